#!/usr/bin/env python3
"""SPF + DMARC + Authentication-Results: CPU cost per message with a warm DNS cache.

  auth.py [--count 2000] [--warmup 200]

In process, through the same pipeline the daemon runs (``milterd.testing.Harness``), with
the real shared resolver (``milterd.dns.StubResolver``, TTL-honouring cache) pointed at the
test DNS server on loopback. After the warm-up every answer comes from the cache; the DNS
server's query counter proves it (``dns_queries_measured`` must be 0).

Measured: CPU seconds (``time.process_time``) per message for

* ``core``: the pipeline with no plugin enabled (parsing, ledger, merge, delivery copy);
* ``auth``: the same with ``spf`` (HELO + MAIL FROM), ``dmarc`` and ``authres`` enabled,
  for a message whose SPF passes and aligns (dmarc=pass) and one that fails (DMARC
  p=none, SPF fail recorded only): every lookup and every result is produced.

With ``--protocol`` the same comparison is also made over the milter protocol: a real
``milterd run`` (one worker, unix socket) driven by bench/milter_load.py (which plays
Postfix: client 127.0.0.1, HELO client.bench.example, MAIL FROM sender@example.com, the
5 KB message of make_msg.py), once with no plugin and once with spf + dmarc + authres;
CPU per message of milterd's process tree (as milter_load measures it).

Prints a markdown section to stdout and appends one JSON line to bench/out/auth.jsonl.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(REPO))

from milterd.config import DnsSettings  # noqa: E402
from milterd.dns import StubResolver  # noqa: E402
from milterd.testing import Harness  # noqa: E402
from tests.support.dnsserver import ZoneServer  # noqa: E402

ZONE = {
    "mail.example.org": {"TXT": ["v=spf1 a -all"], "A": ["192.0.2.1"]},
    "example.org": {"TXT": ["v=spf1 include:_spf.example.org -all"]},
    "_spf.example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 ip4:198.51.100.0/24 mx -all"]},
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=none; rua=mailto:d@example.org"]},
}
MESSAGE = (
    b"From: Alice <alice@example.org>\r\nTo: bob@example.net\r\nSubject: bench\r\n"
    b"Message-ID: <1@example.org>\r\nDate: Sun, 22 Nov 2026 03:00:00 +0000\r\n\r\n"
    + b"Hello Bob, this is a benchmark line.\r\n"
    * 40
)
# The names milter_load.py uses (client 127.0.0.1).
PROTOCOL_ZONE = {
    "client.bench.example": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"], "A": ["127.0.0.1"]},
    "example.com": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "_dmarc.example.com": {"TXT": ["v=DMARC1; p=reject"]},
}
AUTH = {
    "spf": {"skip_addresses": [], "HELO_reject": "False", "Mail_From_reject": "False"},
    "dmarc": {},
    "authres": {},
}


def per_message(h: Harness, count: int, client_ip: str) -> float:
    start = time.process_time()
    for _ in range(count):
        out = h.send(
            MESSAGE, sender="alice@example.org", client_ip=client_ip, helo="mail.example.org"
        )
        assert out.delivered is not None and not out.errors, (out.verdict, out.errors)
    return (time.process_time() - start) / max(1, count)


def measure(
    sections: dict[str, Any], count: int, warmup: int, resolver: StubResolver, client_ip: str
) -> tuple[float, dict[str, float], list[str]]:
    with Harness(sections, resolver=resolver) as h:
        out = h.send(
            MESSAGE, sender="alice@example.org", client_ip=client_ip, helo="mail.example.org"
        )
        results = [f"{r.method}={r.result}" for r in out.results]
        per_message(h, warmup, client_ip)
        cpu = per_message(h, count, client_ip)
        out = h.send(
            MESSAGE, sender="alice@example.org", client_ip=client_ip, helo="mail.example.org"
        )
        timings = {k: v * 1e6 for k, v in out.timings.items()}
    return cpu, timings, results


def protocol(count: int, conns: int) -> dict[str, Any]:
    """CPU per message of a real daemon, no plugin vs spf + dmarc + authres."""
    out: dict[str, Any] = {}
    with ZoneServer(PROTOCOL_ZONE, ttl=3600) as dns:
        for label, plugins in (
            ("core", ""),
            (
                "auth",
                '[plugins.spf]\nskip_addresses = []\nHELO_reject = "False"\n'
                'Mail_From_reject = "False"\n[plugins.dmarc]\n[plugins.authres]\n',
            ),
        ):
            work = Path(tempfile.mkdtemp(prefix="milterd-bench-auth-", dir="/var/tmp"))
            sock = work / "milterd.sock"
            conf = work / "milterd.toml"
            conf.write_text(
                f'[milterd]\nsocket = "unix:{sock}"\nsocket_mode = "0666"\nworkers = 1\n'
                'log_level = "warning"\nauthserv_id = "mx.bench"\ninternal_networks = []\n'
                f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = 2\n{plugins}'
            )
            milterd = str(Path(sys.executable).parent / "milterd")
            with open(work / "milterd.log", "wb") as logf:
                proc = subprocess.Popen(
                    [milterd, "-c", str(conf), "run"],
                    stdout=logf,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            try:
                deadline = time.monotonic() + 30
                while not sock.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)
                time.sleep(0.5)  # the worker forks after the socket opens
                load = [
                    sys.executable,
                    str(BENCH_DIR / "milter_load.py"),
                    f"unix:{sock}",
                    "--conns",
                    str(conns),
                    "--pid",
                    str(proc.pid),
                    "--label",
                    label,
                ]
                subprocess.run([*load, "--count", "200"], check=True, capture_output=True)
                before = dns.query_count()
                res = subprocess.run(
                    [*load, "--count", str(count)], check=True, capture_output=True, text=True
                )
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["dns_queries_measured"] = dns.query_count() - before
                out[label] = row
            finally:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
                shutil.rmtree(work, ignore_errors=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--protocol", action="store_true", help="also over the milter protocol")
    ap.add_argument("--conns", type=int, default=4, help="--protocol: concurrent connections")
    args = ap.parse_args()
    with ZoneServer(ZONE, ttl=3600) as dns:
        resolver = StubResolver(DnsSettings(nameservers=[f"127.0.0.1:{dns.port}"], timeout=2))
        core, _, _ = measure(
            {"milterd": {"authserv_id": "mx.bench"}}, args.count, args.warmup, resolver, "192.0.2.1"
        )
        rows: dict[str, Any] = {}
        for label, ip in (("pass", "192.0.2.1"), ("fail", "203.0.113.9")):
            measure(AUTH, 1, 0, resolver, ip)  # fill the cache for this client
            before = dns.query_count()
            cpu, timings, results = measure(AUTH, args.count, args.warmup, resolver, ip)
            rows[label] = {
                "cpu_us_per_msg": round(cpu * 1e6, 1),
                "added_cpu_us_per_msg": round((cpu - core) * 1e6, 1),
                "ratio_to_core": round(cpu / core, 2),
                "plugin_wall_us": {k: round(v, 1) for k, v in timings.items()},
                "results": results,
                "dns_queries_measured": dns.query_count() - before,
            }
    record = {
        "bench": "auth",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "count": args.count,
        "core_cpu_us_per_msg": round(core * 1e6, 1),
        "auth": rows,
    }
    if args.protocol:
        record["protocol"] = protocol(args.count, args.conns)
    out_dir = BENCH_DIR / "out"
    out_dir.mkdir(exist_ok=True)
    with open(out_dir / "auth.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")

    print("## SPF + DMARC + Authentication-Results, warm DNS cache (in process)\n")
    print(
        f"{args.count} messages per case after {args.warmup} warm-up; CPU time per message;"
        f" Python {record['python']}.\n"
    )
    print(
        "| case | results | CPU µs/msg | added by spf+dmarc+authres | ratio to core |"
        " DNS queries while measuring |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    print(f"| core alone (no plugin) | — | {record['core_cpu_us_per_msg']} | — | 1.00 | — |")
    for label, row in rows.items():
        print(
            f"| {label} | {' '.join(row['results'])} | {row['cpu_us_per_msg']} |"
            f" {row['added_cpu_us_per_msg']} | {row['ratio_to_core']:.2f} |"
            f" {row['dns_queries_measured']} |"
        )
    print(
        "\nPer-plugin wall time of one warm message (µs): "
        + "; ".join(
            f"{label}: " + ", ".join(f"{k} {v}" for k, v in row["plugin_wall_us"].items())
            for label, row in rows.items()
        )
    )
    proto = record.get("protocol")
    if proto:
        core_ms, auth_ms = (proto[k]["milter_cpu_ms_per_msg"] for k in ("core", "auth"))
        print("\n### Over the milter protocol (milterd run, 1 worker, bench/milter_load.py)\n")
        print(
            "| config | msgs | results | milterd CPU ms/msg | ratio to core |"
            " DNS queries while measuring |"
        )
        print("| --- | ---: | --- | ---: | ---: | ---: |")
        for k, ms in (("core", core_ms), ("auth", auth_ms)):
            row = proto[k]
            print(
                f"| {k} | {row['messages']} | {row['results']} | {ms} |"
                f" {ms / core_ms:.2f} | {row['dns_queries_measured']} |"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
