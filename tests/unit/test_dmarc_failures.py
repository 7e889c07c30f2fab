"""DMARC failure reports (RFC 7489 7.3, RFC 6591): when ``fo`` asks for one, the report's
format, and the spool -> sender -> SMTP path through the harness and a sink on loopback."""

from __future__ import annotations

import email
import email.policy
import json
import os
import re
import socket
import threading
import time
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from milterd_plugins.dmarc import DMARCConfig, DMARCPlugin, _psl
from milterd_plugins.dmarc.failures import (
    FailureInfo,
    FailureSender,
    FailureSpool,
    Redactor,
    SenderSettings,
    failure_report,
    wanted,
)

from milterd import (
    AddHeader,
    ConfigError,
    Context,
    Message,
    Result,
    TempFail,
    Verdict,
    hookimpl,
)
from milterd.testing import FakeResolver, Harness
from tests.support.sink import SmtpSink


def R(method: str, result: str, **props: str) -> Result:  # noqa: N802
    return Result(
        method, result, properties=tuple((k.replace("_", "."), v) for k, v in props.items())
    )


@pytest.mark.parametrize(
    ("fo", "dmarc", "dkim_al", "spf_al", "results", "want"),
    [
        ("0", "fail", False, False, [], True),
        ("0", "pass", True, False, [], False),
        ("", "fail", False, False, [], True),  # fo absent: 0
        ("1", "pass", True, False, [], True),  # SPF did not align
        ("1", "pass", True, True, [], False),
        ("d", "pass", True, True, [R("dkim", "fail", header_d="x.example")], True),
        ("d", "fail", False, False, [R("dkim", "pass", header_d="x.example")], False),
        ("s", "pass", True, False, [R("spf", "fail", smtp_mailfrom="x.example")], True),
        ("s", "pass", True, False, [R("spf", "fail", smtp_helo="x.example")], False),
        ("d:s", "pass", True, True, [R("spf", "fail", smtp_mailfrom="x.example")], True),
        ("x", "fail", False, False, [], False),  # only unknown options: none asked for
    ],
)
def test_fo_decides(fo: str, dmarc: str, dkim_al: bool, spf_al: bool,
                    results: list[Result], want: bool) -> None:  # fmt: skip
    assert wanted(fo, dmarc, dkim_al, spf_al, results) is want


def test_report_is_rfc6591_with_the_header_block_only() -> None:
    headers = b"From: a@example.org\r\nSubject: caf\xc3\xa9\r\n"
    info = FailureInfo(
        "example.org", "192.0.2.7", "bounce@example.org", "mx.test; dmarc=fail", "reject",
        ["spf"], ("example.org", "s1"), headers,
    )  # fmt: skip
    raw = failure_report(info, "mx.test", "dmarc@mx.test")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "feedback-report"
    text, feedback, original = msg.iter_parts()
    assert [p.get_content_type() for p in (text, feedback, original)] == [
        "text/plain", "message/feedback-report", "text/rfc822-headers",
    ]  # fmt: skip
    payload = feedback.get_payload()  # the library parses message/* into a sub-message
    assert isinstance(payload, list) and isinstance(payload[0], EmailMessage)
    fields = {k: str(v) for k, v in payload[0].items()}
    assert fields["Feedback-Type"] == "auth-failure"
    assert fields["Auth-Failure"] == "dmarc"
    assert fields["Version"] == "1"
    assert fields["Source-IP"] == "192.0.2.7"
    assert fields["Reported-Domain"] == "example.org"
    assert fields["Original-Mail-From"] == "<bounce@example.org>"
    assert fields["Identity-Alignment"] == "spf"
    assert fields["Delivery-Result"] == "reject"
    assert fields["DKIM-Domain"] == "example.org" and fields["DKIM-Selector"] == "s1"
    assert original.get_payload(decode=True) == headers
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998


HEADERS = (
    b"Received: from mail.example.org (mail.example.org [192.0.2.7])\r\n"
    b"\tby mx.test with ESMTP id 4XyZ for <bob@example.net>; 1 Dec 2026 10:00:00 +0000\r\n"
    b"Return-Path: <bounce@example.org>\r\n"
    b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; i=alice@example.org;\r\n"
    b"\th=from:to; bh=YWJj; b=eHl6/+==\r\n"
    b'From: "Alice Anders" <alice@example.org>\r\n'
    b"Sender: alice@example.org\r\n"
    b'To: Bob <bob@example.net>,\r\n "Smith, Carol" <carol@example.net>\r\n'
    b"Cc: BOB@example.net (Bob at home)\r\n"
    b'Reply-To: "dave x"@example.org\r\n'
    b"Message-ID: <id.1@example.org>\r\n"
    b"Subject: caf\xc3\xa9\r\n"
)


def _parts(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    text, feedback, original = msg.iter_parts()
    payload = feedback.get_payload()
    assert isinstance(payload, list) and isinstance(payload[0], EmailMessage)
    headers = original.get_payload(decode=True)
    assert isinstance(headers, bytes)
    return text.get_content(), {k: str(v) for k, v in payload[0].items()}, headers


def test_redacted_report_hides_local_parts_and_keeps_domains() -> None:
    """RFC 6590: every local part becomes a keyed hash, the same within the report; the
    domains (the From domain above all), message identifiers and the rest stay."""
    info = FailureInfo(
        "example.org", "192.0.2.7", "bounce@example.org",
        "mx.test; dkim=fail header.d=example.org header.i=alice@example.org; "
        "spf=pass smtp.mailfrom=SRS0=ab=cd=example.com=erin@fwd.example",
        "reject", [], ("example.org", "s1"), HEADERS,
    )  # fmt: skip
    raw = failure_report(info, "mx.test", "dmarc@mx.test", redact=True)
    for secret in (b"alice", b"Alice", b"Anders", b"bob", b"Bob", b"carol", b"Smith",
                   b"bounce", b"dave", b"erin", b"at home"):  # fmt: skip
        assert secret not in raw, secret
    text, fields, headers = _parts(raw)
    assert "redacted (RFC 6590)" in text
    block = headers.decode("latin-1").replace("\r\n", "\n")
    lines = block.split("\n")
    token = r"([0-9a-f]{16})"

    def find(pattern: str, where: str) -> str:
        m = re.search(pattern, where, re.M)
        assert m is not None, (pattern, where)
        return m.group(1)

    alice = find(rf"^From: {token}@example\.org$", block)  # the From domain stays
    assert f"Sender: {alice}@example.org" in lines
    assert find(rf"i={token}@example\.org;", block) == alice
    assert find(rf"header\.i={token}@example\.org", fields["Authentication-Results"]) == alice
    bob, carol = re.findall(rf"^To: {token}@example\.net, {token}@example\.net$", block,
                            re.M)[0]  # fmt: skip
    assert bob not in (carol, alice)
    assert f"Cc: {bob}@example.net" in lines  # the same mailbox (case-insensitive)
    assert find(rf"for <{token}@example\.net>", block) == bob
    bounce = find(rf"^Return-Path: <{token}@example\.org>$", block)
    assert fields["Original-Mail-From"] == f"<{bounce}@example.org>"
    assert find(rf"^Reply-To: {token}@example\.org$", block) not in (alice, bounce)
    assert re.search(rf"smtp\.mailfrom={token}@fwd\.example", fields["Authentication-Results"])
    assert "Message-ID: <id.1@example.org>" in lines  # identifiers are not addresses
    assert "d=example.org; s=s1;" in block and "b=eHl6/+==" in block
    assert fields["Reported-Domain"] == "example.org"
    assert fields["DKIM-Domain"] == "example.org"
    assert headers.endswith(b"Subject: caf\xc3\xa9\r\n")
    # A new key for each report: nothing links two reports' tokens.
    _, _, other = _parts(failure_report(info, "mx.test", "dmarc@mx.test", redact=True))
    assert f"From: {alice}@example.org".encode() not in other
    # Off (the default): the header block as received.
    assert _parts(failure_report(info, "mx.test", "dmarc@mx.test"))[2] == HEADERS


def test_redactor_odd_fields() -> None:
    r = Redactor(b"k")
    t = r.token
    assert t("Bob") == t("bob") == t('"bob"') and len(t("bob")) == 16
    assert r.address("") == "" and r.address("x@example.org") == f"{t('x')}@example.org"
    assert r.headers(b"To: undisclosed-recipients:;\r\n") == b"To: undisclosed-recipients:;\r\n"
    a, b = t("a"), t("b")
    assert r.headers(b"To: a@b@example.org\r\n") == f"To: {a}@{b}@example.org\r\n".encode()
    jorg = t("j\xc3\xb6rg")  # the raw UTF-8 bytes, one latin-1 character each
    assert r.headers(b"X-Note: see j\xc3\xb6rg@example.org\r\n") == (
        f"X-Note: see {jorg}@example.org\r\n".encode()
    )
    assert r.headers(b"In-Reply-To: <x@example.org>\r\n") == b"In-Reply-To: <x@example.org>\r\n"


def test_redaction_keeps_keys_without_local_part_and_one_token_per_mailbox() -> None:
    """A key with no local part after it (``header.i=@d``, ``i=@d``) is kept whole, in
    our own fields, the keyed fields and their copies, and elsewhere; a non-ASCII sender
    gets the same token in Original-Mail-From as in the header block; hostile nesting in
    a mailbox field is redacted in place instead of failing."""
    r = Redactor(b"k")
    assert r.text("dkim=fail header.i=@example.org", keyed=True) == (
        "dkim=fail header.i=@example.org"
    )
    assert r.headers(b"DKIM-Signature: v=1; i=@example.org; d=example.org\r\n") == (
        b"DKIM-Signature: v=1; i=@example.org; d=example.org\r\n"
    )
    ar = b"X-Original-Authentication-Results: x; spf=pass smtp.mailfrom=john@example.org\r\n"
    assert r.headers(ar) == ar.replace(b"john", r.token("john").encode())
    assert r.headers(b"X-Note: i=@example.org\r\n") == b"X-Note: i=@example.org\r\n"
    info = FailureInfo(
        "example.org", "192.0.2.7", "j\u00f6rg@example.org",
        "mx.test; spf=pass smtp.mailfrom=j\u00f6rg@example.org", "reject", [],
        None, "Return-Path: <j\u00f6rg@example.org>\r\n".encode(),
    )  # fmt: skip
    raw = failure_report(info, "mx.test", "dmarc@mx.test", redact=True)
    assert "j\u00f6rg".encode() not in raw
    _text, fields, headers = _parts(raw)
    token = re.findall(r"([0-9a-f]{16})@example\.org", headers.decode("latin-1"))
    assert token and fields["Original-Mail-From"] == f"<{token[0]}@example.org>"
    assert f"smtp.mailfrom={token[0]}@example.org" in fields["Authentication-Results"]
    deep = b"To: Bob <bob@example.org> " + b"(" * 3000 + b"\r\n"
    out = r.headers(deep)
    assert b"bob@" not in out and out.startswith(b"To: Bob <")


ZONES: dict[str, dict[str, Any]] = {
    "_dmarc.example.org": {
        "TXT": [
            "v=DMARC1; p=reject; ruf=mailto:f@example.org,mailto:f@ext.example,"
            "mailto:f@nobody.example; fo=1"
        ]
    },
    "example.org._report._dmarc.ext.example": {"TXT": ["v=DMARC1"]},
    "_dmarc.zero.example": {"TXT": ["v=DMARC1; p=none; ruf=mailto:f@zero.example"]},
    "_dmarc.norf.example": {"TXT": ["v=DMARC1; p=none"]},
}


class FakeAuth:
    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        for h in message.get_all("X-Test-DKIM"):
            word, d = h.split()
            ctx.add_result(Result("dkim", word, properties=(("header.d", d[2:]),)))
        for h in message.get_all("X-Test-SPF"):
            word, d = h.split()
            ctx.add_result(Result("spf", word, properties=(("smtp.mailfrom", d),)))


class Defer:
    @hookimpl
    def eom(self, ctx: Context, message: Message) -> Verdict | None:
        return TempFail() if message.get("X-Defer") else None


def msg(frm: str, *extra: str) -> bytes:
    return (
        "".join(f"{e}\r\n" for e in (f"From: {frm}", *extra)) + "Subject: t\r\n\r\nbody\r\n"
    ).encode()


def test_failing_mail_is_reported_to_verified_ruf_addresses(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    with SmtpSink() as sink:
        cfg = {
            "auth": {},
            "defer": {},
            "dmarc": {
                "failure_reports": True,
                "failure_spool": str(spool),
                "report_smtp_port": sink.port,
                "org_name": "mx.test",
                "report_email": "dmarc@mx.test",
                "failure_reports_per_hour": 2,
            },
        }
        plugins = {"auth": FakeAuth, "defer": Defer, "dmarc": DMARCPlugin}
        with Harness(cfg, plugins=plugins, zones=ZONES) as h:
            out = h.send(msg("a@example.org"), client_ip="192.0.2.7")
            assert out.verdict == "reject"
            got = sink.wait_for(2, timeout=20)
            assert sorted(m.rcpt_tos[0] for m in got) == ["f@example.org", "f@ext.example"]
            report = email.message_from_bytes(got[0].data, policy=email.policy.default)
            assert isinstance(report, EmailMessage)
            assert report.get_content_type() == "multipart/report"
            assert report["To"] in ("f@example.org", "f@ext.example")
            (original,) = [p for p in report.iter_parts()
                           if p.get_content_type() == "text/rfc822-headers"]  # fmt: skip
            headers = original.get_payload(decode=True)
            assert isinstance(headers, bytes)
            assert headers.startswith(b"From: a@example.org\r\n") and b"body" not in headers
            deadline = time.monotonic() + 10
            while list(spool.glob("*.report")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not list(spool.glob("*.report"))

            # fo=1: a DMARC pass whose SPF did not align is reported too.
            h.send(msg("a@example.org", "X-Test-DKIM: pass d=example.org"))
            sink.wait_for(4, timeout=20)
            # fo=0 (default) and a pass: nothing; no ruf: nothing; tempfail: nothing.
            h.send(msg("a@zero.example", "X-Test-SPF: pass zero.example"))
            h.send(msg("a@norf.example"))
            h.send(msg("a@zero.example", "X-Defer: yes"))
            # The third failure within the hour goes over failure_reports_per_hour = 2:
            # kept in the spool for a later hour, not sent, not dropped.
            h.send(msg("a@example.org"))
            # The sender's pass over it is done when it marks the refused address.
            done: list[str] = []
            deadline = time.monotonic() + 20
            while not done and time.monotonic() < deadline:
                for kept in spool.glob("*.report"):
                    done = json.loads(kept.read_bytes().split(b"\n", 1)[0]).get("done", [])
                time.sleep(0.05)
            assert done == ["f@nobody.example"]  # refused (7.1); the two others wait
            assert len(sink.messages) == 4, [m.rcpt_tos for m in sink.messages]
            assert len(list(spool.glob("*.report"))) == 1
            # A reload (a new generation) takes the one sender over: no second sender,
            # so nothing is sent twice, and the hour's count goes on.
            with Harness(cfg, plugins=plugins, zones=ZONES) as h2:
                h2.send(msg("a@zero.example"))  # fo=0, fail: another address
                got = sink.wait_for(5, timeout=20)
                assert [m.rcpt_tos for m in got[4:]] == [["f@zero.example"]]
                deadline = time.monotonic() + 20  # the sent report's file goes after the send
                while len(list(spool.glob("*.report"))) > 1 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert len(sink.messages) == 5 and len(list(spool.glob("*.report"))) == 1
                threads = [t for t in threading.enumerate() if t.name == "dmarc-failures"]
                assert len(threads) == 1


def test_shutdown_waits_for_the_senders_pass_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last generation's shutdown only paused the sender: a pass under way went on
    rewriting the spool after shutdown returned, and the thread lived on."""
    started, events = threading.Event(), []
    real_once = FailureSender.run_once

    def slow_once(self: FailureSender) -> dict[str, int]:
        if self.settings.spool is not None:
            started.set()
            time.sleep(0.3)
            events.append("pass")
        counts: dict[str, int] = real_once(self)
        return counts

    monkeypatch.setattr(FailureSender, "run_once", slow_once)
    cfg = {"dmarc": {"failure_reports": True, "failure_spool": str(tmp_path / "spool"),
                     "report_smtp_port": 9}}  # fmt: skip
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES):
        assert started.wait(5)
    assert events == ["pass"]
    assert not [t for t in threading.enumerate() if t.name == "dmarc-failures"]
    # A later generation starts a sender again.
    started.clear()
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES):
        assert started.wait(5)
        assert [t for t in threading.enumerate() if t.name == "dmarc-failures"]


class FailsAtWorkerStart:
    after = ("dmarc",)  # dmarc started first: this refusal unwinds it (no worker_ready)

    @hookimpl
    def worker_start(self) -> None:
        raise OSError("redis down")


def test_a_refused_reload_leaves_the_running_generations_sender_alone(tmp_path: Path) -> None:
    """The refused generation's unwinding released the sender it had just taken over:
    the running generation sent no failure report until the next good reload."""
    from milterd_plugins.dmarc import failures

    with SmtpSink() as sink:
        cfg: dict[str, Any] = {"auth": {}, "dmarc": {
            "failure_reports": True, "failure_spool": str(tmp_path / "spool"),
            "report_smtp_port": sink.port, "report_email": "dmarc@mx.test"}}  # fmt: skip
        plugins = {"auth": FakeAuth, "dmarc": DMARCPlugin}
        with Harness(cfg, plugins=plugins, zones=ZONES) as h:
            refused = {**cfg, "flaky": {}}
            with pytest.raises(ConfigError, match="redis down"), Harness(
                refused, plugins={**plugins, "flaky": FailsAtWorkerStart}, zones=ZONES
            ):
                pass
            sender = failures._SHARED
            assert sender is not None and sender.settings.spool is not None
            assert sender.thread is not None and sender.thread.is_alive()
            h.send(msg("a@example.org"), client_ip="192.0.2.7")
            assert len(sink.wait_for(2, timeout=20)) == 2


class SlowThenFails:
    after = ("dmarc",)

    @hookimpl
    def worker_start(self) -> None:
        time.sleep(1.0)  # a Redis connect timing out
        raise OSError("redis down")


def test_a_refused_reloads_settings_are_never_used_to_send(tmp_path: Path) -> None:
    """Registering woke the sender with the new generation's settings at once: while a
    later plugin's worker_start was still failing, a pass sent the spool with the
    refused configuration's SMTP server."""
    spool = str(tmp_path / "spool")
    base: dict[str, Any] = {"failure_reports": True, "failure_spool": spool,
                            "report_email": "dmarc@mx.test"}  # fmt: skip
    plugins = {"auth": FakeAuth, "dmarc": DMARCPlugin}
    with SmtpSink() as sink:
        running = {"auth": {}, "dmarc": {**base, "report_smtp_port": 9}}  # nothing listens
        with Harness(running, plugins=plugins, zones=ZONES) as h:
            h.send(msg("a@example.org"), client_ip="192.0.2.7")  # spooled, deferred
            refused = {"auth": {}, "dmarc": {**base, "report_smtp_port": sink.port},
                       "flaky": {}}  # fmt: skip
            with pytest.raises(ConfigError, match="redis down"), Harness(
                refused, plugins={**plugins, "flaky": SlowThenFails}, zones=ZONES
            ):
                pass
            time.sleep(0.5)
            assert sink.messages == []


def test_a_sender_still_sending_at_shutdown_is_revived_not_doubled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown's wait ended while a pass was still sending; the next generation started a
    second sender beside it, and a report could go out twice."""
    from milterd_plugins.dmarc import failures

    monkeypatch.setattr(failures, "RELEASE_JOIN_S", 0.1)
    busy, release = threading.Event(), threading.Event()
    real_once = FailureSender.run_once

    def slow_once(self: FailureSender) -> dict[str, int]:
        if self.settings.spool is not None and not release.is_set():
            busy.set()
            release.wait(10)
        counts: dict[str, int] = real_once(self)
        return counts

    monkeypatch.setattr(FailureSender, "run_once", slow_once)
    cfg = {"dmarc": {"failure_reports": True, "failure_spool": str(tmp_path / "spool"),
                     "report_smtp_port": 9}}  # fmt: skip
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES):
        assert busy.wait(5)
    # Shut down, the pass still under way: the next generation takes the same thread.
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES):
        threads = [t for t in threading.enumerate() if t.name == "dmarc-failures"]
        assert len(threads) == 1
        release.set()
        time.sleep(0.2)
        assert threads[0].is_alive()  # revived: it goes on after its pass
    threads[0].join(5)
    assert not threads[0].is_alive()


def test_sender_keeps_deferred_reports_and_drops_bad_files(tmp_path: Path) -> None:
    spool = FailureSpool(str(tmp_path), 3)
    assert spool.put("example.org", "mailto:f@example.org", b"Subject: r\r\n\r\nx\r\n")
    (tmp_path / "0-bad.report").write_bytes(b"not json\n")
    dns = FakeResolver()
    sender = FailureSender(SenderSettings(spool, dns, _psl(), "127.0.0.1", 1, "dmarc@mx.test", 10))
    counts = sender.run_once()
    assert counts["bad"] == 1 and counts["deferred"] == 1
    (left,) = spool.files()
    head, _ = spool.read(left)
    assert head["done"] == []
    # Old enough: dropped instead of kept for ever.
    head["created"] = time.time() - 2 * 86400
    spool.update(left, head, b"Subject: r\r\n\r\nx\r\n")
    assert sender.run_once()["expired"] == 1
    assert spool.files() == []
    # A full spool writes nothing more.
    assert all(spool.put(f"d{i}.example", "", b"x") for i in range(3))
    assert not spool.put("example.org", "", b"x")


def test_failure_reports_need_a_spool() -> None:
    with pytest.raises(ValueError, match="failure_spool"):
        DMARCConfig.model_validate({"failure_reports": True})
    assert json.dumps(DMARCConfig.model_validate({}).failure_reports) == "false"


def test_failed_attempts_use_no_quota(tmp_path: Path) -> None:
    """An MTA down for a while: the report waits, and the hourly cap counts sends only
    (it used to count attempts, and then drop the report as over the cap)."""
    spool = FailureSpool(str(tmp_path), 10)
    spool.put("example.org", "mailto:f@example.org", b"Subject: r\r\n\r\nx\r\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    sender = FailureSender(
        SenderSettings(spool, FakeResolver(), _psl(), "127.0.0.1", dead, "d@mx.test", 1)
    )
    for _ in range(3):
        assert sender.run_once()["deferred"] == 1
    with SmtpSink() as sink:
        sender.configure(replace(sender.settings, port=sink.port))
        assert sender.run_once()["sent"] == 1
        sink.wait_for(1)
    assert spool.files() == []


class Tagger:
    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_change(AddHeader("X-Spam-Report", "quotes the body: SECRET [bcc@example.net]"))


def test_the_report_carries_the_header_block_as_received(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    cfg = {"auth": {}, "tag": {}, "dmarc": {"failure_reports": True,
                                            "failure_spool": str(spool)}}  # fmt: skip
    plugins = {"auth": FakeAuth, "tag": Tagger, "dmarc": DMARCPlugin}
    with SmtpSink() as sink:
        cfg["dmarc"]["report_smtp_port"] = sink.port
        with Harness(cfg, plugins=plugins, zones=ZONES) as h:
            out = h.send(msg("a@zero.example"))
            assert out.header("X-Spam-Report") is not None  # delivered with it
            (m,) = sink.wait_for(1, timeout=20)
    assert b"SECRET" not in m.data and b"bcc@example.net" not in m.data


def test_failure_reports_redact_redacts_what_is_spooled_and_sent(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    cfg: dict[str, Any] = {
        "auth": {},
        "dmarc": {"failure_reports": True, "failure_spool": str(spool),
                  "failure_reports_redact": True},
    }  # fmt: skip
    plugins = {"auth": FakeAuth, "dmarc": DMARCPlugin}
    with SmtpSink() as sink:
        cfg["dmarc"]["report_smtp_port"] = sink.port
        with Harness(cfg, plugins=plugins, zones=ZONES) as h:
            h.send(msg("Alice <alice@zero.example>", "To: bob@example.net"))
            (m,) = sink.wait_for(1, timeout=20)
    _, _, headers = _parts(m.data)
    assert b"alice" not in m.data and b"bob" not in m.data
    assert re.search(rb"^From: [0-9a-f]{16}@zero\.example\r$", headers, re.M)
    assert re.search(rb"^To: [0-9a-f]{16}@example\.net\r$", headers, re.M)
    assert DMARCConfig.model_validate({}).failure_reports_redact is False


def test_ruf_override_and_long_results_and_spool_hygiene(tmp_path: Path) -> None:
    from milterd_plugins.dmarc.reports import Destination, authorize

    dns = FakeResolver(
        {"example.org._report._dmarc.ext.example":
         {"TXT": ["v=DMARC1; rua=mailto:agg@ext.example; ruf=mailto:forensic@ext.example"]}}
    )  # fmt: skip
    allowed, _, _ = authorize(dns, _psl(), "example.org", [Destination("f@ext.example")],
                              tag="ruf")  # fmt: skip
    assert [d.address for d in allowed] == ["forensic@ext.example"]
    results = "mx.test; " + "; ".join(f"dkim=fail header.d={'d' * 200}.example" for _ in range(8))
    info = FailureInfo("example.org", "192.0.2.7", "a@example.org", results, "reject")
    raw = failure_report(info, "mx.test", "dmarc@mx.test")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    spool = FailureSpool(str(tmp_path / "s"), 5)
    stale = spool.dir / ".old.tmp"
    stale.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert spool.sweep() == 1 and not stale.exists()


def test_one_domain_cannot_fill_the_spool_for_everyone(tmp_path: Path) -> None:
    """Found by a security review: reports over a ruf address's hourly limit wait, so a
    domain whose owner sends failing mail as it could keep a shared spool full."""
    spool = FailureSpool(str(tmp_path / "spool"), max_reports=30)
    ruf = "mailto:me@attacker.example"
    attacker = [spool.put("attacker.example", ruf, b"r") for _ in range(10)]
    assert attacker == [True, True, True, False] + [False] * 6  # a tenth of 30
    assert spool.put("Attacker.Example", "mailto:me@attacker.example", b"r") is False
    assert all(spool.put(f"d{i}.example", "mailto:r@x.example", b"r") for i in range(9))
    assert spool.put("victim.example", "mailto:r@victim.example", b"r") is True
    assert len(spool.files()) == 3 + 9 + 1


def test_the_spool_share_is_per_owner_not_per_subdomain(tmp_path: Path) -> None:
    """A wildcard TXT makes every subdomain a policy domain: the share is counted by the
    organizational domain (found by a review)."""
    spool = FailureSpool(str(tmp_path / "spool"), max_reports=20)
    accepted = [spool.put(f"r{i}.attacker.example", "mailto:me@attacker.example", b"r",
                          owner="attacker.example") for i in range(20)]  # fmt: skip
    assert accepted.count(True) == 2
    assert spool.put("example.org", "mailto:r@example.org", b"r", owner="example.org")
