"""Every hook fires when its contract says, in order, with the arguments it promises."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from milterd import (
    Abort,
    AddHeader,
    Body,
    Close,
    ConfigError,
    Connect,
    Context,
    Data,
    EnvFrom,
    EnvRcpt,
    Eoh,
    Eom,
    Header,
    Helo,
    Message,
    PluginConfig,
    Quarantine,
    Reject,
    Services,
    Verdict,
    hookimpl,
)
from milterd.events import Client
from milterd.pipeline import Session
from milterd.testing import Harness

MSG = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"


class Recorder:
    """Implements every hook and records what it saw."""

    class Config(PluginConfig):
        tag: str = "t"

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return self.Config

    @hookimpl
    def startup(self, config: Any, services: Services) -> None:
        self.calls.append(("startup", (config.tag, services.settings.authserv_id)))

    @hookimpl
    def worker_start(self, services: Services) -> None:
        self.calls.append(("worker_start", services.settings.authserv_id))

    @hookimpl
    def worker_ready(self, services: Services) -> None:
        self.calls.append(("worker_ready", services.settings.authserv_id))

    @hookimpl
    def shutdown(self) -> None:
        self.calls.append(("shutdown", None))

    @hookimpl
    def connect(self, ctx: Context, event: Connect) -> None:
        self.calls.append(("connect", (event.client.ip, ctx.connection.internal)))

    @hookimpl
    def helo(self, event: Helo) -> None:
        self.calls.append(("helo", event.name))

    @hookimpl
    def envfrom(self, ctx: Context, event: EnvFrom) -> None:
        self.calls.append(("envfrom", (event.sender, ctx.connection.auth_user)))

    @hookimpl
    def envrcpt(self, event: EnvRcpt) -> None:
        self.calls.append(("envrcpt", event.recipient))

    @hookimpl
    def data(self, event: Data) -> None:
        self.calls.append(("data", None))

    @hookimpl
    def header(self, ctx: Context, event: Header) -> None:
        assert ctx.message is not None and ctx.message.headers[-1] == event
        self.calls.append(("header", event.name))

    @hookimpl
    def eoh(self, event: Eoh) -> None:
        self.calls.append(("eoh", None))

    @hookimpl
    def body(self, event: Body) -> None:
        self.calls.append(("body", event.chunk))

    @hookimpl
    def eom(self, ctx: Context, event: Eom, message: Message) -> None:
        assert ctx.message is not None
        self.calls.append(("eom", (ctx.message.queue_id, message.get("subject"))))

    @hookimpl
    def finalize(self, ctx: Context, message: Message) -> None:
        self.calls.append(("finalize", message.body()))

    @hookimpl
    def outcome(self, ctx: Context, verdict: Verdict | None, message: Message) -> None:
        self.calls.append(("outcome", (verdict.word if verdict else None, message.get("X-Added"))))

    @hookimpl
    def abort(self, event: Abort) -> None:
        self.calls.append(("abort", None))

    @hookimpl
    def close(self, event: Close) -> None:
        self.calls.append(("close", None))


def test_every_hook_in_order() -> None:
    h = Harness(
        {"milterd": {"authserv_id": "mx.t"}, "plugins": {"rec": {"tag": "x"}}},
        plugins={"rec": Recorder},
    )
    rec = h.runtime.plugins[0].obj
    assert isinstance(rec, Recorder)
    h.send(
        MSG,
        client_ip="10.1.2.3",
        helo="c.example",
        auth="alice",
        queue_id="QID1",
        sender="a@example.org",
        recipients=["b@example.com", "c@example.com"],
    )
    h.close()
    assert rec.calls == [
        ("startup", ("x", "mx.t")),
        ("worker_start", "mx.t"),
        ("worker_ready", "mx.t"),
        ("connect", ("10.1.2.3", False)),
        ("helo", "c.example"),
        ("envfrom", ("a@example.org", "alice")),
        ("envrcpt", "b@example.com"),
        ("envrcpt", "c@example.com"),
        ("data", None),
        ("header", "From"),
        ("header", "Subject"),
        ("eoh", None),
        ("body", b"body\r\n"),
        ("eom", ("QID1", "s")),
        ("finalize", b"body\r\n"),
        ("outcome", (None, None)),
        ("close", None),
        ("shutdown", None),
    ]


def test_abort_replaces_the_rest_of_an_abandoned_message_and_a_second_one_follows() -> None:
    h = Harness({"plugins": {"rec": {}}}, plugins={"rec": Recorder})
    rec = h.runtime.plugins[0].obj
    assert isinstance(rec, Recorder)
    s = Session(h.runtime)
    s.on_connect("[::1]", Client("[::1]", "inet6", None), {})
    s.on_envfrom("a@example.org", {}, {"i": "Q1"})
    s.on_envrcpt("b@example.com", {}, {})
    s.on_abort()
    s.on_envfrom("a@example.org", {}, {"i": "Q2"})
    s.on_envrcpt("b@example.com", {}, {})
    d = s.on_eom({})
    s.on_close()
    h.close()
    names = [c for c, _ in rec.calls]
    assert names == [
        "startup",
        "worker_start",
        "worker_ready",
        "connect",
        "envfrom",
        "envrcpt",
        "abort",
        "envfrom",
        "envrcpt",
        "eom",
        "finalize",
        "outcome",
        "close",
        "shutdown",
    ]
    assert d.word == "continue"


def test_each_message_of_a_session_gets_its_own_queue_id() -> None:
    # Postfix sends macro i at MAIL only once the queue file exists (by default it is
    # created at the first valid RCPT): the second message of a session must not carry
    # the first one's (or an abandoned transaction's) queue id until its own arrives.
    seen: list[str] = []
    macros: list[dict[str, str]] = []

    class Qid:
        @hookimpl
        def envfrom(self, ctx: Context) -> None:
            seen.append("from:" + (ctx.message.queue_id if ctx.message else "?"))
            macros.append(dict(ctx.connection.macros))

        @hookimpl
        def eom(self, ctx: Context) -> None:
            seen.append("eom:" + (ctx.message.queue_id if ctx.message else "?"))

    with Harness(plugins={"qid": Qid}) as h:
        s = Session(h.runtime)
        s.on_connect("mx", Client("mx", "inet", ipaddress.ip_address("192.0.2.1")), {"j": "mx"})
        for qid in ("Q1", "Q2", "Q3"):
            s.on_envfrom("a@example.org", {}, {"{auth_authen}": "alice"})
            s.on_envrcpt("b@example.com", {}, {"i": qid, "{rcpt_addr}": "b@example.com"})
            if qid == "Q2":  # abandoned (RSET) after its queue file was made
                s.on_abort()
                continue
            s.on_eom({"i": qid})
            assert s.last_ledger is not None
        s.on_envfrom("a@example.org", {}, {"i": "Q4"})  # sendmail: known at MAIL
        assert s.msg is not None and s.msg.info.queue_id == "Q4"
        s.on_close()
    assert seen == ["from:", "eom:Q1", "from:", "from:", "eom:Q3", "from:Q4"]
    # ctx.connection.macros: the session's (connect) and this transaction's only.
    assert macros[:3] == [{"j": "mx", "{auth_authen}": "alice"}] * 3
    assert macros[3] == {"j": "mx", "i": "Q4"}  # no AUTH sent with this MAIL


def test_a_connect_reject_refuses_the_session() -> None:
    class Door:
        @hookimpl
        def connect(self, event: Connect) -> Reject | None:
            return Reject("554", "5.7.1", "go away") if event.client.ip == "192.0.2.66" else None

    with Harness(plugins={"door": Door}) as h:
        assert h.send(MSG, client_ip="192.0.2.66").verdict == "reject"
        assert h.send(MSG, client_ip="192.0.2.67").verdict == "continue"


def test_outcome_sees_the_final_verdict_and_the_right_copy_and_cannot_record() -> None:
    seen: list[tuple[str | None, str | None, str]] = []

    class Tagger:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self, ctx: Context, message: Message) -> Reject | None:
            ctx.add_change(AddHeader("X-Added", "yes"))
            return Reject() if message.get("Subject") == "bad" else None

    class Observer:
        @hookimpl
        def outcome(self, ctx: Context, verdict: Verdict | None, message: Message) -> None:
            try:
                ctx.add_symbol("LATE", 1.0)
                refused = "recorded"
            except Exception as e:
                refused = type(e).__name__
            seen.append((verdict.word if verdict else None, message.get("X-Added"), refused))

    with Harness(plugins={"tagger": Tagger, "observer": Observer}) as h:
        h.send(b"Subject: good\r\n\r\nx\r\n")
        h.send(b"Subject: bad\r\n\r\nx\r\n")
    assert seen == [(None, "yes", "ContributionRefused"), ("reject", None, "ContributionRefused")]


def test_finalize_sees_the_merged_verdict_so_far() -> None:
    seen: list[str | None] = []

    class Hold:
        @hookimpl
        def eom(self, message: Message) -> Quarantine | None:
            return Quarantine(reason="held") if message.get("Subject") == "hold" else None

    class Archiver:
        @hookimpl
        def finalize(self, ctx: Context) -> None:
            seen.append(ctx.verdict.word if ctx.verdict else None)

    with Harness(plugins={"hold": Hold, "archiver": Archiver}) as h:
        h.send(b"Subject: hold\r\n\r\nx\r\n")
        h.send(b"Subject: pass\r\n\r\nx\r\n")
    assert seen == ["quarantine", None]


# --- the harness's sessions: several messages over one connection ---------------------


class PerMessage:
    """Counts messages in the connection's state; tags each message with what it saw."""

    actions = frozenset({"add_header"})
    isolation = "inline"

    @hookimpl
    def envfrom(self, ctx: Context) -> None:
        ctx.connection_state["n"] = ctx.connection_state.get("n", 0) + 1
        assert "seen" not in ctx.message_state  # fresh for every message

    @hookimpl
    def header(self, ctx: Context, event: Header) -> None:
        ctx.message_state.setdefault("seen", []).append(event.name)

    @hookimpl
    def eom(self, ctx: Context) -> None:
        qid = ctx.message.queue_id if ctx.message else ""
        seen = ",".join(ctx.message_state.get("seen", []))
        ctx.add_change(
            AddHeader("X-Seen", f"n={ctx.connection_state['n']} qid={qid} headers={seen}")
        )


def test_harness_session_carries_several_messages_and_abandoned_ones() -> None:
    rec = Recorder()
    with (
        Harness(plugins={"rec": rec, "per": PerMessage}) as h,
        h.session(client_ip="192.0.2.9", helo="relay.example") as s,
    ):
        first = s.send(MSG)
        s.abandon(b"X-Gone: 1\r\nSubject: never\r\n\r\nbody\r\n", after="header")
        s.abandon(after="envfrom")
        last = s.send(b"Subject: last\r\n\r\nbody\r\n", queue_id="Q9")
    assert first.header("X-Seen") == "n=1 qid=4TESTQID headers=From,Subject"
    # the abandoned messages counted (envfrom ran) and left nothing in the next one
    assert last.header("X-Seen") == "n=4 qid=Q9 headers=Subject"
    names = [c for c, _ in rec.calls]
    assert names.count("connect") == names.count("helo") == names.count("close") == 1
    assert names.count("envfrom") == 4 and names.count("abort") == 2
    assert names.count("eom") == 2


def test_harness_session_refused_at_connect_answers_every_message() -> None:
    class Door:
        @hookimpl
        def connect(self, event: Connect) -> Reject | None:
            return Reject("554", "5.7.1", "go away")

    with Harness(plugins={"door": Door}) as h, h.session() as s:
        outs = [s.send(MSG), s.send(MSG)]
    assert [(o.verdict, o.stage) for o in outs] == [("reject", "connect")] * 2
    with Harness() as h, h.session() as s, pytest.raises(ValueError, match="after: one of"):
        s.abandon(after="eom")


@pytest.mark.parametrize(
    "stage", ["envfrom", "data", "header", "eoh", "body", "core-limit", "core-limit-noreply"]
)
def test_a_message_ended_before_eom_gets_abort_for_every_plugin(stage: str) -> None:
    """Every message ends with eom or abort: a plugin holding something per message (opened
    at envfrom) is told when another plugin's or the core's verdict ends it early."""
    held: list[str] = []

    class Holder:
        @hookimpl
        def envfrom(self, ctx: Context) -> None:
            held.append("open")

        @hookimpl
        def eom(self, message: Message) -> None:  # reads the body: the MTA sends it
            held.remove("open")

        @hookimpl
        def abort(self) -> None:
            held.remove("open")

    class Refuser:
        @hookimpl
        def envfrom(self) -> Reject | None:
            return Reject() if stage == "envfrom" else None

        @hookimpl
        def data(self) -> Reject | None:
            return Reject() if stage == "data" else None

        @hookimpl
        def header(self) -> Reject | None:
            return Reject() if stage == "header" else None

        @hookimpl
        def eoh(self) -> Reject | None:
            return Reject() if stage == "eoh" else None

        @hookimpl
        def body(self) -> Reject | None:
            return Reject() if stage == "body" else None

    core = {"max_message_size": 100} if stage.startswith("core-limit") else {}
    # noreply: no plugin hooks the body (it is sent without reply, for eom's message), so
    # the limit's verdict waits for end of message
    plugins: dict[str, type] = {"holder": Holder}
    if not stage.endswith("noreply"):
        plugins["refuser"] = Refuser
    config = {"milterd": core, "plugins": {n: {} for n in plugins}}
    with Harness(config, plugins=plugins) as h, h.session() as s:
        assert ("body" in h.runtime.negotiation.noreply) == stage.endswith("noreply")
        out = s.send(MSG + b"x" * 200)
        assert out.verdict == "reject" and held == []  # abort ran, once
        s.send(MSG)  # the session goes on: the next message opens and ends normally
        assert held == []


class LogsAtStart:
    @hookimpl
    def startup(self, services: Services) -> None:
        services.logger.warning("starting")

    @hookimpl
    def worker_start(self, services: Services) -> None:
        services.logger.warning("worker starting")


def test_services_logger_is_the_plugins_own(caplog: pytest.LogCaptureFixture) -> None:
    # README: services.logger is "your logger", the one ctx.log is (milterd.NAME); it was
    # the core's ("milterd"), so a plugin's start-up lines were the core's (a review).
    with caplog.at_level("WARNING"), Harness({"mine": {}}, plugins={"mine": LogsAtStart}):
        pass
    got = [(r.name, r.getMessage()) for r in caplog.records if "starting" in r.getMessage()]
    assert got == [("milterd.mine", "starting"), ("milterd.mine", "worker starting")]


def test_worker_ready_follows_every_worker_start_and_never_a_refused_one() -> None:
    """A generation a later plugin refuses gets no worker_ready (its shutdown, yes); a
    failing worker_ready is logged and the generation stands."""
    seen: list[str] = []

    class Ready:
        @hookimpl
        def worker_start(self) -> None:
            seen.append("start")

        @hookimpl
        def worker_ready(self) -> None:
            seen.append("ready")

        @hookimpl
        def shutdown(self) -> None:
            seen.append("shutdown")

    class Refuses:
        after = ("ready",)

        @hookimpl
        def worker_start(self) -> None:
            raise OSError("store gone")

    class ReadyFails:
        @hookimpl
        def worker_ready(self) -> None:
            raise RuntimeError("late")

    with pytest.raises(ConfigError, match="store gone"), Harness(
        {"ready": {}, "refuses": {}}, plugins={"ready": Ready, "refuses": Refuses}
    ):
        pass
    assert seen == ["start", "shutdown"]
    seen.clear()
    with Harness({"fails": {}, "ready": {}}, plugins={"fails": ReadyFails, "ready": Ready}) as h:
        assert h.send(MSG).verdict == "continue"
    assert seen == ["start", "ready", "shutdown"]


def test_a_skip_in_worker_ready_still_shuts_the_generation_down() -> None:
    seen: list[str] = []

    class SkipsWhenReady:
        @hookimpl
        def worker_ready(self) -> None:
            pytest.skip("not here")

        @hookimpl
        def shutdown(self) -> None:
            seen.append("shutdown")

    with pytest.raises(pytest.skip.Exception), Harness({"s": {}}, plugins={"s": SkipsWhenReady}):
        pass
    assert seen == ["shutdown"]
