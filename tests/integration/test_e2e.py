"""End to end over both MTAs: SMTP client -> a private Postfix or sendmail 8.17 on loopback
-> milterd (unix socket and TCP) -> sink.

One code path for both MTAs (:func:`tests.integration.mta.make_mta`); every test runs for
each of (postfix, sendmail) x (unix, inet).  One MTA, one sink and one daemon per
combination (module-scoped); a test sets its milterd configuration with SIGHUP
(:meth:`Rig.configure`) and starts from an empty sink.  sendmail runs with the documented
``etc/sendmail.mc.snippet`` verbatim (``F=T``, ``T=C:30s;S:10s;R:10s;E:5m``), Postfix with
``milter_default_action = tempfail`` and its default milter timeouts.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import signal
import smtplib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import authres
import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from milterd_plugins.archive.store import FileStore, Query
from milterd_plugins.dkim.keys import public_txt

from milterd.events import parse_address
from tests.integration.daemon import Daemon
from tests.integration.mta import MILTER_TIMEOUT_RE, MTA, Kind, make_mta
from tests.support.dnsserver import ZoneServer
from tests.support.opendkim import opendkim_verify as support_opendkim_verify
from tests.support.postfix import PrivatePostfix, ipv6_loopback_available
from tests.support.sendmail import (
    SNIPPET,
    PrivateSendmail,
    ensure_sendmail,
    filter_line,
    sendmail_unavailable_reason,
)
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import SendResult, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

# Date and Message-ID present, so that neither MTA adds its own: the sink must see the
# MTA's Received header, then exactly these bytes (plus milterd's changes).
MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
    b"Message-ID: <e2e-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
SASL_USERS = {"alice": "s3cret-pw"}


@dataclass
class Rig:
    kind: Kind
    socket_kind: str
    daemon: Daemon
    mta: MTA
    sink: SmtpSink

    def configure(self, body: str) -> None:
        """Give milterd ``body`` (plugin sections) with SIGHUP; start from an empty sink."""
        self.ensure_daemon()
        self.daemon.write(body)
        mark = len(self.daemon.log_text())
        self.daemon.signal(signal.SIGHUP)
        self.daemon.wait_log("reloaded", after=mark)
        self.sink.clear()

    def ensure_daemon(self) -> None:
        """Restart milterd if an earlier test stopped it (or it died)."""
        if self.daemon.proc is None or self.daemon.proc.poll() is not None:
            self.daemon.start()

    def send(
        self,
        rcpts: list[str] | None = None,
        data: bytes = MESSAGE,
        host: str = "127.0.0.1",
        sender: str = "alice@example.org",
        auth: tuple[str, str] | None = None,
    ) -> SendResult:
        return send(host, self.mta.smtp_port, sender, rcpts or ["bob@example.net"], data, auth=auth)

    def delivered(self, count: int = 1, timeout: float = 15) -> list[SinkMessage]:
        return self.sink.wait_for(count, timeout)

    def queued(self) -> list[str]:
        """What the MTA still holds in its queue (would be delivered later)."""
        if isinstance(self.mta, PrivateSendmail):
            return [f for f in self.mta.queue_files() if f.startswith(("qf", "hf", "df"))]
        assert isinstance(self.mta, PrivatePostfix)
        return self.mta.queue_ids()

    def summary(self, qid: str) -> str:
        """milterd's one-line summary for queue id ``qid``."""
        lines = [x for x in self.daemon.log_text().splitlines() if f" {qid}: client=" in x]
        assert len(lines) == 1, (qid, self.daemon.log_text())
        return lines[0]


@dataclass
class World:
    """The outside world all combinations share: a DNS server and a DKIM key."""

    dns: ZoneServer
    keydir: Path
    records: dict[str, str]  # TXT records by name

    @property
    def key(self) -> Path:
        return self.keydir / "rsa.key"

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        v = self.records.get(name.decode().rstrip("."))
        return v.encode() if v else None


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    # root-owned, not world-writable: milterd's key check accepts it
    keydir = Path(tempfile.mkdtemp(prefix="milterd-e2e-", dir="/var/lib"))
    keydir.chmod(0o755)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = keydir / "rsa.key"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    records = {
        "e2e._domainkey.example.com": public_txt(key),
        "example.com": "v=spf1 ip4:127.0.0.1 ip6:::1 -all",
        "client.example": "v=spf1 ip4:127.0.0.1 ip6:::1 -all",
        "fail.example": "v=spf1 -all",
        "_dmarc.example.com": "v=DMARC1; p=reject",
    }
    try:
        with ZoneServer({k: {"TXT": [v]} for k, v in records.items()}) as dns:
            yield World(dns, keydir, records)
    finally:
        shutil.rmtree(keydir, ignore_errors=True)


@pytest.fixture(
    scope="module",
    params=[
        ("postfix", "unix"),
        ("postfix", "inet"),
        ("sendmail", "unix"),
        ("sendmail", "inet"),
    ],
    ids=lambda p: f"{p[0]}-{p[1]}",
)
def rig(request: pytest.FixtureRequest, world: World) -> Iterator[Rig]:
    kind, socket_kind = request.param
    if kind == "sendmail" and (why := sendmail_unavailable_reason()):
        pytest.skip(why)
    # Loopback is not "internal": SPF/DKIM checks apply to the test client; only SMTP AUTH
    # makes a sender trusted (signed).
    extra = (
        "internal_networks = []\n"
        f'[dns]\nnameservers = ["127.0.0.1:{world.dns.port}"]\ntimeout = 2\n'
    )
    with (
        Daemon("[plugins.t_mark]\n", socket_kind=socket_kind, milterd_extra=extra) as d,
        SmtpSink() as sink,
        make_mta(
            kind,
            sink_port=sink.port,
            milter=d.socket,
            ipv6=ipv6_loopback_available(),
            sasl_users=SASL_USERS,
            max_message_size=20_000_000,
            max_header_bytes=4_000_000,
        ) as mta,
    ):
        yield Rig(kind, socket_kind, d, mta, sink)


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].decode()
        for line in head.split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    ]


def received_id(msg: SinkMessage) -> str:
    """The queue id in the MTA's own Received header (``... with ESMTP id QID``)."""
    m = re.search(r"\bid ([0-9A-Za-z]+)", msg.header("Received")[0])
    assert m, msg.header("Received")
    return m.group(1)


# --------------------------------------------------------------------------------------


def test_headers_added_and_placed(rig: Rig) -> None:
    rig.configure(
        "[plugins.authres]\ntrusted = true\n"
        '[plugins.example_header]\ngreeting = "hi, example"\n'
        "[plugins.t_mark]\n"
    )
    res = rig.send()
    assert res.ok, res
    (msg,) = rig.delivered()
    names = header_names(msg.data)
    # Authentication-Results on top (above the MTA's Received), the client's header block
    # unchanged, then the headers plugins add, in pipeline order.
    assert names[:2] == ["Authentication-Results", "Received"], names
    assert names[-2:] == ["X-Milterd-Example", "X-Test-Mark"], names
    client_head = MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n"
    assert client_head in msg.data
    assert msg.data.endswith(
        b"\r\nX-Milterd-Example: hi, example\r\n"
        + f"X-Test-Mark: {msg.header('X-Test-Mark')[0]}\r\n".encode()
        + b"\r\nHello Bob.\r\n"
    )
    assert msg.header("Authentication-Results") == ["mx.test; none"]
    # The queue id milterd saw (sendmail: from MAIL on; Postfix: from RCPT) is the MTA's.
    qid = received_id(msg)
    assert msg.header("X-Test-Mark") == [f"marked qid={qid} client=127.0.0.1"]
    assert "verdict=continue" in rig.summary(qid)


def test_an_added_field_with_an_existing_name_goes_to_the_bottom(rig: Rig) -> None:
    """sendmail's smfi_addheader puts a field next to an existing one of the same name
    (above it); the core's model, which signatures and the archive's delivered copy
    follow, puts it at the bottom, as Postfix does. Both MTAs must agree with the model."""
    rig.configure('[plugins.t_mark]\nheader = "Subject"\n')
    res = rig.send()
    assert res.ok, res
    (msg,) = rig.delivered()
    names = [n for n in header_names(msg.data) if n != "Received"]
    assert names == ["From", "To", "Subject", "Date", "Message-ID", "Subject"], names
    assert msg.data.split(b"\r\n\r\n")[0].endswith(
        b"\r\nSubject: marked qid=" + received_id(msg).encode() + b" client=127.0.0.1"
    )


def test_reject_at_rcpt_refuses_one_recipient_and_delivers_the_others(rig: Rig) -> None:
    rig.configure("[plugins.t_reject_rcpt]\n[plugins.t_mark]\n")
    res = rig.send(["ok1@example.net", "reject-me@example.net", "ok2@example.net"])
    (msg,) = rig.delivered()
    assert res.ok and list(res.refused) == ["reject-me@example.net"], res
    code, text = res.refused["reject-me@example.net"]
    assert code == 550 and "5.1.1" in text and "Recipient refused by test plugin" in text
    assert sorted(msg.rcpt_tos) == ["ok1@example.net", "ok2@example.net"]
    assert msg.header("X-Test-Mark")
    assert "refused=[" in rig.summary(received_id(msg))


@pytest.mark.parametrize("policy", ["continue", "tempfail", "reject"])
def test_plugin_raising_in_every_hook(rig: Rig, policy: str) -> None:
    rig.configure(f'[plugins.t_raise]\non_error = "{policy}"\n[plugins.t_mark]\n')
    pid, workers = rig.daemon.pid, rig.daemon.worker_pids()
    mark = len(rig.daemon.log_text())
    res = rig.send()
    if policy == "continue":
        assert res.ok, res
        (msg,) = rig.delivered()
        assert msg.header("X-Test-Mark")
    else:
        # t_raise fails already at connect: the MTA refuses the whole session.
        if policy == "tempfail":
            assert res.code == 451 and not res.ok, res
        elif rig.kind == "sendmail":
            # a milter reject at connect: sendmail's greeting itself is 554
            assert (res.stage, res.code) == ("connect", 554), res
        else:
            assert res.rejected and not res.ok, res
        time.sleep(1)
        assert rig.sink.messages == []
    assert "t_raise fails at connect" in rig.daemon.log_text()[mark:]
    assert rig.daemon.proc is not None and rig.daemon.proc.poll() is None
    assert (rig.daemon.pid, rig.daemon.worker_pids()) == (pid, workers)


def test_plugin_sleeping_past_its_timeout_at_eom(rig: Rig) -> None:
    rig.configure(
        '[plugins.t_sleep]\nseconds = 12\ntimeout = 2\non_error = "tempfail"\n[plugins.t_mark]\n'
    )
    mark = rig.mta.log_mark()
    t0 = time.monotonic()
    res = rig.send()
    elapsed = time.monotonic() - t0
    assert res.tempfail and res.code == 451 and res.stage == "data", res
    assert 2 <= elapsed < 8, elapsed
    time.sleep(0.5)
    assert rig.sink.messages == []
    log = rig.mta.log_text().encode()[mark:].decode(errors="replace")
    assert not MILTER_TIMEOUT_RE[rig.kind].search(log), log


def test_default_deadlines_fit_under_the_mta_timeouts(rig: Rig) -> None:
    # A plugin hanging at RCPT with milterd's defaults (plugin timeout 5 s, command_timeout
    # 8 s) is cut off and answered before sendmail's R:10s (and Postfix's 30 s).
    rig.configure('[plugins.t_sleep]\nseconds = 12\nstage = "envrcpt"\n[plugins.t_mark]\n')
    mark = rig.mta.log_mark()
    dmark = len(rig.daemon.log_text())
    t0 = time.monotonic()
    res = rig.send()
    elapsed = time.monotonic() - t0
    assert res.refused.get("bob@example.net", (0, ""))[0] == 451, res
    assert 4.5 <= elapsed < 10, elapsed
    time.sleep(0.5)
    assert rig.sink.messages == []
    log = rig.mta.log_text().encode()[mark:].decode(errors="replace")
    assert not MILTER_TIMEOUT_RE[rig.kind].search(log), log
    assert "t_sleep" in rig.daemon.log_text()[dmark:]


def test_sighup_applies_a_new_config_and_keeps_the_old_one_when_broken(rig: Rig) -> None:
    rig.configure('[plugins.t_mark]\nvalue = "old"\n')
    assert rig.send().ok
    rig.daemon.write('[plugins.t_mark]\nvalue = "new"\n')
    mark = len(rig.daemon.log_text())
    rig.daemon.signal(signal.SIGHUP)
    rig.daemon.wait_log("reloaded", after=mark)
    assert rig.send().ok
    rig.daemon.write('[plugins.t_mark]\nvalue = "broken"\nnot_a_key = true\n')
    mark = len(rig.daemon.log_text())
    rig.daemon.signal(signal.SIGHUP)
    rig.daemon.wait_log("reload refused", after=mark)
    assert rig.send().ok
    msgs = rig.delivered(3)
    values = [m.header("X-Test-Mark")[0].split()[0] for m in msgs]
    # Counted, not in order: the MTA need not deliver in the order the messages came.
    assert sorted(values) == ["new", "new", "old"], values


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_ipv4_and_ipv6_clients(rig: Rig, host: str) -> None:
    if host == "::1" and not rig.mta.ipv6:
        pytest.skip("no IPv6 loopback on this machine")
    rig.configure("[plugins.t_echo]\n")
    res = rig.send(host=host)
    assert res.ok, res
    (msg,) = rig.delivered()
    (echo,) = msg.header("X-Test-Echo")
    fields = dict(f.split("=", 1) for f in echo.split())
    family = "inet6" if ":" in host else "inet"
    assert (fields["client"], fields["family"]) == (host, family), echo
    # The raw {client_addr} as the MTA sent it; sendmail writes IPv6 as
    # "IPv6:0:0:0:0:0:0:0:1", which the core must read as ::1.
    raw = fields["addr"]
    if rig.kind == "sendmail" and family == "inet6":
        assert raw == "IPv6:0:0:0:0:0:0:0:1", echo
    assert parse_address(raw) == ipaddress.ip_address(host), echo
    qid = received_id(msg)
    assert fields["qid"] == qid
    assert f"[{host}] from=<alice@example.org>" in rig.summary(qid)


def test_authenticated_submission_reaches_plugins(rig: Rig) -> None:
    rig.configure("[plugins.t_echo]\n")
    assert rig.send(auth=("alice", SASL_USERS["alice"])).ok
    assert rig.send().ok
    echoes = [m.header("X-Test-Echo")[0] for m in rig.delivered(2)]
    a, n = (dict(f.split("=", 1) for f in e.split()) for e in sorted(echoes, key=len, reverse=True))
    # {auth_authen} through AUTH PLAIN. sendmail sends the bare login name; Postfix adds
    # "@" + smtpd_sasl_local_domain when that is set (the private Postfix sets $myhostname).
    login = "alice" if rig.kind == "sendmail" else "alice@mta.test"
    assert (a["auth"], a["type"]) == (login, "PLAIN"), a
    assert (n["auth"], n["type"]) == ("", ""), n
    # {daemon_name} at connect: sendmail's DAEMON_OPTIONS Name=, Postfix's $myhostname.
    daemon = "MTA" if rig.kind == "sendmail" else "mta.test"
    assert a["daemon"] == n["daemon"] == daemon, (a, n)
    # A wrong password never reaches the milter as authenticated.
    bad = rig.send(auth=("alice", "wrong"))
    assert bad.stage == "auth" and bad.code == 535, bad


def test_milterd_stopped_gives_451_and_nothing_unfiltered(rig: Rig) -> None:
    rig.configure("[plugins.t_mark]\n")
    assert rig.daemon.stop() == 0
    try:
        results = [rig.send(), rig.send(["x@example.net", "y@example.net"])]
        for res in results:
            # sendmail F=T: "451 4.3.2 Please try again later" at MAIL; Postfix
            # milter_default_action=tempfail: "451 4.7.1 Service unavailable" at RCPT/DATA.
            assert res.code == 451 and not res.ok, res
        time.sleep(2)
        assert rig.sink.messages == []
        assert rig.queued() == []  # nothing kept to be delivered unfiltered later
    finally:
        rig.daemon.start()
    # Back up: mail flows again, filtered.
    res = rig.send()
    assert res.ok, res
    (msg,) = rig.delivered()
    assert msg.header("X-Test-Mark")
    time.sleep(1)
    assert len(rig.sink.messages) == 1


ODD = [
    b"Subject: caf\xc3\xa9 8-bit\r\nFrom: \xe2\x98\x83 <a@example.org>\r\n\r\n"
    b"8-bit body \xc3\xa4\r\n",
    b"Subject: invalid \xff\xfe utf-8\r\nX-Bad: \xc0\xaf\r\n\r\nbody \xff\r\n",
    b"Subject: nul\r\nX-Nul: a\x00b\r\n\r\nbody with \x00 NUL\r\n",
    b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 990) for i in range(1050)) + b"\r\nbig header\r\n",
]


def test_odd_input_gets_a_verdict_never_an_exception(rig: Rig) -> None:
    rig.configure("[plugins.authres]\n[plugins.t_mark]\n")
    results = [rig.send(data=m) for m in ODD]
    delivered = rig.delivered(count=sum(1 for x in results if x.ok))
    log = rig.daemon.log_text()
    assert rig.daemon.proc is not None and rig.daemon.proc.poll() is None
    # 8-bit, invalid UTF-8 and NUL are delivered; the 1 MB header block exceeds the default
    # max_header_bytes (1 MiB) and gets the documented 552.
    assert [x.ok for x in results[:3]] == [True, True, True], results
    assert results[3].code == 552 and "5.3.4" in results[3].text, results[3]
    assert "Traceback" not in log and "internal error" not in log
    assert all(m.header("X-Test-Mark") for m in delivered)


# --------------------------------------------------------------------------------------
# built-in plugins through both MTAs


def signed_message(date_and_id: bool = True) -> bytes:
    head = (
        b"From: Alice <alice@example.com>\r\n"
        b"To: Bob <bob@example.net>\r\n"
        b"Subject: figures\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=us-ascii\r\n"
    )
    if date_and_id:
        head += b"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\nMessage-ID: <e2e-dkim@example.com>\r\n"
    return head + b"\r\nHello Bob,\r\n\r\nthe figures.\r\n"


def opendkim_verify(world: World, data: bytes) -> str:
    """OpenDKIM's own verdict (``opendkim -t``, keys from TestPublicKeys, no DNS)."""
    return support_opendkim_verify(world.records, data, world.keydir)


def ar_results(msg: SinkMessage) -> list[tuple[str, str, dict[str, str]]]:
    (value,) = msg.header("Authentication-Results")
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + value)
    assert parsed.authserv_id == "mx.test"
    return [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in parsed.results
    ]


DKIM_CONFIG = (
    '[plugins.dkim]\n[plugins.dkim.keys.rsa]\nselector = "e2e"\nfile = "{key}"\n'
    '[[plugins.dkim.signing]]\npattern = "example.com"\nkeys = ["rsa"]\n'
    "[plugins.authres]\n"
)


def test_dkim_signed_by_milterd_verifies_after_the_mta(rig: Rig, world: World) -> None:
    rig.configure(DKIM_CONFIG.format(key=world.key))
    res = rig.send(
        data=signed_message(), sender="alice@example.com", auth=("alice", SASL_USERS["alice"])
    )
    assert res.ok, res
    (msg,) = rig.delivered()
    names = header_names(msg.data)
    # milterd's DKIM-Signature sits above the MTA's Received, like Authentication-Results.
    assert names.index("DKIM-Signature") < names.index("Received"), names
    assert "d=example.com" in msg.header("DKIM-Signature")[0]
    assert dkim.verify(msg.data, dnsfunc=world.dnsfunc), msg.data
    out = opendkim_verify(world, msg.data)
    assert "verification" in out and "succeeded" in out, out


def test_dkim_signature_survives_headers_the_mta_adds(rig: Rig, world: World) -> None:
    # A submission without Date/Message-ID: sendmail adds both *after* the milter signed
    # (Postfix as configured here adds none). Oversigning them while absent would break
    # the signature at every verifier; the dkim plugin oversigns them only when present.
    rig.configure(DKIM_CONFIG.format(key=world.key))
    res = rig.send(
        data=signed_message(date_and_id=False),
        sender="alice@example.com",
        auth=("alice", SASL_USERS["alice"]),
    )
    assert res.ok, res
    (msg,) = rig.delivered()
    out = opendkim_verify(world, msg.data)
    assert dkim.verify(msg.data, dnsfunc=world.dnsfunc), out
    assert "verification" in out and "succeeded" in out, out


_RECEIVED = re.compile(rb"\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*")
_RECEIVED_ANY = re.compile(rb"^Received: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*", re.MULTILINE)


def test_archive_copies_match_the_wire(rig: Rig) -> None:
    # Both MTAs prepend their Received field after the milter saw the message (and add
    # nothing else to a message that has Date and Message-ID): the as-delivered copy is
    # exactly the sink's bytes after that field, the as-received copy the client's bytes.
    archive = Path(tempfile.mkdtemp(prefix="milterd-e2e-arch-", dir="/var/tmp"))
    try:
        rig.configure(f'[plugins.t_mark]\n[plugins.archive]\npath = "{archive}"\nstore = "both"\n')
        rcpts = ["bob@example.net", "hidden@example.com"]
        assert rig.send(rcpts).ok
        (msg,) = rig.delivered()
        m = _RECEIVED.match(msg.data)
        assert m, msg.data[:300]
        rest = msg.data[m.end() :]
        qid = received_id(msg)
        store = FileStore(archive, readonly=True)
        (rec,) = [r for r in store.search(Query()) if r.queue_id == qid]
        assert sorted(rec.recipients) == sorted(rcpts) == sorted(msg.rcpt_tos)
        assert rec.client_address == "127.0.0.1"
        assert store.read(rec, "delivered") == rest
        assert store.read(rec, "received") == MESSAGE
    finally:
        shutil.rmtree(archive, ignore_errors=True)


SPAMMY = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
    b"Message-ID: <e2e-spam@example.org>\r\n"
    b"X-Spam-Level: forged\r\n"
    b"\r\n"
    b"Buy cheap pills now.\r\n"
)
SCORING = (
    "[plugins.scoring]\n"
    "[[plugins.scoring.rules]]\n"
    'name = "E2E_PILLS"\ntype = "body"\npattern = "cheap pills"\nscore = 9.0\n'
)


def test_several_messages_over_one_smtp_connection(rig: Rig, world: World) -> None:
    # Both MTAs keep one milter connection for a whole SMTP session: every transaction on
    # it is filtered on its own (signature, mark, archive record with its own Bcc
    # recipients), and a transaction abandoned with RSET leaves nothing behind.
    archive = Path(tempfile.mkdtemp(prefix="milterd-e2e-arch-", dir="/var/tmp"))
    rcpts = [
        ["bob@example.net", "hidden@example.com"],
        ["carol@example.net"],
        ["dave@example.net", "erin@example.net", "frank@example.com"],
    ]
    sent: list[bytes] = []
    try:
        rig.configure(
            DKIM_CONFIG.format(key=world.key)
            + f'[plugins.t_mark]\n[plugins.archive]\npath = "{archive}"\nstore = "both"\n'
        )
        client = smtplib.SMTP("127.0.0.1", rig.mta.smtp_port, "client.example", timeout=30)
        try:
            client.ehlo()
            client.user, client.password = "alice", SASL_USERS["alice"]
            assert client.auth("PLAIN", client.auth_plain)[0] == 235
            for i, to in enumerate(rcpts):
                if i == 1:  # abandoned: MAIL and RCPT reach the milter, then RSET
                    assert client.mail("alice@example.com")[0] == 250
                    assert client.rcpt("ghost@example.net")[0] == 250
                    assert client.rset()[0] == 250
                data = (
                    signed_message()
                    .replace(b"Subject: figures", b"Subject: part %d" % i)
                    .replace(b"<e2e-dkim@", b"<e2e-part-%d@" % i)
                    .replace(b"the figures.", b"the figures, part %d." % i * (i + 1))
                )
                assert client.sendmail("alice@example.com", to, data) == {}
                sent.append(data)
        finally:
            client.quit()
        msgs = {m.header("Subject")[0]: m for m in rig.delivered(3)}
        assert sorted(msgs) == ["part 0", "part 1", "part 2"], list(msgs)
        qids: dict[str, int] = {}
        for i, to in enumerate(rcpts):
            msg = msgs[f"part {i}"]
            qid = received_id(msg)
            qids[qid] = i
            assert sorted(msg.rcpt_tos) == sorted(to)
            assert len(msg.header("DKIM-Signature")) == 1, msg.data
            assert dkim.verify(msg.data, dnsfunc=world.dnsfunc), msg.data
            assert [v.split(" client=")[0] for v in msg.header("X-Test-Mark")] == [
                f"marked qid={qid}"
            ]
        assert len(qids) == 3
        store = FileStore(archive, readonly=True)
        recs = store.search(Query())
        assert sorted(r.queue_id for r in recs) == sorted(qids), recs  # not the abandoned one
        for rec in recs:
            i = qids[rec.queue_id]
            msg = msgs[f"part {i}"]
            assert rec.recipients == rcpts[i] and rec.subject == f"part {i}"
            assert (
                rec.sender == "alice@example.com" and rec.message_id == f"e2e-part-{i}@example.com"
            )
            # The sink's bytes without the MTA's Received field (below DKIM-Signature)
            head = msg.data.split(b"\r\n\r\n", 1)[0]
            assert len(_RECEIVED_ANY.findall(head)) == 1, head
            assert store.read(rec, "delivered") == _RECEIVED_ANY.sub(b"", msg.data, count=1)
            assert store.read(rec, "received") == sent[i]
        assert store.verify() == []
    finally:
        shutil.rmtree(archive, ignore_errors=True)


def test_scoring_and_tagging_change_and_delete_headers(rig: Rig) -> None:
    # rewrite_subject (score 9 >= 8): ChangeHeader of Subject; tagging deletes the forged
    # incoming X-Spam-Level (DeleteHeader) and adds its own headers.
    rig.configure(SCORING + "[plugins.tagging]\n")
    res = rig.send(data=SPAMMY)
    assert res.ok, res
    (msg,) = rig.delivered()
    assert msg.header("Subject") == ["***SPAM*** hello"], msg.data
    assert "forged" not in msg.header("X-Spam-Level"), msg.data
    assert msg.header("X-Spam-Level") == ["*********"], msg.data
    assert msg.header("X-Spam-Flag") == ["YES"], msg.data
    (status,) = msg.header("X-Spam-Status")
    assert status.startswith("Yes, score=9") and "E2E_PILLS" in status, status
    assert msg.body == b"Buy cheap pills now.\r\n"


def test_quarantine_is_held_by_the_mta(rig: Rig) -> None:
    rig.configure(SCORING + "[plugins.scoring.actions]\nquarantine = 5.0\n")
    res = rig.send(data=SPAMMY)
    assert res.ok, res  # accepted, then held: Postfix's hold queue, sendmail's quarantine
    time.sleep(2)
    assert rig.sink.messages == []
    try:
        if isinstance(rig.mta, PrivateSendmail):
            # sendmail keeps a quarantined message as hf* (not qf*) with its reason in "q".
            files = rig.mta.queue_files()
            hfs = [f for f in files if f.startswith("hf")]
            assert len(hfs) == 1 and not [f for f in files if f.startswith("qf")], files
            hf = (rig.mta.queue_dir / hfs[0]).read_text(errors="replace")
            assert re.search(r"^q.*score 9", hf, re.MULTILINE), hf
        else:
            assert isinstance(rig.mta, PrivatePostfix)
            assert [q["queue_name"] for q in rig.mta.queue()] == ["hold"]
    finally:
        if isinstance(rig.mta, PrivateSendmail):
            for f in rig.mta.queue_dir.iterdir():
                f.unlink()
        else:
            assert isinstance(rig.mta, PrivatePostfix)
            rig.mta.clear_queue()


def test_spf_and_dmarc_through_the_mta(rig: Rig) -> None:
    rig.configure(
        "[plugins.spf]\nskip_addresses = []\n"
        'HELO_reject = "Fail"\nMail_From_reject = "Fail"\nHeader_Type = "SPF,AR"\n'
        "[plugins.dmarc]\n[plugins.authres]\n"
    )
    data = MESSAGE.replace(b"alice@example.org", b"alice@example.com")
    res = rig.send(data=data, sender="alice@example.com")
    assert res.ok, res
    (msg,) = rig.delivered()
    results = ar_results(msg)
    assert ("spf", "pass", {"smtp.mailfrom": "example.com"}) in results, results
    assert any(m == "dmarc" and r == "pass" for m, r, _ in results), results
    (rspf,) = msg.header("Received-SPF")
    assert rspf.startswith("pass ") and "client-ip=127.0.0.1;" in rspf
    names = header_names(msg.data)
    assert names.index("Received-SPF") < names.index("Received"), names
    # -all for the envelope domain: refused at MAIL FROM on both MTAs.
    bad = rig.send(sender="alice@fail.example")
    assert bad.stage == "mail" and bad.code == 550, bad
    time.sleep(0.5)
    assert len(rig.sink.messages) == 1


# --------------------------------------------------------------------------------------
# documented config is tested config


def test_sendmail_runs_the_documented_snippet_verbatim() -> None:
    if why := sendmail_unavailable_reason():
        pytest.skip(why)
    snippet = SNIPPET.read_text()
    sm = PrivateSendmail(relay_port=1, milter="inet:9999@127.0.0.1")
    try:
        tree = ensure_sendmail()
        sm._write_config(tree)
        mc, cf = sm.mc.read_text(), sm.cf.read_text()
    finally:
        sm.stop()
    name, equates = filter_line(snippet)
    documented = equates["S"]
    # The whole snippet, in one piece, with only the socket spec swapped.
    assert snippet.replace(f"S={documented}", "S=inet:9999@127.0.0.1", 1) in mc
    assert (equates.get("F"), equates.get("T")) == ("T", "C:30s;S:10s;R:10s;E:5m")
    # ...and what sendmail reads from it: the filter and milterd's macros at each stage.
    assert f"X{name}, S=inet:9999@127.0.0.1, F=T, T=C:30s;S:10s;R:10s;E:5m\n" in cf
    macros = dict(re.findall(r"^O Milter\.macros\.(\w+)=(.*)$", cf, re.MULTILINE))
    need = {
        "connect": ["j", "{daemon_name}", "{client_addr}"],
        "envfrom": ["i", "{auth_authen}", "{auth_type}"],
        "envrcpt": ["i"],
        "eom": ["i"],
    }
    for stage, names in need.items():
        have = [x.strip() for x in macros[stage].split(",")]
        assert all(n in have for n in names), (stage, macros[stage])
