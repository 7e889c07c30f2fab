"""End to end: SMTP client -> private Postfix or sendmail -> milterd (scoring + tagging) ->
sink, with a real DNS server for the blocklists and a real Redis for Bayes and greylisting.

Every test runs through both MTAs (:func:`tests.integration.mta.make_mta`): one MTA, one
daemon and one DNS server per MTA for the module, one Redis for both (each rig with its own
key prefixes). Loopback clients are made untrusted (``internal_networks`` elsewhere), and
the tests pick their client address inside 127.0.0.0/8 to be listed or not (both MTAs
relay for all of 127.0.0.0/8: ``relay_networks``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon import Daemon
from tests.integration.mta import HOLD_RE, KINDS, MTA, Kind, accepted_queue_id, make_mta
from tests.support.dnsserver import ZoneServer
from tests.support.postfix import free_port
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import SendResult, send
from tests.unit.test_scoring_bayes import held_out, make_corpus

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

ZONES = {
    # bl.test: a healthy list (RFC 5782 test points right).
    "2.0.0.127.bl.test": {"A": ["127.0.0.2"]},
    "10.0.0.127.bl.test": {"A": ["127.0.0.2", "127.0.0.4"]},
    "12.0.0.127.bl.test": {"A": ["127.255.255.254"]},  # an error code: not a listing
    # broken.test lists 127.0.0.1; nolist.test does not list 127.0.0.2: both disabled.
    "2.0.0.127.broken.test": {"A": ["127.0.0.2"]},
    "1.0.0.127.broken.test": {"A": ["127.0.0.2"]},
    "10.0.0.127.broken.test": {"A": ["127.0.0.2"]},
    "10.0.0.127.nolist.test": {"A": ["127.0.0.2"]},
    # dbl.test: a URI list
    "test.dbl.test": {"A": ["127.0.1.2"]},
    "phish-bank.example.dbl.test": {"A": ["127.0.1.2"]},
}


def config(port: int, redis_port: int, kind: str) -> str:
    """milterd's plugin configuration; Redis keys prefixed per MTA kind (``it:KIND:``)."""
    redis = f"redis://127.0.0.1:{redis_port}/0"
    return f"""
[dns]
nameservers = ["127.0.0.1:{port}"]
timeout = 2

[plugins.scoring]
reject_text = "Spam refused here"
dnsbl_timeout = 3
result_defaults = false
[plugins.scoring.actions]
reject = 50.0
rewrite_subject = 8.0
add_header = 5.0
[[plugins.scoring.rules]]
name = "IT_TAG_ME"
type = "body"
pattern = "tag-me-please"
score = 6.0
[[plugins.scoring.rules]]
name = "IT_REWRITE_ME"
type = "body"
pattern = "rewrite-me-please"
score = 9.0
[[plugins.scoring.rules]]
name = "IT_GREY"
type = "recipient"
pattern = "@grey[.]example$"
score = 1.0
[[plugins.scoring.dnsbl]]
zone = "bl.test"
symbol = "RBL_IT"
score = 2.0
returncodes = {{ "127.0.0.4" = {{ symbol = "RBL_IT_POLICY", score = 0.5 }} }}
[[plugins.scoring.dnsbl]]
zone = "broken.test"
symbol = "RBL_BROKEN"
score = 3.0
[[plugins.scoring.dnsbl]]
zone = "nolist.test"
symbol = "RBL_NOLIST"
score = 3.0
[[plugins.scoring.dnsbl]]
zone = "dbl.test"
type = "uri"
symbol = "URIBL_IT"
score = 2.5
[plugins.scoring.bayes]
enabled = true
backend = "redis"
redis_url = "{redis}"
redis_prefix = "it:{kind}:bayes"
min_spam = 10
min_ham = 10
[plugins.scoring.greylist]
backend = "redis"
redis_url = "{redis}"
redis_prefix = "it:{kind}:grey"
delay = 2
[plugins.scoring.domains."grey.example"]
actions = {{ greylist = 1.0 }}
[plugins.scoring.domains."tagonly.example"]
actions = {{ reject = false }}
[plugins.scoring.domains."hold.example"]
actions = {{ quarantine = 5.0 }}

[plugins.tagging]
report = true
"""


@dataclass
class Rig:
    kind: Kind
    daemon: Daemon
    mta: MTA
    sink: SmtpSink
    dns: ZoneServer
    redis_port: int
    workdir: Path

    def send(
        self, data: bytes, client: str = "127.0.0.11", rcpts: list[str] | None = None
    ) -> SendResult:
        return send(
            "127.0.0.1",
            self.mta.smtp_port,
            "alice@sender.example",
            rcpts or ["bob@example.net"],
            data,
            source_address=(client, 0),
        )

    def delivered(self, marker: str, timeout: float = 15) -> SinkMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.sink.messages):
                if marker.encode() in m.data:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"message {marker} not delivered:\n{self.mta.log_tail()}")


def message(marker: str, body: str = "Hello Bob.", extra: str = "") -> bytes:
    return (
        f"From: Alice <alice@sender.example>\r\nTo: bob@example.net\r\n"
        f"Subject: note {marker}\r\nMessage-ID: <{marker}@sender.example>\r\n{extra}\r\n"
        f"{body}\r\n"
    ).encode()


def status(m: SinkMessage) -> str:
    (value,) = m.header("X-Spam-Status")
    return " ".join(value.split())


def symbols_of(m: SinkMessage) -> set[str]:
    return set(status(m).split("tests=", 1)[1].split(","))


@pytest.fixture(scope="module")
def redis_port() -> Iterator[int]:
    exe = shutil.which("redis-server")
    assert exe, "Debian package redis-server is required"
    port = free_port()
    d = tempfile.mkdtemp(prefix="milterd-redis-")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", d],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=KINDS)
def rig(
    request: pytest.FixtureRequest, redis_port: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Rig]:
    kind: Kind = request.param
    with ZoneServer(ZONES) as dns:
        daemon = Daemon(
            config(dns.port, redis_port, kind),
            socket_kind="inet",
            milterd_extra='internal_networks = ["10.255.255.0/24"]',
        )
        with (
            daemon as d,
            SmtpSink() as sink,
            make_mta(
                kind, sink_port=sink.port, milter=d.socket, relay_networks=["127.0.0.0/8"]
            ) as mta,
        ):
            workdir = tmp_path_factory.mktemp(f"scoring-{kind}")
            yield Rig(kind, d, mta, sink, dns, redis_port, workdir)


def test_gtube_is_rejected_with_the_configured_text(rig: Rig) -> None:
    res = rig.send(message("gtube1", GTUBE))
    assert res.rejected and res.code == 550, res
    assert "5.7.1 Spam refused here" in res.text


def test_gtube_is_tagged_where_the_domain_only_tags(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    res = rig.send(message(mk, GTUBE), rcpts=["carol@tagonly.example"])
    assert res.ok, res
    m = rig.delivered(mk)
    assert m.header("X-Spam-Flag") == ["YES"]
    assert m.header("Subject") == [f"***SPAM*** note {mk}"]
    assert status(m).startswith("Yes, score=1000.0 required=5.0")
    assert "GTUBE" in symbols_of(m)


def test_thresholds_tag_and_rewrite_the_subject(rig: Rig) -> None:
    tag, rew, ham = (uuid.uuid4().hex for _ in range(3))
    assert rig.send(message(tag, "please tag-me-please")).ok
    assert rig.send(message(rew, "please rewrite-me-please")).ok
    assert rig.send(message(ham, "nothing to see")).ok
    m_tag, m_rew, m_ham = rig.delivered(tag), rig.delivered(rew), rig.delivered(ham)
    assert m_tag.header("Subject") == [f"note {tag}"]
    assert m_tag.header("X-Spam") == ["Yes"] and m_tag.header("X-Spam-Flag") == ["YES"]
    assert m_rew.header("Subject") == [f"***SPAM*** note {rew}"]
    assert "IT_REWRITE_ME" in symbols_of(m_rew)
    assert m_ham.header("X-Spam-Flag") == ["NO"] and m_ham.header("X-Spam") == []
    assert m_ham.header("Subject") == [f"note {ham}"]


def test_an_8bit_subject_is_rewritten_not_tempfailed(rig: Rig) -> None:
    """A Subject in a legacy 8-bit charset (not UTF-8) rewritten for spam: pymilter takes
    only UTF-8 text, so the undecodable bytes are read as Windows-1252. This used to
    tempfail the message on every retry."""
    mk = uuid.uuid4().hex
    data = message(mk, "please rewrite-me-please").replace(
        f"Subject: note {mk}".encode(), f"Subject: caf\xe9 {mk}".encode("latin-1")
    )
    res = rig.send(data)
    assert res.ok, res
    m = rig.delivered(mk)
    assert f"\r\nSubject: ***SPAM*** caf\u00e9 {mk}\r\n".encode() in m.data


def test_quarantine_puts_the_message_on_hold(rig: Rig) -> None:
    # held by the MTA: Postfix's hold queue, sendmail's hf file
    mk = uuid.uuid4().hex
    mark = rig.mta.log_mark()
    res = rig.send(message(mk, "please tag-me-please"), rcpts=[f"{mk}@hold.example"])
    assert res.ok, res
    rig.mta.wait_log(HOLD_RE[rig.kind], since=mark)
    assert accepted_queue_id(res.text) in rig.mta.held_ids(), (res.text, rig.mta.held_ids())
    time.sleep(1.0)
    assert not [m for m in rig.sink.messages if mk.encode() in m.data]


def test_dnsbl_listed_client_gets_the_symbol_and_others_do_not(rig: Rig) -> None:
    listed, clean, errcode = (uuid.uuid4().hex for _ in range(3))
    assert rig.send(message(listed), client="127.0.0.10").ok
    assert rig.send(message(clean), client="127.0.0.11").ok
    assert rig.send(message(errcode), client="127.0.0.12").ok
    t_listed = symbols_of(rig.delivered(listed))
    assert {"RBL_IT", "RBL_IT_POLICY"} <= t_listed
    # The broken lists also "list" 127.0.0.10, but they were disabled at start-up.
    assert "RBL_BROKEN" not in t_listed and "RBL_NOLIST" not in t_listed
    assert not {s for s in symbols_of(rig.delivered(clean)) if s.startswith("RBL")}
    assert not {s for s in symbols_of(rig.delivered(errcode)) if s.startswith("RBL")}
    log = rig.daemon.log_text()
    assert "dnsbl broken.test lists the RFC 5782 test point 127.0.0.1: list disabled" in log
    assert "dnsbl nolist.test does not list the RFC 5782 test point 127.0.0.2" in log
    assert "error code 127.255.255.254" in log
    asked = {q.name for q in rig.dns.query_log}
    assert "10.0.0.127.bl.test" in asked and "10.0.0.127.broken.test" not in asked


def test_uri_blocklist(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    assert rig.send(message(mk, "login at https://secure.phish-bank.example/x now")).ok
    assert "URIBL_IT" in symbols_of(rig.delivered(mk))


def test_forged_spam_headers_are_stripped(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    forged = "X-Spam-Flag: NO\r\nX-Spam-Status: No, score=-50.0\r\nX-Spam-Score: -50\r\n"
    assert rig.send(message(mk, "please tag-me-please", extra=forged)).ok
    m = rig.delivered(mk)
    assert m.header("X-Spam-Flag") == ["YES"]
    assert m.header("X-Spam-Score") == ["6.0"]
    assert len(m.header("X-Spam-Status")) == 1 and b"score=-50" not in m.data


def test_greylisting_tempfails_first_attempt_and_passes_the_retry(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    rcpt = [f"{mk}@grey.example"]
    first = rig.send(message(mk), rcpts=rcpt)
    assert first.tempfail and first.code == 451 and "4.7.1" in first.text, first
    early = rig.send(message(mk), rcpts=rcpt)
    assert early.tempfail, early
    time.sleep(2.2)
    retry = rig.send(message(mk), rcpts=rcpt)
    assert retry.ok, retry
    m = rig.delivered(mk)
    assert m.rcpt_tos == rcpt


def test_bayes_in_redis_trained_by_the_cli_classifies_held_out_mail(rig: Rig) -> None:
    spam, ham = make_corpus(rig.workdir, count=30, seed=11)
    out = subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(rig.daemon.config), "bayes", "train",
         "--spam", str(spam), "--ham", str(ham)],
        check=False, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "total: 30 spam, 30 ham" in out.stdout
    verdicts = []
    for i, (is_spam, raw) in enumerate(held_out(seed=7, count=6)):
        mk = f"bayes{i}{uuid.uuid4().hex[:8]}"
        data = raw.replace(b"\nSubject: ", f"\nX-Marker: {mk}\nSubject: ".encode())
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        assert rig.send(data).ok
        verdicts.append((is_spam, symbols_of(rig.delivered(mk))))
    for is_spam, tests in verdicts:
        assert ("BAYES_SPAM" if is_spam else "BAYES_HAM") in tests, verdicts


def test_reload_compiles_new_rules_and_refuses_broken_ones(rig: Rig) -> None:
    """Runs last in this module: it changes the daemon's rules."""
    base = config(rig.dns.port, rig.redis_port, rig.kind)
    added = (
        '[[plugins.scoring.rules]]\nname = "IT_RELOADED"\ntype = "body"\n'
        'pattern = "brand-new-rule"\nscore = 0.5\n'
    )
    broken = '[[plugins.scoring.rules]]\nname = "IT_BROKEN"\ntype = "body"\npattern = "(x"\n'
    # Rules sit under [plugins.scoring]: insert them before [plugins.tagging].
    head, tail = base.split("[plugins.tagging]")
    rig.daemon.write(head + broken + "[plugins.tagging]" + tail)
    mark = len(rig.daemon.log_text())
    rig.daemon.signal(signal.SIGHUP)
    rig.daemon.wait_log("reload refused", after=mark)
    assert "IT_BROKEN" in rig.daemon.log_text()[mark:]
    before = uuid.uuid4().hex
    assert rig.send(message(before, "a brand-new-rule here")).ok
    assert "IT_RELOADED" not in symbols_of(rig.delivered(before))
    rig.daemon.write(head + added + "[plugins.tagging]" + tail)
    mark = len(rig.daemon.log_text())
    rig.daemon.signal(signal.SIGHUP)
    rig.daemon.wait_log("reloaded", after=mark)
    after = uuid.uuid4().hex
    assert rig.send(message(after, "a brand-new-rule here")).ok
    assert "IT_RELOADED" in symbols_of(rig.delivered(after))


def test_redis_bayes_learns_one_message_once_when_it_arrives_at_once(redis_port: int) -> None:
    """The Redis store's claim (one script): as SQLite's, only one of many concurrent
    learns of one message counts."""
    from milterd_plugins.scoring.bayes import Classifier, RedisStore

    from tests.unit.test_scoring_bayes import concurrent_learns

    store = RedisStore(f"redis://127.0.0.1:{redis_port}/0", f"it:claim:{uuid.uuid4().hex}", 2.0)
    clf = Classifier(store, 1, 1)
    assert sum(concurrent_learns(clf)) == 1
    assert store.totals() == (1, 0) and store.counts(["casino"]) == {"casino": (1, 0)}
    assert not clf.learn(["casino", "win"], True, "same-message-id")
    assert clf.learn(["casino", "win"], False, "same-message-id")  # moved: ham now
    assert store.totals() == (0, 1) and store.counts(["casino"]) == {"casino": (0, 1)}
    store.close()


def test_redis_greylist_does_not_overwrite_a_row_written_meanwhile(redis_port: int) -> None:
    """A concurrency review: check() read the triplet, decided and wrote without WATCH,
    so a first-seen delivery could overwrite the row a retry had just passed with a new
    pending one (the sender greylisted again). Now the write is conditional on the row
    being unchanged; a changed row is read again."""
    import redis
    from milterd_plugins.scoring.greylist import RedisGrey

    prefix = f"it:grey:{uuid.uuid4().hex}"
    grey = RedisGrey(f"redis://127.0.0.1:{redis_port}/0", prefix, delay=60, expire=86400,
                     pending_expire=3600)  # fmt: skip
    other = redis.Redis(port=redis_port)
    real = grey.decide
    calls: list[Any] = []

    def decide(row: Any, now: float) -> Any:
        calls.append(row)
        if len(calls) == 1:  # another connection passes the triplet meanwhile
            other.set(f"{prefix}:t", "[1000.0, 1, 999999.0]", ex=600)
        return real(row, now)

    grey.decide = decide
    assert grey.check("t", 1100.0)  # read again: passed
    assert calls[0] is None and calls[1] == (1000.0, 1, 999999.0)
    assert grey.peek("t", 1100.0) == (True, True)
    grey.close()
    other.close()
