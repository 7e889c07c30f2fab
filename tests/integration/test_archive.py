"""The archive plugin end to end: SMTP client -> private Postfix or sendmail -> milterd
(archive) -> sink. Every test that involves an MTA runs through both
(:func:`tests.integration.mta.make_mta`).

Both MTAs prepend their own ``Received:`` field *after* the milter has seen the message
(the milter never sees it), so the sink's bytes are exactly that one field followed by the
archived as-delivered copy; the as-received copy is exactly the client's bytes. The test
messages carry Date and Message-ID: without them sendmail would add its own (below its
Received, which the milter never sees either).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from milterd_plugins.archive.store import FileStore, Query, Record

from milterd import Message, Reject, hookimpl
from milterd.testing import Harness
from tests.integration.daemon import Daemon
from tests.integration.mta import (
    DELIVERED_RE,
    HOLD_RE,
    KINDS,
    MTA,
    Kind,
    accepted_queue_id,
    make_mta,
    received_queue_id,
)
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: archive me\r\n"
    b"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
    b"Message-ID: <it-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)
_RECEIVED = re.compile(rb"\AReceived: [^\r]*\r\n(?:[ \t][^\r]*\r\n)*")


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(the MTA's Received field, the rest) of a message as the sink got it."""
    m = _RECEIVED.match(data)
    assert m, data[:200]
    return m.group(0), data[m.end() :]


@contextlib.contextmanager
def archive_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="milterd-arch-", dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    """Make ``path`` read-only even for root: a read-only bind mount over itself. Files the
    daemon already has open stay writable; every new file or open goes through the mount."""
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        with pytest.raises(OSError):
            (path / "probe").write_bytes(b"x")
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            # busy: the store generation that opened it read-only is still being retired
            subprocess.run(["umount", "-l", str(path)], check=True)


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(config), "archive", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def records(path: Path) -> list[Record]:
    found: list[Record] = FileStore(path, readonly=True).search(Query())
    return found


@dataclass
class Rig:
    kind: Kind
    daemon: Daemon
    mta: MTA
    sink: SmtpSink
    archive: Path


@pytest.fixture(scope="module", params=KINDS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind: Kind = request.param
    with archive_dir() as archive:
        body = f'[plugins.t_mark]\n[plugins.archive]\npath = "{archive}"\nstore = "both"\n'
        with (
            Daemon(body) as d,
            SmtpSink() as sink,
            make_mta(kind, sink_port=sink.port, milter=d.socket) as mta,
        ):
            yield Rig(kind, d, mta, sink, archive)


def test_bcc_recipients_and_both_copies_match_the_wire(rig: Rig) -> None:
    rig.sink.clear()
    rcpts = ["bob@example.net", "hidden1@example.com", "hidden2@example.org"]  # 2 Bcc
    res = send("127.0.0.1", rig.mta.smtp_port, "alice@example.org", rcpts, MESSAGE)
    assert res.ok, res
    (msg,) = rig.sink.wait_for(1, 15)
    received_field, rest = split_received(msg.data)
    qid = received_queue_id(received_field)
    (rec,) = [r for r in records(rig.archive) if r.queue_id == qid]
    assert rec.recipients == rcpts
    assert sorted(msg.rcpt_tos) == sorted(rcpts)
    assert rec.sender == "alice@example.org" and rec.client_address == "127.0.0.1"
    assert rec.message_id == "it-1@example.org" and rec.subject == "archive me"
    store = FileStore(rig.archive, readonly=True)
    delivered = store.read(rec, "delivered")
    assert delivered == rest  # the sink's bytes after the MTA's own Received field
    assert b"X-Test-Mark: marked qid=" + qid.encode() in delivered
    assert store.read(rec, "received") == MESSAGE  # the client's bytes
    assert rec.sha256 == hashlib.sha256(rest).hexdigest() and rec.size == len(rest)
    assert rec.copies["received"].sha256 == hashlib.sha256(MESSAGE).hexdigest()


def test_verify_finds_a_flipped_byte_and_a_deleted_file(rig: Rig) -> None:
    rig.sink.clear()
    for i in range(3):
        data = MESSAGE.replace(b"it-1@", b"verify-%d@" % i)
        assert send("127.0.0.1", rig.mta.smtp_port, "a@example.org", ["b@example.net"],
                    data).ok  # fmt: skip
    rig.sink.wait_for(3, 15)
    config = rig.daemon.config
    r = cli(config, "verify")
    assert r.returncode == 0, r.stdout + r.stderr
    recs = {r.message_id: r for r in records(rig.archive)}
    flip = rig.archive / recs["verify-0@example.org"].copies["delivered"].path
    flipped = bytearray(flip.read_bytes())
    flipped[len(flipped) // 2] ^= 0x20
    flip.write_bytes(bytes(flipped))
    gone = rig.archive / recs["verify-1@example.org"].copies["received"].path
    gone.unlink()
    r = cli(config, "verify")
    assert r.returncode == 1
    lines = sorted(r.stdout.splitlines())
    assert len(lines) == 2, r.stdout
    assert lines[0].startswith(f"mismatch: {recs['verify-0@example.org'].id} ")
    assert lines[1].startswith(f"missing: {recs['verify-1@example.org'].id} ")
    # leave the module's archive clean for the next test
    for m in ("verify-0@example.org", "verify-1@example.org"):
        FileStore(rig.archive).delete(recs[m].id)
    assert cli(config, "verify").returncode == 0


def test_read_only_archive_tempfails_when_required_delivers_when_not(rig: Rig) -> None:
    rig.sink.clear()
    before = len(records(rig.archive))
    ro = read_only(rig.archive)
    ro.__enter__()
    try:
        res = send("127.0.0.1", rig.mta.smtp_port, "a@example.org", ["b@example.net"],
                   MESSAGE)  # fmt: skip
        assert res.tempfail and res.code == 451 and "4.3.0 Archive unavailable" in res.text, res
        assert rig.sink.messages == []
        # required = false (and on_error = continue for a hung store): passes, logged.
        body = (
            f'[plugins.t_mark]\n[plugins.archive]\npath = "{rig.archive}"\nstore = "both"\n'
            'required = false\non_error = "continue"\n'
        )
        rig.daemon.write(body)
        mark = len(rig.daemon.log_text())
        rig.daemon.signal(signal.SIGHUP)
        rig.daemon.wait_log("reloaded", after=mark)
        mark = len(rig.daemon.log_text())
        res = send("127.0.0.1", rig.mta.smtp_port, "a@example.org", ["b@example.net"],
                   MESSAGE)  # fmt: skip
        assert res.ok, res
        (msg,) = rig.sink.wait_for(1, 15)
        assert msg.header("X-Test-Mark")
        rig.daemon.wait_log("archive", after=mark)
        assert re.search(
            r"archive (write failed|store .* unavailable)", rig.daemon.log_text()[mark:]
        )
    finally:
        ro.__exit__(None, None, None)
        rig.daemon.write(
            f'[plugins.t_mark]\n[plugins.archive]\npath = "{rig.archive}"\nstore = "both"\n'
        )
        mark = len(rig.daemon.log_text())
        rig.daemon.signal(signal.SIGHUP)
        rig.daemon.wait_log("reloaded", after=mark)
    assert len(records(rig.archive)) == before  # nothing was written


@pytest.mark.parametrize("kind", KINDS)
def test_release_delivers_a_quarantined_copy(kind: Kind) -> None:
    with archive_dir() as archive, SmtpSink() as sink:
        body = (
            '[plugins.dkim]\nsign = false\nsign_local = false\nactions = { none = "quarantine" }\n'
            f'[plugins.archive]\npath = "{archive}"\nrelease_port = {sink.port}\n'
        )
        with (
            Daemon(body, milterd_extra="internal_networks = []") as d,
            make_mta(kind, sink_port=sink.port, milter=d.socket) as mta,
        ):
            mark = mta.log_mark()
            res = send("127.0.0.1", mta.smtp_port, "alice@example.org", ["bob@example.net"],
                       MESSAGE)  # fmt: skip
            assert res.ok, res
            # held by the MTA: Postfix's hold queue, sendmail's hf file
            mta.wait_log(HOLD_RE[kind], since=mark)
            qid = accepted_queue_id(res.text)
            assert mta.held_ids() == [qid] == mta.queue_ids(), mta.queue_ids()
            time.sleep(0.5)
            assert sink.messages == []
            (rec,) = records(archive)
            assert rec.verdict == "quarantine" and rec.queue_id == qid
            r = cli(d.config, "search", "--verdict", "quarantine")
            assert rec.id in r.stdout, r.stdout + r.stderr
            r = cli(d.config, "release", rec.id, "--to", "rescued@example.net")
            assert r.returncode == 0, r.stdout + r.stderr
            (msg,) = sink.wait_for(1, 15)
            stored = FileStore(archive, readonly=True).read(rec)
    assert msg.rcpt_tos == ["rescued@example.net"] and msg.mail_from == "alice@example.org"
    assert msg.data == stored  # the quarantined copy, byte for byte
    assert stored.endswith(MESSAGE)  # (only an Authentication-Results/none field was added)


SMTP_SOURCE = "/usr/sbin/smtp-source"


def _count(index: Path) -> int:
    try:
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=5) as db:
            return int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
    except sqlite3.Error:
        return 0


# After the kill the MTA answers 4xx for the milter it cannot reach: Postfix
# (milter_default_action = tempfail) "451 4.7.1" at RCPT/DATA, logged as milter-reject;
# sendmail (F=T) "451 4.3.2" at MAIL.
TEMPFAIL_REPLY: dict[Kind, bytes] = {"postfix": b"451 4.7.1", "sendmail": b"451 4.3.2"}
TEMPFAIL_LOG: dict[Kind, re.Pattern[str]] = {
    "postfix": re.compile(r"milter-reject: [A-Z-]+ from .*: 4\.7\.1 "),
    # a new session finds no milter / a session's milter died mid-message (end of data)
    "sendmail": re.compile(
        r"Milter: initialization failed, temp failing commands|Milter: data, reject=451 4\.3\.2"
    ),
}


@pytest.mark.parametrize("kind", KINDS)
def test_kill_9_during_load_loses_nothing_that_got_250(kind: Kind) -> None:
    total = 2000
    with archive_dir() as archive, SmtpSink() as sink:
        body = f'[plugins.t_mark]\n[plugins.archive]\npath = "{archive}"\n'
        d = Daemon(body, workers=2)
        d.start()
        try:
            with make_mta(kind, sink_port=sink.port, milter=d.socket) as mta:
                src = subprocess.Popen(
                    [SMTP_SOURCE, "-s", "8", "-m", str(total), "-l", "5000",
                     "-f", "load@example.org", "-t", "sink@example.net",
                     f"127.0.0.1:{mta.smtp_port}"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                )  # fmt: skip
                deadline = time.monotonic() + 60
                while _count(archive / "index.sqlite3") < 400 and time.monotonic() < deadline:
                    assert src.poll() is None, src.stdout.read() if src.stdout else ""
                    time.sleep(0.02)
                # Supervisor and workers, mid-write: the supervisor frozen first (it would
                # restart the workers), then every worker, then the supervisor.
                os.kill(d.pid, signal.SIGSTOP)
                for pid in d.worker_pids():
                    os.kill(pid, signal.SIGKILL)
                os.kill(d.pid, signal.SIGKILL)
                killed_at = _count(archive / "index.sqlite3")
                try:
                    out, _ = src.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    src.kill()
                    out, _ = src.communicate()
                mta.wait_queue_empty(timeout=30)
                time.sleep(0.5)
                # Postfix's log line for the 4xx may trail the reply under this load
                # (postlogd); wait for it a while, the reply itself is checked below.
                with contextlib.suppress(TimeoutError):
                    mta.wait_log(TEMPFAIL_LOG[kind], timeout=15)
                delivered: list[SinkMessage] = list(sink.messages)
                log = mta.log_text()
        finally:
            d.stop()
        # After the kill the MTA answers 4xx (TEMPFAIL_REPLY): those messages got no 250,
        # were not queued and are not at the sink. (smtp-source stops at its first 4xx.)
        tempfailed = len(TEMPFAIL_LOG[kind].findall(log))
        sent = len(DELIVERED_RE[kind].findall(log))
        assert killed_at >= 400, (killed_at, out[-2000:])
        assert TEMPFAIL_REPLY[kind] in out, (tempfailed, out[-2000:])
        assert sent == len(delivered) < total, (sent, len(delivered))
        store = FileStore(archive, readonly=True)
        by_qid = {r.queue_id: r for r in store.search(Query())}
        # A row is committed before the MTA's 250: at most one message per smtp-source
        # session (-s 8) was indexed at the kill without getting its 250.
        assert len(by_qid) >= len(delivered) >= killed_at - 8, (len(delivered), killed_at)
        for msg in delivered:
            received_field, rest = split_received(msg.data)
            rec = by_qid.get(received_queue_id(received_field))
            assert rec is not None, received_field
            assert rec.sha256 == hashlib.sha256(rest).hexdigest()
            assert store.read(rec) == rest
        # No partial file in the date layout: every indexed copy verifies; a copy renamed
        # just before the kill, whose index row was never committed, is complete (that
        # message never got 250). Writers' temporary files: removed by the next start.
        problems = store.verify()
        assert {p.kind for p in problems} <= {"orphan", "stale-temp"}, problems
        # verify leaves files younger than a writer's longest commit wait alone (they may
        # be messages being stored): list the unindexed files of the layout directly.
        indexed = {c.path for r in store.search(Query()) for c in r.copies.values()}
        orphans = sorted(set(store.files()) - indexed)
        print(
            f"kill -9 at {killed_at} indexed; delivered {len(delivered)} of {total}; "
            f"4xx logged {tempfailed}; "
            f"indexed {len(by_qid)}; problems {[p.kind for p in problems]}; "
            f"unindexed files {len(orphans)}"
        )
        assert len(orphans) <= 8 * 2, orphans
        for rel in orphans:
            data = (archive / rel).read_bytes()
            assert data.startswith(b"From: <load@example.org>") or b"\r\n\r\n" in data
            assert b"X-Test-Mark: marked qid=" in data and len(data) > 5000
        d2 = Daemon(body, workers=1)
        d2.start()
        d2.stop()
        assert os.listdir(archive / "tmp") == []
        assert {p.kind for p in FileStore(archive, readonly=True).verify()} <= {"orphan"}


class RejectSubject:
    """Rejects a message whose Subject contains 'reject-me' (for the harness)."""

    @hookimpl
    def eom(self, message: Message) -> Reject | None:
        return Reject() if "reject-me" in (message.get("Subject") or "") else None


def test_release_of_a_rejected_copy_and_refusals() -> None:
    """A rejected message (kept as received, at ``outcome``) is released through SMTP;
    an unknown id, and delivered mail without --force, are refused."""
    with archive_dir() as archive, SmtpSink() as sink:
        config = archive / "milterd.toml"
        config.write_text(
            f'[plugins.t_rej]\n[plugins.archive]\npath = "{archive}"\n'
            f'release_port = {sink.port}\nverdicts = ["continue", "reject"]\n'
        )
        rejected = MESSAGE.replace(b"archive me", b"reject-me")
        with Harness(config.read_text(), plugins={"t_rej": RejectSubject}) as h:
            assert h.send(MESSAGE, sender="a@example.org").verdict == "continue"
            assert h.send(rejected, sender="a@example.org").verdict == "reject"
        recs = {r.verdict: r for r in records(archive)}
        assert list(recs["reject"].copies) == ["received"]
        r = cli(config, "release", recs["continue"].id)
        assert r.returncode == 1 and "nothing to release" in r.stderr
        assert cli(config, "release", "no-such-id").returncode == 1
        assert sink.messages == []
        r = cli(config, "release", recs["reject"].id, "--to", "x@example.net")
        assert r.returncode == 0, r.stderr
        (msg,) = sink.wait_for(1, 15)
    assert msg.rcpt_tos == ["x@example.net"] and msg.mail_from == "a@example.org"
    assert msg.data == rejected  # the client's bytes
