"""The text log format: one line per record, plugin lines grep-able by queue id."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from milterd import Context, hookimpl
from milterd.logs import TextFormatter
from milterd.testing import Harness


@pytest.fixture
def text_log() -> Iterator[io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter("%(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("milterd")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield out
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_a_plugin_line_starts_with_the_queue_id(text_log: io.StringIO) -> None:
    class Talker:
        @hookimpl
        def connect(self, ctx: Context) -> None:
            ctx.log.info("connect line")

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.log.info("score=1 from\r\nINFO forged")

    with Harness(plugins={"talker": Talker}) as h:
        h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="4XyZ1")
    lines = [line for line in text_log.getvalue().splitlines() if "milterd.talker" in line]
    assert lines == [
        "INFO milterd.talker: NOQUEUE: connect line",
        "INFO milterd.talker: 4XyZ1: score=1 from\\x0d\\x0aINFO forged",
    ]


def test_the_summary_line_says_which_identity_each_result_is_about(
    text_log: io.StringIO,
) -> None:
    from milterd import Result

    class Two:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_result(Result("spf", "none", properties=(("smtp.helo", "c.example"),)))
            ctx.add_result(Result("spf", "fail", properties=(("smtp.mailfrom", "x.example"),)))

    with Harness(plugins={"two": Two}) as h:
        h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="Q1")
    summary = [line for line in text_log.getvalue().splitlines() if "Q1: client=" in line]
    assert len(summary) == 1, text_log.getvalue()
    assert "results=[spf=none(smtp.helo=c.example), spf=fail(smtp.mailfrom=x.example)]" in (
        summary[0]
    )
    assert "Q1: Q1:" not in summary[0]


def test_a_note_goes_on_the_summary_line_and_nowhere_else(text_log: io.StringIO) -> None:
    class Signer:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.note("signed d=example.com s=sel")

        @hookimpl
        def finalize(self, ctx: Context) -> None:
            ctx.note("second\r\nINFO forged")

    with Harness(plugins={"signer": Signer}) as h:
        out = h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="Q2")
    assert out.notes == ["signer: signed d=example.com s=sel", "signer: second\r\nINFO forged"]
    lines = text_log.getvalue().splitlines()
    assert len(lines) == 1, lines  # the summary only: no line of the plugin's own
    assert (
        " notes=[signer: signed d=example.com s=sel; signer: second\\x0d\\x0aINFO forged] time=["
        in lines[0]
    )


def test_the_json_summary_has_every_key_and_the_notes() -> None:
    from milterd import Result
    from milterd.logs import JsonFormatter

    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("milterd")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)

    class Noter:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_result(Result("spf", "pass", properties=(("smtp.mailfrom", "a.example"),)))
            ctx.add_symbol("S", 1.5)
            ctx.note("did a thing")

    try:
        with Harness(plugins={"noter": Noter}) as h:
            h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="Q3", sender="a@a.example")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    (line,) = [json.loads(x) for x in out.getvalue().splitlines() if '"Q3' in x]
    assert set(line) >= {
        "queue_id", "client", "client_name", "helo", "sender", "recipients", "verdict",
        "decided_by", "stage", "score", "results", "plugin_ms", "errors", "conflicts",
        "size", "notes", "time", "level", "logger", "pid", "worker", "message",
    }  # fmt: skip
    assert line["queue_id"] == "Q3" and line["sender"] == "a@a.example"
    assert line["score"] == 1.5 and line["notes"] == ["noter: did a thing"]
    assert line["results"] == ["spf=pass(smtp.mailfrom=a.example)"]
    assert "notes=[noter: did a thing]" in line["message"] and "score=1.5" in line["message"]


def test_a_note_is_dropped_with_a_failed_call_and_refused_before_the_message() -> None:
    refused: list[str] = []

    class Noter:
        @hookimpl
        def connect(self, ctx: Context) -> None:
            try:
                ctx.note("at connect")
            except RuntimeError as e:  # ContributionRefused
                refused.append(str(e))

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.note("kept")

        @hookimpl
        def finalize(self, ctx: Context) -> None:
            ctx.note("x" * 5000)
            raise RuntimeError("boom")

    with Harness(plugins={"noter": Noter}, raise_errors=False) as h:
        out = h.send(b"Subject: s\r\n\r\nx\r\n")
    assert out.notes == ["noter: kept"]
    assert refused and "connect" in refused[0]


def test_a_note_at_outcome_is_kept_and_dropped_when_that_call_fails() -> None:
    class Observer:
        @hookimpl
        def outcome(self, ctx: Context) -> None:
            ctx.note(f"saw {ctx.verdict}")
            if ctx.message is not None and ctx.message.queue_id == "BAD":
                raise RuntimeError("observer broke")

    with Harness(plugins={"observer": Observer}, raise_errors=False) as h:
        good = h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="OK")
        bad = h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="BAD")
    assert good.notes == ["observer: saw None"]
    assert bad.notes == [] and bad.errors and bad.errors[0][:2] == ("observer", "outcome")


def test_the_json_fields_are_those_of_the_line_when_read_later_or_pickled() -> None:
    """A handler may keep a record and format it later (caplog, MemoryHandler, a queue),
    or pickle it (SocketHandler): the JSON's plugin_ms are the line's, not what the abort
    hooks that run after the line add, and the fields pickle as a dict."""
    import pickle
    import time as _time

    from milterd import Reject
    from milterd.logs import JsonFormatter

    kept: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            kept.append(record)

    class Early:
        @hookimpl
        def envfrom(self, ctx: Context) -> Reject:
            return Reject("550", "5.7.1", "no")

        @hookimpl
        def abort(self, ctx: Context) -> None:
            _time.sleep(0.2)

    logger = logging.getLogger("milterd")
    handler = Keep()
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    try:
        with Harness(plugins={"early": Early}) as h:
            h.send(b"Subject: s\r\n\r\nx\r\n", queue_id="Q4")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    (record,) = [r for r in kept if "Q4: client=" in r.getMessage()]
    line = json.loads(JsonFormatter().format(record))
    assert line["plugin_ms"]["early"] < 100  # the abort's 200 ms came after the line
    again = pickle.loads(pickle.dumps(record))
    assert again.summary == dict(record.summary)  # type: ignore[attr-defined]


@pytest.mark.parametrize("created", [-0.5, -1.25, 0.0, 0.999, 1764817966.5, 1764817967.0])
@pytest.mark.parametrize("msec_format", ["%s,%03d", "%s.%03d", "", None])
def test_the_text_time_stamp_is_loggings_own(created: float, msec_format: str | None) -> None:
    """TextFormatter makes a second's date and time once; the stamp stays logging's."""
    ours = TextFormatter("%(asctime)s %(message)s")
    theirs = logging.Formatter("%(asctime)s %(message)s")
    for f in (ours, theirs):
        f.default_msec_format = msec_format
        f.converter = time.gmtime  # the same on every machine
    for when in (created, created + 0.3, created):  # cached, then a new second, then back
        record = logging.LogRecord("milterd", logging.INFO, "", 0, "m", (), None)
        record.created = when
        record.msecs = (when - int(when)) * 1000 // 1
        assert ours.formatTime(record) == theirs.formatTime(record)
        assert ours.formatTime(record, "%H:%M") == theirs.formatTime(record, "%H:%M")


def test_a_long_note_is_cut() -> None:
    from milterd.context import MAX_NOTE

    class Long:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.note("y" * 5000)

    with Harness(plugins={"long": Long}) as h:
        out = h.send(b"Subject: s\r\n\r\nx\r\n")
    assert out.notes == ["long: " + "y" * MAX_NOTE]


def test_under_the_journal_the_text_line_has_no_time_stamp_of_its_own(tmp_path: Path) -> None:
    """systemd sets JOURNAL_STREAM=DEV:INODE of the stream it gave the service as stderr;
    the journal stamps each line, so milterd's own stamp goes. Only when stderr *is*
    that stream: a process that inherited the variable and logs elsewhere keeps it."""
    script = (
        "import logging; from milterd.logs import setup_logging; setup_logging();"
        "logging.getLogger('milterd').info('hello')"
    )
    out = tmp_path / "stderr"
    for journal in (True, False):
        with out.open("wb") as f:
            st = os.fstat(f.fileno())
            ino = st.st_ino if journal else st.st_ino + 1
            env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{ino}"}
            subprocess.run(
                [sys.executable, "-c", script], stderr=f, env=env, check=True, timeout=60
            )
        line = out.read_text().strip()
        assert line.startswith("milterd[") == journal, line
        assert line.endswith("INFO milterd: hello")
