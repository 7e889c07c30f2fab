"""Negotiation derived from the enabled plugins, down to libmilter's bits."""

from __future__ import annotations

from typing import Any

import Milter
import pytest

from milterd import Context, EnvRcpt, Message, hookimpl
from milterd.bridge import protocol_flags
from milterd.config import from_dict
from milterd.merge import merge
from milterd.pipeline import Runtime
from milterd.testing import FakeResolver
from tests.support.milterctx import FakeMilterCtx


def runtime(**plugins: object) -> Runtime:
    config = from_dict({"plugins": {name: {} for name in plugins}})
    return Runtime(config, plugins, FakeResolver())


class HeaderAtEom:
    """Like the example plugin: adds a header at end of message, reads nothing."""

    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        return None


class RcptAndBody:
    """Rejects recipients and reads the whole message."""

    actions = frozenset({"change_header", "quarantine"})
    macros = {"envrcpt": ["{rcpt_mailer}"], "connect": ["{client_ptr}"]}

    @hookimpl
    def envrcpt(self, event: EnvRcpt) -> None:
        return None

    @hookimpl
    def eom(self, message: Message) -> None:
        return None


class HeadersOnly:
    reads_body = False

    @hookimpl
    def eom(self, message: Message) -> None:
        return None


def test_trivial_plugin_set_asks_for_almost_nothing() -> None:
    n = runtime(example=HeaderAtEom).negotiation
    assert n.skip == {"data", "header", "eoh", "body"}
    assert n.noreply == {"connect", "helo", "envfrom", "envrcpt"}
    assert n.actions == {"add_header"}
    actions, proto = protocol_flags(n)
    assert actions == Milter.ADDHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
    for bit in (
        Milter.P_NOHDRS,
        Milter.P_NOBODY,
        Milter.P_NOEOH,
        Milter.P_NODATA,
        Milter.P_NOUNKNOWN,
        Milter.P_NR_CONN,
        Milter.P_NR_HELO,
        Milter.P_NR_MAIL,
        Milter.P_NR_RCPT,
    ):
        assert proto & bit, hex(bit)
    assert not proto & Milter.P_NORCPT  # the core still wants the envelope, without waiting


def test_rcpt_and_body_reader_asks_for_content_and_waits_at_rcpt() -> None:
    n = runtime(checker=RcptAndBody).negotiation
    assert n.skip == {"data", "eoh"} and n.needs_body and n.needs_headers
    assert "envrcpt" not in n.noreply and "header" in n.noreply and "body" in n.noreply
    assert n.macros["envrcpt"] == ("i", "{rcpt_mailer}")
    assert "{client_ptr}" in n.macros["connect"]
    actions, proto = protocol_flags(n)
    assert actions == Milter.CHGHDRS | Milter.ADDHDRS | Milter.QUARANTINE | Milter.SETSYMLIST
    assert not proto & Milter.P_NOBODY and not proto & Milter.P_NR_RCPT
    assert proto & Milter.P_NR_BODY and proto & Milter.P_HDR_LEADSPC


def test_a_headers_only_reader_does_not_request_the_body() -> None:
    n = runtime(headers=HeadersOnly).negotiation
    assert n.needs_headers and not n.needs_body
    assert "body" in n.skip and "header" not in n.skip


def test_only_offered_protocol_bits_are_answered() -> None:
    n = runtime(example=HeaderAtEom).negotiation
    _, proto = protocol_flags(n, offered=Milter.P_NOHDRS | Milter.P_NOBODY)
    assert proto == Milter.P_NOHDRS | Milter.P_NOBODY


def test_a_core_error_at_a_no_reply_stage_is_answered_at_end_of_message() -> None:
    """The MTA reads no reply at a stage negotiated with SMFIP_NR_*: answering there would
    put milterd out of step with it. End of message answers 451 instead, the plugins get
    abort (not eom), and a failure at connect or helo fails every message of the session."""
    from milterd import bridge
    from milterd.events import Client

    seen: list[str] = []

    class Rec:
        @hookimpl
        def eom(self, message: Message) -> None:
            seen.append("eom")

        @hookimpl
        def abort(self) -> None:
            seen.append("abort")

    rt = Runtime(from_dict({"plugins": {"rec": {}}}), {"rec": Rec}, FakeResolver())
    rt.start()

    def broken(ctx: object, *args: object) -> int:
        raise RuntimeError("core bug")

    def connection(proto: int) -> tuple[FakeMilterCtx, bridge._Conn]:
        ctx = FakeMilterCtx()
        conn = bridge._Conn(ctx, rt)
        conn.proto, ctx.conn = proto, conn
        return ctx, conn

    def message(ctx: FakeMilterCtx, conn: bridge._Conn, body: bool = True) -> int:
        assert bridge._guard("envfrom")(lambda c: 0)(ctx) == 0
        conn.session.on_envfrom("a@example.org", {}, {})
        conn.session.on_envrcpt("b@example.com", {}, {})
        if body:
            conn.session.on_body(b"text\r\n")
        return bridge._guard("eom")(bridge._eom)(ctx)

    nr = Milter.P_NR_BODY | Milter.P_NR_CONN
    ctx, conn = connection(nr)
    conn.session.on_connect("c", Client("c", "inet", None), {})
    conn.session.on_envfrom("a@example.org", {}, {})
    assert bridge._guard("body")(broken)(ctx, b"chunk") == bridge.NOREPLY and ctx.replies == []
    assert bridge._guard("eom")(bridge._eom)(ctx) == bridge.TEMPFAIL
    assert ctx.replies == [("451", "4.3.0", "Temporary filter failure, try again later")]
    assert seen == ["abort"]  # the message ended for the plugins; no eom, no outcome
    assert conn.session.last_ledger is not None
    assert merge(conn.session.last_ledger.entries).plugin == "milterd"
    seen.clear()
    assert message(ctx, conn) == bridge.ACCEPT and seen == ["eom"]  # the next one is fine

    ctx, conn = connection(nr)  # a core error at connect: the session is half set up
    assert bridge._guard("connect")(broken)(ctx, "c", 0, None) == bridge.NOREPLY
    for _ in range(2):
        assert message(ctx, conn) == bridge.TEMPFAIL

    ctx, conn = connection(Milter.P_NR_MAIL)  # before the message began: no message state
    assert bridge._guard("envfrom")(broken)(ctx, "<a@example.org>") == bridge.NOREPLY
    assert bridge._guard("eom")(bridge._eom)(ctx) == bridge.TEMPFAIL

    ctx, conn = connection(0)  # negotiated with a reply: answered at once, as before
    assert bridge._guard("body")(broken)(ctx, b"chunk") == bridge.TEMPFAIL and not conn.failed
    rt.stop()


def test_a_reload_between_choosing_the_runtime_and_using_it_cannot_stop_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found by a concurrency review: _negotiate read the current runtime, and only later
    (in Session) counted the connection on it; a reload in between replaced and retired
    it with no connection counted, so it was stopped (plugins shut down) under the new
    connection."""
    from milterd import bridge, pipeline

    old_rt = Runtime(from_dict({"plugins": {"e": {}}}), {"e": HeaderAtEom}, FakeResolver())
    old_rt.start()
    new_rt = Runtime(from_dict({"plugins": {"e": {}}}), {"e": HeaderAtEom}, FakeResolver())
    new_rt.start()
    previous = bridge.set_runtime(old_rt)
    real_init = pipeline.Session.__init__

    def reload_first(self: Any, *args: Any, **kwargs: Any) -> None:
        bridge.set_runtime(new_rt)  # the reload lands right here
        old_rt.retire()
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.Session, "__init__", reload_first)
    try:
        ctx = FakeMilterCtx()
        assert bridge._negotiate(ctx, [0x1FF, 0x1FFFFF, 0, 0]) == bridge.CONTINUE
        assert old_rt.started, "the connection's runtime was stopped under it"
        monkeypatch.setattr(pipeline.Session, "__init__", real_init)
        bridge._close(ctx)
        assert not old_rt.started  # its last connection closed: now it stops
    finally:
        if previous is not None:
            bridge.set_runtime(previous)
        new_rt.stop()


def test_negotiate_asks_for_each_stages_macros_of_the_current_generation() -> None:
    """smfi_setsymlist per stage with the names the core and the plugins read, made once
    a generation (set_runtime) and always the generation the connection got."""
    from milterd import bridge

    calls: list[tuple[object, ...]] = []

    class Recording(FakeMilterCtx):
        def setsymlist(self, *args: object) -> None:
            calls.append(args)

    rts = [
        Runtime(from_dict({"plugins": {"r": {}}}), {"r": RcptAndBody}, FakeResolver()),
        Runtime(from_dict({"plugins": {"e": {}}}), {"e": HeaderAtEom}, FakeResolver()),
    ]
    previous = bridge.current_runtime()
    try:
        for rt in rts:
            rt.start()
            bridge.set_runtime(rt)
            calls.clear()
            ctx = Recording()
            assert bridge._negotiate(ctx, [0x1FF, 0x1FFFFF, 0, 0]) == bridge.CONTINUE
            want = [
                (bridge.MACRO_STAGES[stage], " ".join(names))
                for stage, names in rt.negotiation.macros.items()
            ]
            assert calls == want
            bridge._close(ctx)
        first = dict(rts[0].negotiation.macros)
        assert "{rcpt_mailer}" in first["envrcpt"] and "{client_ptr}" in first["connect"]
        assert rts[0].negotiation.macros != rts[1].negotiation.macros
    finally:
        if previous is not None:
            bridge.set_runtime(previous)
        for rt in rts:
            rt.stop()
