"""The plugin author's harness (milterd.testing): what it shows of failures, the macros it
delivers, its configuration forms, and how it reports verdicts given before end of message."""

from __future__ import annotations

import time
import traceback
from typing import Any

import pytest

from milterd import Accept, AddHeader, Context, Message, Quarantine, Reject, Verdict, hookimpl
from milterd.events import Connect, EnvFrom, EnvRcpt, Eom, Helo
from milterd.testing import Harness, PluginFailed, split_message
from tests.support.milterctx import FakeMilterCtx

MSG = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"


class Counter:
    """Fails at eom as a plugin author's typo would: a KeyError deep in its own code."""

    actions = frozenset({"add_header"})

    def tally(self, ctx: Context) -> int:
        return int(ctx.message_state["hits"])  # never set: KeyError

    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_change(AddHeader("X-Hits", str(self.tally(ctx))))


def frames(exc: BaseException) -> list[str]:
    return [f.name for f in traceback.extract_tb(exc.__traceback__)]


# --- 1. a plugin's exception, with its traceback ---------------------------------------------


@pytest.mark.parametrize("isolation", ["thread", "inline"])
def test_outcome_carries_the_exception_with_the_plugins_traceback(isolation: str) -> None:
    cfg = {"plugins": {"counter": {"on_error": "continue", "isolation": isolation}}}
    with Harness(cfg, plugins={"counter": Counter}) as h:
        out = h.send(MSG)
    assert out.errors == [("counter", "eom", "exception: KeyError: 'hits'")]
    [(plugin, stage, exc)] = out.exceptions
    assert (plugin, stage) == ("counter", "eom") and isinstance(exc, KeyError)
    assert frames(exc)[-2:] == ["eom", "tally"]  # where it happened, in the plugin


def test_raise_errors_raises_after_the_send_chained_to_the_plugins_exception() -> None:
    cfg = {"counter": {"on_error": "continue"}}
    with (
        Harness(cfg, plugins={"counter": Counter}, raise_errors=True) as h,
        pytest.raises(PluginFailed) as info,
    ):
        h.send(MSG)
    err = info.value
    assert isinstance(err.__cause__, KeyError) and frames(err.__cause__)[-1] == "tally"
    assert err.errors == [("counter", "eom", "exception: KeyError: 'hits'")]
    assert "plugin 'counter' failed at eom: exception: KeyError: 'hits'" in str(err)
    # The pipeline finished first (on_error applied): the outcome is there to inspect.
    assert err.outcome is not None and err.outcome.verdict == "continue"


def test_raise_errors_stays_quiet_when_nothing_fails() -> None:
    class Fine:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.message_state["hits"] = 1

    with Harness(plugins={"fine": Fine}, raise_errors=True) as h, h.session() as s:
        assert s.send(MSG).errors == []
        assert s.abandon(MSG, after="header") == []
    assert s.errors == []


# --- 2. failures outside the message ledger ---------------------------------------------------


class Everywhere:
    """Fails at every connection-level stage, in three different ways."""

    @hookimpl
    def connect(self, ctx: Context) -> None:
        raise RuntimeError("at connect")

    @hookimpl
    def helo(self, ctx: Context) -> str:
        return "not a verdict"  # bad-return

    @hookimpl
    def outcome(self, ctx: Context) -> None:
        raise RuntimeError("at outcome")

    @hookimpl
    def abort(self, ctx: Context) -> None:
        raise RuntimeError("at abort")

    @hookimpl
    def close(self, ctx: Context) -> None:
        time.sleep(0.3)  # past the 0.1 s deadline: a timeout


CONTINUE = {"plugins": {"every": {"on_error": "continue", "timeout": 0.1}}}


def test_connection_level_failures_reach_the_outcome_of_a_send() -> None:
    with Harness(CONTINUE, plugins={"every": Everywhere}) as h:
        out = h.send(MSG)
    assert [(s, d.split(":")[0]) for _, s, d in out.errors] == [
        ("connect", "exception"),
        ("helo", "bad-return"),
        ("outcome", "exception"),
        ("close", "timeout"),
    ]
    assert [(s, str(e)) for _, s, e in out.exceptions] == [
        ("connect", "at connect"),
        ("outcome", "at outcome"),
    ]


def test_a_session_exposes_connection_errors_and_abandon_returns_abort_failures() -> None:
    with Harness(CONTINUE, plugins={"every": Everywhere}) as h:
        with h.session() as s:
            assert [st for _, st, _ in s.errors] == ["connect", "helo"]
            out = s.send(MSG)
            assert out.errors == [("every", "outcome", "exception: RuntimeError: at outcome")]
            abandoned = s.abandon(MSG, after="header")
            assert abandoned == [("every", "abort", "exception: RuntimeError: at abort")]
        assert [st for _, st, _ in s.errors] == ["connect", "helo", "outcome", "abort", "close"]
        assert s.exceptions[-1][1] == "abort" and str(s.exceptions[-1][2]) == "at abort"


def test_raise_errors_reports_connection_failures_too() -> None:
    with (
        Harness(CONTINUE, plugins={"every": Everywhere}, raise_errors=True) as h,
        pytest.raises(PluginFailed) as info,
    ):
        h.send(MSG)
    assert [s for _, s, _ in info.value.errors] == ["connect", "helo", "outcome", "close"]
    assert str(info.value.__cause__) == "at connect"


class Holder:
    """Releases at abort and close what it holds, and says so."""

    def __init__(self) -> None:
        self.released: list[str] = []

    @hookimpl
    def abort(self, ctx: Context) -> None:
        self.released.append("abort")

    @hookimpl
    def close(self, ctx: Context) -> None:
        self.released.append("close")


class FailsToRelease:
    def __init__(self, how: str) -> None:
        self.how = how

    def _fail(self) -> Verdict | None:
        if self.how == "raise":
            raise RuntimeError("cannot release")
        if self.how == "sleep":
            time.sleep(0.3)  # past its 0.1 s timeout
            return None
        return Reject("550", "5.7.1", "no")  # a verdict there is ignored

    @hookimpl
    def abort(self, ctx: Context) -> Verdict | None:
        return self._fail()

    @hookimpl
    def close(self, ctx: Context) -> Verdict | None:
        return self._fail()


@pytest.mark.parametrize("how", ["raise", "sleep", "reject"])
def test_abort_and_close_reach_every_plugin_whatever_an_earlier_one_did(how: str) -> None:
    # The default on_error (tempfail) of the first plugin must not end the stage: every
    # plugin releases what it holds (found by a review: the later plugins were skipped).
    holder = Holder()
    cfg = {"plugins": {"first": {"timeout": 0.1}, "holder": {}}}
    with (
        Harness(cfg, plugins={"first": FailsToRelease(how), "holder": holder}) as h,
        h.session() as s,
    ):
        s.abandon(MSG, after="header")
    assert holder.released == ["abort", "close"]


# --- 3. only the negotiated macros ------------------------------------------------------------


def macro_spy(declared: dict[str, list[str]]) -> tuple[type, dict[str, dict[str, str]]]:
    seen: dict[str, dict[str, str]] = {}

    class Spy:
        macros = declared

        @hookimpl
        def connect(self, event: Connect) -> None:
            seen["connect"] = dict(event.macros)

        @hookimpl
        def helo(self, event: Helo) -> None:
            seen["helo"] = dict(event.macros)

        @hookimpl
        def envfrom(self, event: EnvFrom) -> None:
            seen["envfrom"] = dict(event.macros)

        @hookimpl
        def envrcpt(self, event: EnvRcpt) -> None:
            seen.setdefault("envrcpt", {}).update(event.macros)

        @hookimpl
        def eom(self, ctx: Context, event: Eom) -> None:
            seen["eom"] = dict(event.macros)
            seen["connection"] = dict(ctx.connection.macros)

    return Spy, seen


def test_undeclared_macros_never_reach_a_plugin() -> None:
    spy, seen = macro_spy({})
    with Harness(plugins={"spy": spy}) as h:
        h.send(MSG, macros={"{tls_version}": "TLSv1.3", "{daemon_name}": "submission"})
    # The core's macros (CORE_MACROS), with the test's value for {daemon_name}...
    assert seen["connect"] == {
        "j": "mx.test.example",
        "{daemon_name}": "submission",
        "{client_addr}": "192.0.2.1",
    }
    assert seen["helo"] == {} and seen["envfrom"] == {"i": "4TESTQID"}
    # ...and nothing else: the daemon never asks the MTA for {tls_version}.
    assert "{tls_version}" not in seen["connection"]


def test_declared_macros_arrive_at_the_declared_stage_only() -> None:
    spy, seen = macro_spy({"helo": ["{tls_version}"], "envrcpt": ["{rcpt_addr}"]})
    with Harness(plugins={"spy": spy}) as h:
        h.send(MSG, recipients=["a@example.com", "b@example.com"],
               macros={"{tls_version}": "TLSv1.3"})  # fmt: skip
    assert seen["helo"] == {"{tls_version}": "TLSv1.3"}
    assert "{tls_version}" not in seen["connect"]
    assert seen["envrcpt"] == {"i": "4TESTQID", "{rcpt_addr}": "b@example.com"}
    assert seen["eom"] == {"i": "4TESTQID"}


def test_auth_macros_are_delivered_at_mail() -> None:
    spy, seen = macro_spy({})
    with Harness(plugins={"spy": spy}) as h:
        h.send(MSG, auth="alice")
    assert seen["envfrom"] == {"i": "4TESTQID", "{auth_authen}": "alice", "{auth_type}": "PLAIN"}


# --- 4. a fixed authserv_id in every config form -----------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        {"authres": {"trusted": True}},  # shorthand
        {"milterd": {"log_level": "info"}, "plugins": {"authres": {"trusted": True}}},
        {"plugins": {"authres": {"trusted": True}}},
        '[milterd]\nlog_level = "info"\n[plugins.authres]\ntrusted = true\n',  # TOML
        "[plugins.authres]\ntrusted = true\n",
    ],
)
def test_authserv_id_is_the_harness_default_in_every_form(config: Any) -> None:
    with Harness(config) as h:
        out = h.send(MSG)
    assert h.config.milterd.authserv_id == "mx.test.example"
    assert out.header("Authentication-Results") == "mx.test.example; none"


@pytest.mark.parametrize(
    "config",
    [
        {"milterd": {"authserv_id": "mx.mine"}, "plugins": {"authres": {"trusted": True}}},
        '[milterd]\nauthserv_id = "mx.mine"\n[plugins.authres]\ntrusted = true\n',
    ],
)
def test_an_authserv_id_the_test_sets_wins(config: Any) -> None:
    with Harness(config) as h:
        assert h.send(MSG).header("Authentication-Results") == "mx.mine; none"


def test_toml_enables_the_plugins_given_as_objects_like_the_dict_forms() -> None:
    class Marker:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(AddHeader("X-Marker", "1"))

    with Harness('[milterd]\nlog_level = "info"\n', plugins={"marker": Marker}) as h:
        assert h.send(MSG).header("X-Marker") == "1"


# --- 6. who decided a verdict given before end of message ---------------------------------------


class Refuser:
    def __init__(self, stage: str) -> None:
        self.stage = stage

    def _maybe(self, stage: str) -> Reject | None:
        if stage == self.stage:
            return Reject("550", "5.7.23", f"refused at {stage}", reason=f"policy at {stage}")
        return None

    @hookimpl
    def connect(self) -> Reject | None:
        return self._maybe("connect")

    @hookimpl
    def envfrom(self) -> Reject | None:
        return self._maybe("envfrom")

    @hookimpl
    def envrcpt(self) -> Reject | None:
        return self._maybe("envrcpt")

    @hookimpl
    def eoh(self) -> Reject | None:
        return self._maybe("eoh")


@pytest.mark.parametrize("stage", ["connect", "envfrom", "envrcpt", "eoh"])
def test_an_early_verdict_names_the_plugin_that_gave_it(stage: str) -> None:
    with Harness(plugins={"quiet": Refuser("none"), "refuser": Refuser(stage)}) as h:
        out = h.send(MSG)
    assert out.verdict == "reject" and out.stage == stage
    assert out.decided_by == "refuser" and out.decision.plugin == "refuser"
    [(who, verdict)] = out.decision.reasons
    assert who == "refuser" and isinstance(verdict, Reject) and verdict.code == "550"
    assert verdict.text == f"refused at {stage}"


def test_an_early_verdict_from_a_failure_policy_names_the_failing_plugin() -> None:
    class Broken:
        @hookimpl
        def envfrom(self) -> None:
            raise OSError("database gone")

    with Harness({"broken": {"on_error": "tempfail"}}, plugins={"broken": Broken}) as h:
        out = h.send(MSG)
    assert out.verdict == "tempfail" and out.stage == "envfrom" and out.decided_by == "broken"


class HeaderReader:
    @hookimpl
    def header(self) -> None:
        return None


def test_an_early_verdict_by_the_cores_limits_names_milterd() -> None:
    with Harness({"milterd": {"max_headers": 1}, "plugins": {}},
                 plugins={"quiet": Refuser("none"), "reader": HeaderReader()}) as h:  # fmt: skip
        out = h.send(MSG)
    assert out.verdict == "reject" and out.stage == "header" and out.decided_by == "milterd"


def test_header_limits_apply_only_where_the_mta_sends_the_header() -> None:
    """Found by a review: with no plugin reading header fields the daemon negotiates them
    away and never counts them, but the harness rejected the message for max_headers."""
    with Harness({"milterd": {"max_headers": 1, "max_header_bytes": 10}, "plugins": {}},
                 plugins={"quiet": Refuser("none")}) as h:  # fmt: skip
        out = h.send(MSG)
    assert out.verdict == "continue" and out.delivered == MSG


def test_eoh_macros_reach_the_connection_macros() -> None:
    """As DATA's do: a macro declared for eoh is in ctx.connection.macros from then on."""
    seen: dict[str, str] = {}

    class Spy:
        macros = {"eoh": ["{x_eoh}"]}

        @hookimpl
        def eom(self, ctx: Context) -> None:
            seen.update(ctx.connection.macros)

    with Harness(plugins={"spy": Spy}) as h:
        h.send(MSG, macros={"{x_eoh}": "here"})
    assert seen.get("{x_eoh}") == "here"


# --- 4. the harness as the daemon ------------------------------------------------------------


def test_quarantine_needs_no_declared_action() -> None:
    """The MTA is always asked for the quarantine action (bridge.protocol_flags), so a
    plugin that declares only add_header may still quarantine."""

    class Holder:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self) -> Quarantine:
            return Quarantine(reason="suspicious")

    with Harness(plugins={"holder": Holder}) as h:
        out = h.send(MSG)
    assert out.verdict == "quarantine" and out.errors == []


def test_accept_at_eom_skips_finalize_but_not_outcome() -> None:
    called: list[str] = []

    class Done:
        @hookimpl
        def eom(self) -> Accept:
            called.append("eom")
            return Accept()

        @hookimpl
        def finalize(self) -> None:
            called.append("finalize")

        @hookimpl
        def outcome(self) -> None:
            called.append("outcome")

    with Harness(plugins={"done": Done}) as h:
        out = h.send(MSG)
    assert out.verdict == "accept" and called == ["eom", "outcome"]


@pytest.mark.parametrize("reader", [False, True])
def test_the_body_is_seen_only_when_a_plugin_reads_it(reader: bool) -> None:
    """In the daemon the MTA sends no body when no plugin reads it; the harness must not
    show a body the daemon would not have (it keeps its own copy for ``delivered``)."""
    bodies: list[bytes] = []
    sizes: list[int] = []

    class HeadersOnly:
        reads_body = False

        @hookimpl
        def eom(self, ctx: Context, message: Message) -> None:
            bodies.append(message.body())
            assert ctx.message is not None
            sizes.append(ctx.message.body_size)

    class BodyReader:
        @hookimpl
        def eom(self, message: Message) -> None:
            message.body()

    plugins: dict[str, object] = {"headers_only": HeadersOnly}
    if reader:
        plugins["body_reader"] = BodyReader
    with Harness(plugins=plugins) as h:
        out = h.send(MSG)
    assert bodies == ([b"body\r\n"] if reader else [b""])
    assert sizes == ([6] if reader else [0])  # ctx.message.body_size as the daemon has it
    assert out.delivered is not None and out.delivered.endswith(b"\r\n\r\nbody\r\n")


def test_header_is_unfolded() -> None:
    class Folder:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(AddHeader("X-Long", "first part\n\tsecond part"))

    with Harness(plugins={"folder": Folder}) as h:
        out = h.send(MSG)
    assert b"X-Long: first part\r\n\tsecond part\r\n" in (out.delivered or b"")
    assert out.header("x-long") == "first part\tsecond part"
    assert ("X-Long", "first part\tsecond part") in out.headers()


def test_split_message_is_linear_in_the_folds_of_a_field() -> None:
    # It appended each continuation line to the bytes so far: 150,000 folds took 2.4 s
    # (bayes train reads messages through it too).
    raw = b"Subject: x\r\nX-Long: " + b"a\r\n " * 150_000 + b"b\r\n\r\nbody\r\n"
    t0 = time.monotonic()
    fields, body = split_message(raw)
    assert time.monotonic() - t0 < 0.5
    assert [n for n, _ in fields] == ["Subject", "X-Long"] and body == b"body\r\n"
    assert fields[1][1] == b" " + b"a\n " * 150_000 + b"b"  # folds as the MTAs send them


class DiscardAt:
    """Discards at one stage (for recipient ``r2`` only at RCPT); records what it sees."""

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.seen: list[str] = []

    def _at(self, stage: str) -> Verdict | None:
        self.seen.append(stage)
        from milterd import Discard

        return Discard(reason=f"at {stage}") if stage == self.stage else None

    @hookimpl
    def connect(self) -> Verdict | None:
        return self._at("connect")

    @hookimpl
    def helo(self) -> Verdict | None:
        return self._at("helo")

    @hookimpl
    def envfrom(self) -> Verdict | None:
        return self._at("envfrom")

    @hookimpl
    def envrcpt(self, event: EnvRcpt) -> Verdict | None:
        return self._at("envrcpt") if event.recipient == "r2@example.com" else None

    @hookimpl
    def eom(self) -> Verdict | None:
        return self._at("eom")

    @hookimpl
    def abort(self) -> None:
        self.seen.append("abort")


def test_discard_at_rcpt_discards_the_whole_message() -> None:
    """Found by a review: the harness kept the message for the other recipients, while
    both MTAs discard the whole message on SMFIS_DISCARD at RCPT."""
    plugin = DiscardAt("envrcpt")
    with Harness(plugins={"d": plugin}) as h:
        out = h.send(MSG, recipients=["r1@example.com", "r2@example.com", "r3@example.com"])
    assert out.verdict == "discard" and out.stage == "envrcpt" and out.delivered is None
    assert out.decided_by == "d" and out.refused == {}
    assert plugin.seen == ["connect", "helo", "envfrom", "envrcpt", "abort"]


@pytest.mark.parametrize("stage", ["connect", "helo"])
def test_discard_at_connect_or_helo_discards_every_message_at_mail(stage: str) -> None:
    """Found by a review: Postfix ignores DISCARD at CONNECT and HELO (and delivered every
    message of the session), while the harness discarded them. The core now keeps it and
    answers DISCARD at each MAIL FROM, before any plugin sees the message."""
    import socket

    from milterd import bridge
    from milterd.config import from_dict
    from milterd.pipeline import Runtime

    plugin = DiscardAt(stage)
    with Harness(plugins={"d": plugin}) as h, h.session() as s:
        first, second = s.send(MSG), s.send(MSG)
    for out in (first, second):
        assert out.verdict == "discard" and out.delivered is None and out.decided_by == "d"
    assert plugin.seen[-2:] == ["abort", "abort"] and "envfrom" not in plugin.seen

    # The bridge, as libmilter drives it: CONTINUE at CONNECT and HELO, DISCARD at MAIL.

    rt = Runtime(from_dict({"plugins": {"d": {}}}), {"d": DiscardAt(stage)})
    rt.start()
    old = bridge.set_runtime(rt)
    try:
        ctx = FakeMilterCtx()
        assert bridge._negotiate(ctx, [0x1FF, 0x1FFFFF, 0, 0]) == bridge.CONTINUE
        assert bridge._connect(ctx, "c.example", socket.AF_INET, ("192.0.2.1", 1)) in (
            bridge.CONTINUE, bridge.NOREPLY)  # fmt: skip
        assert bridge._helo(ctx, "c.example") in (bridge.CONTINUE, bridge.NOREPLY)
        for _ in range(2):
            assert bridge._envfrom(ctx, b"<a@example.org>") == bridge.DISCARD
        bridge._close(ctx)
    finally:
        if old is not None:
            bridge.set_runtime(old)
        rt.stop()


def test_quarantine_at_rcpt_holds_the_message() -> None:
    """Found by a review: a Quarantine returned at RCPT was dropped without a word; only a
    message can be held, so it holds the message (unless that recipient is refused)."""

    class Hold:
        @hookimpl
        def envrcpt(self) -> Verdict:
            return Quarantine(reason="held")

    with Harness(plugins={"hold": Hold()}) as h:
        out = h.send(MSG)
    assert out.verdict == "quarantine" and out.decided_by == "hold"


def test_the_harness_sends_what_the_mtas_send() -> None:
    """Found by a review (harness against Postfix): folded fields came with CRLF (Postfix
    and sendmail send a bare LF), a body without a final line end kept it that way, and
    an IPv6 {client_addr} lacked the "IPv6:" both MTAs write; ::ffff:192.0.2.7 was said to
    come over inet."""
    seen: dict[str, Any] = {}

    class Spy:
        @hookimpl
        def connect(self, event: Connect) -> None:
            seen["family"] = event.client.family
            seen["addr"] = event.macros.get("{client_addr}")

        @hookimpl
        def header(self, ctx: Context) -> None:
            return None

        @hookimpl
        def eom(self, message: Message) -> None:
            seen["raw"] = [h.raw for h in message.headers]
            seen["body"] = message.body()

    msg = b"Subject: one\r\n\ttwo\r\n\r\nlast line without its end"
    for ip, family, addr in (("::1", "inet6", "IPv6:::1"), ("192.0.2.7", "inet", "192.0.2.7"),
                             ("::ffff:192.0.2.7", "inet6", "IPv6:::ffff:192.0.2.7")):  # fmt: skip
        with Harness(plugins={"spy": Spy()}) as h:
            out = h.send(msg, client_ip=ip)
        assert (seen["family"], seen["addr"]) == (family, addr), ip
    assert seen["raw"] == [b" one\n\ttwo"]
    assert seen["body"] == b"last line without its end\r\n"
    assert out.delivered is not None and out.delivered.endswith(b"its end\r\n")


def test_a_session_discard_reaches_no_plugin_when_mail_has_no_reply() -> None:
    """A review of the change above: with no plugin hooking envfrom (MAIL without reply)
    the message went on to RCPT and DATA; another plugin refused a recipient (550 to a
    client whose mail was to vanish) and saw data. Now nothing after MAIL reaches one."""
    seen: list[str] = []

    class Gone:
        @hookimpl
        def connect(self) -> Verdict:
            from milterd import Discard

            return Discard(reason="session")

    class Rcpt:
        @hookimpl
        def envrcpt(self, event: EnvRcpt) -> Verdict | None:
            seen.append("envrcpt")
            return Reject() if event.recipient.startswith("bad") else None

        @hookimpl
        def data(self) -> None:
            seen.append("data")

        @hookimpl
        def abort(self) -> None:
            seen.append("abort")

    with Harness(plugins={"gone": Gone(), "rcpt": Rcpt()}) as h:
        assert "envfrom" in h.runtime.negotiation.noreply
        out = h.send(MSG, recipients=["ok@example.com", "bad@example.com"])
    assert out.verdict == "discard" and out.refused == {} and out.delivered is None
    assert seen == ["abort"]
