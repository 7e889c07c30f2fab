#!/usr/bin/env python3
"""Per-message cost of the ``scoring`` plugin, in process, against the core with no plugin.

  bench/scoring.py [--messages N] [--size BYTES]

Targets, each run through the harness (the daemon's Session code, no MTA, no sockets) with
the same ~5 KB message (bench/make_msg.py):

* ``core``: no plugin at all (the baseline);
* ``scoring-rules``: the scoring plugin with 200 regex rules (header, body, raw, URL);
* ``scoring-full``: the same plus two DNS blocklists (client address and URL domains,
  answered by an in-process resolver, so this measures our work, not DNS latency) and
  Bayes (SQLite, trained on 200 generated messages);
* ``scoring+tagging``: scoring-full and the tagging plugin.

The message is scanned completely each time (nothing is cached between messages). Output:
a markdown section on stdout, one JSON object a line appended to bench/out/scoring.jsonl.
Target: under 2 ms added per 5 KB message.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from make_msg import build_message  # noqa: E402
from milterd_plugins.scoring import ScoringPlugin  # noqa: E402
from milterd_plugins.scoring.bayes import Classifier, SQLiteStore  # noqa: E402
from milterd_plugins.scoring.cli import learn_bytes  # noqa: E402
from milterd_plugins.tagging import Tagging  # noqa: E402

from milterd.testing import FakeResolver, Harness  # noqa: E402

OUT = HERE / "out" / "scoring.jsonl"
TARGET_MS = 2.0
WORDS = [
    "cheap",
    "free",
    "winner",
    "prize",
    "casino",
    "offer",
    "pills",
    "bonus",
    "crypto",
    "urgent",
]


def rules(n: int = 200) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        w = WORDS[i % len(WORDS)]
        kind = i % 10
        r: dict[str, Any]
        if kind < 6:
            r = {"type": "body", "pattern": rf"\b{w}\s+(?:deal|item)s?{i}\b"}
        elif kind < 8:
            r = {"type": "header", "header": "Subject", "pattern": rf"{w}.{{0,20}}now{i}"}
        elif kind == 8:
            r = {"type": "raw", "pattern": rf"^X-{w}-{i}:"}
        else:
            r = {"type": "uri", "domains": [f"{w}{i}.example"]}
        out.append({"name": f"BENCH_{i}", "score": 0.5, **r})
    return out


def zones() -> dict[str, Any]:
    return {
        "2.0.0.127.bl.bench": {"A": ["127.0.0.2"]},
        "test.dbl.bench": {"A": ["127.0.1.2"]},
    }


def train(db: Path) -> None:
    rng = random.Random(3)
    clf = Classifier(SQLiteStore(str(db)), 1, 1)
    for i in range(200):
        spam = i % 2 == 0
        words = " ".join(rng.choice(WORDS if spam else ["meeting", "report", "lunch", "draft"])
                         for _ in range(80))  # fmt: skip
        raw = f"Subject: msg {i}\r\nMessage-ID: <{i}@b>\r\n\r\n{words}\r\n".encode()
        learn_bytes(clf, raw, spam, 2000)
    clf.store.close()


def section(full: bool, db: Path) -> dict[str, Any]:
    s: dict[str, Any] = {"rules": rules()}
    if full:
        s["dnsbl"] = [
            {"zone": "bl.bench", "symbol": "RBL_BENCH", "score": 2.0},
            {"zone": "dbl.bench", "type": "uri", "symbol": "URIBL_BENCH", "score": 2.0},
        ]
        s["bayes"] = {"enabled": True, "path": str(db), "min_spam": 10, "min_ham": 10}
    return s


def measure(name: str, cfg: dict[str, Any], plugins: dict[str, object], msg: bytes,
            n: int) -> dict[str, Any]:  # fmt: skip
    with Harness(cfg, plugins=plugins, resolver=FakeResolver(zones())) as h:
        for _ in range(max(20, n // 10)):  # warm-up
            h.send(msg)
        times: list[float] = []
        plugin_times: list[float] = []
        for _ in range(n):
            t0 = time.perf_counter()
            out = h.send(msg)
            times.append(time.perf_counter() - t0)
            plugin_times.append(sum(out.timings.values()))
            assert not out.errors, out.errors
    return {
        "target": name,
        "messages": n,
        "median_ms": round(statistics.median(times) * 1000, 3),
        "mean_ms": round(statistics.fmean(times) * 1000, 3),
        "p90_ms": round(sorted(times)[int(n * 0.9)] * 1000, 3),
        "plugin_median_ms": round(statistics.median(plugin_times) * 1000, 3),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--size", type=int, default=5000)
    args = ap.parse_args()
    msg = build_message(args.size).replace(b"\n", b"\r\n")
    # A link, so the URL list is asked, and nothing that matches a rule.
    msg = msg.rstrip(b"\r\n") + b"\r\nsee https://www.shop.example/offer\r\n"
    with tempfile.TemporaryDirectory(prefix="milterd-bench-scoring-") as d:
        db = Path(d) / "bayes.sqlite"
        train(db)
        targets: list[tuple[str, dict[str, Any], dict[str, object]]] = [
            ("core", {}, {}),
            ("scoring-rules", {"scoring": section(False, db)}, {"scoring": ScoringPlugin}),
            ("scoring-full", {"scoring": section(True, db)}, {"scoring": ScoringPlugin}),
            ("scoring+tagging", {"scoring": section(True, db), "tagging": {}},
             {"scoring": ScoringPlugin, "tagging": Tagging}),
        ]  # fmt: skip
        rows = [measure(n, c, p, msg, args.messages) for n, c, p in targets]
    base = rows[0]["median_ms"]
    ts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        for r in rows:
            r["added_ms"] = round(r["median_ms"] - base, 3)
            r["ratio"] = round(r["median_ms"] / base, 2) if base else None
            r["within_target"] = r["added_ms"] < TARGET_MS
            f.write(json.dumps({"bench": "scoring", "ts": ts, "size": len(msg), **r}) + "\n")
    print(f"## scoring plugin: per-message cost ({len(msg)} byte message, in process)\n")
    print("| target | median ms | p90 ms | added ms | ratio to core | plugin time ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['target']} | {r['median_ms']} | {r['p90_ms']} | {r['added_ms']} | "
              f"{r['ratio']} | {r['plugin_median_ms']} |")  # fmt: skip
    full = rows[2]
    verdict = "meets" if full["within_target"] else "MISSES"
    print(f"\nscoring-full adds {full['added_ms']} ms a message: {verdict} the "
          f"{TARGET_MS} ms target (200 rules, 2 blocklists, Bayes).")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
