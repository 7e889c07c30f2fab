"""Per-plugin isolation: exceptions, hangs and bad return values never escape the guard."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import pytest

from milterd import AddHeader, ConfigError, Context, Result, hookimpl
from milterd.hookspecs import STAGES
from milterd.pipeline import Runtime, Session
from milterd.testing import Harness

MSG = b"From: a@example.org\r\nSubject: s\r\n\r\nbody\r\n"
HOOKED = list(STAGES)


def make_raiser() -> type:
    class Raiser:
        pass

    for stage in HOOKED:

        def hook(self: object, ctx: Context, _stage: str = stage) -> None:
            raise RuntimeError(f"boom at {_stage}")

        hook.__name__ = stage
        setattr(Raiser, stage, hookimpl(hook))
    return Raiser


@pytest.mark.parametrize(
    ("policy", "verdict"),
    [("continue", "continue"), ("tempfail", "tempfail"), ("reject", "reject")],
)
def test_exception_in_every_hook_applies_on_error(policy: str, verdict: str) -> None:
    with Harness(
        {"plugins": {"raiser": {"on_error": policy}}}, plugins={"raiser": make_raiser()}
    ) as h:
        out = h.send(MSG)
    assert out.verdict == verdict
    if policy == "continue":
        stages = {s for _, s, _ in out.errors}
        assert {"envfrom", "envrcpt", "data", "header", "eoh", "body", "eom", "finalize"} <= stages
        assert out.delivered is not None
    else:
        code = getattr(out.early or out.decision.verdict, "code", "")
        assert code == ("451" if policy == "tempfail" else "550")


@pytest.mark.parametrize("isolation", ["inline", "thread"])
@pytest.mark.parametrize("exc", [SystemExit, GeneratorExit])
def test_what_is_no_exception_is_a_plugin_failure_too(
    isolation: str, exc: type[BaseException], caplog: pytest.LogCaptureFixture
) -> None:
    """A plugin calling sys.exit() (SystemExit) went past the guard: out of the harness
    into the test, and in the daemon it ended libmilter's thread for that connection,
    leaving the MTA waiting for a reply until its milter timeout."""

    class Exits:
        @hookimpl
        def startup(self) -> None:
            self.calls = 0

        @hookimpl
        def eom(self, ctx: Context) -> None:
            self.calls += 1
            raise exc("leaving")

        @hookimpl
        def shutdown(self) -> None:
            raise exc("at shutdown")

    section = {"on_error": "continue", "isolation": isolation}
    with Harness({"plugins": {"exits": section}}, plugins={"exits": Exits}) as h:
        out = h.send(MSG)
        again = h.send(MSG)
    assert out.verdict == again.verdict == "continue"
    assert out.errors == [("exits", "eom", f"exception: {exc.__name__}: leaving")]
    assert "plugin exits: shutdown failed" in caplog.text

    class ExitsAtStartup:
        @hookimpl
        def startup(self) -> None:
            sys.exit("missing dependency")

    with pytest.raises(ConfigError, match="plugin 'bad': startup failed: SystemExit"):
        Harness({"plugins": {"bad": {}}}, plugins={"bad": ExitsAtStartup}).__enter__()

    class SchemaFails:
        @hookimpl
        def config_schema(self) -> None:
            raise ImportError("no module named 'x'")

    with pytest.raises(ConfigError, match="plugin 'bad': config_schema failed: ImportError"):
        Harness({"plugins": {"bad": {}}}, plugins={"bad": SchemaFails}).__enter__()

    class ExitsInInit:
        def __init__(self) -> None:
            sys.exit(2)

    with pytest.raises(ConfigError, match=r"plugin 'bad': creating ExitsInInit\(\) failed"):
        Harness({"plugins": {"bad": {}}}, plugins={"bad": ExitsInInit}).__enter__()


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_a_ctrl_c_or_pytest_fail_in_the_harness_still_goes_through(isolation: str) -> None:
    """On the main thread a KeyboardInterrupt is the user's Ctrl-C, and pytest.fail() in
    a test plugin's hook is the test's verdict: neither is a plugin failure."""

    class Interrupted:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            raise KeyboardInterrupt

    class Fails:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            pytest.fail("eom must not be called")

    cfg = {"plugins": {"i": {"isolation": isolation}}}
    with Harness(cfg, plugins={"i": Interrupted}) as h, pytest.raises(KeyboardInterrupt):
        h.send(MSG)
    with Harness(cfg, plugins={"i": Fails}) as h, pytest.raises(pytest.fail.Exception):
        h.send(MSG)


def test_a_skip_in_a_start_up_hook_still_shuts_down_what_started() -> None:
    """pytest.skip() in a test plugin's worker_start went through (as it should) but left
    the plugins started before it running: their threads outlived the test."""
    shut: list[str] = []

    class Starts:
        @hookimpl
        def shutdown(self) -> None:
            shut.append("starts")

    class Skips:
        after = ("starts",)

        @hookimpl
        def worker_start(self) -> None:
            pytest.skip("redis not running")

    plugins = {"starts": Starts, "skips": Skips}
    cfg: dict[str, Any] = {"starts": {}, "skips": {}}
    with pytest.raises(pytest.skip.Exception), Harness(cfg, plugins=plugins):
        pass
    assert shut == ["starts"]


def test_stop_all_at_exit_shuts_down_idle_generations_and_waits_for_one_under_way() -> None:
    """A worker's exit only retired the current generation: an idle one was shut down,
    but a shutdown another thread had begun (a session closing at that moment) was cut
    by the exit. A generation a session still holds is left alone: its hooks may run."""
    from milterd.config import from_dict
    from milterd.pipeline import stop_all

    shut: list[str] = []

    def recorder(name: str, seconds: float = 0.0) -> type:
        class Recorder:
            @hookimpl
            def shutdown(self) -> None:
                time.sleep(seconds)
                shut.append(name)

        return Recorder

    def runtime(name: str, seconds: float = 0.0) -> Runtime:
        rt = Runtime(from_dict({"plugins": {"r": {}}}), {"r": recorder(name, seconds)})
        rt.start()
        return rt

    held, _idle, closing = runtime("held"), runtime("idle"), runtime("closing", 0.5)
    held.acquire()  # a session the drain cut
    closing.acquire()
    closing.retire()
    last_session = threading.Thread(target=closing.release)  # its shutdown takes 0.5 s
    last_session.start()
    deadline = time.monotonic() + 5
    while not closing._stopping and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stop_all() == [held]
    assert sorted(shut) == ["closing", "idle"]  # waited for "closing"'s shutdown
    last_session.join()
    held.release()
    held.retire()
    assert sorted(shut) == ["closing", "held", "idle"]
    assert stop_all() == [] and len(shut) == 3


def test_an_async_hook_refuses_the_config() -> None:
    """async def eom(...) returned a coroutine nobody awaited: a bad return on every
    message, and a RuntimeWarning."""

    class Async:
        @hookimpl
        async def eom(self, ctx: Context) -> None:
            return None

    with pytest.raises(ConfigError, match="plugin 'a': hook eom is 'async def'"):
        Harness({"plugins": {"a": {}}}, plugins={"a": Async}).__enter__()


class Unprintable(Exception):
    def __str__(self) -> str:
        raise ValueError("no text")


@pytest.mark.parametrize("isolation", ["inline", "thread"])
def test_an_exception_without_text_or_with_megabytes_of_it_is_contained(
    isolation: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception whose str() raised escaped the guard (a core error, 451 whatever
    on_error said); one with 5 MB of text went whole into the log line and the errors."""

    class Odd:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            assert ctx.message is not None
            if ctx.message.sender.startswith("u@"):
                raise Unprintable()
            raise OSError("x" * 5_000_000)

        @hookimpl
        def shutdown(self) -> None:
            raise Unprintable()

    section = {"on_error": "continue", "isolation": isolation}
    with Harness({"plugins": {"odd": section}}, plugins={"odd": Odd}) as h:
        unprintable = h.send(MSG, sender="u@example.org")
        huge = h.send(MSG, sender="h@example.org")
    assert unprintable.verdict == huge.verdict == "continue"
    assert unprintable.errors == [
        ("odd", "eom", "exception: Unprintable: (its text could not be read)")
    ]
    (detail,) = [d for _, _, d in huge.errors]
    assert detail.startswith("exception: OSError: xxx") and detail.endswith("(5000000 characters)")
    assert len(detail) < 1100
    assert max(len(r.getMessage()) for r in caplog.records) < 1300

    class StartFails:
        @hookimpl
        def startup(self) -> None:
            raise Unprintable()

    with pytest.raises(ConfigError, match=r"startup failed: Unprintable: \(its text could not"):
        Harness({"plugins": {"bad": {}}}, plugins={"bad": StartFails}).__enter__()


def test_a_failed_call_contributes_nothing() -> None:
    class Half:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(AddHeader("X-Half", "1"))
            ctx.add_result(Result("half", "pass"))
            raise ValueError("then fails")

    with Harness({"plugins": {"half": {"on_error": "continue"}}}, plugins={"half": Half}) as h:
        out = h.send(MSG)
    assert out.ops == [] and out.results == []
    assert out.errors == [("half", "eom", "exception: ValueError: then fails")]


def test_a_hanging_plugin_gets_its_policy_within_the_deadline() -> None:
    release = threading.Event()
    late: list[str] = []

    class Hang:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            release.wait(10)
            try:
                ctx.add_result(Result("late", "pass"))
            except Exception as e:  # refused: the call is over for the pipeline
                late.append(type(e).__name__)

    with Harness(
        {"plugins": {"hang": {"timeout": 0.3, "on_error": "tempfail"}}}, plugins={"hang": Hang}
    ) as h:
        t0 = time.monotonic()
        out = h.send(MSG)
        elapsed = time.monotonic() - t0
        release.set()
    assert out.verdict == "tempfail" and elapsed < 1.5
    assert out.errors[0][2].startswith("timeout")
    for _ in range(50):
        if late:
            break
        time.sleep(0.02)
    assert late == ["ContributionRefused"]


def test_calls_fail_at_once_when_every_helper_thread_is_stuck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A hung disk or C call keeps its helper thread past the deadline. Once all of them
    # are taken, a thread call fails at once (its on_error applies) instead of queueing
    # behind them: the queue would never drain and would hold every message meanwhile.
    from milterd import pipeline

    release = threading.Event()

    class Hang:
        @hookimpl
        def eom(self) -> None:
            release.wait(10)

    monkeypatch.setattr(pipeline, "HELPER_THREADS", 2)
    cfg = {"plugins": {"hang": {"timeout": 0.2, "on_error": "tempfail"}}}
    with Harness(cfg, plugins={"hang": Hang}) as h:
        stuck = [h.send(MSG) for _ in range(2)]
        t0 = time.monotonic()
        refused = [h.send(MSG) for _ in range(3)]
        elapsed = time.monotonic() - t0
        queued = pipeline.executor()._work_queue.qsize()
        release.set()
        deadline = time.monotonic() + 5
        while pipeline._stuck > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        after = h.send(MSG)
    assert [o.errors[0][2].split(":")[0] for o in stuck] == ["timeout"] * 2
    assert all(o.verdict == "tempfail" for o in stuck + refused)
    assert all("helper threads still busy" in o.errors[0][2] for o in refused), refused
    assert elapsed < 0.3 and queued == 0, (elapsed, queued)
    assert after.verdict == "continue" and not after.errors


def test_other_connections_are_served_while_one_plugin_hangs() -> None:
    release = threading.Event()

    class Slow:
        @hookimpl
        def envrcpt(self, ctx: Context) -> None:
            if ctx.message is not None and ctx.message.sender == "slow@example.org":
                release.wait(10)

    with Harness({"plugins": {"slow": {"timeout": 5}}}, plugins={"slow": Slow}) as h:
        results: dict[str, str] = {}
        t = threading.Thread(
            target=lambda: results.setdefault(
                "slow", h.send(MSG, sender="slow@example.org").verdict
            )
        )
        t.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        results["fast"] = h.send(MSG, sender="fast@example.org").verdict
        fast_elapsed = time.monotonic() - t0
        release.set()
        t.join(5)
    assert results == {"fast": "continue", "slow": "continue"} and fast_elapsed < 0.5


def test_inline_overrun_is_a_timeout_once_it_returns() -> None:
    class Busy:
        isolation = "inline"

        @hookimpl
        def eom(self) -> None:
            time.sleep(0.3)

    with Harness(
        {"plugins": {"busy": {"timeout": 0.1, "on_error": "reject"}}}, plugins={"busy": Busy}
    ) as h:
        out = h.send(MSG)
    assert out.verdict == "reject" and out.errors[0][2].startswith("timeout")


def test_bad_return_values_are_plugin_errors() -> None:
    class Odd:
        @hookimpl
        def envfrom(self) -> str:
            return "REJECT"  # a string, not a Verdict

    with Harness({"plugins": {"odd": {"on_error": "tempfail"}}}, plugins={"odd": Odd}) as h:
        out = h.send(MSG)
    assert out.verdict == "tempfail" and out.stage == "envfrom"


def test_long_eom_work_sends_progress() -> None:
    class Slowish:
        @hookimpl
        def eom(self) -> None:
            time.sleep(0.35)

    h = Harness(
        {"milterd": {"progress_interval": 0.1}, "plugins": {"slowish": {"timeout": 2}}},
        plugins={"slowish": Slowish},
    )
    ticks: list[float] = []
    rt: Runtime = h.runtime
    s = Session(rt, progress=lambda: ticks.append(time.monotonic()))
    from milterd.events import Client

    s.on_connect("x", Client("x", "unknown", None), {})
    s.on_envfrom("a@example.org", {}, {})
    s.on_envrcpt("b@example.com", {}, {})
    d = s.on_eom({})
    s.on_close()
    h.close()
    assert d.word == "continue" and len(ticks) >= 2


def test_isolation_can_be_chosen_per_hook_and_overridden_by_config() -> None:
    where: dict[str, str] = {}

    class Mixed:
        isolation = {"default": "inline", "eom": "thread"}

        @hookimpl
        def envfrom(self) -> None:
            where["envfrom"] = threading.current_thread().name

        @hookimpl
        def eom(self) -> None:
            where["eom"] = threading.current_thread().name

    with Harness(plugins={"mixed": Mixed}) as h:
        h.send(MSG)
    assert where["eom"].startswith("plugin") and not where["envfrom"].startswith("plugin")
    with Harness({"plugins": {"mixed": {"isolation": "thread"}}}, plugins={"mixed": Mixed}) as h:
        h.send(MSG)
    assert where["envfrom"].startswith("plugin")


def test_a_connection_refused_while_draining_holds_no_generation() -> None:
    """Refused at CONNECT (the worker draining), a connection still counted on the
    generation until the MTA hung up, so the exit took it for busy and skipped its
    shutdown; its close also ran the plugins' close hooks."""
    import socket

    from milterd import bridge
    from milterd.config import from_dict
    from milterd.pipeline import stop_all
    from tests.support.milterctx import FakeMilterCtx

    seen: list[str] = []

    class Closes:
        @hookimpl
        def close(self) -> None:
            seen.append("close")

        @hookimpl
        def shutdown(self) -> None:
            seen.append("shutdown")

    rt = Runtime(from_dict({"plugins": {"c": {}}}), {"c": Closes})
    rt.start()
    old = bridge.set_runtime(rt)
    try:
        bridge.begin_drain()
        ctx = FakeMilterCtx()
        bridge._negotiate(ctx, [0x1FF, 0x1FFFFF, 0, 0])
        assert bridge._connect(ctx, "c.example", socket.AF_INET, ("192.0.2.1", 1)) == (
            bridge.TEMPFAIL)  # fmt: skip
        assert rt.connections == 0
        assert stop_all() == [] and seen == ["shutdown"]
        bridge._close(ctx)
        assert seen == ["shutdown"]
    finally:
        bridge._draining = False
        if old is not None:
            bridge.set_runtime(old)
