#!/usr/bin/env python3
"""Start-up work done once, before the fork (issue 8): what it costs and what it saves.

  .venv/bin/python bench/startup.py [--rules 3000] [--workers 2] [--runs 3]

milterd runs `dkim` (an rsa-2048 signing key) and `scoring` with ``--rules`` regex rules
(both declare ``prefork = True``), ``--workers`` workers. From milterd's own log lines
(millisecond timestamps) and /proc, per run:

* *prefork startup*: as the supervisor logs it ("prefork start-up ... took N ms"): the key
  loading and rule compilation the supervisor does once (before this change every worker
  did it after the fork, and so did every worker the supervisor restarted);
* *worker ready*: "started worker N" -> "worker N ready" (worker_start only);
* *respawn*: kill -9 of worker 0 -> the new worker 0 "ready";
* memory: RSS and PSS (/proc/PID/smaps_rollup) of each worker after start-up; PSS counts a
  page shared by k processes as 1/k, so workers sharing the compiled rules copy-on-write
  show PSS well under RSS.

Prints a markdown section and writes it to bench/results.d/startup.md.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import time
from datetime import datetime
from pathlib import Path

from benchlib import BENCH_DIR, MILTERD, WORK, Endpoint, Proc, listening, tree_pids, wait_for
from workers import bench_key, config

OUT = BENCH_DIR / "results.d" / "startup.md"
STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def when(log: str, needle: str, after: int = 0) -> tuple[float, int] | None:
    """(timestamp, offset) of the first log line containing ``needle`` after ``after``."""
    i = log.find(needle, after)
    if i < 0:
        return None
    start = log.rfind("\n", 0, i) + 1
    m = STAMP.match(log[start:])
    if m is None:
        return None
    t = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return t, i


def smaps(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Rss:"):
            rss = int(line.split()[1])
        elif line.startswith("Pss:"):
            pss = int(line.split()[1])
    return rss, pss


def one(base: Path, key: Path, rules: int, workers: int, n: int) -> dict[str, float]:
    sock = base / f"s{n}.sock"
    conf = base / f"m{n}.toml"
    conf.write_text(config(str(sock), workers, key, rules, log_level="info"))
    logf = base / f"m{n}.log"
    logf.unlink(missing_ok=True)
    proc = Proc(f"startup-{n}", [MILTERD, "-c", str(conf), "run"], logf)
    try:
        t_spawn = time.monotonic()
        wait_for(lambda: listening(Endpoint("unix", path=str(sock))), 120, "socket", proc)

        def ready_count() -> int:
            return logf.read_text(errors="replace").count(" ready (pid ")

        wait_for(lambda: ready_count() >= workers, 120, "workers ready", proc)
        t_all_ready = time.monotonic() - t_spawn
        log = logf.read_text(errors="replace")
        prefork = re.search(r"prefork start-up \(.*?\) took (\d+) ms", log)
        assert prefork is not None
        ready_ms = []
        for i in range(workers):
            s, r = when(log, f"started worker {i} "), when(log, f"worker {i} ready")
            assert s and r
            ready_ms.append(1000 * (r[0] - s[0]))
        pids = [p for p in tree_pids(proc.pid) if p != proc.pid]
        mem = [smaps(p) for p in pids]
        sup_mem = smaps(proc.pid)
        # respawn: kill worker 0, time its replacement until ready
        victim = int(re.findall(r"worker 0 ready \(pid (\d+)\)", log)[0])
        mark = len(log)
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: "worker 0 ready" in logf.read_text(errors="replace")[mark:], 60, "respawn")
        log2 = logf.read_text(errors="replace")
        died = when(log2, "died: killed by signal 9", mark)
        back = when(log2, "worker 0 ready", mark)
        assert died and back
        return {
            "prefork_ms": float(prefork.group(1)),
            "worker_ready_ms": max(ready_ms),
            "respawn_ms": 1000 * (back[0] - died[0]),
            "all_ready_s": t_all_ready,
            "worker_rss_kib": statistics.mean(m[0] for m in mem),
            "worker_pss_kib": statistics.mean(m[1] for m in mem),
            "supervisor_rss_kib": sup_mem[0],
        }
    finally:
        proc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rules", type=int, default=3000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    base = WORK / "startup"
    base.mkdir(parents=True, exist_ok=True)
    key = bench_key(base)
    rows = [one(base, key, a.rules, a.workers, n) for n in range(a.runs)]

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    text = "\n".join(
        [
            f"## Start-up work once before the fork ({a.rules} scoring rules + an rsa-2048 "
            f"DKIM key, workers = {a.workers})",
            "",
            f"`bench/startup.py`, {a.runs} runs, medians; from milterd's log timestamps and "
            "/proc. Measured " + time.strftime("%Y-%m-%d", time.gmtime()) + ".",
            "",
            "| | median | runs |",
            "|---|---|---|",
            f"| prefork startup in the supervisor (once) | {med('prefork_ms'):.0f} ms | "
            + ", ".join(f"{r['prefork_ms']:.0f}" for r in rows)
            + " |",
            f"| fork -> worker ready (worker_start only) | {med('worker_ready_ms'):.0f} ms | "
            + ", ".join(f"{r['worker_ready_ms']:.0f}" for r in rows)
            + " |",
            f"| kill -9 of a worker -> its replacement ready | {med('respawn_ms'):.0f} ms | "
            + ", ".join(f"{r['respawn_ms']:.0f}" for r in rows)
            + " |",
            f"| worker RSS / PSS | {med('worker_rss_kib') / 1024:.1f} / "
            f"{med('worker_pss_kib') / 1024:.1f} MiB | |",
            f"| supervisor RSS | {med('supervisor_rss_kib') / 1024:.1f} MiB | |",
            "",
            "Before this change each worker ran the prefork startup itself after the fork, so "
            "a restarted worker took the first row's time again before it could answer; now "
            "it inherits the supervisor's compiled rules and loaded keys. PSS below RSS is the "
            "share of each worker's memory it shares copy-on-write with the others.",
        ]
    )
    OUT.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
