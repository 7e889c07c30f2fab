"""Tests of the example plugin, written with milterd's harness (no MTA, no libmilter)."""

from __future__ import annotations

from milterd_example_header import ExampleHeader

from milterd.testing import Harness

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


def test_adds_the_configured_header_at_the_bottom() -> None:
    with Harness(
        {"example_header": {"greeting": "hi there"}}, plugins={"example_header": ExampleHeader}
    ) as h:
        out = h.send(MSG)
    assert out.verdict == "continue"
    assert out.headers()[-1] == ("X-Milterd-Example", "hi there")
    assert out.delivered is not None and out.delivered.endswith(b"\r\n\r\nHello.\r\n")


def test_skips_authenticated_senders_when_told() -> None:
    with Harness(
        {"example_header": {"skip_authenticated": True}}, plugins={"example_header": ExampleHeader}
    ) as h:
        authed = h.send(MSG, auth="alice")
        anonymous = h.send(MSG)
    assert authed.header("X-Milterd-Example") is None
    assert anonymous.header("X-Milterd-Example") == "hello from milterd"


def test_found_through_its_entry_point_when_installed() -> None:
    # No plugins= here: the harness loads the installed entry point, as the daemon does.
    with Harness({"example_header": {}}) as h:
        out = h.send(MSG)
    assert out.header("X-Milterd-Example") == "hello from milterd"


def test_every_message_of_a_session_gets_the_header_once() -> None:
    # An MTA keeps one milter connection for a whole SMTP session: several messages,
    # some abandoned half way. Each delivered one gets exactly one header.
    with (
        Harness({"example_header": {}}, plugins={"example_header": ExampleHeader}) as h,
        h.session() as s,
    ):
        first = s.send(MSG)
        s.abandon(MSG, after="header")
        second = s.send(MSG, auth="alice")
    for out in (first, second):
        assert [v for n, v in out.headers() if n == "X-Milterd-Example"] == ["hello from milterd"]
