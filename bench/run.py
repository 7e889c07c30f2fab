#!/usr/bin/env python3
"""Run milterd's benchmarks and regenerate bench/RESULTS.md.

  run.py [postfix] [milter] [memory]     (default: all three, in that order)
  run.py --report                        (only rebuild RESULTS.md from bench/out/)

Sections:
  postfix  end to end: smtp-source -> Postfix + milter -> smtp-sink (postfix_bench.py)
  milter   milter protocol only: milter_load.py against each milter, no MTA
  memory   milterd's RSS (supervisor + workers) over MEM_COUNT messages (milter_load.py)

Raw results: one JSON line per measurement in bench/out/run-<UTC time>.jsonl (gitignored).
RESULTS.md is rebuilt from the newest file holding each section, so running one section
refreshes it and keeps the others. Knobs: see bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchlib import (
    BENCH_DIR,
    HEADER_NAME,
    OTHER_MAX,
    PYTHON,
    QUIET_MAX,
    QUIET_WAIT,
    REPO,
    RETRIES,
    TARGETS,
    WORK,
    Milter,
    Target,
    disturbed,
    env_float,
    env_int,
    idle_check,
    log,
    median,
    milters,
    retry_disturbed,
    targets_from_env,
    tree_rss,
    wait_quiet,
)
from postfix_bench import DEFAULT_TARGETS as PF_DEFAULT_TARGETS
from postfix_bench import POSTCONF, PostfixBench

OUT = BENCH_DIR / "out"
RESULTS = BENCH_DIR / "RESULTS.md"
MILTER_DEFAULT_TARGETS = (
    "bare-unix bare-tcp milterd-w1-unix milterd-w1-tcp milterd-w2-unix milterd-w2-tcp "
    "bare-unix-envelope"
)
MEM_DEFAULT_TARGETS = "milterd-w1-unix bare-unix"
SECTIONS = ("postfix", "milter", "memory")
TARGET_RATIO = 0.95  # milterd >= 95 % of the bare pymilter milter's msgs/s through Postfix
TARGET_RSS_GROWTH = 10.0  # % over MEM_COUNT messages, after warm-up

Row = dict[str, Any]
Emit = Callable[[Row], None]


# ---- facts ----------------------------------------------------------------------------


def _cmd(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def machine_facts() -> Row:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem_kb = int(f.readline().split()[1])
    os_name = "?"
    with contextlib.suppress(OSError), open("/etc/os-release") as f:
        for line in f:
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip().strip('"')
    import milter

    lm = milter.getversion()

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    dirty = _cmd(["git", "-C", str(REPO), "status", "--porcelain", "--", "milterd", "plugins",
                  "examples"])  # fmt: skip
    queue = Path(os.environ.get("PF_QUEUE") or WORK / "postfix")
    queue.mkdir(parents=True, exist_ok=True)
    return {
        "section": "facts",
        "date_utc": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(mem_kb / 2**20, 1),
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": _cmd([POSTCONF, "-d", "-h", "mail_version"]),
        "pymilter": version("pymilter"),
        "libmilter": ".".join(str(x) for x in lm) if isinstance(lm, tuple) else str(lm),
        "milterd": version("milterd"),
        "milterd_commit": _cmd(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
        + (" (+ uncommitted changes)" if dirty and dirty != "?" else ""),
        "example_plugin": version("milterd-example-header"),
        "queue_fs": _cmd(["df", "--output=fstype", str(queue)]).splitlines()[-1:],
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
    }


# ---- milter protocol section ----------------------------------------------------------


def load(spec: str, count: int, conns: int, duration: float, extra: list[str]) -> Row:
    """Run milter_load.py once (its own process, like an MTA would be); its JSON line."""
    msg_timeout = 30.0
    argv = [PYTHON, str(BENCH_DIR / "milter_load.py"), spec, "--count", str(count),
            "--conns", str(conns), "--duration", str(duration),
            "--msg", str(WORK / "msg.eml"), "--msg-timeout", str(msg_timeout), *extra]  # fmt: skip
    r = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + msg_timeout + 60, check=False
    )
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        raise RuntimeError(f"milter_load.py printed no result (exit {r.returncode}): {r.stderr}")
    row: Row = json.loads(lines[-1])
    if r.stderr.strip():
        row["stderr"] = r.stderr.strip()[-500:]
    return row


def check_load(row: Row, n_expected: int | None = None) -> list[str]:
    """Problems with a load result: errors, non-accept verdicts, a message without the
    header."""
    n = row["messages"]
    problems = []
    if row["errors"]:
        problems.append(f"{row['errors']} connection errors {row['error_kinds']}")
    if row["results"].get("accept", 0) != n:
        problems.append(f"results {row['results']}, expected {n} accept")
    if row.get("expect_hits") is not None and row["expect_hits"] != n:
        problems.append(f"{HEADER_NAME} added to {row['expect_hits']} of {n} messages")
    if n_expected is not None and n != n_expected:
        problems.append(f"{n} of {n_expected} messages done ({row['stopped_by']})")
    return problems


def milter_section(emit: Emit) -> None:
    targets = targets_from_env("MILTER_TARGETS", MILTER_DEFAULT_TARGETS)
    runs, count, conns = env_int("RUNS", 3), env_int("MILTER_COUNT", 5000), env_int("CONNS", 20)
    duration = env_float("MILTER_DURATION", 120.0)
    warm = env_int("MILTER_WARMUP", 500)
    log(f"milter section: {len(targets)} targets x {runs} runs x {count} messages, {conns} conns")
    emit({"section": "milter", "kind": "idle", "busy_pct": idle_check()})
    with milters(targets) as running:
        ok: list[Target] = []
        for t in targets:
            m = running[t.name]
            row = load(m.endpoint.milter_spec, warm, conns, duration,
                       ["--expect-header", HEADER_NAME])  # fmt: skip
            problems = check_load(row, warm)
            emit({"section": "milter", "kind": "verify", "target": t.name, "ok": not problems,
                  "problems": problems, "negotiated": row["negotiated"]})  # fmt: skip
            if problems:
                log(f"{t.name}: verification FAILED, not measured: {problems}")
            else:
                ok.append(t)
        for rnd in range(runs):
            order = ok[rnd % len(ok) :] + ok[: rnd % len(ok)] if ok else []
            for t in order:
                m = running[t.name]
                for attempt in range(1 + RETRIES):
                    quiet = wait_quiet()
                    row = load(m.endpoint.milter_spec, count, conns, duration,
                               ["--pid", str(m.pid), "--expect-header", HEADER_NAME,
                                "--label", t.name])  # fmt: skip
                    row.update(section="milter", kind="run", target=t.name, round=rnd,
                               attempt=attempt, busy_before_pct=quiet,
                               disturbed=disturbed(row.get("other_busy_pct")))  # fmt: skip
                    row["problems"] = check_load(row, count)
                    log(
                        f"milter round {rnd + 1}/{runs} {t.name}: {row['rate']} msgs/s, "
                        f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms"
                        + (f" PROBLEMS {row['problems']}" if row["problems"] else "")
                        + (
                            f" DISTURBED (other {row['other_busy_pct']} %)"
                            if row["disturbed"]
                            else ""
                        )
                    )
                    emit(row)
                    if not retry_disturbed(row):
                        break


# ---- memory section -------------------------------------------------------------------


def memory_section(emit: Emit) -> None:
    targets = targets_from_env("MEM_TARGETS", MEM_DEFAULT_TARGETS)
    total = env_int("MEM_COUNT", 100_000)
    warm = min(env_int("MEM_WARMUP", 10_000), total)
    conns = env_int("CONNS", 20)
    budget = env_float("MEM_DURATION", 600.0)  # seconds per target, warm-up included
    every = max(1, env_int("MEM_SAMPLE_EVERY", 10_000))
    log(f"memory section: {total} messages per target (warm-up {warm}), budget {budget:g}s")
    emit({"section": "memory", "kind": "idle", "busy_pct": idle_check()})
    for t in targets:
        m = Milter(t, instance="mem")
        try:
            time.sleep(1.0)
            rss_start = tree_rss(m.pid)
            t0 = time.monotonic()
            first = load(m.endpoint.milter_spec, warm, conns, budget, ["--pid", str(m.pid)])
            time.sleep(1.0)  # let libmilter's connection threads finish and exit
            rss_warm = tree_rss(m.pid)
            left = max(1.0, budget - (time.monotonic() - t0))
            second = load(m.endpoint.milter_spec, max(1, total - warm), conns, left,
                          ["--pid", str(m.pid), "--rss-pid", str(m.pid),
                           "--rss-every", str(every)])  # fmt: skip
            time.sleep(1.0)
            rss_end = tree_rss(m.pid)
            elapsed = time.monotonic() - t0
        finally:
            m.stop()
        done = first["messages"] + second["messages"]
        problems = check_load(first) + check_load(second)
        if done < total:
            problems.append(f"only {done} of {total} messages in the {budget:g}s budget")
        samples = [
            {"after": 0, "rss_kb": sum(rss_start.values())},
            {"after": first["messages"], "rss_kb": sum(rss_warm.values()), "idle": True},
        ]
        samples += [
            {"after": first["messages"] + s["after"], "rss_kb": s["rss_kb"]}
            for s in second["rss_samples"]
        ]
        samples.append({"after": done, "rss_kb": sum(rss_end.values()), "idle": True})  # fmt: skip
        w, e = sum(rss_warm.values()), sum(rss_end.values())
        row = {
            "section": "memory",
            "kind": "run",
            "target": t.name,
            "messages": done,
            "warmup": first["messages"],
            "elapsed_s": round(elapsed, 1),
            "rate": second["rate"],
            "rss_start_kb": sum(rss_start.values()),
            "rss_warm_kb": w,
            "rss_end_kb": e,
            "growth_pct": round(100 * (e - w) / w, 2) if w else None,
            "per_pid_warm_kb": {str(k): v for k, v in rss_warm.items()},
            "per_pid_end_kb": {str(k): v for k, v in rss_end.items()},
            "processes": len(rss_end),
            "samples": samples,
            "problems": problems,
        }
        log(
            f"memory {t.name}: {done} messages, RSS {sum(rss_start.values())} -> {w} -> {e} kB "
            f"({row['growth_pct']}% after warm-up)"
        )
        emit(row)


# ---- RESULTS.md -----------------------------------------------------------------------


def _rows(path: Path) -> list[Row]:
    out = []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
    return out


def newest_per_section() -> dict[str, tuple[Path, list[Row]]]:
    """For each section, (file, rows of that file) of the newest run file that has it."""
    found: dict[str, tuple[Path, list[Row]]] = {}
    for path in sorted(OUT.glob("run-*.jsonl"), reverse=True):
        rows = _rows(path)
        for s in ("facts", *SECTIONS):
            if s not in found and any(
                r.get("section") == s and r.get("kind", "run") == "run" for r in rows
            ):
                found[s] = (path, rows)
    return found


def fmt(x: float | None, digits: int = 0) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:,.{digits}f}"


def ratio(x: float | None, base: float | None) -> str:
    if x is None or base is None or not base or math.isnan(x) or math.isnan(base):
        return "-"
    return f"{x / base:.2f}"


def cell(x: float | None, base: float | None, digits: int = 0) -> str:
    """'value (xratio)' against the baseline; the baseline row itself gets just its value."""
    if base is None:
        return fmt(x, digits)
    return f"{fmt(x, digits)} (x{ratio(x, base)})"


def _runs(rows: list[Row], section: str) -> dict[str, list[Row]]:
    out: dict[str, list[Row]] = {}
    for r in rows:
        if r.get("section") == section and r.get("kind") == "run":
            out.setdefault(r["target"], []).append(r)
    return out


def _med(rs: list[Row], key: Callable[[Row], float | None]) -> float | None:
    vals = [v for v in (key(r) for r in rs) if v is not None]
    return median(vals) if vals else None


def _range(rs: list[Row], key: Callable[[Row], float | None]) -> str:
    vals = [v for v in (key(r) for r in rs) if v is not None]
    return f"{fmt(min(vals))}-{fmt(max(vals))}" if vals else "-"


def _paired(runs: dict[str, list[Row]], a: str, b: str, key: str) -> list[float]:
    """Per-round ratios a/b (each round ran every target once, back to back)."""
    ra: dict[int, float] = {r["round"]: r[key] for r in runs.get(a, []) if r.get(key)}
    rb: dict[int, float] = {r["round"]: r[key] for r in runs.get(b, []) if r.get(key)}
    return [ra[k] / rb[k] for k in sorted(ra) if k in rb]


def verdict(ok: bool | None) -> str:
    return "**MET**" if ok else ("**NOT MET**" if ok is False else "**not measured**")


def _idle(rows: list[Row], section: str) -> str:
    vals = [r["busy_pct"] for r in rows if r.get("section") == section and r.get("kind") == "idle"]
    return f"{vals[-1]:g} %" if vals else "?"


LATENCY_BOUND_BUSY = 160.0  # machine busy % below which a Postfix run was not CPU-bound


MIN_CLEAN = 3  # with at least this many undisturbed runs, only those count


def _usable(rs: list[Row], bad_key: str) -> list[Row]:
    """The runs that count. Failed runs never do. If the target has MIN_CLEAN or more
    undisturbed runs, exactly those; otherwise one run per round: its undisturbed attempt,
    or else (every attempt disturbed by other load on the machine) the least disturbed."""
    ok = [r for r in rs if not r.get(bad_key)]
    clean = [r for r in ok if not r.get("disturbed")]
    if len(clean) >= MIN_CLEAN:
        return sorted(clean, key=lambda r: r.get("round", 0))
    by_round: dict[int, list[Row]] = {}
    for r in ok:
        by_round.setdefault(r.get("round", 0), []).append(r)
    out = []
    for rnd in sorted(by_round):
        cands = by_round[rnd]
        clean = [r for r in cands if not r.get("disturbed")]
        out.append(clean[0] if clean else min(cands, key=lambda r: r.get("other_busy_pct") or 0))
    return out


def _runs_cell(used: list[Row], measured: list[Row]) -> str:
    clean = sum(1 for r in used if not r.get("disturbed"))
    return f"{len(used)} ({clean} clean) of {len(measured)}"


def _order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: list(TARGETS).index(n))


def _guard(rows: list[Row]) -> Row:
    """The disturbance settings the run used (today's defaults for older files)."""
    for r in rows:
        if r.get("section") == "config" and "guard" in r:
            g: Row = r["guard"]
            return g
    return {"quiet_max": QUIET_MAX, "quiet_wait": QUIET_WAIT, "other_max": OTHER_MAX,
            "retries": RETRIES}  # fmt: skip


def _total_cpu(r: Row) -> float | None:
    """CPU ms per message of everything the Postfix run accounts for."""
    c = r.get("cpu_ms_per_msg")
    return sum(c.values()) if c else None


def postfix_report(path: Path, rows: list[Row]) -> tuple[list[str], dict[str, bool | None], Row]:
    g = _guard(rows)
    runs = _runs(rows, "postfix")
    ok_runs = {t: _usable(rs, "errors") for t, rs in runs.items()}
    errored = {t: n for t, rs in runs.items() if (n := sum(1 for r in rs if r.get("errors")))}
    disturbed_n = sum(1 for rs in runs.values() for r in rs if r.get("disturbed"))
    verifies = [r for r in rows if r.get("section") == "postfix" and r.get("kind") == "verify"]
    first = next(iter(runs.values()), [{}])[0]
    e2e: dict[str, float | None] = {
        t: _med(rs, lambda r: r.get("e2e_rate")) for t, rs in ok_runs.items()
    }
    busy: dict[str, float | None] = {
        t: _med(rs, lambda r: r.get("machine_busy_pct")) for t, rs in ok_runs.items()
    }
    nrounds = max((r["round"] + 1 for rs in runs.values() for r in rs), default=0)
    out = [
        "## A. End to end through Postfix",
        "",
        f"`smtp-source -s {first.get('sessions', '?')} -m {first.get('count', '?')}` (a new SMTP "
        "connection per message, 5 KB message) -> private Postfix on 127.0.0.1 "
        "(`smtpd_milters` = the milter, `milter_default_action = tempfail`, queue on disk) -> "
        "`smtp-sink`. *e2e msgs/s* = messages / (smtp-source start until smtp-sink has all of "
        "them), the headline; *accept* = until smtp-source is done (all queued). "
        f"{nrounds} rounds, each target once per round (order rotated each round); median "
        "and min-max of the counted runs. CPU ms/msg from /proc (Postfix = master and every "
        "child, exited ones included); 2 cores = 2000 CPU-ms per second. Machine busy before "
        f"the section, nothing of ours running: {_idle(rows, 'postfix')}. "
        f"Source: `bench/out/{path.name}`.",
        "",
        "(xR) = the figure / the same figure of the row's baseline in this run: Postfix "
        "alone for the bare pymilter rows, the bare pymilter milter on the same socket "
        "family for milterd rows.",
        "",
        "| configuration | e2e msgs/s | min-max | / Postfix alone | / bare pymilter | "
        "accept msgs/s | Postfix CPU ms/msg | milter CPU ms/msg | all CPU ms/msg | "
        "machine busy % | runs | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _order(list(ok_runs)):
        rs = ok_runs[name]
        if not rs:
            continue
        t = TARGETS[name]
        base = "none" if t.kind == "bare" else (t.baseline if t.kind == "milterd" else None)
        brs = ok_runs.get(base, []) if base else []

        def b(key: Callable[[Row], float | None], brs: list[Row] = brs) -> float | None:
            return _med(brs, key) if brs else None

        def cpu(part: str) -> Callable[[Row], float | None]:
            return lambda r: r.get("cpu_ms_per_msg", {}).get(part)

        def acc(r: Row) -> float | None:
            return r.get("accept_rate")

        milter_cpu = (
            cell(_med(rs, cpu("milter")), b(cpu("milter")) if t.kind == "milterd" else None, 2)
            if t.kind != "none"
            else "-"
        )
        notes = []
        if t.args:
            notes.append("experiment, not a baseline")
        if (busy[name] or 0) < LATENCY_BOUND_BUSY:
            notes.append("latency-bound (CPU not saturated)")
        out.append(
            "| "
            + " | ".join(
                [
                    t.describe(),
                    f"**{fmt(e2e[name])}**",
                    _range(rs, lambda r: r.get("e2e_rate")),
                    ratio(e2e[name], e2e.get("none")),
                    ratio(e2e[name], e2e.get(t.baseline)) if t.kind == "milterd" or t.args else "-",
                    cell(_med(rs, acc), b(acc)),
                    cell(_med(rs, cpu("postfix")), b(cpu("postfix")), 2),
                    milter_cpu,
                    cell(_med(rs, _total_cpu), b(_total_cpu), 2),
                    fmt(busy[name]),
                    _runs_cell(rs, runs[name]),
                    "; ".join(notes),
                ]
            )
            + " |"
        )
    out.append("")
    targets: dict[str, bool | None] = {}
    detail: Row = {}
    for fam, label in (("unix", "unix socket"), ("tcp", "TCP")):
        m, bare = f"milterd-w1-{fam}", f"bare-{fam}"
        rm, rb = e2e.get(m), e2e.get(bare)
        pairs = _paired(ok_runs, m, bare, "e2e_rate")
        cm, cb = _med(ok_runs.get(m, []), _total_cpu), _med(ok_runs.get(bare, []), _total_cpu)
        est = cb / cm if cm and cb else None
        clean = sum(1 for r in ok_runs.get(m, []) + ok_runs.get(bare, []) if not r.get("disturbed"))
        counted = len(ok_runs.get(m, [])) + len(ok_runs.get(bare, []))
        # the weaker of the two targets decides whether the comparison is conclusive
        weak = min(
            (
                (
                    sum(1 for r in ok_runs.get(n, []) if not r.get("disturbed")),
                    len(ok_runs.get(n, [])),
                    n,
                )
                for n in (m, bare)
            ),
            key=lambda x: x[0] / x[1] if x[1] else 0.0,
        )
        if rm and rb:
            targets[fam] = rm / rb >= TARGET_RATIO
            pm = median(pairs) if pairs else None
            detail[fam] = (rm / rb, pairs, est, clean, counted, pm, weak)
            out.append(
                f"- milterd (workers=1) / bare pymilter, {label}: **{rm / rb:.3f}** (medians); "
                f"paired per round (rounds where both counted): "
                f"{', '.join(f'{p:.3f}' for p in pairs) or '-'}. "
                f"{clean} of the {counted} counted runs of the two were clean. CPU-based "
                f"estimate (bare's all-CPU ms/msg / milterd's: what the ratio would be on a "
                f"CPU-bound machine, and far less sensitive to other load): "
                + (f"**{est:.3f}**." if est else "-.")
            )
        else:
            targets[fam] = None

    def clean_busy(n: str) -> float | None:
        vals = [r["machine_busy_pct"] for r in ok_runs.get(n, []) if not r.get("disturbed")]
        return median(vals) if vals else busy.get(n)

    tcp_names: tuple[str, ...] = ("bare-tcp", "milterd-w1-tcp", "bare-tcp-replydata")
    tcp_rows: list[str] = [n for n in tcp_names if n in ok_runs]
    if tcp_rows:
        fix = e2e.get("bare-tcp-replydata")
        stalled: list[str] = [n for n in tcp_rows if (clean_busy(n) or 0) < LATENCY_BOUND_BUSY]
        free: list[str] = [n for n in tcp_rows if n not in stalled]

        def names(ns: list[str]) -> str:
            return ", ".join(f"{n} ({fmt(clean_busy(n))} % busy)" for n in ns) or "none"

        out.append(
            "- **Postfix's TCP stall.** Over TCP, Postfix leaves Nagle on for its milter "
            "sockets. Its smtpd sends the envelope macros (sent even for steps the milter "
            "negotiated away) and any no-reply envelope events, then hands the socket to "
            "cleanup, whose end-of-message write waits behind Nagle until the milter's delayed "
            "ACK (~40 ms) of that unanswered data. TCP_NODELAY on the milter's side cannot help "
            "(it governs the other direction). With 20 SMTP sessions a stalled pipeline is "
            "capped near 20 / 0.045 s = ~440 msgs/s with the CPU not saturated. A milter that "
            "asks for a reply to DATA, the last step smtpd sends, turns the stall into one "
            "round trip (`bare-tcp-replydata`"
            + (
                f": {fmt(fix)} msgs/s, x{ratio(fix, e2e.get('bare-tcp'))} the plain bare milter"
                if fix
                else ""
            )
            + "). Latency-bound here (median busy of undisturbed runs < "
            f"{LATENCY_BOUND_BUSY:g} %): {names(stalled)}; CPU-bound: {names(free)}. "
            "Where milterd answers DATA on TCP and the plain bare milter does not, the TCP "
            "target compares a stalled baseline with an unstalled milterd; the like-for-like "
            "line below compares milterd with the bare milter that answers DATA too."
        )
        like = e2e.get("milterd-w1-tcp")
        if like and fix and "milterd-w1-tcp" in stalled:
            out.append(
                "- Like for like on TCP: not computed: milterd was itself stalled in this run "
                "(it did not answer DATA), so its TCP row measures the stall, like bare-tcp."
            )
        elif like and fix:
            cm = _med(ok_runs.get("milterd-w1-tcp", []), _total_cpu)
            cb = _med(ok_runs.get("bare-tcp-replydata", []), _total_cpu)
            detail["tcp-like"] = (like / fix, cb / cm if cm and cb else None)
            out.append(
                f"- Like for like on TCP (information, not a target): milterd (workers=1) / "
                f"bare milter answering DATA: **{like / fix:.3f}** (medians)"
                + (f"; CPU-based estimate {cb / cm:.3f}." if cm and cb else ".")
            )
    vfail = [v for v in verifies if not v.get("ok")]
    out.append(
        "- Checked before the runs: 3 messages per configuration dumped by smtp-sink, "
        f"`{HEADER_NAME}` present exactly once with a milter, absent without, body intact: "
        + (
            "all passed."
            if verifies and not vfail
            else f"FAILED for {[v['target'] for v in vfail]}."
        )
    )
    out.append(
        "- Every counted run: Postfix logged `status=sent` for each message, no milter "
        "warning, smtp-sink received all"
        + ("." if not errored else f"; runs left out for errors: {errored}.")
    )
    out.append(
        f"- *runs* = runs counted (of them clean) of runs measured. With {MIN_CLEAN} or more "
        "undisturbed runs a target counts only those; otherwise one run per round. Before "
        "each run the "
        f"harness waits (up to {g['quiet_wait']:g} s) for the machine to be below "
        f"{g['quiet_max']:g} % busy; a run whose *other load* (machine busy minus the CPU of "
        f"Postfix, milter, smtp-source and smtp-sink) exceeds {g['other_max']:g} % was "
        "disturbed by something else on this shared machine and is re-run (up to "
        f"{g['retries']} times while the time budget lasts); in the per-round fallback a "
        "round counts its clean run, or if every attempt was disturbed, the least disturbed. "
        f"Disturbed attempts in this section: {disturbed_n}; every attempt is in the raw file."
    )
    out.append("")
    return out, targets, detail


def milter_report(path: Path, rows: list[Row]) -> list[str]:
    g = _guard(rows)
    runs = _runs(rows, "milter")
    verifies = {
        r["target"]: r for r in rows if r.get("section") == "milter" and r.get("kind") == "verify"
    }
    first = next(iter(runs.values()), [{}])[0]
    nrounds = max((r["round"] + 1 for rs in runs.values() for r in rs), default=0)
    out = [
        "## B. Milter protocol only (no MTA)",
        "",
        f"`milter_load.py --conns {first.get('conns', '?')} --count {first.get('count', '?')}`: "
        "an asyncio client playing Postfix (protocol v6, one milter connection per message, "
        "steps the milter negotiated away skipped, no-reply steps not waited for), same 5 KB "
        f"message. {nrounds} rounds, targets in rotated order; median, min-max. Latency = "
        "connect to the final EOM reply. The client shares the 2 cores with the milter. "
        f"Machine busy before the section: {_idle(rows, 'milter')}. "
        f"Source: `bench/out/{path.name}`.",
        "",
        "(xR) = the figure / the same figure of the bare pymilter milter on the same socket "
        "family in this run.",
        "",
        "| target | msgs/s | min-max | p50 ms | p99 ms | milter CPU ms/msg | client CPU ms/msg | "
        "runs | header added |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in _order(list(runs)):
        rs = runs[name]
        t = TARGETS[name]
        good = _usable(rs, "problems")
        compared = t.kind == "milterd" or bool(t.args)  # experiments: against the baseline too
        brs = _usable(runs.get(t.baseline, []), "problems") if compared else []

        def col(key: str, digits: int = 0, good: list[Row] = good, brs: list[Row] = brs) -> str:
            v = _med(good, lambda row: row.get(key))
            base = _med(brs, lambda row: row.get(key)) if brs else None
            return cell(v, base, digits)

        hits = sum(r.get("expect_hits") or 0 for r in rs)
        msgs = sum(r.get("messages") or 0 for r in rs)
        out.append(
            f"| {t.describe()}{' (experiment)' if t.args else ''} | **{col('rate')}** | "
            f"{_range(good, lambda r: r.get('rate'))} | "
            f"{col('p50_ms', 1)} | {col('p99_ms', 1)} | {col('milter_cpu_ms_per_msg', 3)} | "
            f"{col('client_cpu_ms_per_msg', 3)} | {_runs_cell(good, rs)} | {hits}/{msgs} |"
        )
    out.append("")
    ndist = sum(1 for rs in runs.values() for r in rs if r.get("disturbed"))
    out.append(
        "*runs* = runs counted (of them clean) of runs measured; as in A, a run with more "
        f"than {g['other_max']:g} % other load (machine busy minus milter and client CPU) is "
        f"re-run and left out when {MIN_CLEAN} or more clean runs remain. "
        f"Disturbed attempts in this section: {ndist}."
    )
    out.append("")
    if "bare-unix-envelope" in runs:
        out.append(
            "The experiment row is the bare milter also taking CONNECT, HELO, MAIL and RCPT "
            "without reply, as milterd's core asks: the same callbacks per message as "
            "milterd, so the gap between it and milterd is milterd's own work (its Python "
            "per message, and the GIL contention that work causes among libmilter's "
            "connection threads), not the protocol."
        )
        out.append("")
    out.append("What each milter negotiated (from the OPTNEG reply; steps the client then sent):")
    out.append("")
    groups: dict[str, list[str]] = {}
    for name, v in verifies.items():
        t = TARGETS[name]
        key = t.kind + " ".join(t.args) + json.dumps(v.get("negotiated", {}), sort_keys=True)
        groups.setdefault(key, []).append(name)
    for members in groups.values():
        v = verifies[members[0]]
        t = TARGETS[members[0]]
        n = v.get("negotiated", {})
        sym = "; ".join(f"{k}: {m}" for k, m in n.get("symlists", {}).items()) or "none"
        label = "milterd" if t.kind == "milterd" else "bare pymilter " + " ".join(t.args)
        out.append(
            f"- {label.strip()} ({', '.join(members)}): actions "
            f"{', '.join(n.get('actions', [])) or 'none'}; steps "
            f"{' -> '.join(n.get('steps', []))}; macros requested: {sym}."
        )
    problems = [
        (r["target"], r["round"], r["problems"])
        for rs in runs.values()
        for r in rs
        if r.get("problems")
    ]
    bad_verify = [t for t, v in verifies.items() if not v.get("ok")]
    out.append(
        "- Every message of every counted run ended `accept` with the header added "
        "(checked, column *header added*)"
        + (f"; runs with problems, left out: {problems}" if problems else "")
        + (f"; verification failed for {bad_verify}" if bad_verify else "")
        + "."
    )
    out.append("")
    return out


def memory_report(path: Path, rows: list[Row]) -> tuple[list[str], bool | None, float | None, int]:
    runs = {r["target"]: r for r in rows if r.get("section") == "memory" and r.get("kind") == "run"}
    base = runs.get("bare-unix")
    out = [
        "## C. Memory: RSS over a long run",
        "",
        "`milter_load.py` (milter protocol, 20 connections, one per message) against a fresh "
        "daemon; RSS = sum of VmRSS (/proc/PID/status) of the process tree (milterd: supervisor "
        "+ worker). Sampled idle after start, idle after the warm-up, under load every "
        "10,000 messages, and idle at the end; growth = end / after warm-up - 1. "
        f"Source: `bench/out/{path.name}`.",
        "",
        "| target | messages | RSS after start | after warm-up | at end | growth after warm-up | "
        "msgs/s |",
        "|---|---|---|---|---|---|---|",
    ]
    milterd_growth: float | None = None
    milterd_msgs = 0
    for name, r in runs.items():
        t = TARGETS[name]
        b = base if t.kind == "milterd" and base else None
        out.append(
            f"| {t.describe()} | {fmt(r['messages'])} (warm-up {fmt(r['warmup'])}) | "
            f"{cell(r['rss_start_kb'] / 1024, b['rss_start_kb'] / 1024 if b else None, 1)} MiB | "
            f"{cell(r['rss_warm_kb'] / 1024, b['rss_warm_kb'] / 1024 if b else None, 1)} MiB | "
            f"{cell(r['rss_end_kb'] / 1024, b['rss_end_kb'] / 1024 if b else None, 1)} MiB | "
            f"**{r['growth_pct']:+.2f} %**"
            + (f" (bare: {b['growth_pct']:+.2f} %)" if b else "")
            + f" | {cell(r['rate'], b['rate'] if b else None)} |"
        )
        if t.kind == "milterd" and milterd_growth is None:
            milterd_growth, milterd_msgs = r["growth_pct"], r["messages"]
    out.append("")
    for name, r in runs.items():
        pts = ", ".join(
            f"{s['after'] // 1000}k: {s['rss_kb'] / 1024:.1f}" + ("*" if s.get("idle") else "")
            for s in r["samples"]
        )
        out.append(f"- {name} RSS in MiB after N messages (* = idle): {pts}")
        if r.get("problems"):
            out.append(f"  - problems: {r['problems']}")
    out.append("")
    met = None if milterd_growth is None else milterd_growth < TARGET_RSS_GROWTH
    return out, met, milterd_growth, milterd_msgs


#: RESULTS.md headings that write_results builds from bench/out/run-*.jsonl itself.
CORE_HEADINGS = ("## Targets", "## Machine", "## A. ", "## B. ", "## C. ")


def _results_d() -> list[str]:
    """Sections measured by the other bench scripts (workers, plugins): each writes its own
    markdown to bench/results.d/NAME.md, committed, appended to RESULTS.md in name order."""
    out: list[str] = []
    for section in sorted((BENCH_DIR / "results.d").glob("*.md")):
        out += ["", section.read_text().strip(), "", f"(from `bench/results.d/{section.name}`)"]
    return out


def splice_results_d() -> None:
    """No run-*.jsonl here (they are gitignored: a fresh clone has none): keep RESULTS.md's
    own sections as committed and refresh only the results.d ones."""
    lines = RESULTS.read_text().split("\n")
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    first = next((i for i in heads if not lines[i].startswith(CORE_HEADINGS)), len(lines))
    tail = next((i for i in heads if lines[i].startswith("## How to reproduce")), len(lines))
    head = lines[:first]
    while head and head[-1] == "":
        head.pop()
    RESULTS.write_text("\n".join([*head, *_results_d(), "", *lines[tail:]]))
    log(f"no run-*.jsonl in {OUT}: kept the committed A-C sections, refreshed results.d")


def write_results() -> None:
    found = newest_per_section()
    if not found and RESULTS.exists():
        splice_results_d()
        return
    facts_path, facts_rows = found.get("facts", (None, []))
    facts = next((r for r in facts_rows if r.get("section") == "facts"), {})
    cfg = next((r for r in facts_rows if r.get("section") == "config"), {})
    cfg_env: dict[str, str] = cfg.get("env", {})
    body: list[str] = []
    targets: dict[str, bool | None] = {"unix": None, "tcp": None}
    detail: Row = {}
    mem_met: bool | None = None
    growth: float | None = None
    mem_msgs = 0
    if "postfix" in found:
        part, targets, detail = postfix_report(*found["postfix"])
        body += part
    if "milter" in found:
        body += milter_report(*found["milter"])
    if "memory" in found:
        part, mem_met, growth, mem_msgs = memory_report(*found["memory"])
        body += part
    sources = sorted({p.name for p, _ in found.values()})

    def tline(label: str, fam: str) -> str:
        if fam not in detail:
            return f"| {label} | not measured | {verdict(None)} |"
        r, pairs, est, _clean, _counted, pm, weak = detail[fam]
        measured = f"{r:.3f} (ratio of median msgs/s)"
        if pairs and pm is not None:
            measured += (
                f"; paired per round: median {pm:.3f}, {min(pairs):.3f}-{max(pairs):.3f} "
                f"({len(pairs)} rounds)"
            )
        if est:
            measured += f"; CPU-based estimate {est:.3f}"
        caveat = ""
        views = [v for v in (r, pm, est) if v is not None]
        if any(v >= TARGET_RATIO for v in views) and any(v < TARGET_RATIO for v in views):
            caveat = " - borderline: the three estimates fall on both sides of 0.95"
        wc, wn, wname = weak
        if wn and wc < wn / 2:
            caveat += (
                f" - not conclusive: only {wc} of the {wn} counted {wname} runs were "
                "undisturbed by other jobs on the machine"
            )
        return f"| {label} | {measured} | {verdict(targets[fam])}{caveat} |"

    head = [
        "# milterd benchmark results",
        "",
        "Generated by `bench/run.py` (do not edit by hand; `make bench` rebuilds it). What each "
        "script measures and the knobs: [README.md](README.md). Raw JSON lines: "
        + ", ".join(f"`bench/out/{s}`" for s in sources)
        + " (gitignored, stay on the machine that ran them).",
        "",
        "## Targets",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        tline(
            "milterd + one trivial plugin >= 95 % of the bare pymilter milter's msgs/s "
            "through Postfix, unix socket",
            "unix",
        ),
        tline("same, TCP", "tcp"),
        (
            f"| (information) TCP like for like: milterd / the bare milter that also answers "
            f"DATA (`bare-tcp-replydata`) | {detail['tcp-like'][0]:.3f} (ratio of median msgs/s)"
            + (f"; CPU-based estimate {detail['tcp-like'][1]:.3f}" if detail["tcp-like"][1] else "")
            + " | - |"
            if "tcp-like" in detail
            else "| (information) TCP like for like | not measured | - |"
        ),
        "| milterd RSS growth < 10 % over 100,000 messages (after a 10,000-message warm-up) | "
        + (f"{growth:+.2f} % over {mem_msgs:,} messages" if growth is not None else "not measured")
        + f" | {verdict(mem_met)}"
        + (" (over fewer messages than the target names)" if 0 < mem_msgs < 100_000 else "")
        + " |",
        "",
        "The Postfix ratios compare medians of runs that took turns on the same machine; "
        "the per-round ratios show the noise. With a few runs a difference of a few per "
        'cent is within that noise: read a verdict near the line as "about equal", not '
        "as a measured 1 % gap. On TCP, read section A's note on Postfix's TCP stall "
        "before the TCP verdict: whether a milter answers DATA decides its TCP throughput "
        "at 20 SMTP sessions more than its CPU cost does.",
        "",
        "## Machine",
        "",
        f"- date (UTC): {facts.get('date_utc', '?')}"
        + (f" (facts of `{facts_path.name}`)" if facts_path else ""),
        f"- CPU: {facts.get('nproc', '?')} x {facts.get('cpu_model', '?')}, "
        f"{facts.get('mem_gib', '?')} GiB RAM; load average at start "
        f"{' '.join(facts.get('loadavg', []))}",
        f"- OS: {facts.get('os', '?')}, kernel {facts.get('kernel', '?')}",
        f"- Python {facts.get('python', '?')}, pymilter {facts.get('pymilter', '?')} "
        f"(libmilter API {facts.get('libmilter', '?')}), Postfix {facts.get('postfix', '?')}",
        f"- milterd {facts.get('milterd', '?')} at {facts.get('milterd_commit', '?')}, "
        f"milterd-example-header {facts.get('example_plugin', '?')}",
        f"- Postfix queue filesystem: {' '.join(facts.get('queue_fs', [])) or '?'}; "
        "5 KB test message (`bench/make_msg.py`)",
        "- settings: "
        + (" ".join(f"{k}={v}" for k, v in sorted(cfg_env.items())) or "all defaults")
        + (f" (`bench/out/{facts_path.name}`)" if facts_path else ""),
        "",
    ]
    repro = [
        "## How to reproduce",
        "",
        "As root on Debian 12 with the venv set up (`make venv`; Postfix, libmilter-dev "
        "installed; nothing leaves 127.0.0.1):",
        "",
        "```sh",
        "make bench                             # = .venv/bin/python bench/run.py, all sections",
        ".venv/bin/python bench/run.py postfix  # one section; RESULTS.md keeps the others",
        "RUNS=5 COUNT=3000 .venv/bin/python bench/run.py postfix milter",
        "MEM_COUNT=20000 MEM_WARMUP=2000 .venv/bin/python bench/run.py memory   # quick check",
        ".venv/bin/python bench/run.py --report      # rebuild this file from bench/out/",
        "```",
        "",
        "Single pieces by hand: `bench/postfix_bench.py bare-unix milterd-w1-unix`, "
        "`bench/milter_load.py unix:/var/lib/milterd-bench/sock/X.sock --count 5000`, "
        "`bench/bare_milter.py inet:8925@127.0.0.1`.",
        "",
    ]
    RESULTS.write_text("\n".join(head + body + _results_d() + ["", *repro]))
    log(f"wrote {RESULTS}")


# ---- main -----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("sections", nargs="*", metavar="SECTION",
                    help="postfix, milter, memory (default: all)")  # fmt: skip
    ap.add_argument("--report", action="store_true", help="only rebuild RESULTS.md")
    a = ap.parse_args()
    unknown = [s for s in a.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if os.geteuid() != 0 and not a.report:
        print("run.py: run as root (private Postfix, smtp-sink -u postfix)", file=sys.stderr)
        return 2
    if a.report:
        write_results()
        return 0
    sections = [s for s in SECTIONS if s in a.sections] if a.sections else list(SECTIONS)

    def on_signal(signum: int, _frame: object) -> None:
        raise SystemExit(f"stopped by signal {signum}")  # finally blocks clean up

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    OUT.mkdir(exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    from make_msg import write_message

    write_message(WORK / "msg.eml")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out_path = OUT / f"run-{stamp}.jsonl"
    t_start = time.monotonic()
    with open(out_path, "a") as out:

        def emit(row: Row) -> None:
            out.write(json.dumps(row) + "\n")
            out.flush()

        emit(machine_facts())
        emit({"section": "config", "sections": sections, "env": {
            k: v for k, v in os.environ.items()
            if k in ("RUNS", "COUNT", "SESSIONS", "WARMUP", "CONNS", "MILTER_COUNT",
                     "MEM_COUNT", "MEM_WARMUP", "MEM_DURATION", "PF_TARGETS",
                     "MILTER_TARGETS", "MEM_TARGETS", "PF_QUEUE", "QUIET_MAX",
                     "QUIET_WAIT", "OTHER_MAX", "RETRIES", "BENCH_BUDGET")},
              "guard": {"quiet_max": QUIET_MAX, "quiet_wait": QUIET_WAIT,
                        "other_max": OTHER_MAX, "retries": RETRIES}})  # fmt: skip
        log(f"results -> {out_path}")
        failed = False
        for s in sections:
            t0 = time.monotonic()
            try:
                if s == "postfix":
                    targets = targets_from_env("PF_TARGETS", PF_DEFAULT_TARGETS)
                    PostfixBench().run(targets, emit)
                elif s == "milter":
                    milter_section(emit)
                else:
                    memory_section(emit)
            except Exception as e:  # the other sections still run
                failed = True
                log(f"section {s} failed: {type(e).__name__}: {e}")
                emit({"section": s, "kind": "error", "error": f"{type(e).__name__}: {e}"})
            log(f"section {s}: {time.monotonic() - t0:.0f}s")
    log(f"all done in {time.monotonic() - t_start:.0f}s")
    write_results()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
