#!/usr/bin/env python3
"""Milter protocol load client: plays the MTA (Postfix) side of milter protocol version 6.

  milter_load.py SOCKET [--conns 20] [--count 5000] [--duration 60] [--msg FILE]
                 [--pid MILTER_PID] [--rss-pid PID --rss-every N] [--label NAME]

SOCKET: unix:/path | inet:PORT@127.0.0.1 | inet:127.0.0.1:PORT (loopback or unix only).

Per message, one milter connection (as Postfix opens one per SMTP session): OPTNEG, then
for each step the milter did not negotiate away, its macros ('D') and the command:
CONNECT, HELO, MAIL, RCPT, DATA, each header, EOH, body (65535-byte chunks), then the
EOM macros and EOM, and QUIT. Steps the milter marked no-reply are written without
waiting: everything up to the next step that needs an answer goes out in one write.
Macros: the milter's SETSYMLIST lists when it sent them (as Postfix honours them), else
Postfix's default macro lists; a fresh queue id ("i") per message.

``--conns`` connections run concurrently (asyncio, one task each), until ``--count``
messages are done or ``--duration`` seconds have passed, whichever comes first; every
connection is also bounded by ``--msg-timeout``. Latency = connect() to the final EOM
reply. Prints one JSON line: msgs/s, p50/p90/p99/max latency, final results, header and
envelope modifications counted by kind, errors, CPU per message of the milter process
tree (``--pid``) and of this client, and RSS samples of ``--rss-pid``'s process tree
every ``--rss-every`` messages. Exit status 1 on any error or when no message completed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchlib import Endpoint, busy_pct, machine_busy, parse_socket, tree_cpu, tree_rss
from make_msg import build_message

# ---- protocol constants (libmilter's mfdef.h) ----------------------------------------
SMFI_VERSION = 6
NOCONNECT, NOHELO, NOMAIL, NORCPT = 0x1, 0x2, 0x4, 0x8
NOBODY, NOHDRS, NOEOH, NR_HDR = 0x10, 0x20, 0x40, 0x80
NOUNKNOWN, NODATA, SKIP, RCPT_REJ = 0x100, 0x200, 0x400, 0x800
NR_CONN, NR_HELO, NR_MAIL, NR_RCPT = 0x1000, 0x2000, 0x4000, 0x8000
NR_DATA, NR_UNKN, NR_EOH, NR_BODY = 0x10000, 0x20000, 0x40000, 0x80000
HDR_LEADSPC = 0x100000
MTA_PROTOCOL = 0x1FFFFF  # every step the MTA can leave out, every reply it can do without
MTA_ACTIONS = 0x1FF  # every modification action, SETSYMLIST included
BODY_CHUNK = 65535
PORT_40000 = struct.pack("!H", 40000)  # the "client port" of CONNECT

FINAL = {b"a": "accept", b"c": "continue", b"r": "reject", b"t": "tempfail", b"d": "discard"}
MODS = {
    b"h": "addheader",
    b"i": "insheader",
    b"m": "chgheader",
    b"b": "replbody",
    b"+": "addrcpt",
    b"-": "delrcpt",
    b"2": "addrcpt_par",
    b"e": "chgfrom",
    b"q": "quarantine",
}
ACTION_NAMES = {
    0x1: "ADDHDRS",
    0x2: "CHGBODY",
    0x4: "ADDRCPT",
    0x8: "DELRCPT",
    0x10: "CHGHDRS",
    0x20: "QUARANTINE",
    0x40: "CHGFROM",
    0x80: "ADDRCPT_PAR",
    0x100: "SETSYMLIST",
}

# SETSYMLIST stage numbers -> the command letter of the 'D' packet for that stage.
SYMLIST_STAGE = {0: b"C", 1: b"H", 2: b"M", 3: b"R", 4: b"T", 5: b"E", 6: b"N"}

QID_PLACEHOLDER = b"@@QUEUEID@"  # 10 bytes; replaced by each message's queue id
SENDER = "sender@example.com"
RECIPIENT = "rcpt@dest.example.net"

# What this "Postfix" knows per stage (Postfix only sends macros that have a value), and
# Postfix's default milter_*_macros lists, used when the milter sends no SETSYMLIST.
MACRO_VALUES: dict[str, str] = {
    "j": "mx.bench.example",
    "_": "localhost [127.0.0.1]",
    "v": "Postfix 3.7.11",
    "{daemon_name}": "milterd-bench",
    "{daemon_addr}": "127.0.0.1",
    "{client_addr}": "127.0.0.1",
    "{client_name}": "localhost",
    "{client_port}": "40000",
    "{client_ptr}": "localhost",
    "{client_connections}": "0",
    "i": QID_PLACEHOLDER.decode(),
    "{mail_addr}": SENDER,
    "{mail_host}": "example.com",
    "{mail_mailer}": "smtp",
    "{rcpt_addr}": RECIPIENT,
    "{rcpt_host}": "dest.example.net",
    "{rcpt_mailer}": "smtp",
}
DEFAULT_MACROS: dict[bytes, tuple[str, ...]] = {
    b"C": ("j", "{daemon_name}", "{daemon_addr}", "v", "_"),
    b"H": ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    b"M": ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}",
           "{mail_host}", "{mail_mailer}"),
    b"R": ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    b"T": ("i",),
    b"N": ("i",),
    b"E": ("i",),
}  # fmt: skip


def packet(cmd: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + cmd + data


def nul(*parts: str | bytes) -> bytes:
    """NUL-terminate and join: the milter protocol's string encoding."""
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


def load_message(raw: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(headers as (name, value-with-leading-space), body with CRLF) of an RFC 5322 file."""
    raw = raw.replace(b"\r\n", b"\n")
    head, _, body = raw.partition(b"\n\n")
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and headers:  # folded: continuation of the last one
            name, value = headers[-1]
            headers[-1] = (name, value + b"\r\n" + line)
        else:
            name, _, value = line.partition(b":")
            headers.append((name, value))
    return headers, body.replace(b"\n", b"\r\n")


@dataclass
class Plan:
    """The packets of one message for one negotiated (protocol, symlists), pre-encoded.

    ``batches``: (bytes, wait_for_reply, is_body) in order; consecutive steps that need
    no reply are merged into the next batch that does. ``eom``: the rest plus EOM.
    """

    batches: list[tuple[bytes, bool, bool]]
    eom: bytes
    steps: list[str]


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    results: dict[str, int] = field(default_factory=dict)
    mods: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    expect_hits: int = 0
    rss: list[tuple[int, int, dict[int, int]]] = field(default_factory=list)
    negotiated: dict[str, object] = field(default_factory=dict)


class Client:
    def __init__(self, a: argparse.Namespace, endpoint: Endpoint, msg: bytes) -> None:
        self.a = a
        self.endpoint = endpoint
        self.headers, self.body = load_message(msg)
        self.stats = Stats()
        self.plans: dict[tuple[int, tuple[tuple[int, str], ...]], Plan] = {}
        self.started = 0
        self.done = 0
        self.expect = a.expect_header.lower().encode() if a.expect_header else None
        self.optneg = packet(b"O", struct.pack("!III", SMFI_VERSION, MTA_ACTIONS, MTA_PROTOCOL))
        self.postfix_writes: bool = a.postfix_writes

    # -- building the packets -----------------------------------------------------------

    def plan(self, proto: int, symlists: tuple[tuple[int, str], ...]) -> Plan:
        key = (proto, symlists)
        if key in self.plans:
            return self.plans[key]
        wanted = dict(DEFAULT_MACROS)
        for stage, names in symlists:
            if stage in SYMLIST_STAGE:
                wanted[SYMLIST_STAGE[stage]] = tuple(names.split())

        def macros(stage: bytes) -> bytes:
            pairs = [(n, MACRO_VALUES[n]) for n in wanted.get(stage, ()) if n in MACRO_VALUES]
            if not pairs:
                return b""
            return packet(b"D", stage + b"".join(nul(n, v) for n, v in pairs))

        # (name, macros, command, skip flag, no-reply flag). Like Postfix, the macros of a
        # stage are sent even when the milter negotiated the command itself away.
        steps: list[tuple[str, bytes, bytes, int, int]] = [
            (
                "connect",
                macros(b"C"),
                packet(b"C", nul("localhost") + b"4" + PORT_40000 + nul("127.0.0.1")),
                NOCONNECT,
                NR_CONN,
            ),
            ("helo", macros(b"H"), packet(b"H", nul("client.bench.example")), NOHELO, NR_HELO),
            ("mail", macros(b"M"), packet(b"M", nul(f"<{SENDER}>")), NOMAIL, NR_MAIL),
            ("rcpt", macros(b"R"), packet(b"R", nul(f"<{RECIPIENT}>")), NORCPT, NR_RCPT),
            ("data", macros(b"T"), packet(b"T"), NODATA, NR_DATA),
        ]
        for hname, hvalue in self.headers:
            # Postfix sends the value without its leading space unless HDR_LEADSPC.
            v = hvalue if proto & HDR_LEADSPC else hvalue.lstrip(b" \t")
            steps.append(("header", b"", packet(b"L", nul(hname, v)), NOHDRS, NR_HDR))
        steps.append(("eoh", macros(b"N"), packet(b"N"), NOEOH, NR_EOH))
        for i in range(0, len(self.body), BODY_CHUNK):
            chunk = packet(b"B", self.body[i : i + BODY_CHUNK])
            steps.append(("body", b"", chunk, NOBODY, NR_BODY))
        batches: list[tuple[bytes, bool, bool]] = []
        sent: list[str] = []
        pending = b""
        handed_over = False
        for name, mac, cmd, no, nr in steps:
            if self.postfix_writes and name == "header" and not handed_over:
                # Postfix's smtpd sends connect..data, then hands the milter socket to
                # the cleanup server, which sends the content: two separate writes.
                handed_over = True
                if pending:
                    batches.append((pending, False, False))
                    pending = b""
            pending += mac
            if proto & no:
                continue
            pending += cmd
            wait = not proto & nr
            if not sent or sent[-1].split("(")[0] != name:
                sent.append(name if wait else f"{name}(noreply)")
            if wait:
                batches.append((pending, True, name == "body"))
                pending = b""
        p = Plan(batches, pending + macros(b"E") + packet(b"E"), [*sent, "eom"])
        self.plans[key] = p
        return p

    # -- one connection -----------------------------------------------------------------

    async def read_packet(self, r: asyncio.StreamReader) -> tuple[bytes, bytes]:
        (n,) = struct.unpack("!I", await r.readexactly(4))
        data = await r.readexactly(n)
        return data[:1], data[1:]

    async def stage_reply(self, r: asyncio.StreamReader) -> str:
        while True:
            cmd, data = await self.read_packet(r)
            if cmd == b"p":  # progress: keep waiting
                continue
            if cmd == b"s":
                return "skip"
            if cmd == b"y":  # replycode: "4xx ..." or "5xx ..."
                return "tempfail" if data[:1] == b"4" else "reject"
            return FINAL.get(cmd, "other:" + cmd.decode(errors="replace"))

    async def connection(self, seq: int) -> None:
        t0 = time.perf_counter()
        ep = self.endpoint
        if ep.family == "unix":
            r, w = await asyncio.open_unix_connection(ep.path)
        else:  # asyncio sets TCP_NODELAY on TCP transports
            r, w = await asyncio.open_connection(ep.host, ep.port)
            if self.postfix_writes:  # Postfix leaves Nagle on for its milter sockets
                w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        try:
            w.write(self.optneg)
            cmd, data = await self.read_packet(r)
            if cmd != b"O" or len(data) < 12:
                raise RuntimeError(f"bad OPTNEG reply {cmd!r}")
            _version, actions, proto = struct.unpack("!III", data[:12])
            symlists: list[tuple[int, str]] = []
            rest = data[12:]
            while len(rest) >= 5:
                (stage,) = struct.unpack("!I", rest[:4])
                names, _, rest = rest[4:].partition(b"\0")
                symlists.append((stage, names.decode(errors="replace")))
            plan = self.plan(proto, tuple(symlists))
            if not self.stats.negotiated:
                self.stats.negotiated = {
                    "actions": [n for bit, n in ACTION_NAMES.items() if actions & bit],
                    "protocol": hex(proto),
                    "steps": plan.steps,
                    "symlists": {SYMLIST_STAGE.get(s, b"?").decode(): n for s, n in symlists},
                }
            qid = b"B%09X" % seq
            verdict = "continue"
            skip_body = False
            for data_, wait, is_body in plan.batches:
                if is_body and skip_body:
                    continue
                w.write(data_.replace(QID_PLACEHOLDER, qid))
                if wait:
                    verdict = await self.stage_reply(r)
                    if verdict == "skip":
                        skip_body, verdict = True, "continue"
                    elif verdict != "continue":
                        break
            if verdict == "continue":
                w.write(plan.eom.replace(QID_PLACEHOLDER, qid))
                verdict = await self.eom_reply(r)
            lat = time.perf_counter() - t0
            w.write(packet(b"Q"))
        finally:
            w.close()
        st = self.stats
        st.latencies.append(lat)
        st.results[verdict] = st.results.get(verdict, 0) + 1

    async def eom_reply(self, r: asyncio.StreamReader) -> str:
        st = self.stats
        while True:
            cmd, data = await self.read_packet(r)
            kind = MODS.get(cmd)
            if kind is not None:
                st.mods[kind] = st.mods.get(kind, 0) + 1
                # addheader: name NUL value NUL; insheader/chgheader: index first
                if self.expect is not None and self.expect in data.lower():
                    st.expect_hits += 1
                continue
            if cmd == b"p":
                continue
            if cmd == b"y":
                return "tempfail" if data[:1] == b"4" else "reject"
            return FINAL.get(cmd, "other:" + cmd.decode(errors="replace"))

    # -- the load -----------------------------------------------------------------------

    async def worker(self, deadline: float) -> None:
        a = self.a
        while self.started < a.count and time.monotonic() < deadline:
            seq = self.started
            self.started += 1
            try:
                await asyncio.wait_for(self.connection(seq), a.msg_timeout)
            except Exception as e:
                st = self.stats
                st.errors += 1
                kind = type(e).__name__
                st.error_kinds[kind] = st.error_kinds.get(kind, 0) + 1
                if st.errors <= 3:
                    print(f"milter_load: message {seq}: {kind}: {e}", file=sys.stderr)
                if isinstance(e, ConnectionRefusedError | FileNotFoundError):
                    await asyncio.sleep(0.01)  # nobody listening: do not spin
            self.done += 1
            if a.rss_pid and a.rss_every and self.done % a.rss_every == 0:
                rss = tree_rss(a.rss_pid)
                self.stats.rss.append((self.done, sum(rss.values()), rss))

    async def run(self) -> None:
        deadline = time.monotonic() + self.a.duration
        await asyncio.gather(*(self.worker(deadline) for _ in range(self.a.conns)))


def percentile(sorted_xs: list[float], p: float) -> float | None:
    if not sorted_xs:
        return None
    return round(1000 * sorted_xs[min(len(sorted_xs) - 1, int(p * len(sorted_xs)))], 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("socket")
    ap.add_argument("--conns", type=int, default=20, help="concurrent milter connections")
    ap.add_argument("--count", type=int, default=5000, help="messages in total")
    ap.add_argument("--duration", type=float, default=60.0, help="stop after this many seconds")
    ap.add_argument("--msg", help="message file (default: make_msg.py's 5 KB message)")
    ap.add_argument("--msg-timeout", type=float, default=30.0, help="seconds per connection")
    ap.add_argument("--pid", type=int, help="milter PID: CPU of its process tree per message")
    ap.add_argument("--rss-pid", type=int, help="sample this process tree's RSS (VmRSS)")
    ap.add_argument("--rss-every", type=int, default=10000, help="... every N messages")
    ap.add_argument("--expect-header", help="count EOM changes that name this header")
    ap.add_argument(
        "--postfix-writes",
        action="store_true",
        help="write like Postfix: Nagle on (TCP), and the envelope part (smtpd) flushed\n"
        "apart from the content part (cleanup) instead of coalesced with it",
    )
    ap.add_argument("--label", default="")
    a = ap.parse_args()
    if a.conns < 1 or a.count < 1 or a.duration <= 0:
        ap.error("--conns, --count and --duration must be positive")
    try:
        endpoint = parse_socket(a.socket)
    except ValueError as e:
        ap.error(str(e))
    msg = Path(a.msg).read_bytes() if a.msg else build_message()
    client = Client(a, endpoint, msg)
    cpu0 = tree_cpu(a.pid) if a.pid else 0.0
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    busy0 = machine_busy()
    t0 = time.perf_counter()
    asyncio.run(client.run())
    wall = time.perf_counter() - t0
    busy = busy_pct(busy0, machine_busy())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = tree_cpu(a.pid) - cpu0 if a.pid else None
    st = client.stats
    n = len(st.latencies)
    lat = sorted(st.latencies)
    client_cpu = ru1.ru_utime + ru1.ru_stime - ru0.ru_utime - ru0.ru_stime
    out = {
        "tool": "milter_load",
        "label": a.label or a.socket,
        "socket": a.socket,
        "conns": a.conns,
        "count": a.count,
        "messages": n,
        "stopped_by": "count" if client.started >= a.count else "duration",
        "wall_s": round(wall, 3),
        "rate": round(n / wall, 1) if wall > 0 else 0.0,
        "p50_ms": percentile(lat, 0.50),
        "p90_ms": percentile(lat, 0.90),
        "p99_ms": percentile(lat, 0.99),
        "max_ms": round(1000 * lat[-1], 3) if lat else None,
        "results": st.results,
        "mods": st.mods,
        "expect_header": a.expect_header,
        "expect_hits": st.expect_hits if a.expect_header else None,
        "errors": st.errors,
        "error_kinds": st.error_kinds,
        "negotiated": st.negotiated,
        "milter_cpu_ms_per_msg": round(1000 * cpu / n, 3) if cpu is not None and n else None,
        "client_cpu_ms_per_msg": round(1000 * client_cpu / n, 3) if n else None,
        "machine_busy_pct": busy,
        # busy % not explained by the milter and this client: other load on the machine
        "other_busy_pct": round(busy - 100 * (client_cpu + (cpu or 0.0)) / wall, 1)
        if a.pid and wall > 0
        else None,
        "rss_samples": [
            {"after": k, "rss_kb": total, "per_pid_kb": {str(p): v for p, v in per.items()}}
            for k, total, per in st.rss
        ],
    }
    print(json.dumps(out), flush=True)
    return 1 if st.errors or not n else 0


if __name__ == "__main__":
    sys.exit(main())
