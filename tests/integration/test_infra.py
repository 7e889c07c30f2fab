"""Tests of the test infrastructure itself (tests/support): Postfix, sink, DNS, milter.

Each test checks an observable end result (bytes at the sink, SMTP codes at the client,
DNS answers), so a broken helper makes it fail rather than pass vacuously.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rdatatype
import dns.resolver
import pytest

from tests.support.dnsserver import ZoneServer
from tests.support.noop_milter import start_noop_milter, stop_milter
from tests.support.postfix import (
    PostfixError,
    PrivatePostfix,
    free_port,
    ipv6_loopback_available,
    postfix_unavailable_reason,
)
from tests.support.sink import SmtpSink
from tests.support.smtp import send

pytestmark = [pytest.mark.integration]

_NO_POSTFIX = postfix_unavailable_reason()
needs_postfix = pytest.mark.skipif(_NO_POSTFIX is not None, reason=str(_NO_POSTFIX))

# CRLF throughout, 8-bit UTF-8 in a header and the body, a line starting with a dot (must
# survive dot-stuffing both ways), trailing whitespace, an empty line inside the body.
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?=\r\n"
    b"X-Test-Raw: \xc3\xa9t\xc3\xa9\r\n"
    b"\r\n"
    b"Line one with trailing spaces   \r\n"
    b".a line starting with a dot\r\n"
    b"..two dots\r\n"
    b"\r\n"
    b"8-bit: \xc3\xa4\xc3\xb6\xc3\xbc \xe2\x82\xac\r\n"
    b"last line\r\n"
)

# One Received: header (first line + tab-indented continuation lines) prepended by Postfix.
RECEIVED_RE = re.compile(rb"\AReceived: [^\r\n]*\r\n(?:\t[^\r\n]*\r\n)*\Z")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as s:
        yield s


def _assert_relayed_verbatim(data: bytes) -> None:
    """The sink copy must be exactly one Received: header + the client's bytes."""
    assert data.endswith(MESSAGE), data
    prefix = data[: len(data) - len(MESSAGE)]
    assert RECEIVED_RE.match(prefix), prefix


# ------------------------------------------------------------------------------ Postfix


@needs_postfix
@pytest.mark.timeout(60)
def test_relay_to_sink_is_byte_identical(sink: SmtpSink) -> None:
    with PrivatePostfix(relay_port=sink.port) as pf:
        result = send(pf.host, pf.smtp_port, "alice@example.org", ["bob@example.net"], MESSAGE)
        assert result.ok, result
        [msg] = sink.wait_for(1, timeout=15)
        pf.wait_queue_empty(timeout=10)
    assert msg.mail_from == "alice@example.org"
    assert msg.rcpt_tos == ["bob@example.net"]
    assert "BODY=8BITMIME" in msg.mail_options
    assert msg.helo == "mta.test"
    _assert_relayed_verbatim(msg.data)
    assert msg.body == MESSAGE.split(b"\r\n\r\n", 1)[1]


@needs_postfix
@pytest.mark.timeout(60)
def test_two_recipients_both_delivered(sink: SmtpSink) -> None:
    rcpts = ["bob@example.net", "carol@example.com"]
    with PrivatePostfix(relay_port=sink.port) as pf:
        result = send(pf.host, pf.smtp_port, "alice@example.org", rcpts, MESSAGE)
        assert result.ok, result
        assert result.accepted_rcpts == rcpts and not result.refused
        # Postfix may group both recipients into one transaction or split them.
        deadline = time.monotonic() + 15
        while sorted(r for m in sink.messages for r in m.rcpt_tos) != sorted(rcpts):
            assert time.monotonic() < deadline, sink.messages
            time.sleep(0.05)
        pf.wait_log(r"to=<carol@example\.com>.*status=sent", timeout=5)
    for msg in sink.messages:
        assert msg.mail_from == "alice@example.org"
        _assert_relayed_verbatim(msg.data)


@needs_postfix
@pytest.mark.timeout(60)
def test_sink_tempfail_keeps_mail_queued_until_flush(sink: SmtpSink) -> None:
    sink.data_response = "451 4.3.0 sink says later"
    with PrivatePostfix(relay_port=sink.port) as pf:
        mark = pf.log_mark()
        result = send(pf.host, pf.smtp_port, "alice@example.org", "bob@example.net", MESSAGE)
        assert result.ok, result
        pf.wait_log(r"status=deferred .*sink says later", timeout=10, since=mark)
        assert len(pf.queue_ids()) == 1
        assert not pf.postqueue_empty()
        assert sink.messages == []
        sink.data_response = "250 2.0.0 OK"
        pf.flush()
        sink.wait_for(1, timeout=15)
        pf.wait_queue_empty(timeout=10)


@needs_postfix
@pytest.mark.timeout(60)
@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_ipv6_client(sink: SmtpSink) -> None:
    with PrivatePostfix(relay_port=sink.port, ipv6=True) as pf:
        result = send(
            "::1",
            pf.smtp_port,
            "alice@example.org",
            "bob@example.net",
            MESSAGE,
            source_address=("::1", 0),
        )
        assert result.ok, result
        sink.wait_for(1, timeout=15)
        pf.wait_log(r"connect from unknown\[::1\]", timeout=5)
    assert b"[IPv6:::1]" in sink.messages[0].data.split(b"\r\n\r\n", 1)[0]


@pytest.mark.skipif(
    postfix_unavailable_reason(sasl=True) is not None,
    reason=str(postfix_unavailable_reason(sasl=True)),
)
@pytest.mark.timeout(60)
def test_sasl_auth(sink: SmtpSink) -> None:
    with PrivatePostfix(relay_port=sink.port, sasl_users={"alice": "s3cret"}) as pf:
        bad = send(
            pf.host,
            pf.smtp_port,
            "alice@example.org",
            "bob@example.net",
            MESSAGE,
            auth=("alice", "wrong"),
        )
        assert bad.stage == "auth" and bad.code == 535, bad
        good = send(
            pf.host,
            pf.smtp_port,
            "alice@example.org",
            "bob@example.net",
            MESSAGE,
            auth=("alice", "s3cret"),
        )
        assert good.ok, good
        [msg] = sink.wait_for(1, timeout=15)
    assert b"with ESMTPA" in msg.data  # Postfix marks authenticated submissions


@needs_postfix
@pytest.mark.timeout(60)
def test_milter_header_reaches_sink(sink: SmtpSink) -> None:
    pf = PrivatePostfix(relay_port=sink.port, milter_command_timeout=10)
    sock = pf.scratch_dir / "noop.sock"
    events = pf.scratch_dir / "events.log"
    pf.milters = f"unix:{sock}"
    milter = start_noop_milter(f"unix:{sock}", header="X-Noop-Milter", value="added", log=events)
    try:
        with pf:
            result = send(pf.host, pf.smtp_port, "alice@example.org", "bob@example.net", MESSAGE)
            assert result.ok, result
            [msg] = sink.wait_for(1, timeout=15)
            seen = events.read_text().splitlines()
    finally:
        stop_milter(milter)
    assert msg.header("X-Noop-Milter") == ["added"]
    assert seen == [
        "connect 127.0.0.1",
        "envfrom <alice@example.org>",
        "envrcpt <bob@example.net>",
        "eom",
    ]
    # Postfix appends milter headers at the end of the header block; the body is untouched.
    head, body = msg.data.split(b"\r\n\r\n", 1)
    assert head.endswith(b"\r\nX-Noop-Milter: added")
    assert body == MESSAGE.split(b"\r\n\r\n", 1)[1]


@needs_postfix
@pytest.mark.timeout(60)
def test_missing_milter_socket_tempfails(sink: SmtpSink) -> None:
    pf = PrivatePostfix(relay_port=sink.port, milter_default_action="tempfail")
    missing: Path = pf.scratch_dir / "nobody-listens.sock"
    pf.milters = f"unix:{missing}"
    with pf:
        result = send(pf.host, pf.smtp_port, "alice@example.org", "bob@example.net", MESSAGE)
        pf.wait_log(r"warning: connect to Milter service unix:.*nobody-listens\.sock", timeout=5)
        assert pf.postqueue_empty()
    assert result.code == 451, result
    assert result.stage == "mail"
    assert result.text.startswith("4.7.1")
    assert sink.messages == []


@needs_postfix
@pytest.mark.timeout(60)
def test_start_failure_raises_with_maillog_and_cleans_up() -> None:
    port = free_port()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        pf = PrivatePostfix(smtp_port=port, relay_port=free_port())
        with pytest.raises(PostfixError, match=r"(?s)maillog.*Address already in use"):
            pf.start()
    assert not pf.root.exists()
    assert not pf.running


# ------------------------------------------------------------------------------ DNS

DKIM_KEY = "v=DKIM1; k=rsa; p=" + "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" * 10  # 458 B


def _resolver(port: int, *, lifetime: float = 3.0) -> dns.resolver.Resolver:
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = ["127.0.0.1"]
    r.port = port
    r.timeout = lifetime
    r.lifetime = lifetime
    return r


@pytest.mark.timeout(60)
def test_dns_answers_nxdomain_nodata_servfail_and_silence() -> None:
    zone: dict[str, dict[str, Any]] = {
        "Example.COM.": {
            "TXT": ["v=spf1 ip4:192.0.2.0/24 -all"],
            "MX": [(10, "mx.example.com")],
            "A": ["192.0.2.1"],
        },
        "sel._domainkey.example.com": {"TXT": [DKIM_KEY]},
        "www.example.com": {"CNAME": "example.com"},
    }
    with ZoneServer(zone, servfail=["broken.example.com"]) as ns:
        r = _resolver(ns.port)

        txt = r.resolve("example.com", "TXT")
        assert [b"".join(rd.strings) for rd in txt] == [b"v=spf1 ip4:192.0.2.0/24 -all"]

        # >255 bytes: one record, several character-strings, concatenation == original.
        dkim = r.resolve("SEL._domainkey.example.com.", "TXT")
        assert dkim.rrset is not None and len(dkim.rrset) == 1
        strings = dkim.rrset[0].strings
        assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
        assert b"".join(strings).decode() == DKIM_KEY

        mx = r.resolve("example.com", "MX")
        assert [(rd.preference, str(rd.exchange)) for rd in mx] == [(10, "mx.example.com.")]
        a = r.resolve("www.example.com", "A")  # via CNAME
        assert [rd.address for rd in a] == ["192.0.2.1"]

        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("unknown.example.com", "TXT")
        with pytest.raises(dns.resolver.NoAnswer):  # known name, missing type
            r.resolve("example.com", "AAAA")
        with pytest.raises(dns.resolver.NoNameservers):  # SERVFAIL from the only server
            r.resolve("broken.example.com", "A")

        # Runtime zone replacement.
        ns.set_zone({"example.com": {"TXT": ["v=spf1 +all"]}})
        assert [b"".join(rd.strings) for rd in r.resolve("example.com", "TXT")] == [b"v=spf1 +all"]
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("sel._domainkey.example.com", "TXT")

        assert ns.query_count("example.com", "TXT") == 2
        assert ns.query_count("unknown.example.com") == 1

        # Silent: the client times out (bounded by the short lifetime).
        ns.set_silent(True)
        started = time.monotonic()
        with pytest.raises(dns.exception.Timeout):
            _resolver(ns.port, lifetime=0.5).resolve("example.com", "TXT")
        assert time.monotonic() - started < 3
        assert ns.query_log[-1].outcome == "dropped"


@pytest.mark.timeout(60)
def test_dns_udp_truncation_falls_back_to_tcp() -> None:
    with ZoneServer({"sel._domainkey.example.com": {"TXT": [DKIM_KEY * 2]}}) as ns:
        query = dns.message.make_query("sel._domainkey.example.com", "TXT", use_edns=False)
        udp = dns.query.udp(query, "127.0.0.1", port=ns.port, timeout=2)
        assert udp.flags & dns.flags.TC and not udp.answer
        tcp = dns.query.tcp(query, "127.0.0.1", port=ns.port, timeout=2)
        assert b"".join(tcp.answer[0][0].strings).decode() == DKIM_KEY * 2
        # The stub resolver does the same dance by itself.
        answer = _resolver(ns.port).resolve("sel._domainkey.example.com", "TXT")
        assert answer.rrset is not None
        assert b"".join(answer.rrset[0].strings).decode() == DKIM_KEY * 2
        protocols = [q.protocol for q in ns.query_log]
        assert protocols.count("tcp") == 2, ns.query_log
