"""The text log format: one line per record, plugin lines grep-able by queue id."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

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
