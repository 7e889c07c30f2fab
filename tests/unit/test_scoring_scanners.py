"""The spamd and rspamd clients, against canned replies from loopback stand-ins.

(The real daemons are exercised in tests/integration/test_scoring_scanners.py.)
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from milterd_plugins.scoring import DECISION_SYMBOL, ScoringPlugin
from milterd_plugins.scoring.scanners import parse_spamd

from milterd.testing import Harness, Outcome

PLAIN = b"From: a@example.org\r\nSubject: hello\r\n\r\nHello there.\r\n"
SPAMD_REPLY = (
    b"SPAMD/1.1 0 EX_OK\r\nContent-length: 400\r\nSpam: True ; 7.5 / 5.0\r\n\r\n"
    b"Spam detection software...\r\n\r\nContent analysis details:   (7.5 points, 5.0 required)\r\n"
    b"\r\n pts rule name              description\r\n"
    b"---- ---------------------- --------------------------------------------------\r\n"
    b" 2.5 FREE_MONEY             BODY: Free money\r\n"
    b"                            [cf: 100]\r\n"
    b" 5.0 URIBL_BLACK            Contains an URL listed in the URIBL blacklist\r\n"
    b"-0.0 NO_RELAYS              Informational: message was not relayed via SMTP\r\n"
)


def syms(out: Outcome) -> dict[str, float]:
    return {s.name: s.score for s in out.symbols if s.name != DECISION_SYMBOL}


def test_parse_spamd_report() -> None:
    r = parse_spamd(SPAMD_REPLY)
    assert (r.score, r.required) == (7.5, 5.0)
    assert [(n, s) for n, s, _, _ in r.rules] == [
        ("FREE_MONEY", 2.5), ("URIBL_BLACK", 5.0), ("NO_RELAYS", 0.0)
    ]  # fmt: skip
    with pytest.raises(ValueError):
        parse_spamd(b"SPAMD/1.0 76 Bad header line: x\r\n\r\n")


@pytest.mark.parametrize("score", [b"1" + b"0" * 309 + b".0", b"2000000.0", b"-2000000"])
def test_a_spamd_score_that_is_no_finite_number_is_nonsense(score: bytes) -> None:
    # Scores over 1e308 summed to an infinite total, which made tagging fail (a review).
    table = SPAMD_REPLY.replace(b" 2.5 FREE_MONEY", b" " + score + b" FREE_MONEY")
    assert table != SPAMD_REPLY
    with pytest.raises(ValueError, match="scanner: score"):
        parse_spamd(table)
    total = SPAMD_REPLY.replace(b"7.5 /", score + b" /")
    assert total != SPAMD_REPLY
    with pytest.raises(ValueError, match="scanner: score"):
        parse_spamd(total)


class FakeSpamd:
    """A one-thread TCP server answering every request with ``reply`` after ``delay``."""

    def __init__(self, reply: bytes, delay: float = 0.0) -> None:
        self.reply, self.delay = reply, delay
        self.requests: list[bytes] = []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.requests.append(data)
                time.sleep(self.delay)
                with contextlib.suppress(OSError):
                    conn.sendall(self.reply)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def spamd() -> Iterator[FakeSpamd]:
    s = FakeSpamd(SPAMD_REPLY)
    yield s
    s.close()


def run(section: dict[str, Any], msg: bytes = PLAIN, **kw: Any) -> Outcome:
    with Harness({"scoring": section}, plugins={"scoring": ScoringPlugin}) as h:
        return h.send(msg, **kw)


def test_spamd_rules_become_symbols(spamd: FakeSpamd) -> None:
    out = run({"spamd": {"enabled": True, "port": spamd.port, "user": "bob"}},
              client_ip="198.51.100.7", helo="mx.sender.example")  # fmt: skip
    assert syms(out) == {"SA_FREE_MONEY": 2.5, "SA_URIBL_BLACK": 5.0, "SA_NO_RELAYS": 0.0}
    (req,) = spamd.requests
    head, _, body = req.partition(b"\r\n\r\n")
    assert head.startswith(b"REPORT SPAMC/1.5\r\n") and b"\r\nUser: bob" in head
    assert int(head.split(b"Content-length: ")[1].split(b"\r\n")[0]) == len(body)
    assert body.startswith(b"Received: from mx.sender.example ([198.51.100.7] [198.51.100.7])")
    assert body.endswith(PLAIN)


def test_spamd_total_mode_and_weight(spamd: FakeSpamd) -> None:
    section = {"spamd": {"enabled": True, "port": spamd.port, "mode": "total", "weight": 0.5,
                         "add_received": False}}  # fmt: skip
    out = run(section)
    assert syms(out) == {"SPAMD": 3.75}
    assert spamd.requests[0].endswith(b"\r\n\r\n" + PLAIN)


def test_spamd_down_or_slow_is_not_a_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once closed
    out = run({"spamd": {"enabled": True, "port": port}})
    assert out.verdict == "continue" and not out.errors
    assert syms(out) == {"SPAMD_UNAVAILABLE": 0.0}
    slow = FakeSpamd(SPAMD_REPLY, delay=3.0)
    try:
        t0 = time.monotonic()
        out = run({"spamd": {"enabled": True, "port": slow.port, "timeout": 0.5}})
        assert time.monotonic() - t0 < 2.0
    finally:
        slow.close()
    assert syms(out) == {"SPAMD_UNAVAILABLE": 0.0} and not out.errors


def test_messages_over_max_size_are_not_sent(spamd: FakeSpamd) -> None:
    out = run({"spamd": {"enabled": True, "port": spamd.port, "max_size": 10}})
    assert syms(out) == {} and spamd.requests == []


class RspamdHandler(BaseHTTPRequestHandler):
    reply: dict[str, Any] = {}
    seen: list[tuple[str, dict[str, list[str]], bytes]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        headers: dict[str, list[str]] = {}
        for k, v in self.headers.items():
            headers.setdefault(k, []).append(v)
        RspamdHandler.seen.append((self.path, headers, body))
        data = json.dumps(self.reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def rspamd() -> Iterator[int]:
    RspamdHandler.seen = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RspamdHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


def test_rspamd_symbols_headers_and_preresult(rspamd: int) -> None:
    RspamdHandler.reply = {
        "score": 6.1, "required_score": 15.0, "action": "add header", "is_skipped": False,
        "symbols": {
            "MISSING_DATE": {"name": "MISSING_DATE", "score": 1.0, "description": "no date"},
            "FROM_HAS_DN": {"name": "FROM_HAS_DN", "score": 0.0},
            "BAD_URL": {"name": "BAD_URL", "score": 5.1, "options": ["a.example", "b.example"]},
        },
    }  # fmt: skip
    url = f"http://127.0.0.1:{rspamd}"
    out = run({"rspamd": {"enabled": True, "url": url}}, recipients=["x@example.com",
              "y@example.com"], client_ip="2001:db8::7", auth=None)  # fmt: skip
    assert syms(out) == {"RSPAMD_MISSING_DATE": 1.0, "RSPAMD_BAD_URL": 5.1}
    (bad,) = [s for s in out.symbols if s.name == "RSPAMD_BAD_URL"]
    assert bad.options == ("a.example", "b.example")
    path, headers, body = RspamdHandler.seen[0]
    assert path == "/checkv2" and body == PLAIN
    assert headers["IP"] == ["2001:db8::7"] and headers["Rcpt"] == ["x@example.com",
                                                                    "y@example.com"]  # fmt: skip
    assert headers["From"] == ["sender@example.org"] and headers["Queue-Id"] == ["4TESTQID"]
    keep = run({"rspamd": {"enabled": True, "url": url, "keep_zero": True}})
    assert "RSPAMD_FROM_HAS_DN" in syms(keep)
    RspamdHandler.reply = {
        "score": 15.0, "required_score": 15.0, "action": "reject", "is_skipped": True,
        "symbols": {"GTUBE": {"name": "GTUBE", "score": 0.0}},
        "messages": {"smtp_message": "Gtube pattern"},
    }  # fmt: skip
    assert syms(run({"rspamd": {"enabled": True, "url": url}})) == {"RSPAMD_PRERESULT": 15.0}
    total = run({"rspamd": {"enabled": True, "url": url, "mode": "total", "symbol": "RS"}})
    assert syms(total) == {"RS": 15.0}
