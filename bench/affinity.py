#!/usr/bin/env python3
"""``cpu_affinity = "auto"`` against ``"none"``: milterd's CPU a message and msgs/s.

  .venv/bin/python bench/affinity.py [--count 3000] [--runs 3] [--pf-count 1000]

Two pipelines, each with workers = 1 and 2, affinity ``none`` and ``auto`` in alternating
order every round:

* ``core``: milterd + ``example_header`` (one header added, nothing else);
* ``dkim``: dkim signing (rsa-2048) + 200 scoring rules (bench/workers.py's config).

Over the milter protocol alone (bench/milter_load.py, unix socket, 20 connections; the
client shares the 2 cores) and end to end through a private Postfix (smtp-source, 20
sessions, a new connection per message). Prints a markdown section (medians; the ratio
auto / none per round) and appends JSON lines to bench/out/affinity.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from benchlib import BENCH_DIR, median, tree_cpu
from make_msg import write_message
from postfix_bench import Postfix, Sink
from workers import bench_key, milter_run, postfix_run, run_args, start, work_dir
from workers import config as dkim_config

OUT = BENCH_DIR / "out" / "affinity.jsonl"
PF_PORT, SINK_PORT = 2755, 2756


def core_config(sock: str, workers: int) -> str:
    return (
        f'[milterd]\nsocket = "unix:{sock}"\nsocket_mode = "0666"\nworkers = {workers}\n'
        'log_level = "warning"\nauthserv_id = "mx.bench"\n\n[plugins.example_header]\n'
    )


def main() -> int:
    a = run_args(__doc__)
    base = work_dir("affinity")
    key = bench_key(base)
    msg = write_message(base / "msg.eml", 5000)
    sock = base / "sock" / "milterd.sock"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    cases = [(p, w) for p in ("core", "dkim") for w in (1, 2)]
    for rnd in range(a.runs):
        order = ("none", "auto") if rnd % 2 == 0 else ("auto", "none")
        for pipeline, workers in cases:
            for aff in order:
                text = (
                    core_config(str(sock), workers)
                    if pipeline == "core"
                    else dkim_config(str(sock), workers, key)
                )
                text = text.replace("[milterd]\n", f'[milterd]\ncpu_affinity = "{aff}"\n', 1)
                conf = base / f"{pipeline}-w{workers}-{aff}.toml"
                conf.write_text(text)
                proc = start(conf, sock, workers)
                try:
                    m = milter_run(sock, proc.pid, a.count)
                    row: dict[str, object] = {
                        "bench": "affinity", "round": rnd, "pipeline": pipeline,
                        "workers": workers, "affinity": aff, "rate": m.get("rate"),
                        "cpu_ms": m.get("milter_cpu_ms_per_msg"), "error": m.get("error"),
                    }  # fmt: skip
                    if not a.no_postfix:
                        pf, sink = Postfix(PF_PORT, SINK_PORT), Sink(SINK_PORT)
                        pf.configure(f"unix:{sock}")
                        pf.flush()
                        try:
                            pf.start()
                            postfix_run(pf, sink, msg, 100, 0)  # warm-up
                            cpu0 = tree_cpu(proc.pid)
                            row["pf_rate"] = round(postfix_run(pf, sink, msg, a.pf_count, 100), 1)
                            row["pf_cpu_ms"] = round(
                                1000 * (tree_cpu(proc.pid) - cpu0) / a.pf_count, 3
                            )
                        finally:
                            pf.stop()
                            sink.stop()
                finally:
                    proc.stop()
                rows.append(row)
                with OUT.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), file=sys.stderr)
                time.sleep(0.5)
    print(report(rows, a))
    return 0


def report(rows: list[dict[str, object]], a: argparse.Namespace) -> str:
    out = [
        "## cpu_affinity: auto against none (bench/affinity.py)",
        "",
        f"{a.runs} rounds; milter protocol: {a.count} messages, 20 connections, unix socket; "
        f"Postfix: {a.pf_count} messages, 20 SMTP sessions. Medians; *auto/none* = median of "
        "the per-round ratios of msgs/s.",
        "",
        "| pipeline | workers | affinity | msgs/s (protocol) | CPU ms/msg | auto/none "
        "| msgs/s (Postfix) | CPU ms/msg | auto/none |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def pick(p: str, w: int, aff: str, key: str) -> list[float]:
        return [
            float(r[key])  # type: ignore[arg-type]
            for r in rows
            if (r["pipeline"], r["workers"], r["affinity"]) == (p, w, aff) and r.get(key)
        ]

    def paired(p: str, w: int, key: str) -> str:
        by = {(r["round"], r["affinity"]): r.get(key) for r in rows
              if (r["pipeline"], r["workers"]) == (p, w)}  # fmt: skip
        ratios = [
            float(by[(n, "auto")]) / float(by[(n, "none")])  # type: ignore[arg-type]
            for n in range(a.runs)
            if by.get((n, "auto")) and by.get((n, "none"))
        ]
        return f"{median(ratios):.2f}" if ratios else ""

    def med(v: list[float]) -> str:
        if not v:
            return ""
        m = median(v)
        return f"{m:.0f}" if m >= 100 else f"{m:.3g}"

    for p in ("core", "dkim"):
        for w in (1, 2):
            for aff in ("none", "auto"):
                ratio = aff == "auto"
                out.append(
                    f"| {p} | {w} | {aff} | {med(pick(p, w, aff, 'rate'))} | "
                    f"{med(pick(p, w, aff, 'cpu_ms'))} | {paired(p, w, 'rate') if ratio else ''} "
                    f"| {med(pick(p, w, aff, 'pf_rate'))} | {med(pick(p, w, aff, 'pf_cpu_ms'))} "
                    f"| {paired(p, w, 'pf_rate') if ratio else ''} |"
                )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
