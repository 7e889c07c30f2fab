#!/usr/bin/env python3
"""2 workers against 1 with a CPU-heavy plugin set (issue 8's bench).

  .venv/bin/python bench/workers.py [--count 3000] [--runs 3] [--pf-count 1000]

milterd runs `dkim` (signing every message with an rsa-2048 key, OpenSSL) and `scoring`
(200 header and body regex rules, scanning trusted mail too) with workers = 1, then 2,
in alternating rounds:

* over the milter protocol alone: bench/milter_load.py, unix socket, 20 connections;
  the load client shares the 2 cores with milterd;
* end to end through a private Postfix with smtp-source (bench/postfix_bench.py's parts).

Prints a markdown section (medians, min-max, the ratio 2 workers / 1 worker per round)
and appends JSON lines to bench/out/workers.jsonl. Target (issue 8): at least 1.35x over
the milter protocol; the Postfix ratio is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from benchlib import (
    BENCH_DIR,
    MILTERD,
    PYTHON,
    WORK,
    Endpoint,
    Proc,
    env_int,
    listening,
    median,
    tree_pids,
    wait_for,
)
from make_msg import write_message
from postfix_bench import Postfix, Sink, smtp_source

OUT = BENCH_DIR / "out" / "workers.jsonl"


def scoring_rules(n: int) -> str:
    """``n`` cheap but real regex rules over headers and body (none matching the message)."""
    out = []
    for i in range(n):
        kind = "header" if i % 2 else "body"
        where = '\nheader = "Subject"' if kind == "header" else ""
        out.append(
            f'[[plugins.scoring.rules]]\nname = "R{i}"\ntype = "{kind}"{where}\n'
            f'pattern = "(?i)\\\\bzq{i}x+(?:alpha|beta){{2,}}\\\\d"\nscore = 0.1\n'
        )
    return "\n".join(out)


def config(sock: str, workers: int, key: Path, rules: int = 200, log_level: str = "warning") -> str:
    """DKIM rsa signing + ``rules`` scoring rules (bench/startup.py uses it too)."""
    return f"""
[milterd]
socket = "unix:{sock}"
socket_mode = "0666"
workers = {workers}
log_level = "{log_level}"
authserv_id = "mx.bench"

[plugins.dkim]
[plugins.dkim.keys.bench]
selector = "bench"
file = "{key}"
[[plugins.dkim.signing]]
pattern = "example.com"
keys = ["bench"]

[plugins.scoring]
scan_trusted = true
{scoring_rules(rules)}
"""


def start(conf: Path, sock: Path, workers: int) -> Proc:
    if sock.exists():
        sock.unlink()
    proc = Proc(
        f"milterd-w{workers}",
        [MILTERD, "-c", str(conf), "run"],
        WORK / "logs" / f"workers-w{workers}.log",
    )
    ep = Endpoint("unix", path=str(sock))
    wait_for(lambda: listening(ep), 60, "milterd socket", proc)
    wait_for(lambda: len(tree_pids(proc.pid)) >= 1 + workers, 60, "workers", proc)
    time.sleep(1.0)  # workers finish their startup (key loading, rule compilation)
    return proc


def milter_run(sock: Path, pid: int, count: int) -> dict[str, object]:
    out = subprocess.run(
        [PYTHON, str(BENCH_DIR / "milter_load.py"), f"unix:{sock}", "--conns", "20",
         "--count", str(count), "--pid", str(pid)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    line = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else "{}"
    row: dict[str, object] = json.loads(line)
    if out.returncode != 0:
        row["error"] = out.stderr[-500:]
    return row


def postfix_run(pf: Postfix, sink: Sink, msg: Path, count: int, done: int) -> float:
    t0 = time.monotonic()
    rc, _ = smtp_source(pf.port, count, 20, msg, 300)
    if rc != 0 or not sink.wait_for(done + count, 300):
        return 0.0
    return count / (sink.t_reached - t0)


def run_args(doc: str | None) -> argparse.Namespace:
    """The command line shared with bench/affinity.py: --count (milter protocol messages),
    --pf-count (Postfix messages), --runs, --no-postfix; defaults from the environment."""
    ap = argparse.ArgumentParser(description=(doc or "").splitlines()[0])
    ap.add_argument("--count", type=int, default=env_int("COUNT", 3000))
    ap.add_argument("--pf-count", type=int, default=env_int("PF_COUNT", 1000))
    ap.add_argument("--runs", type=int, default=env_int("RUNS", 3))
    ap.add_argument("--no-postfix", action="store_true")
    return ap.parse_args()


def work_dir(name: str) -> Path:
    """WORK/NAME with a ``sock`` directory for the socket, and WORK/logs: mode 0755, where
    Postfix's smtpd (user postfix) can reach the socket."""
    base = WORK / name
    (base / "sock").mkdir(parents=True, exist_ok=True)
    (WORK / "logs").mkdir(parents=True, exist_ok=True)
    for d in (WORK, base, base / "sock"):
        d.chmod(0o755)
    return base


def bench_key(base: Path) -> Path:
    """BASE/bench.rsa.key: an rsa-2048 key for example.com, selector ``bench``, made with
    ``milterd dkim keygen`` the first time."""
    key = base / "bench.rsa.key"
    if not key.exists():
        subprocess.run(
            [MILTERD, "dkim", "keygen", "--domain", "example.com", "--selector", "bench",
             "--out", str(base)],
            check=True, capture_output=True,
        )  # fmt: skip
        next(p for p in base.glob("bench*.key") if p != key).rename(key)
    return key


def main() -> int:
    a = run_args(__doc__)
    base = work_dir("workers")
    key = bench_key(base)
    msg = write_message(base / "msg.eml")
    sock = base / "sock" / "milterd.sock"
    results: dict[int, list[dict[str, object]]] = {1: [], 2: []}
    pf_rates: dict[int, list[float]] = {1: [], 2: []}
    for rnd in range(a.runs):
        for workers in (1, 2) if rnd % 2 == 0 else (2, 1):
            conf = base / f"w{workers}.toml"
            conf.write_text(config(str(sock), workers, key))
            proc = start(conf, sock, workers)
            try:
                milter_run(sock, proc.pid, 300)  # warm-up
                row = milter_run(sock, proc.pid, a.count)
                row.update(kind="workers-milter", workers=workers, round=rnd)
                results[workers].append(row)
                if not a.no_postfix:
                    pf = Postfix(env_int("PF_PORT", 2735), env_int("SINK_PORT", 2736))
                    pf.configure(f"unix:{sock}")
                    sink = Sink(pf.sink_port)
                    pf.start()
                    try:
                        postfix_run(pf, sink, msg, 100, 0)  # warm-up
                        rate = postfix_run(pf, sink, msg, a.pf_count, 100)
                    finally:
                        pf.stop()
                        sink.stop()
                    pf_rates[workers].append(rate)
                    row["postfix_rate"] = rate
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"round {rnd} workers={workers}: {row.get('rate')} msgs/s milter, "
                    f"{row.get('postfix_rate', '-')} through Postfix",
                    file=sys.stderr,
                )
            finally:
                proc.stop()
    rates = {w: [float(str(r.get("rate", 0))) for r in rows] for w, rows in results.items()}
    ratios = [b / a_ for a_, b in zip(rates[1], rates[2], strict=True) if a_]
    print("\n## Workers: 2 against 1, CPU-heavy plugins (DKIM rsa-2048 signing + 200 rules)\n")
    print(
        f"`bench/workers.py`, {a.runs} rounds, alternating order; {a.count} messages over the "
        "milter protocol (20 connections, unix socket; the load client shares the 2 cores)"
        + ("" if a.no_postfix else f", {a.pf_count} through Postfix (smtp-source, 20 sessions)")
        + ".\n"
    )
    print("| | 1 worker msgs/s | 2 workers msgs/s | 2 / 1 (median of per-round ratios) |")
    print("|---|---|---|---|")
    print(
        f"| milter protocol | {median(rates[1]):.0f} ({min(rates[1]):.0f}-{max(rates[1]):.0f}) | "
        f"{median(rates[2]):.0f} ({min(rates[2]):.0f}-{max(rates[2]):.0f}) | "
        f"**{median(ratios):.2f}** (per round {', '.join(f'{r:.2f}' for r in ratios)}) |"
    )
    if not a.no_postfix:
        pr = [b / a_ for a_, b in zip(pf_rates[1], pf_rates[2], strict=True) if a_]
        print(
            f"| through Postfix | {median(pf_rates[1]):.0f} | {median(pf_rates[2]):.0f} | "
            f"**{median(pr):.2f}** (per round {', '.join(f'{r:.2f}' for r in pr)}) |"
        )
    verdict = "MET" if median(ratios) >= 1.35 else "NOT MET"
    print(f"\nTarget: 2 workers >= 1.35 x 1 worker over the milter protocol: **{verdict}**.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
