"""End to end: SMTP client -> private Postfix or sendmail -> milterd (spf, dmarc, authres)
-> sink, with every DNS answer from the test DNS server on loopback.

Every test runs through both MTAs (:func:`tests.integration.mta.make_mta`, one rig per
MTA for the module). The SMTP client is 127.0.0.1, so the zone authorizes (or not)
127.0.0.1, and ``internal_networks`` is emptied so loopback is not "trusted". Messages
carry Date and Message-ID so that sendmail adds no header of its own.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import authres
import pytest

from tests.integration.daemon import Daemon
from tests.integration.mta import HOLD_RE, KINDS, MTA, Kind, accepted_queue_id, make_mta
from tests.support.dnsserver import ZoneServer
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import SendResult, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ZONE = {
    "client.example": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "badhelo.example": {"TXT": ["v=spf1 -all"]},
    "example.org": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; sp=none"]},
    "other.example": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "fail.example": {"TXT": ["v=spf1 -all"]},
    "soft.example": {"TXT": ["v=spf1 ~all"]},
    "silent.example": {"TXT": ["v=spf1 -all"]},
    "quar.example": {"TXT": ["v=spf1 -all"]},
    "_dmarc.quar.example": {"TXT": ["v=DMARC1; p=quarantine"]},
}

CONFIG = """
[plugins.spf]
skip_addresses = []
HELO_reject = "Fail"
Mail_From_reject = "Fail"
TempError_Defer = true
Header_Type = "SPF,AR"
Lookup_Time = 4
[plugins.t_dkim_result]
[plugins.dmarc]
[plugins.authres]
"""


@dataclass
class Rig:
    kind: Kind
    dns: ZoneServer
    daemon: Daemon
    mta: MTA
    sink: SmtpSink

    def send(
        self,
        sender: str,
        from_header: str,
        extra: bytes = b"",
        helo: str = "client.example",
        subject: str = "t",
    ) -> SendResult:
        data = (
            f"From: {from_header}\r\nTo: bob@example.net\r\nSubject: {subject}\r\n"
            f"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@t>\r\n"
        ).encode()
        data += extra + b"\r\nHello.\r\n"
        return send("127.0.0.1", self.mta.smtp_port, sender, ["bob@example.net"], data, helo)

    def delivered(self, subject: str, timeout: float = 15) -> SinkMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.sink.messages:
                if f"Subject: {subject}\r\n".encode() in m.data:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"{subject!r} not delivered:\n{self.daemon.log_text()[-3000:]}")


@pytest.fixture(scope="module", params=KINDS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind: Kind = request.param
    with ZoneServer(ZONE) as dns:
        extra = 'internal_networks = []\n[dns]\nnameservers = ["127.0.0.1:%d"]\ntimeout = 2\n'
        with (
            Daemon(CONFIG, socket_kind="unix", milterd_extra=extra % dns.port) as d,
            SmtpSink() as sink,
            make_mta(kind, sink_port=sink.port, milter=d.socket) as mta,
        ):
            yield Rig(kind, dns, d, mta, sink)


def ar(msg: SinkMessage) -> list[tuple[str, str, dict[str, str]]]:
    (value,) = msg.header("Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert parsed.authserv_id == "mx.test"
    return [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in parsed.results
    ]


def test_spf_pass_with_received_spf_and_one_authentication_results(rig: Rig) -> None:
    res = rig.send("alice@example.org", "alice@example.org", subject="spf-pass")
    assert res.ok, res
    msg = rig.delivered("spf-pass")
    results = ar(msg)
    assert ("spf", "pass", {"smtp.helo": "client.example"}) in results
    assert ("spf", "pass", {"smtp.mailfrom": "example.org"}) in results
    assert ("dmarc", "pass", {"header.from": "example.org", "policy.dmarc": "none"}) in results
    (rspf,) = msg.header("Received-SPF")
    assert rspf.startswith("pass ") and "client-ip=127.0.0.1;" in rspf
    head = msg.data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    first = [line.split(b":", 1)[0] for line in head if line[:1] not in (b" ", b"\t")][:3]
    assert first[0] == b"Authentication-Results"  # on top, above the MTA's Received
    assert b"Received" in first


def test_spf_fail_rejected_at_mail_from(rig: Rig) -> None:
    res = rig.send("x@fail.example", "x@fail.example")
    assert res.rejected and res.code == 550 and res.stage == "mail", res
    assert "5.7.23" in res.text


def test_spf_softfail_recorded_and_delivered(rig: Rig) -> None:
    res = rig.send("x@soft.example", "x@soft.example", subject="softfail")
    assert res.ok, res
    assert ("spf", "softfail", {"smtp.mailfrom": "soft.example"}) in ar(rig.delivered("softfail"))


def test_spf_temperror_when_dns_is_silent_is_deferred(rig: Rig) -> None:
    rig.dns.set_silent(True)
    try:
        started = time.monotonic()
        res = rig.send("x@silent.example", "x@silent.example")
        took = time.monotonic() - started
    finally:
        rig.dns.set_silent(False)
    assert res.tempfail and res.code == 451 and "4.7.24" in res.text, res
    # bounded by the lookup deadline, below sendmail's R:10s and far below Postfix's 30 s
    assert took < 10


def test_helo_check_rejects(rig: Rig) -> None:
    res = rig.send("alice@example.org", "alice@example.org", helo="badhelo.example")
    assert res.rejected and res.code == 550 and "5.7.23" in res.text, res


def test_null_sender_checks_postmaster_at_helo(rig: Rig) -> None:
    res = rig.send("", "mailer-daemon@client.example", subject="null-sender")
    assert res.ok, res
    results = ar(rig.delivered("null-sender"))
    assert ("spf", "pass", {"smtp.mailfrom": "client.example"}) in results


def test_dmarc_pass_through_dkim_only(rig: Rig) -> None:
    res = rig.send(
        "bounce@other.example",
        "alice@example.org",
        b"X-Test-DKIM: pass d=example.org\r\n",
        subject="dkim-only",
    )
    assert res.ok, res
    results = ar(rig.delivered("dkim-only"))
    assert ("dkim", "pass", {"header.d": "example.org"}) in results
    assert ("dmarc", "pass", {"header.from": "example.org", "policy.dmarc": "none"}) in results


def test_dmarc_pass_through_spf_only(rig: Rig) -> None:
    res = rig.send("alice@example.org", "Alice <alice@example.org>", subject="spf-only")
    assert res.ok, res
    results = ar(rig.delivered("spf-only"))
    assert not [r for r in results if r[0] == "dkim"]
    assert ("dmarc", "pass", {"header.from": "example.org", "policy.dmarc": "none"}) in results


def test_dmarc_fail_with_p_reject_is_rejected(rig: Rig) -> None:
    res = rig.send("bounce@other.example", "alice@example.org")
    assert res.rejected and res.code == 550 and res.stage == "data", res
    assert "5.7.1" in res.text


def test_dmarc_subdomain_policy_sp_none_delivers(rig: Rig) -> None:
    res = rig.send("bounce@other.example", "alice@news.example.org", subject="sp-none")
    assert res.ok, res
    results = ar(rig.delivered("sp-none"))
    want = ("dmarc", "fail", {"header.from": "news.example.org", "policy.dmarc": "none"})
    assert want in results


@pytest.mark.parametrize("from_domain", ["quar.example", "shop.quar.example"])
def test_dmarc_quarantine_holds_the_message(rig: Rig, from_domain: str) -> None:
    # quar.example: p=quarantine; shop.quar.example: no record of its own, so the policy of
    # the organizational domain applies (p, there being no sp).
    # Postfix moves it to its hold queue, sendmail keeps it as an hf file.
    mark = rig.mta.log_mark()
    subject = f"quarantine-{from_domain}"
    res = rig.send("bounce@other.example", f"a@{from_domain}", subject=subject)
    assert res.ok, res
    rig.mta.wait_log(HOLD_RE[rig.kind], since=mark)
    rig.daemon.wait_log(f"dmarc quarantine {from_domain}")
    assert accepted_queue_id(res.text) in rig.mta.held_ids(), (res.text, rig.mta.held_ids())
    time.sleep(0.5)
    assert not [m for m in rig.sink.messages if f"Subject: {subject}\r\n".encode() in m.data]


def test_forged_authentication_results_removed_others_intact(rig: Rig) -> None:
    extra = (
        b"Authentication-Results: mx.test; spf=pass smtp.mailfrom=forged.example\r\n"
        b"Authentication-Results: other.example; spf=fail smtp.mailfrom=a.example\r\n"
        b"ARC-Authentication-Results: i=1; mx.test; dmarc=pass\r\n"
        b"Authentication-Results: lists.example; dkim=pass header.d=b.example\r\n"
        b"Authentication-Results: (forged) MX.TEST; dkim=pass\r\n"
        b"ARC-Authentication-Results: i=1; lists.example; arc=none\r\n"
        b"Authentication-Results: mx.test;\r\n\tdmarc=pass header.from=example.org\r\n"
        b"X-Between: kept\r\n"
    )
    res = rig.send("alice@example.org", "alice@example.org", extra, subject="forged")
    assert res.ok, res
    msg = rig.delivered("forged")
    head = msg.data.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.findall(
        r"^((?:ARC-)?Authentication-Results): ?([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head, re.M
    )
    assert fields[0][0] == "Authentication-Results" and fields[0][1].startswith("mx.test;")
    assert fields[1:] == [
        ("Authentication-Results", "other.example; spf=fail smtp.mailfrom=a.example"),
        # ARC sets are sealed: never deleted, whatever authserv-id they carry
        ("ARC-Authentication-Results", "i=1; mx.test; dmarc=pass"),
        ("Authentication-Results", "lists.example; dkim=pass header.d=b.example"),
        ("ARC-Authentication-Results", "i=1; lists.example; arc=none"),
    ]
    assert "forged.example" not in head
    assert head.count("mx.test;") == 2  # ours on top, and the untouched ARC one
    assert head.endswith(
        "\r\nARC-Authentication-Results: i=1; lists.example; arc=none\r\nX-Between: kept"
    )


def test_fail_only_recorded_after_reload_with_mail_from_reject_false(rig: Rig) -> None:
    rig.daemon.write(CONFIG.replace('Mail_From_reject = "Fail"', 'Mail_From_reject = "False"'))
    mark = len(rig.daemon.log_text())
    rig.daemon.signal(signal.SIGHUP)
    rig.daemon.wait_log("reload", after=mark)
    time.sleep(0.5)
    res = rig.send("x@fail.example", "x@fail.example", subject="fail-recorded")
    assert res.ok, res
    results = ar(rig.delivered("fail-recorded"))
    assert ("spf", "fail", {"smtp.mailfrom": "fail.example"}) in [
        (m, r, {k: v for k, v in p.items() if k != "reason"}) for m, r, p in results
    ]
