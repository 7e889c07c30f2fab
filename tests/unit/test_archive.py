"""The archive plugin in process (harness): selection, stored bytes, metadata, durability
rules, the store's verify/prune, and the ``milterd archive`` subcommands."""

from __future__ import annotations

import hashlib
import json
import mailbox
import os
import re
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from milterd_plugins.archive import (
    ArchiveConfig,
    ArchivePlugin,
    PruneError,
    parse_duration,
    prune,
    selected,
)
from milterd_plugins.archive.store import (
    CopyError,
    FileStore,
    Query,
    Record,
    StoreError,
    new_id,
)

from milterd import (
    AddHeader,
    Context,
    EnvRcpt,
    Message,
    Quarantine,
    Reject,
    ReplaceBody,
    Result,
    Verdict,
    hookimpl,
)
from milterd.testing import Harness
from tests.support.clock import away_from_midnight

MSG = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <abc.123@example.org>\r\n"
    b"\r\n"
    b"Hello Bob.\r\nSecond line.\r\n"
)


class Stamp:
    """Adds a header and a result; optionally replaces the body."""

    actions = frozenset({"add_header", "replace_body"})
    isolation = "inline"

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        ctx.add_change(AddHeader("X-Stamp", "stamped"))
        ctx.add_result(Result("spf", "pass", properties=(("smtp.mailfrom", "example.org"),)))
        ctx.add_symbol("TEST_SYM", 2.5, "test")
        if b"REPLACE" in message.body():
            ctx.add_change(ReplaceBody(b"replaced body\r\n"))


class Judge:
    """Verdict from the Subject: 'quarantine-me', 'reject-me'; rejects RCPT 'refuse@'."""

    actions = frozenset({"quarantine"})
    isolation = "inline"

    @hookimpl
    def envrcpt(self, event: EnvRcpt) -> Verdict | None:
        if event.recipient.startswith("refuse@"):
            return Reject("550", "5.1.1", "no")
        return None

    @hookimpl
    def data(self, ctx: Context) -> Verdict | None:
        if ctx.message is not None and ctx.message.sender.startswith("early@"):
            return Reject("550", "5.7.1", "refused at DATA")
        return None

    @hookimpl
    def eom(self, message: Message) -> Verdict | None:
        subject = message.get("Subject") or ""
        if "quarantine-me" in subject:
            return Quarantine(reason="test")
        if "reject-me" in subject:
            return Reject("550", "5.7.1", "rejected by test")
        return None


def rig(tmp_path: Path, **options: Any) -> Harness:
    section = {"path": str(tmp_path / "arch"), **options}
    return Harness(
        {"plugins": {"t_stamp": {}, "t_judge": {}, "archive": section}},
        plugins={"t_stamp": Stamp, "t_judge": Judge, "archive": ArchivePlugin},
    )


def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "arch", readonly=True)


def all_records(tmp_path: Path) -> list[Record]:
    records: list[Record] = store(tmp_path).search(Query())
    return records


def layout_files(tmp_path: Path) -> list[str]:
    return sorted(FileStore(tmp_path / "arch", readonly=True).files())


# --- what is stored ------------------------------------------------------------------------


def test_delivered_copy_and_metadata(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        out = h.send(
            MSG,
            sender="alice@example.org",
            recipients=["bob@example.com", "hidden-bcc@example.net"],
            client_ip="192.0.2.7",
            client_name="mail.example.org",
            helo="mail.example.org",
            auth="alice",
            queue_id="4ABCQ",
        )
    assert out.verdict == "continue" and out.delivered is not None
    (rec,) = all_records(tmp_path)
    s = store(tmp_path)
    assert s.read(rec) == out.delivered  # byte for byte, as delivered
    assert b"X-Stamp: stamped\r\n" in out.delivered
    assert rec.recipients == ["bob@example.com", "hidden-bcc@example.net"]
    assert rec.sender == "alice@example.org"
    assert (rec.client_address, rec.client_name, rec.helo) == (
        "192.0.2.7",
        "mail.example.org",
        "mail.example.org",
    )
    assert rec.auth_user == "alice" and rec.direction == "outbound"
    assert rec.queue_id == "4ABCQ"
    assert rec.message_id == "abc.123@example.org"
    assert rec.subject == "quarterly numbers"
    assert rec.date == "Sun, 22 Nov 2026 03:00:00 +0000"
    assert rec.verdict == "continue"
    assert rec.score == 2.5
    assert rec.results == ["spf=pass smtp.mailfrom=example.org"]
    assert rec.size == len(out.delivered)
    assert rec.sha256 == hashlib.sha256(out.delivered).hexdigest()
    assert abs(rec.received - time.time()) < 60
    assert list(rec.copies) == ["delivered"]
    path = rec.copies["delivered"].path
    assert path == time.strftime("%Y/%m/%d/", time.gmtime(rec.received)) + rec.id + ".eml"
    assert os.listdir(tmp_path / "arch" / "tmp") == []


def test_both_copies_received_is_the_clients_bytes(tmp_path: Path) -> None:
    raw = MSG.replace(b"Hello Bob.", b"REPLACE me")
    with rig(tmp_path, store="both", compress="zstd") as h:
        out = h.send(raw)
    assert out.delivered is not None
    (rec,) = all_records(tmp_path)
    s = store(tmp_path)
    assert s.read(rec, "received") == raw
    assert s.read(rec, "delivered") == out.delivered
    assert out.delivered.endswith(b"\r\n\r\nreplaced body\r\n")
    assert rec.copies["delivered"].path.endswith(".eml.zst")
    assert rec.copies["received"].path.endswith(".received.eml.zst")
    on_disk = (tmp_path / "arch" / rec.copies["received"].path).read_bytes()
    assert on_disk[:4] == b"\x28\xb5\x2f\xfd"  # zstd frame magic
    assert rec.copies["received"].sha256 == hashlib.sha256(raw).hexdigest()
    assert s.verify() == []


def test_received_only(tmp_path: Path) -> None:
    with rig(tmp_path, store="received") as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    assert list(rec.copies) == ["received"]
    assert store(tmp_path).read(rec) == MSG
    assert rec.sha256 == hashlib.sha256(MSG).hexdigest()


# --- selection -----------------------------------------------------------------------------


def test_default_keeps_delivered_and_quarantined_not_rejected(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG)
        q = h.send(MSG.replace(b"quarterly numbers", b"quarantine-me"))
        r = h.send(MSG.replace(b"quarterly numbers", b"reject-me"))
    assert q.verdict == "quarantine"
    assert r.verdict == "reject"
    assert sorted(x.verdict for x in all_records(tmp_path)) == ["continue", "quarantine"]


def test_rejected_mail_kept_when_selected_as_received(tmp_path: Path) -> None:
    with rig(tmp_path, verdicts=["reject", "quarantine"]) as h:
        h.send(MSG)
        h.send(MSG.replace(b"quarterly numbers", b"quarantine-me"))
        raw = MSG.replace(b"quarterly numbers", b"reject-me")
        h.send(raw)
    recs = {r.verdict: r for r in all_records(tmp_path)}
    assert sorted(recs) == ["quarantine", "reject"]
    # The delivered-but-not-selected copy written at finalize was removed at outcome.
    assert len(layout_files(tmp_path)) == 2
    rej = recs["reject"]
    assert list(rej.copies) == ["received"]
    assert store(tmp_path).read(rej) == raw  # nothing was delivered: the client's bytes
    assert rej.results == ["spf=pass smtp.mailfrom=example.org"]


def test_rules_direction_and_domains(tmp_path: Path) -> None:
    rules = [
        {"recipients": ["legal.example.com"], "archive": True},
        {"senders": [".spam.example"], "archive": False},
        {"direction": "outbound"},
    ]
    with rig(tmp_path, rules=rules, default=False) as h:
        h.send(MSG, sender="x@example.org", recipients=["a@example.com"])  # no rule
        h.send(MSG, sender="x@example.org", recipients=["a@example.com", "b@legal.example.com"])
        h.send(MSG, sender="x@mx.spam.example", recipients=["a@example.com"], auth="u")  # rule 2
        h.send(MSG, sender="me@example.com", recipients=["a@example.org"], auth="me")  # outbound
    recs = all_records(tmp_path)
    assert [r.recipients for r in recs] == [
        ["a@example.com", "b@legal.example.com"],
        ["a@example.org"],
    ]
    assert [r.direction for r in recs] == ["inbound", "outbound"]


def test_selected_function() -> None:
    cfg = ArchiveConfig(
        rules=[{"senders": ["boss@example.com"], "verdicts": ["reject"]}],
        default=False,
    )
    assert selected(cfg, "inbound", "BOSS@example.com", ["x@y"], "reject")
    assert not selected(cfg, "inbound", "boss@example.com", ["x@y"], "continue")
    assert not selected(cfg, "inbound", "other@example.com", ["x@y"], "reject")
    assert selected(ArchiveConfig(), "inbound", "a@b", [], "accept")
    assert not selected(ArchiveConfig(), "inbound", "a@b", [], "discard")
    with pytest.raises(ValueError):
        ArchiveConfig(rules=[{"senders": ["a@b@c"]}])
    with pytest.raises(ValueError):
        ArchiveConfig(retention="soon")
    assert parse_duration("2w") == 14 * 86400 and parse_duration("12h") == 43200


def test_refused_recipient_is_not_recorded(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG, recipients=["ok@example.com", "refuse@example.com"])
    (rec,) = all_records(tmp_path)
    assert rec.recipients == ["ok@example.com"]


# --- durability rules ----------------------------------------------------------------------


def test_aborted_transactions_leave_nothing(tmp_path: Path) -> None:
    with rig(tmp_path, verdicts=[*ArchiveConfig().verdicts, "reject"]) as h:
        out = h.send(MSG, recipients=["refuse@example.com"])  # no recipient left: abort
        assert out.stage == "envrcpt"
        out = h.send(MSG, sender="early@example.org")  # ended at DATA, before any content
        assert out.stage == "data" and out.verdict == "reject"
    assert all_records(tmp_path) == []
    assert layout_files(tmp_path) == []
    assert os.listdir(tmp_path / "arch" / "tmp") == []


def break_store(tmp_path: Path) -> None:
    """Make the next copy's write fail, even for root (who ignores permissions), whichever
    way the store writes (an unnamed file in the day directory, or a named one in tmp/):
    the year's directory and tmp/ become plain files."""
    arch = tmp_path / "arch"
    (arch / "tmp").rmdir()
    (arch / "tmp").write_text("not a directory")
    (arch / time.strftime("%Y", time.gmtime())).write_text("not a directory")


def test_write_failure_required_tempfails(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        break_store(tmp_path)
        out = h.send(MSG)
    assert out.verdict == "tempfail"
    v = out.decision.verdict
    assert (v.code, v.xcode) == ("451", "4.3.0")  # type: ignore[union-attr]
    assert out.delivered is None
    assert all_records(tmp_path) == [] and layout_files(tmp_path) == []


def test_write_failure_not_required_passes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with rig(tmp_path, required=False) as h:
        break_store(tmp_path)
        out = h.send(MSG)
    assert out.verdict == "continue" and out.delivered is not None
    assert "archive write failed" in caplog.text
    assert all_records(tmp_path) == [] and layout_files(tmp_path) == []


@pytest.mark.parametrize("tmpfile", [True, False])
def test_both_ways_of_writing_a_copy_leave_only_the_copy(tmp_path: Path, tmpfile: bool) -> None:
    """An unnamed temporary file linked into place (O_TMPFILE, where the filesystem has it)
    or a named one in tmp/ renamed into place (elsewhere): the same result."""
    s = FileStore(tmp_path / "arch")
    assert s.tmpfile  # this machine's filesystems have O_TMPFILE: the fast path is used
    s.tmpfile = tmpfile
    try:
        rec = s.store(Record(id=new_id(time.time()), received=time.time(), sender="a@x",
                             recipients=["b@y"], verdict="continue"),
                      {"delivered": [MSG], "received": [MSG]})  # fmt: skip
        assert s.read(rec, "delivered") == MSG and s.read(rec, "received") == MSG
        assert s.verify() == []
        assert os.listdir(tmp_path / "arch" / "tmp") == []
        day = tmp_path / "arch" / rec.copies["delivered"].path.rsplit("/", 1)[0]
        assert sorted(os.listdir(day)) == sorted(
            p.rsplit("/", 1)[1] for p in (c.path for c in rec.copies.values())
        )
    finally:
        s.close()


def test_unwritable_store_refuses_startup_when_required(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match=r"archive|Errno|exists|directory"):
        Harness(
            {"archive": {"path": str(tmp_path / "file" / "arch")}},
            plugins={"archive": ArchivePlugin},
        )
    with Harness(
        {"archive": {"path": str(tmp_path / "file" / "arch"), "required": False}},
        plugins={"archive": ArchivePlugin},
    ) as h:
        out = h.send(MSG)
    assert out.verdict == "continue" and out.delivered is not None


# --- store maintenance ---------------------------------------------------------------------


def test_verify_reports_each_problem(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        for i in range(4):
            h.send(MSG.replace(b"quarterly", b"q%d" % i))
    recs = all_records(tmp_path)
    root = tmp_path / "arch"
    assert store(tmp_path).verify() == []
    flipped = root / recs[0].copies["delivered"].path
    data = bytearray(flipped.read_bytes())
    data[10] ^= 0x01
    flipped.write_bytes(bytes(data))
    (root / recs[1].copies["delivered"].path).unlink()
    orphan = root / recs[2].copies["delivered"].path
    (orphan.parent / "stray.eml").write_bytes(b"x")
    old = time.time() - 3600  # not being written now: an orphan (see the live-archive test)
    os.utime(orphan.parent / "stray.eml", (old, old))
    (root / "tmp" / "999999999.1.abcd").write_bytes(b"partial")
    problems = store(tmp_path).verify()
    got = sorted((p.kind, p.id) for p in problems)
    assert got == sorted(
        [("mismatch", recs[0].id), ("missing", recs[1].id), ("orphan", ""), ("stale-temp", "")]
    )
    # A writer starting up removes temporary files of dead writers.
    assert FileStore(root).clean_temp() == 1


def test_prune_and_retention(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG)
        h.send(MSG)
    s = FileStore(tmp_path / "arch")
    recs = s.search(Query())
    s.db.execute("UPDATE messages SET received = received - 40 * 86400 WHERE id = ?", (recs[0].id,))
    assert prune(s, parse_duration("30d")) == 1
    assert [r.id for r in s.search(Query())] == [recs[1].id]
    assert not (tmp_path / "arch" / recs[0].copies["delivered"].path).exists()
    assert s.verify() == []
    # retention in the config prunes in the background at start-up
    s.db.execute("UPDATE messages SET received = received - 400 * 86400")
    with rig(tmp_path, retention="365d"):
        deadline = time.monotonic() + 5
        while FileStore(tmp_path / "arch").search(Query()) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert FileStore(tmp_path / "arch").search(Query()) == []


def test_shutdown_stops_the_pruner_between_deletions_before_closing_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown closed the store under the pruner: the deletion under way failed half done
    and the next ones ran on a closed store, after the daemon had shut the plugin down."""
    with rig(tmp_path) as h:
        for _ in range(3):
            h.send(MSG)
    s = FileStore(tmp_path / "arch")
    s.db.execute("UPDATE messages SET received = received - 400 * 86400")
    s.close()
    started, stopping, events = threading.Event(), threading.Event(), []
    real_delete, real_close = FileStore.delete, FileStore.close
    real_shutdown = ArchivePlugin.shutdown

    def slow_delete(self: FileStore, id: str) -> bool:
        started.set()
        stopping.wait(5)  # the first deletion is still under way when shutdown begins
        done: bool = real_delete(self, id)
        events.append("delete")
        return done

    def shutdown(self: ArchivePlugin) -> None:
        self._stop.set()
        stopping.set()
        real_shutdown(self)

    def close(self: FileStore) -> None:
        if started.is_set():
            events.append("close")
        real_close(self)

    monkeypatch.setattr(FileStore, "delete", slow_delete)
    monkeypatch.setattr(FileStore, "close", close)
    monkeypatch.setattr(ArchivePlugin, "shutdown", hookimpl(shutdown))
    with rig(tmp_path, retention="365d"):
        assert started.wait(5)
    time.sleep(0.5)  # a pruner left running would delete the next one now
    assert events == ["delete", "close"]
    monkeypatch.undo()
    assert len(all_records(tmp_path)) == 2
    assert FileStore(tmp_path / "arch", readonly=True).verify() == []


def test_search_criteria(tmp_path: Path) -> None:
    with rig(tmp_path, verdicts=["continue", "quarantine", "reject"]) as h:
        h.send(MSG, sender="a@one.example", recipients=["x@two.example", "y@three.example"])
        h.send(
            MSG.replace(b"quarterly numbers", b"quarantine-me").replace(b"abc.123", b"zz.9"),
            sender="b@four.example",
            recipients=["z@two.example"],
        )
    s = store(tmp_path)

    def ids(**kw: Any) -> int:
        return len(s.search(Query(**kw)))

    assert ids(sender="a@one.example") == 1 and ids(sender="@one.example") == 1
    assert ids(sender="one.example") == 1 and ids(sender="ne.example") == 0
    assert ids(recipient="y@three.example") == 1 and ids(recipient="two.example") == 2
    assert ids(recipient="@three.example") == 1 and ids(recipient="x@three.example") == 0
    assert ids(subject="QUARANTINE") == 1 and ids(subject="%") == 0
    assert ids(message_id="<ZZ.9@example.org>") == 1
    assert ids(verdict="quarantine") == 1 and ids(verdict="reject") == 0
    assert ids(since=time.time() - 60) == 2 and ids(until=time.time() - 60) == 0
    assert ids(limit=1) == 1


# --- the command line ----------------------------------------------------------------------


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(config), "archive", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_search_show_export_verify_prune(tmp_path: Path) -> None:
    with rig(tmp_path, verdicts=["continue", "reject"]) as h:
        h.send(MSG, recipients=["bob@example.com", "bcc@example.net"])
        h.send(MSG.replace(b"quarterly numbers", b"reject-me"), sender="eve@evil.example")
    config = tmp_path / "milterd.toml"
    config.write_text(f'[plugins.archive]\npath = "{tmp_path / "arch"}"\n')

    r = cli(config, "search", "--to", "bcc@example.net")
    assert r.returncode == 0, r.stderr
    assert "quarterly numbers" in r.stdout and "1 message(s)" in r.stdout
    r = cli(config, "search", "--verdict", "reject", "--json")
    (line,) = r.stdout.splitlines()
    rej = json.loads(line)
    assert rej["sender"] == "eve@evil.example" and rej["verdict"] == "reject"
    r = cli(config, "search", "--from", "nobody@example.org")
    assert r.returncode == 1 and "0 message(s)" in r.stdout
    r = cli(config, "search", "--since", "1h", "--until", "2099-01-01", "--json")
    assert len(r.stdout.splitlines()) == 2

    r = cli(config, "show", rej["id"])
    assert r.returncode == 0 and "eve@evil.example" in r.stdout and "copy received:" in r.stdout
    raw = subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(config), "archive", "show", rej["id"],
         "--raw"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert raw.stdout == MSG.replace(b"quarterly numbers", b"reject-me")

    mbox_path = tmp_path / "out.mbox"
    r = cli(config, "export", "--mbox", str(mbox_path), "--since", "1d")
    assert r.returncode == 0, r.stderr
    box = mailbox.mbox(str(mbox_path))
    assert sorted(m["Subject"] for m in box) == ["quarterly numbers", "reject-me"]
    r = cli(config, "export", rej["id"], "--eml", str(tmp_path / "eml"))
    assert r.returncode == 0
    assert (tmp_path / "eml" / f"{rej['id']}.eml").read_bytes() == MSG.replace(
        b"quarterly numbers", b"reject-me"
    )

    assert cli(config, "verify").returncode == 0
    path = tmp_path / "arch" / rej["copies"]["received"]["path"]
    path.write_bytes(path.read_bytes().replace(b"reject-me", b"reject-mE"))
    r = cli(config, "verify")
    assert r.returncode == 1 and f"mismatch: {rej['id']}" in r.stdout

    r = cli(config, "prune", "--older-than", "1d", "--dry-run")
    assert r.returncode == 0 and "would prune 0" in r.stderr
    r = cli(config, "prune", "--older-than", "0s")
    assert r.returncode == 0 and "pruned 2" in r.stderr
    assert all_records(tmp_path) == []


def test_write_past_the_deadline_tempfails_and_takes_the_copy_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_store = FileStore.store

    def slow_store(self: FileStore, record: Record, copies: Any) -> Record:
        data = {k: [b"".join(v)] for k, v in copies.items()}  # read the message, then stall
        time.sleep(0.6)
        stored: Record = real_store(self, record, data)
        return stored

    monkeypatch.setattr(FileStore, "store", slow_store)
    with Harness(
        {"archive": {"path": str(tmp_path / "arch"), "timeout": 0.2}},
        plugins={"archive": ArchivePlugin},
    ) as h:
        out = h.send(MSG)
        assert out.verdict == "tempfail" and out.delivered is None
        time.sleep(1.0)  # the abandoned call finishes meanwhile
    assert all_records(tmp_path) == [] and layout_files(tmp_path) == []


# --- group commit and the write path -------------------------------------------------------


def _rec(now: float | None = None, id_: str | None = None) -> Record:
    now = time.time() if now is None else now
    return Record(id=id_ or new_id(now), received=now, sender="a@example.org", recipients=["b@x"])


def test_header_and_envelope_bytes_that_are_not_utf8_are_archived(tmp_path: Path) -> None:
    # A raw Latin-1 subject and 8-bit envelope addresses: the message is archived, not
    # tempfailed (SQLite refuses surrogate escapes); the index shows U+FFFD for the invalid
    # bytes and the stored copy keeps them.
    raw = MSG.replace(b"Subject: quarterly numbers", b"Subject: caf\xe9 cr\xe8me")
    with rig(tmp_path) as h:
        out = h.send(raw, sender="j\udce9r\udcf4me@example.org", recipients=["b\udcf6b@x.test"])
    assert out.verdict == "continue", out.errors
    (rec,) = all_records(tmp_path)
    assert rec.subject == "caf\ufffd cr\ufffdme"
    assert rec.sender == "j\ufffdr\ufffdme@example.org"
    assert rec.recipients == ["b\ufffdb@x.test"]
    assert store(tmp_path).read(rec) == out.delivered and b"caf\xe9" in (out.delivered or b"")
    assert store(tmp_path).verify() == []


class _HeldCommits:
    """Wraps FileStore._insert_rows: the first commit waits until ``queued`` writers sit
    in the group-commit queue (so the next batch holds them all); records batch sizes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fs: FileStore, queued: int) -> None:
        self.batches: list[int] = []
        self.fs, self.queued = fs, queued
        self.real = fs._insert_rows
        monkeypatch.setattr(fs, "_insert_rows", self.insert)

    def insert(self, rows: list[tuple[Any, ...]]) -> None:
        if not self.batches:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                c = self.fs._committer
                if c is not None and len(c.queue) >= self.queued:
                    break
                time.sleep(0.005)
        self.batches.append(len(rows))
        self.real(rows)


def _concurrently(fn: Any, args: list[Any]) -> list[Any]:
    """Call fn(arg) for every arg on its own thread; results (or exceptions) in order."""
    out: list[Any] = [None] * len(args)

    def run(i: int) -> None:
        try:
            out[i] = fn(args[i])
        except Exception as e:
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(args))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


def _lead(fs: FileStore, data: bytes) -> threading.Thread:
    """Store one message on a thread and return once its commit runs (so that writers
    started next queue up behind it)."""
    t = threading.Thread(target=fs.store, args=(_rec(), {"delivered": [data]}))
    t.start()
    while fs._committer is None or not fs._committer.busy:
        time.sleep(0.005)
    return t


def test_group_commit_many_concurrent_writers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FileStore(tmp_path / "arch")
    held = _HeldCommits(monkeypatch, fs, queued=15)
    bodies = [b"Subject: m%d\r\n\r\nbody %d\r\n" % (i, i) for i in range(16)]
    out = _concurrently(lambda b: fs.store(_rec(), {"delivered": [b]}), bodies)
    assert all(isinstance(r, Record) for r in out), out
    # One writer committed alone, the 15 that queued meanwhile went in as one transaction.
    assert held.batches == [1, 15]
    s = store(tmp_path)
    assert sorted(s.read(r) for r in s.search(Query())) == sorted(bodies)
    assert s.verify() == [] and os.listdir(tmp_path / "arch" / "tmp") == []
    fs.close()


def test_group_commit_failed_row_fails_only_its_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FileStore(tmp_path / "arch")
    held = _HeldCommits(monkeypatch, fs, queued=6)
    leader = _lead(fs, b"first\r\n")  # held until the six below are queued behind it
    # Message 3's row breaks a NOT NULL constraint: its INSERT fails and rolls back the
    # batch's transaction; the other rows are retried one by one and committed.
    recs = [_rec() for i in range(6)]
    recs[3].sender = None
    out = _concurrently(
        lambda i: fs.store(recs[i], {"delivered": [b"m%d\r\n" % i]}), list(range(6))
    )
    leader.join(10)
    assert isinstance(out[3], sqlite3.IntegrityError)
    assert all(isinstance(r, Record) for i, r in enumerate(out) if i != 3), out
    assert held.batches[:2] == [1, 6]  # all six in one transaction, which failed
    s = store(tmp_path)
    got = {r.id: s.read(r) for r in s.search(Query())}
    want = {recs[i].id: b"m%d\r\n" % i for i in range(6) if i != 3}
    assert sorted(got.values()) == sorted([b"first\r\n", *want.values()])
    assert want.items() <= got.items()
    assert s.verify() == []  # the failed message's copy was removed: no orphan
    fs.close()


def test_group_commit_directory_fsync_failure_fails_that_day_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import milterd_plugins.archive.store as store_mod

    fs = FileStore(tmp_path / "arch")
    old_day = time.mktime((2026, 1, 2, 12, 0, 0, 0, 0, 0))
    fs._day_dir(old_day)  # create it before fsyncs start failing
    real_fsync_dir = store_mod._fsync_dir

    def fsync_dir(path: Path) -> None:
        if str(path).endswith("2026/01/02"):
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(store_mod, "_fsync_dir", fsync_dir)
    held = _HeldCommits(monkeypatch, fs, queued=5)
    leader = _lead(fs, b"today\r\n")
    recs = [_rec(old_day if i % 2 else None) for i in range(5)]
    out = _concurrently(
        lambda i: fs.store(recs[i], {"delivered": [b"m%d\r\n" % i]}), list(range(5))
    )
    leader.join(10)
    assert held.batches == [1, 3]  # one batch of five: two failed their directory fsync
    assert [isinstance(r, OSError) for r in out] == [False, True, False, True, False]
    s = store(tmp_path)
    assert {recs[i].id for i in (0, 2, 4)} < {r.id for r in s.search(Query())}
    assert len(s.search(Query())) == 4
    assert s.verify() == []
    fs.close()


def test_group_commit_queued_writer_gives_up_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = FileStore(tmp_path / "arch")
    release = threading.Event()
    real = fs._insert_rows

    def stalled(rows: list[tuple[Any, ...]]) -> None:
        release.wait(10)
        real(rows)

    monkeypatch.setattr(fs, "_insert_rows", stalled)
    leader = threading.Thread(target=fs.store, args=(_rec(), {"delivered": [b"lead\r\n"]}))
    leader.start()
    while fs._committer is None or not fs._committer.busy:
        time.sleep(0.005)
    committer = fs._committer
    real_submit = committer.submit
    monkeypatch.setattr(committer, "submit", lambda row, day: real_submit(row, day, 0.2))
    with pytest.raises(StoreError, match="not done within"):
        fs.store(_rec(), {"delivered": [b"late\r\n"]})
    release.set()
    leader.join(10)
    s = store(tmp_path)
    assert [s.read(r) for r in s.search(Query())] == [b"lead\r\n"]
    assert s.verify() == [] and committer.queue == [] and not committer.busy
    fs.close()


def test_group_commit_writer_whose_batch_is_committing_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A follower whose batch another writer has taken and is committing cannot withdraw
    # any more: its row may go in. It waits for the outcome (here: committed) instead of
    # failing (it raised ValueError, deleted its file, and the index kept the row).
    fs = FileStore(tmp_path / "arch")
    gates = [threading.Event(), threading.Event()]
    calls: list[int] = []
    real = fs._insert_rows

    def stalled(rows: list[tuple[Any, ...]]) -> None:
        calls.append(len(rows))
        if len(calls) <= 2:
            gates[len(calls) - 1].wait(10)
        real(rows)

    monkeypatch.setattr(fs, "_insert_rows", stalled)
    leader = _lead(fs, b"lead\r\n")
    committer = fs._committer
    assert committer is not None
    real_submit = committer.submit

    def submit(row: tuple[Any, ...], day: str) -> None:  # the second follower: 0.2 s
        real_submit(row, day, 0.2 if threading.current_thread().name == "f2" else 60.0)

    monkeypatch.setattr(committer, "submit", submit)
    out: dict[str, object] = {}

    def follower(name: str) -> None:
        try:
            out[name] = fs.store(_rec(), {"delivered": [name.encode() + b"\r\n"]})
        except Exception as e:
            out[name] = e

    f1 = threading.Thread(target=follower, args=("f1",), name="f1")
    f1.start()
    while len(committer.queue) < 1:
        time.sleep(0.005)
    f2 = threading.Thread(target=follower, args=("f2",), name="f2")
    f2.start()
    while len(committer.queue) < 2:
        time.sleep(0.005)
    gates[0].set()  # the leader's commit ends; f1 leads the batch [f1, f2], which stalls
    while len(calls) < 2:
        time.sleep(0.005)
    time.sleep(0.4)  # past f2's timeout while its batch is being committed
    gates[1].set()
    for t in (leader, f1, f2):
        t.join(10)
    assert not isinstance(out["f2"], Exception), out
    assert calls == [1, 2]
    s = store(tmp_path)
    assert sorted(s.read(r) for r in s.search(Query())) == [b"f1\r\n", b"f2\r\n", b"lead\r\n"]
    assert s.verify() == [] and committer.queue == [] and not committer.busy
    fs.close()


def test_concurrent_sessions_through_the_pipeline(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        msgs = [MSG.replace(b"quarterly numbers", b"n%d" % i) for i in range(12)]
        outs = _concurrently(lambda m: h.send(m, queue_id="Q" + m[-40:].hex()[:6]), msgs)
    assert all(o.verdict == "continue" for o in outs), outs
    recs = all_records(tmp_path)
    assert sorted(r.subject for r in recs) == sorted(f"n{i}" for i in range(12))
    s = store(tmp_path)
    assert {s.read(r) for r in recs} == {o.delivered for o in outs}
    assert s.verify() == []


def test_json_columns_match_json_dumps(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "arch")
    rec = _rec()
    rec.recipients = ['"q"@example.org', "ü@example.org", "x\\y@example.org"]
    rec.results = ["dkim=pass header.d=example.org", "spf=none"]
    fs.store(rec, {"delivered": [b"x\r\n"]})
    row = fs.db.execute("SELECT recipients, results FROM messages").fetchone()
    assert row == (json.dumps(rec.recipients), json.dumps(rec.results))
    (got,) = fs.search(Query())
    assert got.recipients == rec.recipients and got.results == rec.results
    fs.close()


def test_large_message_streamed_and_stored_intact(tmp_path: Path) -> None:
    body = b"".join(b"line %07d of a big body\r\n" % i for i in range(60000))  # ~1.6 MB
    raw = MSG.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    with rig(tmp_path, store="both", compress="zstd") as h:  # streamed, not one buffer
        out = h.send(raw)
    (rec,) = all_records(tmp_path)
    s = store(tmp_path)
    assert s.verify() == []
    assert (tmp_path / "arch" / rec.copies["received"].path).stat().st_size < len(raw) // 4
    assert s.read(rec, "received") == raw
    assert s.read(rec, "delivered") == out.delivered
    assert rec.copies["received"].sha256 == hashlib.sha256(raw).hexdigest()


def test_outcome_write_keeps_its_deadline_and_takes_a_late_copy_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_store = FileStore.store

    def slow_store(self: FileStore, record: Record, copies: Any) -> Record:
        data = {k: [b"".join(v)] for k, v in copies.items()}
        time.sleep(0.6)
        stored: Record = real_store(self, record, data)
        return stored

    monkeypatch.setattr(FileStore, "store", slow_store)
    with rig(tmp_path, verdicts=["reject"], timeout=0.2) as h:
        t0 = time.monotonic()
        out = h.send(MSG.replace(b"quarterly numbers", b"reject-me"))
        took = time.monotonic() - t0
        time.sleep(1.0)  # the write finishes meanwhile, past the deadline
    assert out.verdict == "reject"
    assert took < 0.5  # outcome waited for its deadline, not for the disk
    assert all_records(tmp_path) == [] and layout_files(tmp_path) == []


def test_outcome_disk_work_is_not_queued_behind_a_hung_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A quarantined message's verdict update runs on the plugin's 8 helper threads. With
    # the store hung, each one stays stuck past its deadline; the ninth is not queued
    # behind them (where it would keep its message until the disk came back) but logged.
    release = threading.Event()
    msg = MSG.replace(b"Subject: quarterly numbers", b"Subject: quarantine-me")
    with rig(tmp_path, timeout=0.3) as h:
        plugin = next(p.obj for p in h.runtime.plugins if p.name == "archive")
        assert isinstance(plugin, ArchivePlugin) and plugin.backend is not None
        monkeypatch.setattr(plugin.backend, "set_verdict", lambda id, v: release.wait(10))
        outs = [h.send(msg) for _ in range(9)]
        assert plugin._pool is not None
        queued = plugin._pool._work_queue.qsize()
        release.set()
    assert [o.verdict for o in outs] == ["quarantine"] * 9
    log = [r.getMessage() for r in caplog.records]
    assert sum("verdict update not done within" in m for m in log) == 8, log
    assert sum("verdict update not started" in m for m in log) == 1, log
    assert queued == 0


# --- review fixes: corrupt copies, mbox, live verify, paths, subjects, release, times ---


def _config(tmp_path: Path, extra: str = "") -> Path:
    config = tmp_path / "milterd.toml"
    config.write_text(f'[plugins.archive]\npath = "{tmp_path / "arch"}"\n{extra}')
    return config


def test_read_refuses_truncated_flipped_and_mismatched_copies(tmp_path: Path) -> None:
    import zstandard

    fs = FileStore(tmp_path / "arch", compress=True)
    body = b"Subject: s\r\n\r\n" + b"some text that compresses\r\n" * 50
    recs = [fs.store(_rec(), {"delivered": [body]}) for _ in range(3)]
    root = tmp_path / "arch"
    paths = [root / r.copies["delivered"].path for r in recs]
    assert zstandard.get_frame_parameters(paths[0].read_bytes()).has_checksum
    paths[0].write_bytes(paths[0].read_bytes()[:-12])  # truncated: used to read as b""
    data = bytearray(paths[1].read_bytes())
    data[len(data) // 2] ^= 0x01  # flipped byte: the frame checksum catches it
    paths[1].write_bytes(bytes(data))
    fs.db.execute("UPDATE messages SET delivered_sha256 = ? WHERE id = ?", ("0" * 64, recs[2].id))
    s = store(tmp_path)
    for rec, kind in zip(recs, ["unreadable", "unreadable", "mismatch"], strict=True):
        got = s.get(rec.id)
        assert got is not None
        with pytest.raises(StoreError) as e:
            s.read(got)
        assert isinstance(e.value, CopyError) and e.value.kind == kind, e.value
    assert sorted((p.kind, p.id) for p in s.verify()) == sorted(
        [("unreadable", recs[0].id), ("unreadable", recs[1].id), ("mismatch", recs[2].id)]
    )
    config = _config(tmp_path)
    for rec in recs:
        for cmd in (["show", rec.id, "--raw"], ["export", rec.id, "--eml", str(tmp_path / "e")]):
            r = cli(config, *cmd)
            assert r.returncode == 1 and r.stdout == "", (cmd, r)
            assert rec.id in r.stderr and "Traceback" not in r.stderr
    assert not list((tmp_path / "e").iterdir())
    fs.close()


def _mbox_entries(data: bytes) -> list[tuple[bytes, bytes]]:
    """(From line, message) pairs of an mboxrd file, messages un-quoted, by hand."""
    out = []
    for chunk in data.split(b"\n\nFrom ")[0:]:
        sep, _, msg = chunk.removeprefix(b"From ").partition(b"\n")
        msg = re.sub(rb"(?m)^>(>*From )", rb"\1", msg.removesuffix(b"\n\n"))
        out.append((b"From " + sep, msg))
    return out


def test_export_mbox_is_byte_exact_atomic_and_0640(tmp_path: Path) -> None:
    tricky = (
        b"From: a@example.org\r\nX-A:value\r\nSubject: tricky\r\nContent-Type: multipart/mixed;"
        b' boundary="b"\r\n\r\nFrom here on\r\n>From quoted\r\nbare\rCR\r\n--b--\r\nno end'
    )
    with rig(tmp_path, store="received") as h:
        h.send(MSG, sender="")
        h.send(tricky, sender="x y@example.org")
    r1, r2 = all_records(tmp_path)
    config = _config(tmp_path)
    mbox = tmp_path / "out.mbox"
    r = cli(config, "export", "--mbox", str(mbox), "--since", "1d")
    assert r.returncode == 0, r.stderr
    assert mbox.stat().st_mode & 0o777 == 0o640
    data = mbox.read_bytes()
    assert b"\r" not in data.replace(b"bare\rCR", b"")  # LF line ends, bare CR kept
    entries = _mbox_entries(data)
    asc = [time.asctime(time.gmtime(x.received)).encode() for x in (r1, r2)]
    assert entries == [
        (b"From MAILER-DAEMON " + asc[0], MSG.replace(b"\r\n", b"\n").removesuffix(b"\n")),
        (b"From x_y@example.org " + asc[1], tricky.replace(b"\r\n", b"\n")),
    ]
    assert b"\n>From here on\n>>From quoted\n" in data and data.endswith(b"no end\n\n")
    # Appending: the old contents first, then the new entries.
    assert cli(config, "export", r1.id, "--mbox", str(mbox)).returncode == 0
    assert mbox.read_bytes() == data + data[: data.index(b"\n\nFrom ") + 2]
    # A copy failing its check: exit 1, the mbox untouched, no temporary file left.
    (tmp_path / "arch" / r2.copies["received"].path).write_bytes(b"changed")
    before = mbox.read_bytes()
    r = cli(config, "export", "--mbox", str(mbox), "--since", "1d")
    assert r.returncode == 1 and "mismatch" in r.stderr
    assert mbox.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    r = cli(config, "export", r1.id, "--eml", str(tmp_path / "eml"))
    eml = tmp_path / "eml" / f"{r1.id}.eml"
    assert eml.read_bytes() == MSG and eml.stat().st_mode & 0o777 == 0o640


def test_verify_on_a_live_archive_reports_nothing_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = FileStore(tmp_path / "arch")
    old = [writer.store(_rec(), {"delivered": [b"m%d\r\n" % i]}) for i in range(3)]
    checker = FileStore(tmp_path / "arch", readonly=True)
    real_record = checker._record
    day = tmp_path / "arch" / old[0].copies["delivered"].path.rsplit("/", 1)[0]
    uncommitted = day / f"{new_id(time.time())}.eml"
    an_hour_ago = time.time() - 3600

    def record(row: tuple[Any, ...]) -> Record:
        if row[0] == old[0].id:  # the rows are read; meanwhile, while verify runs:
            writer.delete(old[2].id)  # one message is pruned,
            late = writer.store(_rec(), {"delivered": [b"late\r\n"]})  # one is stored
            # (its file older than the run: renamed in before, committed after the start),
            os.utime(tmp_path / "arch" / late.copies["delivered"].path, (an_hour_ago,) * 2)
            uncommitted.write_bytes(b"being stored\r\n")  # and one is not committed yet
        rec: Record = real_record(row)
        return rec

    monkeypatch.setattr(checker, "_record", record)
    assert checker.verify() == []
    monkeypatch.undo()
    # Once old enough, a file no row describes is an orphan after all.
    os.utime(uncommitted, (an_hour_ago,) * 2)
    assert [(p.kind, p.path) for p in checker.verify()] == [
        ("orphan", str(uncommitted.relative_to(tmp_path / "arch")))
    ]
    writer.close()


def test_commands_need_an_existing_archive(tmp_path: Path) -> None:
    config = tmp_path / "milterd.toml"
    config.write_text("")
    missing = tmp_path / "unmounted" / "archive"
    for args in (
        ["prune", "--older-than", "1d"],
        ["prune", "--older-than", "1d", "--dry-run"],
        ["search"],
        ["verify"],
        ["show", "x"],
        ["export", "--mbox", str(tmp_path / "m"), "--since", "1d"],
        ["release", "x"],
    ):
        r = cli(config, *args, "--path", str(missing))
        assert r.returncode == 2, (args, r)
        assert "no archive index" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "unmounted").exists()


def test_prune_removes_emptied_past_days_and_the_writer_recovers(tmp_path: Path) -> None:
    away_from_midnight()  # delete() reads the date again: today must stay today
    fs = FileStore(tmp_path / "arch")
    root = tmp_path / "arch"
    past = time.time() - 40 * 86400
    a = fs.store(_rec(past), {"delivered": [b"a\r\n"]})
    today = fs.store(_rec(), {"delivered": [b"t\r\n"]})
    past_day = root / a.copies["delivered"].path.rsplit("/", 1)[0]
    assert prune(fs, parse_duration("30d")) == 1
    assert not past_day.exists()  # emptied: removed (and its month/year if empty too)
    assert not past_day.parent.exists() or any(past_day.parent.iterdir())
    # The writer had that day cached: a write into it recreates it instead of failing.
    b = fs.store(_rec(past), {"delivered": [b"b\r\n"]})
    assert fs.read(b) == b"b\r\n"
    # Today's directory is never removed, even when emptied.
    assert fs.delete(today.id) and fs.delete(b.id)
    assert (root / today.copies["delivered"].path).parent.is_dir()
    assert not past_day.exists()
    assert fs.verify() == []
    fs.close()


def test_subject_unfolded_decoded_and_output_escaped(tmp_path: Path) -> None:
    folded = MSG.replace(b"Subject: quarterly numbers", b"Subject: quarterly\r\n numbers")
    encoded = MSG.replace(
        b"Subject: quarterly numbers",
        b"Subject: =?utf-8?q?caf=C3=A9_cr=C3=A8me?=\r\n =?iso-8859-1?q?br=FBl=E9e?= \x1b[2J",
    )
    broken = MSG.replace(b"Subject: quarterly numbers", b"Subject: =?x-nope?q?abc?= =?utf-8?b?")
    with rig(tmp_path) as h:
        for m in (folded, encoded, broken):
            assert h.send(m, helo="evil\x1b]0;title\x07").verdict == "continue"
    s = store(tmp_path)
    assert [r.subject for r in s.search(Query(subject="quarterly numbers"))] == [
        "quarterly numbers"
    ]
    (enc,) = s.search(Query(subject="crème"))
    assert enc.subject == "café crèmebrûlée \x1b[2J"
    assert len(s.search(Query(subject="abc"))) == 1  # malformed: kept, never an error
    config = _config(tmp_path)
    r = cli(config, "search", "--subject", "café")
    assert r.returncode == 0 and "café crèmebrûlée \\x1b[2J" in r.stdout
    r = cli(config, "show", enc.id)
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout
    assert "evil\\x1b]0;title\\x07" in r.stdout
    assert "\\u001b" in cli(config, "show", enc.id, "--json").stdout


def test_release_non_ascii_addresses_and_8bit_body(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    from tests.support.postfix import free_port
    from tests.support.sink import SmtpSink

    body = MSG.replace(b"quarterly numbers", b"quarantine-me").replace(b"Hello", b"H\xc3\xa9llo")
    with rig(tmp_path) as h:
        assert h.send(body, sender="jörg@exämple.org", recipients=["bob@example.com"]).verdict == (
            "quarantine"
        )
    (rec,) = all_records(tmp_path)
    assert rec.sender == "jörg@exämple.org"
    with SmtpSink() as sink:  # offers SMTPUTF8 and 8BITMIME
        r = cli(_config(tmp_path), "release", rec.id, "--port", str(sink.port))
        assert r.returncode == 0, r.stderr
        (got,) = sink.wait_for(1)
    assert got.mail_from == "jörg@exämple.org" and got.data == store(tmp_path).read(rec)
    assert b"H\xc3\xa9llo" in got.data
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(got.mail_options)

    class Plain:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            return "250 OK"

    port = free_port()
    ctl = Controller(Plain(), hostname="127.0.0.1", port=port, enable_SMTPUTF8=False)
    ctl.start()
    try:
        r = cli(_config(tmp_path), "release", rec.id, "--port", str(port))
    finally:
        ctl.stop()
    assert r.returncode == 1 and "SMTPUTF8" in r.stderr and "Traceback" not in r.stderr


def test_times_accept_iso_8601_and_bad_values_are_errors(tmp_path: Path) -> None:
    from milterd_plugins.archive.cli import parse_when

    t = 1796264270.0  # 2026-12-03T02:17:50Z
    assert parse_when("2026-12-03T02:17:50Z") == t
    assert parse_when("2026-12-03T02:17:50") == t  # naive: UTC
    assert parse_when("2026-12-03 02:17") == t - 50
    assert parse_when("2026-12-03T03:17:50+01:00") == t
    assert parse_when("2026-12-03") == t - 2 * 3600 - 17 * 60 - 50
    assert abs(parse_when("2h") - (time.time() - 7200)) < 5
    with pytest.raises(ValueError, match="not a time"):
        parse_when("yesterday")
    with rig(tmp_path) as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    config = _config(tmp_path)
    shown = json.loads(cli(config, "show", rec.id, "--json").stdout)["received_iso"]
    r = cli(config, "search", "--since", shown, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == rec.id
    r = cli(config, "search", "--since", "yesterday")
    assert r.returncode == 2 and "--since" in r.stderr and "Traceback" not in r.stderr


def test_limit_gives_the_newest_and_must_be_positive(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "arch")
    now = time.time()
    recs = [fs.store(_rec(now - 100 + i), {"delivered": [b"%d\r\n" % i]}) for i in range(4)]
    assert [r.id for r in fs.search(Query(limit=2))] == [recs[2].id, recs[3].id]
    with pytest.raises(ValueError):
        fs.search(Query(limit=0))
    r = cli(_config(tmp_path), "search", "--limit", "0")
    assert r.returncode == 2 and "positive" in r.stderr
    fs.close()


def test_named_temporary_files_can_be_forced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MILTERD_ARCHIVE_TMPFILE", "0")
    s = FileStore(tmp_path / "arch")
    try:
        assert not s.tmpfile
    finally:
        s.close()


def test_export_never_replaces_what_is_not_a_regular_file(tmp_path: Path) -> None:
    """The result is renamed into place: a FIFO, a directory or a device there must be an
    error (2), not replaced by a regular file; so is a symbolic link, neither followed
    (a planted link would make root overwrite its target) nor replaced."""
    with rig(tmp_path) as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    config = _config(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    for target in (fifo, folder):
        r = cli(config, "export", rec.id, "--mbox", str(target))
        assert r.returncode == 2 and "not a regular file" in r.stderr, r.stderr
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and folder.is_dir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / f"{rec.id}.eml").symlink_to(victim)
    (shared / "box.mbox").symlink_to(victim)
    (shared / "dangling.mbox").symlink_to(tmp_path / "nowhere")
    for args in (("--eml", str(shared)), ("--mbox", str(shared / "box.mbox")),
                 ("--mbox", str(shared / "dangling.mbox"))):  # fmt: skip
        r = cli(config, "export", rec.id, *args)
        assert r.returncode == 2 and "a symbolic link" in r.stderr, r.stderr
    assert victim.read_bytes() == b"precious" and not (tmp_path / "nowhere").exists()
    assert all(p.is_symlink() for p in shared.iterdir())


def test_cli_refuses_contradictory_or_out_of_range_arguments(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    config = _config(tmp_path)
    r = cli(config, "export", rec.id, "--since", "5x", "--mbox", str(tmp_path / "o.mbox"))
    assert r.returncode == 2 and "not both (--since)" in r.stderr
    assert not (tmp_path / "o.mbox").exists()
    r = cli(config, "show", rec.id, "--json", "--raw")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    for port in ("0", "99999", "x"):
        r = cli(config, "release", rec.id, "--force", "--port", port)
        assert r.returncode == 2 and "not a port number" in r.stderr


def test_cli_does_not_initialise_another_programs_database(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with sqlite3.connect(other / "index.sqlite3") as db:
        db.execute("CREATE TABLE t (x)")
    before = (other / "index.sqlite3").read_bytes()
    config = _config(tmp_path)
    for args in (("prune", "--older-than", "1d"), ("search",), ("verify",)):
        r = cli(config, *args, "--path", str(other))
        assert r.returncode == 2 and "not a milterd archive index" in r.stderr, r.stderr
    assert (other / "index.sqlite3").read_bytes() == before
    assert sorted(p.name for p in other.iterdir()) == ["index.sqlite3"]


# --- found by a review of the requirements (2026-12-03) ----------------------------


def test_durations_have_no_ambiguous_m() -> None:
    """'6m' as retention deleted everything older than six minutes (months were meant):
    there is no 'm' any more, and the error says what to write."""
    for text in ("6m", "6M", "1mo", "2 months"):
        with pytest.raises(ValueError, match="min for minutes"):
            parse_duration(text)
        with pytest.raises(ValueError, match="ambiguous"):
            ArchiveConfig(retention=text)
    assert parse_duration("30min") == 1800 and parse_duration("45s") == 45
    assert parse_duration("2") == 2 * 86400 and parse_duration("1Y") == 365 * 86400
    with pytest.raises(ValueError, match="units"):
        parse_duration("3x")


def test_cli_prune_refuses_an_ambiguous_age(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG)
    r = cli(_config(tmp_path), "prune", "--older-than", "6m")
    assert r.returncode == 2 and "ambiguous" in r.stderr, r.stderr
    r = cli(_config(tmp_path), "search", "--since", "6m")
    assert r.returncode == 2 and "6min for minutes" in r.stderr, r.stderr
    assert len(all_records(tmp_path)) == 1


def test_a_failed_write_is_not_tried_again_at_outcome(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With required = false a failed finalize write was repeated at outcome: twice the
    wait on a hung store, two errors a message on a full one."""
    with rig(tmp_path, required=False) as h:
        break_store(tmp_path)
        out = h.send(MSG)
    assert out.verdict == "continue"
    failures = [m for r in caplog.records if "archive" in (m := r.getMessage()) and "fail" in m]
    assert len(failures) == 1, failures


def test_search_folds_case_beyond_ascii_and_finds_bounces(tmp_path: Path) -> None:
    with rig(tmp_path) as h:
        h.send(MSG.replace(b"quarterly numbers", "Überweisung CAFÉ".encode()))
        h.send(MSG, sender="")
        h.send(MSG, sender="Jürgen@Example.org")
    s = store(tmp_path)

    def n(**kw: Any) -> int:
        return len(s.search(Query(**kw)))

    assert n(subject="überweisung") == 1 and n(subject="café") == 1
    assert n(subject="ÜBERWEISUNG") == 1
    assert n(sender="<>") == 1
    assert n(sender="jürgen@example.org") == 1 and n(sender="JÜRGEN@EXAMPLE.ORG") == 1


def test_cli_refuses_empty_query_values(tmp_path: Path) -> None:
    """An empty value matched every message: `export --message-id "$UNSET"` exported the
    whole archive."""
    with rig(tmp_path) as h:
        h.send(MSG)
        h.send(MSG, sender="")
    config = _config(tmp_path)
    for option in ("--from", "--to", "--subject", "--message-id", "--queue-id", "--since",
                   "--until"):  # fmt: skip
        r = cli(config, "export", option, "", "--eml", str(tmp_path / "out"))
        assert r.returncode == 2 and "empty value" in r.stderr, (option, r.stderr)
    assert not (tmp_path / "out").exists()
    r = cli(config, "search", "--from", " <> ", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 1
    assert json.loads(r.stdout)["sender"] == ""


def test_message_id_with_a_comment_and_a_folded_date_are_indexed_clean(tmp_path: Path) -> None:
    msg = MSG.replace(
        b"Message-ID: <abc.123@example.org>", b"Message-ID: <Abc.123@example.org> (sent by X)"
    ).replace(b"Date: Sun, 22 Nov 2026", b"Date: Sun,\r\n 22 Nov 2026")
    with rig(tmp_path) as h:
        h.send(msg)
    (rec,) = all_records(tmp_path)
    assert rec.message_id == "abc.123@example.org"
    assert rec.date == "Sun, 22 Nov 2026 03:00:00 +0000"
    assert len(store(tmp_path).search(Query(message_id="<abc.123@example.org>"))) == 1


@pytest.mark.parametrize(
    "pattern",
    [
        "*.example.com",
        "example.com.",
        "@.example.com",
        "user@",
        "..example.com",
        "<user@example.com>",
        "example..com",
        "<>@example.com",
    ],
)
def test_patterns_that_can_never_match_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match=r"never match|invalid"):
        ArchiveConfig(rules=[{"senders": [pattern]}])
    with pytest.raises(ValueError, match=r"never match|invalid"):
        ArchiveConfig(rules=[{"recipients": [pattern]}])
    with pytest.raises(ValueError, match="never match"):  # no recipient is the null address
        ArchiveConfig(rules=[{"recipients": ["<>"]}])


def test_null_sender_pattern_selects_bounces() -> None:
    cfg = ArchiveConfig(rules=[{"senders": ["<>"], "archive": False}])
    assert not selected(cfg, "inbound", "", ["x@y.example"], "continue")
    assert selected(cfg, "inbound", "a@b.example", ["x@y.example"], "continue")


def test_a_subject_of_many_encoded_words_is_indexed_in_bounded_time() -> None:
    # The decoder's time grows with the square of the encoded words: a 360 KB Subject of
    # them took 30 s, past the write's deadline, so the message was deferred at every try.
    from milterd_plugins.archive import _subject

    t0 = time.monotonic()
    text = _subject("=?utf-8?q?caf=C3=A9?= " * 40_000)
    assert time.monotonic() - t0 < 2.0
    assert text.startswith("café") and len(text) > 100_000


# --- found by a review (2026-12-03, evening) ------------------------------------------------


def test_verify_reports_a_stray_file_whose_name_is_not_utf8(tmp_path: Path) -> None:
    """One stray file named b"\\xff\\xfe.eml" made verify exit 2 on an SQLite encoding
    error, reporting nothing (a corrupt copy beside it went unreported too)."""
    with rig(tmp_path) as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    day = tmp_path / "arch" / rec.copies["delivered"].path.rsplit("/", 1)[0]
    stray = os.path.join(os.fsencode(day), b"\xff\xfe.eml")
    with open(stray, "wb") as f:
        f.write(b"x")
    os.utime(stray, (time.time() - 3600, time.time() - 3600))
    (tmp_path / "arch" / rec.copies["delivered"].path).write_bytes(b"changed")
    problems = store(tmp_path).verify()
    assert sorted(p.kind for p in problems) == ["mismatch", "orphan"], problems
    r = cli(_config(tmp_path), "show", "\udcff")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr


def test_export_appending_to_a_users_mbox_keeps_its_owner(tmp_path: Path) -> None:
    """The mbox was replaced by a new file of the exporting user (root): the owner's own
    mailbox became root's."""
    with rig(tmp_path) as h:
        h.send(MSG, sender="jörg@exämple.org")
    mbox = tmp_path / "user.mbox"
    mbox.write_bytes(b"")
    mbox.write_bytes(b"From a@b Thu Dec  3 00:00:00 2026\nSubject: old\n\nold\n\n")
    mbox.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(mbox, 1000, 1000)
    want = mbox.stat()
    r = cli(_config(tmp_path), "export", "--mbox", str(mbox), "--since", "1d")
    assert r.returncode == 0, r.stderr
    st = mbox.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (want.st_uid, want.st_gid, 0o600)
    # The From_ line is ASCII (Python's mailbox decodes it so): the sender was jörg@exämple
    boxes = list(mailbox.mbox(str(mbox)))
    assert len(boxes) == 2 and boxes[1].get_from().startswith("j_rg@ex_mple.org ")


def test_prune_interval_is_bounded() -> None:
    """prune_interval = "0" made retention a busy loop; "300y" killed the pruner thread
    (Event.wait overflow)."""
    from milterd_plugins.archive import ArchiveConfig

    for bad in ("0", "0s", "30s", "2y", "300y"):
        with pytest.raises(ValueError, match="from 1min to 1y"):
            ArchiveConfig(path="/tmp/x", retention="30d", prune_interval=bad)
    assert ArchiveConfig(path="/tmp/x", prune_interval="1min").prune_interval == "1min"


def test_release_from_empty_is_the_null_sender(tmp_path: Path) -> None:
    """release_from = "" was taken for "unset": the original sender was used, while
    --from '' gives <>."""
    from tests.support.sink import SmtpSink

    body = MSG.replace(b"quarterly numbers", b"quarantine-me")
    with rig(tmp_path) as h:
        h.send(body, sender="alice@example.org")
    (rec,) = all_records(tmp_path)
    with SmtpSink() as sink:
        r = cli(_config(tmp_path, 'release_from = ""\n'), "release", rec.id,
                "--port", str(sink.port))  # fmt: skip
        assert r.returncode == 0, r.stderr
        (got,) = sink.wait_for(1)
    assert got.mail_from == "<>"


def test_cli_odd_arguments_and_both_copies_as_eml(tmp_path: Path) -> None:
    """--limit 2**63 gave "datatype mismatch", a --subject that was not UTF-8 an encoding
    error (exit 2); --copy received and delivered went to the same DIR/<id>.eml."""
    with rig(tmp_path, store="both") as h:
        h.send(MSG)
    (rec,) = all_records(tmp_path)
    config = _config(tmp_path)
    r = cli(config, "search", "--limit", str(2**63), "--since", "1d")
    assert r.returncode == 0 and rec.id in r.stdout, r.stderr
    r = cli(config, "search", "--subject", "\udcff")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    out = tmp_path / "eml"
    for copy in ("received", "delivered"):
        assert cli(config, "export", rec.id, "--eml", str(out), "--copy", copy).returncode == 0
    s = store(tmp_path)
    assert (out / f"{rec.id}.received.eml").read_bytes() == s.read(rec, "received")
    assert (out / f"{rec.id}.eml").read_bytes() == s.read(rec, "delivered")


def test_recipient_search_folds_case_as_the_sender_search_does(tmp_path: Path) -> None:
    """--from STRASSE@example.de found straße@example.de, --to did not (lower() against
    casefold())."""
    with rig(tmp_path) as h:
        h.send(MSG, sender="straße@example.de", recipients=["straße@example.de"])
    s = store(tmp_path)
    for q in ("STRASSE@example.de", "straße@example.de", "Straße@EXAMPLE.de", "@example.de"):
        assert len(s.search(Query(recipient=q))) == 1, q
        assert len(s.search(Query(sender=q))) == 1, q
    assert s.search(Query(recipient="strasse@example.com")) == []
    # A row written before (lower-cased recipients) is still found by what it holds.
    s.db.execute("UPDATE messages SET rcpt_search = ?", ("\nstraße@example.de\n",))
    assert len(s.search(Query(recipient="Straße@example.de"))) == 1


def test_an_mbox_keeps_what_of_its_owner_may_be_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A review: a user (not root) exporting into a mailbox of group mail lost the group
    too, the uid-and-gid fchown failing as a whole."""
    from milterd_plugins.archive import cli as archive_cli

    calls: list[tuple[int, int]] = []

    def fchown(fd: int, uid: int, gid: int) -> None:
        calls.append((uid, gid))
        if uid != -1 and gid != -1:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(archive_cli.os, "fchown", fchown)
    with archive_cli._replacing(tmp_path / "box", 0o660, (1000, 8)) as f:
        f.write(b"x")
    assert calls == [(1000, 8), (1000, -1), (-1, 8)]
    assert (tmp_path / "box").read_bytes() == b"x"


# --- review fixes (2026-12-04): empty IDs, prune failures, verify on damage and races ------


def _two_stored(tmp_path: Path, age: float = 0.0) -> tuple[FileStore, Record, Record]:
    fs = FileStore(tmp_path / "arch")
    now = time.time() - age
    a = fs.store(_rec(now), {"delivered": [b"first\r\n"]})
    b = fs.store(_rec(now + 1), {"delivered": [b"second\r\n"]})
    return fs, a, b


def test_cli_refuses_an_empty_id_and_an_empty_message_id(tmp_path: Path) -> None:
    fs, _, _ = _two_stored(tmp_path)
    fs.close()
    config = _config(tmp_path)
    out = tmp_path / "all.mbox"
    # A script's unset variable: "" must not select every message.
    r = cli(config, "export", "", "--mbox", str(out))
    assert r.returncode == 2 and "empty ID" in r.stderr and not out.exists()
    cases: list[tuple[list[str], str]] = [
        (["show", ""], "empty ID"),
        (["release", " ", "--port", "9"], "empty ID"),
        # '<>' has no id: it would match every message without a Message-ID (both here).
        (["search", "--message-id", "<>"], "no id in"),
        (["export", "--message-id", "< >", "--eml", str(tmp_path / "eml")], "no id in"),
    ]
    for args, why in cases:
        r = cli(config, *args)
        assert r.returncode == 2 and why in r.stderr, args
    assert not (tmp_path / "eml").exists()


def test_prune_leaves_a_message_it_cannot_remove_whole_and_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from milterd.cli import main

    fs, a, _ = _two_stored(tmp_path, age=3 * 86400)
    fs.close()
    # a's day directory cannot be written (as for a non-root prune of a root-owned day);
    # a and b are on the same day, so give a a day of its own.
    blocked = tmp_path / "arch" / "2000" / "01" / "01"
    blocked.mkdir(parents=True)
    old = tmp_path / "arch" / a.copies["delivered"].path
    new_rel = f"2000/01/01/{a.id}.eml"
    old.rename(tmp_path / "arch" / new_rel)
    with sqlite3.connect(tmp_path / "arch" / "index.sqlite3") as db:
        db.execute("UPDATE messages SET delivered_path = ? WHERE id = ?", (new_rel, a.id))
    db.close()
    real_access = os.access

    def access(path: Any, mode: int, **kw: Any) -> bool:
        return False if Path(path) == blocked else real_access(path, mode, **kw)

    monkeypatch.setattr(os, "access", access)
    rc = main(["-c", str(_config(tmp_path)), "archive", "prune", "--older-than", "1d"])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert f"{a.id}: cannot remove {new_rel}" in err and "pruned 1 message(s), 1 not" in err
    left = [r.id for r in all_records(tmp_path)]
    assert left == [a.id] and (tmp_path / "arch" / new_rel).exists()  # whole: row and file
    assert store(tmp_path).verify() == []


def test_a_removal_that_fails_after_the_row_is_reported_and_prune_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, a, _ = _two_stored(tmp_path, age=3 * 86400)
    path_a = str(tmp_path / "arch" / a.copies["delivered"].path)
    real_unlink = os.unlink

    def unlink(path: Any, *args: Any, **kw: Any) -> None:
        if str(path) == path_a:
            raise PermissionError(13, "Permission denied", path_a)
        real_unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(PruneError) as e:
        prune(fs, 86400)
    monkeypatch.undo()
    assert e.value.pruned == 1
    assert "remove it by hand" in str(e.value) and a.copies["delivered"].path in str(e.value)
    assert all_records(tmp_path) == []
    t = time.time() - 3600  # (written just now: verify would take it for one being stored)
    os.utime(path_a, (t, t))
    assert [p.kind for p in fs.verify()] == ["orphan"]  # the file is found, not forgotten
    fs.close()


def test_retention_zero_is_refused() -> None:
    for v in ("0", "0s", "0d"):
        with pytest.raises(ValueError, match="would delete every message"):
            ArchiveConfig(retention=v)
    assert ArchiveConfig(retention="").retention == ""
    assert ArchiveConfig(retention="1d").retention == "1d"


def test_verify_leaves_a_copy_waiting_for_its_commit_alone(tmp_path: Path) -> None:
    fs, a, _ = _two_stored(tmp_path)
    day = (tmp_path / "arch" / a.copies["delivered"].path).parent
    waiting = day / f"{new_id(time.time())}.eml"
    waiting.write_bytes(b"its writer waits for the index lock\r\n")
    # 30 s old: a writer may wait that long for its row's commit (busy index, group
    # commit queue), so it is not an orphan yet.
    t = time.time() - 30
    os.utime(waiting, (t, t))
    assert fs.verify() == []
    t = time.time() - 3600
    os.utime(waiting, (t, t))
    assert [p.kind for p in fs.verify()] == ["orphan"]
    fs.close()


def test_a_damaged_row_is_reported_and_does_not_stop_search_show_or_prune(
    tmp_path: Path,
) -> None:
    fs, a, b = _two_stored(tmp_path, age=3 * 86400)
    with fs._lock:
        fs.db.execute("UPDATE messages SET recipients = 'not json' WHERE id = ?", (a.id,))
        fs.db.execute("UPDATE messages SET results = '{\"x\": 1}' WHERE id = ?", (b.id,))
    problems = {(p.kind, p.id) for p in fs.verify()}
    assert problems == {("bad-row", a.id), ("bad-row", b.id)}
    got = fs.get(a.id)
    assert got is not None and got.recipients == ["not json"]
    config = _config(tmp_path)
    r = cli(config, "search", "--json")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    r = cli(config, "verify")
    assert r.returncode == 1 and f"bad-row: {a.id}: recipients is not" in r.stdout, r.stdout
    # release would send the damaged text as an address: refused unless --to is given.
    with fs._lock:
        fs.db.execute("UPDATE messages SET verdict = 'quarantine'")
    r = cli(config, "release", a.id, "--port", "9")
    assert r.returncode == 1 and "index row is damaged" in r.stderr, r.stderr
    assert prune(fs, 86400) == 2 and all_records(tmp_path) == []
    fs.close()


def test_an_index_error_stops_prune_at_once(tmp_path: Path) -> None:
    fs, a, _ = _two_stored(tmp_path, age=3 * 86400)
    fs.close()
    fs = FileStore(tmp_path / "arch", busy_timeout=0.2)
    other = sqlite3.connect(tmp_path / "arch" / "index.sqlite3", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another writer holds the index
    try:
        with pytest.raises(PruneError) as e:
            prune(fs, 86400)
    finally:
        other.execute("ROLLBACK")
        other.close()
    # Not one failure (and one busy timeout) per message: the first stops the run.
    assert e.value.pruned == 0 and len(e.value.failures) == 1, e.value.failures
    assert e.value.failures[0].startswith(f"{a.id}: ") and "locked" in e.value.failures[0]
    assert len(all_records(tmp_path)) == 2
    fs.close()


def test_verify_reports_a_directory_it_cannot_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, a, _ = _two_stored(tmp_path)
    day = (tmp_path / "arch" / a.copies["delivered"].path).parent
    real_walk = os.walk

    def walk(top: Any, *args: Any, onerror: Any = None, **kw: Any) -> Any:
        # As os.walk does for a directory it may not list (a root-owned 0700 day).
        if onerror is not None:
            onerror(PermissionError(13, "Permission denied", str(day)))
        return iter(())

    monkeypatch.setattr(os, "walk", walk)
    problems = fs.verify()
    monkeypatch.setattr(os, "walk", real_walk)
    assert [(p.kind, p.path) for p in problems] == [
        ("unreadable", str(day.relative_to(tmp_path / "arch")))
    ]
    assert "Permission denied" in problems[0].detail
    fs.close()


def test_release_with_a_refused_recipient_exits_1(tmp_path: Path) -> None:
    from aiosmtpd.controller import Controller

    from tests.support.postfix import free_port

    with rig(tmp_path) as h:
        body = MSG.replace(b"quarterly numbers", b"quarantine-me")
        assert h.send(body, recipients=["bob@example.com"]).verdict == "quarantine"
    (rec,) = all_records(tmp_path)
    got: list[list[str]] = []

    class Picky:
        async def handle_RCPT(  # noqa: N802
            self, server: Any, session: Any, envelope: Any, address: str, options: Any
        ) -> str:
            if address.startswith("bad@"):
                return "550 5.1.1 no such user"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            got.append(list(envelope.rcpt_tos))
            return "250 OK"

    port = free_port()
    ctl = Controller(Picky(), hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        config = _config(tmp_path)
        r = cli(config, "release", rec.id, "--port", str(port), "--to", "good@example.org",
                "--to", "bad@example.org")  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "bad@example.org: refused 550" in r.stderr and "good@example.org" in r.stdout
        r = cli(config, "release", rec.id, "--port", str(port), "--to", "good@example.org")
        assert r.returncode == 0, r.stderr
    finally:
        ctl.stop()
    assert got == [["good@example.org"], ["good@example.org"]]


def test_search_into_a_closed_pipe_is_not_a_path_error(tmp_path: Path) -> None:
    fs = FileStore(tmp_path / "arch", fsync=False)
    for i in range(1000):  # about 100 KB of table: more than a pipe buffer holds
        fs.store(_rec(), {"delivered": [b"m%d\r\n" % i]})
    fs.close()
    r = subprocess.run(
        f"{sys.executable} -m milterd.cli -c {_config(tmp_path)} archive search | head -1",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Broken pipe" not in r.stderr and "Traceback" not in r.stderr, r.stderr
