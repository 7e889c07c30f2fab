"""A dry run (``milterd check``, ``Harness(dry_run=True)``): the same verdict, results,
symbols and changes as the daemon, and no change to any stored state: no file or
directory created, no row written, nothing learned, recorded or sent."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from milterd_plugins.archive import ArchivePlugin
from milterd_plugins.dmarc import DMARCPlugin
from milterd_plugins.scoring import ScoringPlugin
from milterd_plugins.scoring.bayes import SQLiteStore

from milterd import Context, Services, hookimpl
from milterd.testing import Harness, Outcome
from tests.support.dnsserver import ZoneServer
from tests.support.sink import SmtpSink

MSG = (
    b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hello\r\n"
    b"Message-ID: <dry@example.org>\r\n\r\nHello there, casino.\r\n"
)
ZONES: dict[str, dict[str, Any]] = {
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; ruf=mailto:f@example.org"]},
}


def listing(root: Path) -> dict[str, tuple[bool, int, int]]:
    """Every file and directory under ``root``: (is a directory, size, mtime in ns)."""
    out: dict[str, tuple[bool, int, int]] = {}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(dirpath, name)
            st = p.stat()
            out[str(p.relative_to(root))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def same(a: Outcome, b: Outcome) -> None:
    """The two runs decided alike: verdict, who, results, symbols, score, changes."""
    assert (a.verdict, a.decided_by, a.stage) == (b.verdict, b.decided_by, b.stage)
    assert a.results == b.results
    assert [(s.name, s.score, s.options) for s in a.symbols] == [
        (s.name, s.score, s.options) for s in b.symbols
    ]
    assert a.score == b.score
    assert [(o.kind, o.name, o.value) for o in a.ops] == [(o.kind, o.name, o.value) for o in b.ops]
    assert not a.errors and not b.errors


def notes(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("dry run:")]


# --- the core ------------------------------------------------------------------------------


class Probe:
    """Records what it is told: services.dry_run at startup/worker_start, ctx.dry_run."""

    seen: list[tuple[str, bool]] = []

    @hookimpl
    def startup(self, services: Services) -> None:
        Probe.seen.append(("startup", services.dry_run))

    @hookimpl
    def worker_start(self, services: Services) -> None:
        Probe.seen.append(("worker_start", services.dry_run))

    @hookimpl
    def eom(self, ctx: Context) -> None:
        Probe.seen.append(("eom", ctx.dry_run))


@pytest.mark.parametrize("dry", [False, True])
def test_the_flag_reaches_startup_worker_start_and_every_hook(dry: bool) -> None:
    Probe.seen = []
    with Harness({"probe": {}}, plugins={"probe": Probe}, dry_run=dry) as h:
        h.send(MSG)
    assert Probe.seen == [("startup", dry), ("worker_start", dry), ("eom", dry)]


def test_the_harness_and_services_default_to_a_real_run() -> None:
    Probe.seen = []
    with Harness({"probe": {}}, plugins={"probe": Probe}) as h:
        h.send(MSG)
    assert {d for _, d in Probe.seen} == {False}


# --- archive -------------------------------------------------------------------------------


def archive_cfg(root: Path, **extra: Any) -> dict[str, Any]:
    return {"archive": {"path": str(root / "arch"), "fsync": False, **extra}}


def test_archive_dry_run_creates_no_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="milterd")
    dry_root, real_root = tmp_path / "dry", tmp_path / "real"
    dry_root.mkdir()
    real_root.mkdir()
    with Harness(archive_cfg(dry_root), plugins={"archive": ArchivePlugin}, dry_run=True) as h:
        dry = h.send(MSG)
    assert listing(dry_root) == {}  # not even the store's directory
    assert any(n.startswith("dry run: would archive (delivered copy, ") for n in notes(caplog))
    with Harness(archive_cfg(real_root), plugins={"archive": ArchivePlugin}) as h:
        real = h.send(MSG)
    same(dry, real)
    assert (real_root / "arch").is_dir()  # a real run does store it (the test can fail)


def test_archive_dry_run_leaves_an_existing_store_untouched(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with Harness(archive_cfg(tmp_path), plugins={"archive": ArchivePlugin}) as h:
        real = h.send(MSG)
    before = listing(tmp_path)
    caplog.set_level(logging.INFO, logger="milterd")
    # Also a message archived only at outcome (rejected): the received copy is not written.
    cfg = archive_cfg(tmp_path, verdicts=["continue", "reject"])
    cfg["reject"] = {}
    with Harness(cfg, plugins={"archive": ArchivePlugin, "reject": Rejecter}, dry_run=True) as h:
        dry = h.send(MSG)
        rejected = h.send(MSG, sender="reject@example.org")
    assert listing(tmp_path) == before
    same(dry, real)
    assert rejected.verdict == "reject"
    assert any("received copy" in n and "verdict reject" in n for n in notes(caplog))


class Rejecter:
    @hookimpl
    def eom(self, ctx: Context) -> Any:
        from milterd import Reject

        assert ctx.message is not None
        return Reject("550", "5.7.1", "no") if ctx.message.sender.startswith("reject@") else None


# --- dmarc ---------------------------------------------------------------------------------


def dmarc_cfg(root: Path, port: int) -> dict[str, Any]:
    return {
        "dmarc": {
            "history_db": str(root / "state" / "history.sqlite"),
            "failure_reports": True,
            "failure_spool": str(root / "state" / "spool"),
            "report_smtp_port": port,
        }
    }


def test_dmarc_dry_run_writes_no_history_and_sends_no_report(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="milterd")
    with SmtpSink() as sink:
        dry_root, real_root = tmp_path / "dry", tmp_path / "real"
        dry_root.mkdir()
        real_root.mkdir()
        cfg = dmarc_cfg(dry_root, sink.port)
        with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES, dry_run=True) as h:
            dry = h.send(MSG)
            time.sleep(0.5)  # a sender thread would have woken up by now
        assert listing(dry_root) == {}
        assert sink.messages == []
        assert any("would record a history row" in n for n in notes(caplog))
        assert any("would queue a failure report for example.org" in n for n in notes(caplog))
        with Harness(
            dmarc_cfg(real_root, sink.port), plugins={"dmarc": DMARCPlugin}, zones=ZONES
        ) as h:
            real = h.send(MSG)
            assert sink.wait_for(1, timeout=20)  # a real run does send (the test can fail)
        assert (real_root / "state" / "history.sqlite").is_file()
    same(dry, real)
    assert dry.verdict == "reject"
    assert [(r.method, r.result) for r in dry.results] == [("dmarc", "fail")]


def test_dmarc_dry_run_leaves_an_existing_history_untouched(tmp_path: Path) -> None:
    cfg = dmarc_cfg(tmp_path, 9)  # port 9: a real run's sender fails, the report stays
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES) as h:
        real = h.send(MSG)
    before = listing(tmp_path)
    assert "state/history.sqlite" in before
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=ZONES, dry_run=True) as h:
        dry = h.send(MSG)
    assert listing(tmp_path) == before
    same(dry, real)


# --- scoring: Bayes and greylisting ---------------------------------------------------------


def bayes_cfg(db: Path) -> dict[str, Any]:
    return {
        "scoring": {
            "bayes": {"enabled": True, "path": str(db), "min_spam": 1, "min_ham": 1,
                      "autolearn": True, "autolearn_spam": 100.0, "autolearn_ham": 0.0},
            "rules": [{"name": "CASINO", "type": "body", "pattern": "casino", "score": 200}],
            "actions": {"reject": None, "add_header": None, "rewrite_subject": None,
                        "quarantine": None},
        }
    }  # fmt: skip


def test_bayes_dry_run_creates_no_database_and_learns_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "bayes" / "bayes.sqlite"
    caplog.set_level(logging.INFO, logger="milterd")
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}, dry_run=True) as h:
        dry = h.send(MSG)
    assert listing(tmp_path) == {}
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        real = h.send(MSG)
    same(dry, real)
    assert db.is_file()  # a real run creates it and learns (the test can fail)


def test_bayes_dry_run_classifies_from_the_database_read_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "bayes.sqlite"
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}) as h:  # autolearn both
        h.send(MSG)
        h.send(b"Subject: lunch\r\nMessage-ID: <h@x>\r\n\r\nmeeting tomorrow\r\n")
    before = listing(tmp_path)
    caplog.set_level(logging.INFO, logger="milterd")
    spam = MSG.replace(b"<dry@", b"<dry2@")  # not learned yet: a real run would learn it
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}, dry_run=True) as h:
        dry = h.send(spam)
    assert listing(tmp_path) == before  # not even a -wal or -shm file
    assert "BAYES_SPAM" in {s.name for s in dry.symbols}  # read from the database
    assert any(n.startswith("dry run: bayes would auto-learn as spam") for n in notes(caplog))
    store = SQLiteStore(str(db))
    try:
        assert store.totals() == (1, 1)
    finally:
        store.close()
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        real = h.send(spam)
    same(dry, real)


def test_bayes_dry_run_while_the_daemon_has_the_database_open(tmp_path: Path) -> None:
    db = tmp_path / "bayes.sqlite"
    with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        h.send(MSG)
        h.send(b"Subject: lunch\r\nMessage-ID: <h@x>\r\n\r\nmeeting tomorrow\r\n")
        names = set(listing(tmp_path))  # WAL files exist while a writer is connected
        with Harness(bayes_cfg(db), plugins={"scoring": ScoringPlugin}, dry_run=True) as d:
            dry = d.send(MSG.replace(b"<dry@", b"<dry3@"))
        assert set(listing(tmp_path)) == names
        assert "BAYES_SPAM" in {s.name for s in dry.symbols}
    store = SQLiteStore(str(db))
    try:
        assert store.totals() == (1, 1)
    finally:
        store.close()


def grey_cfg(db: Path) -> dict[str, Any]:
    return {
        "scoring": {
            "rules": [{"name": "SCORE", "type": "body", "pattern": "hello", "score": 3}],
            "actions": {"greylist": 2.0},
            "greylist": {"path": str(db), "delay": 0.3},
        }
    }


def test_greylist_dry_run_tempfails_a_new_triplet_without_recording_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "grey" / "grey.sqlite"
    caplog.set_level(logging.INFO, logger="milterd")
    with Harness(grey_cfg(db), plugins={"scoring": ScoringPlugin}, dry_run=True) as h:
        dry = h.send(MSG)
        again = h.send(MSG)
    assert listing(tmp_path) == {}
    assert dry.verdict == "tempfail" and again.verdict == "tempfail"
    assert any(n.startswith("dry run: greylist would tempfail (new triplet") for n in notes(caplog))
    with Harness(grey_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        real = h.send(MSG)
    same(dry, real)
    assert db.is_file()  # a real run records it (the test can fail)


def test_greylist_dry_run_passes_a_known_triplet_and_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "grey.sqlite"
    with Harness(grey_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        assert h.send(MSG).verdict == "tempfail"
    time.sleep(0.35)
    before = listing(tmp_path)
    with Harness(grey_cfg(db), plugins={"scoring": ScoringPlugin}, dry_run=True) as h:
        dry = h.send(MSG)
        other = h.send(MSG, recipients=["new@example.com"])
    assert listing(tmp_path) == before
    assert dry.verdict == "continue" and other.verdict == "tempfail"
    with Harness(grey_cfg(db), plugins={"scoring": ScoringPlugin}) as h:
        real = h.send(MSG)
    same(dry, real)


# --- milterd check -------------------------------------------------------------------------


def test_milterd_check_is_a_dry_run(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    eml = tmp_path / "in.eml"
    eml.write_bytes(MSG)
    with ZoneServer(ZONES) as dns, SmtpSink() as sink:
        conf = tmp_path / "milterd.toml"
        conf.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = 2\n'
            f'[plugins.dmarc]\nhistory_db = "{state}/history.sqlite"\n'
            f'failure_reports = true\nfailure_spool = "{state}/spool"\n'
            f'report_smtp_port = {sink.port}\nreject_action = "quarantine"\n'
            f"[plugins.scoring]\nactions = {{ greylist = 1.0, reject = 1000.0 }}\n"
            f'[plugins.scoring.greylist]\npath = "{state}/grey.sqlite"\n'
            f'[plugins.scoring.bayes]\nenabled = true\npath = "{state}/bayes.sqlite"\n'
            f"autolearn = true\nautolearn_spam = 1.0\nautolearn_ham = -1.0\n"
            f'[[plugins.scoring.rules]]\nname = "CASINO"\ntype = "body"\n'
            f'pattern = "casino"\nscore = 0.5\n'
            f'[plugins.archive]\npath = "{state}/archive"\nverdicts = ["tempfail", "continue"]\n'
        )
        cmd = [sys.executable, "-m", "milterd.cli", "-c", str(conf), "check", str(eml),
               "--from", "a@example.org", "--rcpt", "b@example.com",
               "--client-ip", "192.0.2.7"]  # fmt: skip
        res = subprocess.run(
            [*cmd, "--json"], capture_output=True, text=True, timeout=60, check=False
        )
        assert res.returncode == 0, res.stderr
        report = json.loads(res.stdout)
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
        time.sleep(0.5)
        assert sink.messages == []
    assert listing(state) == {}
    assert report["verdict"] == "tempfail" and report["decided_by"] == "scoring"
    assert {r["method"]: r["result"] for r in report["results"]}["dmarc"] == "fail"
    said = {(n["plugin"], n["note"].split(" (")[0]) for n in report["dry_run"]}
    assert {
        ("dmarc", "dry run: would record a history row"),
        ("scoring", "dry run: greylist would tempfail"),
        ("archive", "dry run: would archive"),
    } <= said, said
    assert "dry run: nothing stored, learned, recorded or sent" in text.stdout
    assert "  archive: would archive (received copy" in text.stdout
    assert not [ln for ln in text.stderr.splitlines() if " INFO " in ln]  # log level kept


@pytest.mark.parametrize("shm", [True, False])
def test_a_crashed_writers_wal_is_read_and_left_untouched(tmp_path: Path, shm: bool) -> None:
    """A daemon killed with rows only in its WAL: the dry run sees them (as the daemon
    will), and neither the database nor its -wal/-shm is changed (SQLite would rebuild a
    -shm, or ignore the WAL, when reading the files in place)."""
    import hashlib
    import sqlite3

    from milterd_plugins.scoring.rosqlite import connect_readonly

    db = tmp_path / "state.sqlite"
    pid = os.fork()
    if pid == 0:  # the writer: commits, then dies without a checkpoint
        try:
            c = sqlite3.connect(db, isolation_level=None)
            c.execute("PRAGMA journal_mode = WAL")
            c.execute("PRAGMA wal_autocheckpoint = 0")
            c.execute("CREATE TABLE t (v INTEGER)")
            c.execute("INSERT INTO t VALUES (42)")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.getsize(f"{db}-wal") > 0
    if not shm:
        os.unlink(f"{db}-shm")

    def state() -> dict[str, tuple[str, int]]:
        return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
                for p in sorted(tmp_path.iterdir())}  # fmt: skip

    before = state()
    conn = connect_readonly(str(db), "t")
    assert conn is not None
    try:
        assert conn.execute("SELECT v FROM t").fetchall() == [(42,)]
    finally:
        conn.close()
    assert state() == before
