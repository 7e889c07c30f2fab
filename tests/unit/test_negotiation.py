"""Negotiation derived from the enabled plugins, down to libmilter's bits."""

from __future__ import annotations

import Milter

from milterd import Context, EnvRcpt, Message, hookimpl
from milterd.bridge import protocol_flags
from milterd.config import from_dict
from milterd.pipeline import Runtime
from milterd.testing import FakeResolver


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
    put milterd out of step with it. The error is kept for end of message, which 451s."""
    from milterd import bridge

    class Ctx:
        def __init__(self, conn: object) -> None:
            self.conn = conn
            self.replies: list[tuple[str, ...]] = []

        def getpriv(self) -> object:
            return self.conn

        def setreply(self, *args: str) -> None:
            self.replies.append(args)

    conn = bridge._Conn.__new__(bridge._Conn)
    conn.proto, conn.failed = Milter.P_NR_BODY, False
    ctx = Ctx(conn)

    def broken(ctx: object, *args: object) -> int:
        raise RuntimeError("core bug")

    def fine(ctx: object, *args: object) -> int:
        return bridge.CONTINUE

    def failed() -> bool:  # read at each call (mypy would narrow the attribute)
        return bool(conn.failed)

    assert bridge._guard("body")(broken)(ctx, b"chunk") == bridge.NOREPLY and failed()
    assert ctx.replies == []
    assert bridge._guard("eom")(fine)(ctx) == bridge.TEMPFAIL
    assert ctx.replies == [("451", "4.3.0", "Temporary filter failure, try again later")]
    assert bridge._guard("envfrom")(fine)(ctx) == bridge.CONTINUE and not failed()
    conn.proto = 0  # negotiated with a reply: answered at once, as before
    assert bridge._guard("body")(broken)(ctx, b"chunk") == bridge.TEMPFAIL and not failed()
