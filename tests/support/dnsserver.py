"""An authoritative DNS server on 127.0.0.1 (UDP and TCP, same port) fed from a dict.

Zone data format (names case-insensitive, trailing dot optional)::

    {
        "example.com": {
            "A": ["192.0.2.1"],
            "AAAA": ["2001:db8::1"],
            "MX": [(10, "mx.example.com")],
            "TXT": ["v=spf1 -all"],            # str/bytes; >255 bytes is split for you
            "NS": ["ns1.example.com"],
        },
        "sel._domainkey.example.com": {"TXT": ["v=DKIM1; k=rsa; p=MIIB..."]},
        "www.example.com": {"CNAME": "example.com"},   # a single str is fine too
        "1.2.0.192.in-addr.arpa": {"PTR": ["mail.example.com"]},
    }

TXT/SPF values: a ``str``/``bytes`` is one record; if it is longer than 255 bytes it is
split into several <=255-byte character-strings *inside that one record* (how DKIM keys are
published; resolvers concatenate them).  A ``list``/``tuple`` value is one record with
exactly those character-strings (to test resolvers' concatenation explicitly).

Answers: NXDOMAIN for unknown names; NOERROR with an empty answer (NODATA) for a known name
without the asked type; a CNAME is returned for any type and followed inside the zone.
Over UDP, replies larger than the client's limit (512, or its EDNS payload size) are
truncated with TC set, so clients retry over TCP as with a real server.

Failure modes for tests: :meth:`ZoneServer.set_silent` drops every query (clients time
out; TCP connections are held open without a reply); :meth:`ZoneServer.set_servfail`
answers SERVFAIL for chosen names.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, TXT, A, DNSHeader, DNSRecord
from dnslib.server import DNSHandler, DNSServer

from tests.support.postfix import free_port

__all__ = ["QueryRecord", "ZoneData", "ZoneServer", "split_txt"]

#: ``{name: {TYPE: values}}``; see the module docstring.
ZoneData = Mapping[str, Mapping[str, Any]]

SUPPORTED_TYPES = ("A", "AAAA", "TXT", "MX", "PTR", "CNAME", "NS", "SPF")


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


def split_txt(value: str | bytes, size: int = 255) -> list[bytes]:
    """Split a TXT value into character-strings of at most ``size`` bytes (UTF-8)."""
    raw = value.encode() if isinstance(value, str) else value
    if not raw:
        return [b""]
    return [raw[i : i + size] for i in range(0, len(raw), size)]


@dataclass(frozen=True)
class QueryRecord:
    """One query the server saw.

    :ivar name: query name, lower-case, without trailing dot.
    :ivar qtype: type mnemonic (``"TXT"``) or ``"TYPE<n>"`` for unknown ones.
    :ivar protocol: ``"udp"`` or ``"tcp"``.
    :ivar outcome: ``"NOERROR"``, ``"NXDOMAIN"``, ``"SERVFAIL"`` or ``"dropped"`` (silent).
    :ivar at: ``time.time()`` of arrival.
    """

    name: str
    qtype: str
    protocol: str
    outcome: str
    at: float


class _Resolver:
    """dnslib resolver over the server's current zone (read under the server's lock)."""

    def __init__(self, server: ZoneServer) -> None:
        self._server = server

    def resolve(self, request: Any, handler: Any) -> Any:
        return self._server._answer(request, str(getattr(handler, "protocol", "udp")))


class _Handler(DNSHandler):  # type: ignore[misc]
    """DNSHandler that can drop queries (silent mode) and logs them in the server."""

    def handle(self) -> None:
        zone_server: ZoneServer = self.server.zone_server
        if not zone_server.silent:
            super().handle()
            return
        # Silent: read the query (to log it), answer nothing.
        protocol = "tcp" if self.server.socket_type == socket.SOCK_STREAM else "udp"
        try:
            if protocol == "tcp":
                data = self.request.recv(8192)
                data = data[2:]
            else:
                data = self.request[0]
            q = DNSRecord.parse(data).q
            zone_server._log(str(q.qname), QTYPE.get(q.qtype), protocol, "dropped")
        except Exception:  # garbage in silent mode is just dropped too
            zone_server._log("?", "?", protocol, "dropped")
        if protocol == "tcp":
            # Hold the connection open like a black hole; stop() releases it at once.
            zone_server._stopping.wait(zone_server.silent_tcp_hold)

    def get_reply(self, data: bytes) -> bytes:
        request = DNSRecord.parse(data)
        reply = self.server.resolver.resolve(request, self)
        rdata: bytes = reply.pack()
        if self.protocol == "udp":
            # Respect the client's UDP limit: 512 without EDNS, else its payload size.
            limit = 512
            for rr in request.ar:
                if rr.rtype == QTYPE.OPT:
                    limit = max(512, int(rr.rclass))
            if len(rdata) > limit:
                # Not dnslib's reply.truncate(): it drops the question section, and
                # resolvers (dnspython) discard such a reply as not matching the query.
                truncated = DNSRecord(DNSHeader(id=reply.header.id, bitmap=reply.header.bitmap))
                truncated.header.tc = 1
                truncated.add_question(request.q)
                rdata = truncated.pack()
        return rdata


class _QuietLogger:
    """dnslib logger that logs nothing (the default prints every query to stdout)."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class ZoneServer:
    """Authoritative DNS server for tests on ``127.0.0.1:port`` (UDP + TCP).

    :param zone: initial zone data (see the module docstring); copied.
    :param port: None picks a port free for both UDP and TCP.
    :param ttl: TTL of every answer record.
    :param servfail: names answered with SERVFAIL (any type).
    :param silent: start in silent mode (drop all queries).
    :param silent_tcp_hold: how long a silent TCP connection is held open (seconds).

    Thread-safe: zone and modes can be changed while queries are served.
    """

    def __init__(
        self,
        zone: ZoneData | None = None,
        port: int | None = None,
        *,
        ttl: int = 60,
        servfail: Iterable[str] = (),
        silent: bool = False,
        silent_tcp_hold: float = 30.0,
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port(udp=True)
        self.ttl = ttl
        self.silent = silent
        self.silent_tcp_hold = silent_tcp_hold
        self._lock = threading.Lock()
        self._zone: dict[str, dict[str, list[Any]]] = {}
        self._servfail: set[str] = {_norm(n) for n in servfail}
        self._log_entries: list[QueryRecord] = []
        self._servers: list[Any] = []
        self._stopping = threading.Event()
        self.set_zone(zone or {})

    # ---------------------------------------------------------------- data

    def set_zone(self, zone: ZoneData) -> None:
        """Replace all zone data atomically.

        :raises ValueError: for unsupported types or malformed values.
        """
        new: dict[str, dict[str, list[Any]]] = {}
        for name, rrsets in zone.items():
            entry: dict[str, list[Any]] = {}
            for rtype, values in rrsets.items():
                rtype_u = rtype.upper()
                if rtype_u not in SUPPORTED_TYPES:
                    raise ValueError(f"{name}: unsupported record type {rtype!r}")
                # A single value may be given bare: "CNAME": "x", "MX": (10, "mx").
                single = isinstance(values, str | bytes) or (
                    rtype_u == "MX" and isinstance(values, tuple)
                )
                entry[rtype_u] = [values] if single else list(values)
            new[_norm(name)] = entry
        with self._lock:
            self._zone = new

    def update(self, name: str, rrsets: Mapping[str, Any]) -> None:
        """Add or replace one name's records (other names are kept)."""
        current = self.zone()
        current[_norm(name)] = dict(rrsets)
        self.set_zone(current)

    def zone(self) -> dict[str, dict[str, list[Any]]]:
        """A copy of the current zone data (normalised names and types)."""
        with self._lock:
            return {n: {t: list(v) for t, v in r.items()} for n, r in self._zone.items()}

    def set_silent(self, silent: bool = True) -> None:
        """Drop (True) or answer (False) all queries from now on."""
        self.silent = silent

    def set_servfail(self, names: Iterable[str]) -> None:
        """Answer SERVFAIL for exactly these names from now on (empty: none)."""
        with self._lock:
            self._servfail = {_norm(n) for n in names}

    # ---------------------------------------------------------------- query log

    def _log(self, name: str, qtype: str, protocol: str, outcome: str) -> None:
        with self._lock:
            self._log_entries.append(
                QueryRecord(_norm(name), qtype, protocol, outcome, time.time())
            )

    @property
    def query_log(self) -> list[QueryRecord]:
        """A copy of all queries seen so far, in arrival order."""
        with self._lock:
            return list(self._log_entries)

    def query_count(self, name: str | None = None, qtype: str | None = None) -> int:
        """Number of queries seen, optionally only for ``name`` and/or ``qtype``."""
        return sum(
            1
            for q in self.query_log
            if (name is None or q.name == _norm(name)) and (qtype is None or q.qtype == qtype)
        )

    def clear_log(self) -> None:
        """Forget the query log."""
        with self._lock:
            self._log_entries.clear()

    # ---------------------------------------------------------------- answering

    def _rdata(self, rtype: str, value: Any) -> Any:
        if rtype == "A":
            return A(value)
        if rtype == "AAAA":
            return AAAA(value)
        if rtype in ("TXT", "SPF"):
            if isinstance(value, list | tuple):
                return TXT([v.encode() if isinstance(v, str) else v for v in value])
            return TXT(split_txt(value))
        if rtype == "MX":
            pref, host = value
            return MX(host, int(pref))
        if rtype == "PTR":
            return PTR(value)
        if rtype == "CNAME":
            return CNAME(value)
        if rtype == "NS":
            return NS(value)
        raise ValueError(rtype)

    def _rrs(self, name: str, rtype: str, values: Sequence[Any]) -> list[Any]:
        return [
            RR(name, getattr(QTYPE, rtype), rdata=self._rdata(rtype, v), ttl=self.ttl)
            for v in values
        ]

    def _answer(self, request: Any, protocol: str = "udp") -> Any:
        """Build the reply for ``request`` (a dnslib DNSRecord); logs the query."""
        reply = request.reply()  # sets QR, AA, RD, RA and copies the question
        q = request.q
        qname = str(q.qname)
        qtype = QTYPE.get(q.qtype)
        name = _norm(qname)
        with self._lock:
            zone = self._zone
            servfail = name in self._servfail
        if servfail:
            reply.header.rcode = RCODE.SERVFAIL
        elif name not in zone:
            reply.header.rcode = RCODE.NXDOMAIN
        else:
            # Follow CNAMEs inside the zone (bounded, to survive loops in test data).
            current, owner = name, qname
            for _ in range(8):
                rrsets = zone.get(current)
                if rrsets is None:
                    break
                if "CNAME" in rrsets and qtype != "CNAME":
                    target = str(rrsets["CNAME"][0])
                    for rr in self._rrs(owner, "CNAME", rrsets["CNAME"][:1]):
                        reply.add_answer(rr)
                    current, owner = _norm(target), target.rstrip(".") + "."
                    continue
                if qtype == "ANY":
                    for rtype, values in rrsets.items():
                        for rr in self._rrs(owner, rtype, values):
                            reply.add_answer(rr)
                elif qtype in rrsets:
                    for rr in self._rrs(owner, qtype, rrsets[qtype]):
                        reply.add_answer(rr)
                break
        outcome = RCODE.get(reply.header.rcode)
        self._log(qname, qtype, protocol, outcome)
        return reply

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bind UDP and TCP on ``127.0.0.1:port`` and serve in daemon threads.  Idempotent.

        :raises OSError: if the port cannot be bound.
        """
        if self._servers:
            return
        self._stopping.clear()
        resolver = _Resolver(self)
        servers: list[Any] = []
        try:
            for tcp in (False, True):
                srv = DNSServer(
                    resolver,
                    address=self.host,
                    port=self.port,
                    tcp=tcp,
                    logger=_QuietLogger(),
                    handler=_Handler,
                )
                srv.server.zone_server = self
                servers.append(srv)
        except OSError:
            for srv in servers:
                srv.server.server_close()
            raise
        for srv in servers:
            # Not srv.start_thread(): its default 0.5 s poll interval makes stop() slow.
            threading.Thread(
                target=srv.server.serve_forever,
                kwargs={"poll_interval": 0.05},
                name=f"ZoneServer-{self.port}",
                daemon=True,
            ).start()
        self._servers = servers

    def stop(self) -> None:
        """Stop serving and close the sockets.  Idempotent; bounded (held TCP is released)."""
        self._stopping.set()
        servers, self._servers = self._servers, []
        for srv in servers:
            # shutdown() waits for serve_forever() to notice (poll interval 0.05 s);
            # handler threads are daemon threads, so server_close() does not join them.
            srv.server.shutdown()
            srv.server.server_close()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
