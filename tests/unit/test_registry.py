"""Loading and ordering plugins; pluggy's validation of hook names and arguments."""

from __future__ import annotations

import pytest

from milterd import hookimpl
from milterd.config import ConfigError, from_dict
from milterd.pipeline import Runtime
from milterd.registry import installed
from milterd.testing import FakeResolver


def build(
    plugins: dict[str, object], sections: dict[str, dict[str, object]] | None = None
) -> Runtime:
    sections = sections or {n: {} for n in plugins}
    return Runtime(from_dict({"plugins": sections}), plugins, FakeResolver())


def test_builtins_and_the_example_are_installed_entry_points() -> None:
    names = {p.name: p.dist for p in installed()}
    assert names.get("authres") == "milterd"
    assert names.get("example_header") == "milterd-example-header"


def test_misspelt_hook_is_refused() -> None:
    class Typo:
        @hookimpl
        def envrcp(self) -> None:  # no such hook
            return None

    with pytest.raises(ConfigError, match="typo"):
        build({"typo": Typo})


def test_unknown_argument_is_refused() -> None:
    class BadArgs:
        @hookimpl
        def eom(self, ctx: object, msg: object) -> None:  # 'msg' is not a hook argument
            return None

    with pytest.raises(ConfigError, match="badargs"):
        build({"badargs": BadArgs})


def test_declared_order_is_checked() -> None:
    class Spf:
        @hookimpl
        def eom(self) -> None:
            return None

    class Dmarc:
        after = ("spf",)

        @hookimpl
        def eom(self) -> None:
            return None

    build({"spf": Spf, "dmarc": Dmarc})
    with pytest.raises(ConfigError, match="'dmarc' must run after 'spf'"):
        build({"spf": Spf, "dmarc": Dmarc}, {"dmarc": {}, "spf": {}})


def test_failing_constructor_and_startup_are_named() -> None:
    class Ctor:
        def __init__(self) -> None:
            raise OSError("no key file")

    with pytest.raises(ConfigError, match=r"plugin 'ctor': creating Ctor\(\) failed"):
        build({"ctor": Ctor})

    class Start:
        @hookimpl
        def startup(self) -> None:
            raise ValueError("bad rules")

    rt = build({"start": Start})
    with pytest.raises(ConfigError, match="plugin 'start': startup failed: ValueError: bad rules"):
        rt.start()


def test_start_phases_split_prefork_startup_from_per_worker_work() -> None:
    calls: list[str] = []

    class Pre:
        prefork = True

        @hookimpl
        def startup(self) -> None:
            calls.append("pre.startup")

        @hookimpl
        def worker_start(self) -> None:
            calls.append("pre.worker_start")

    class Plain:
        @hookimpl
        def startup(self) -> None:
            calls.append("plain.startup")

        @hookimpl
        def worker_start(self) -> None:
            calls.append("plain.worker_start")

    # listed plain first: the prefork plugin's startup still runs in the supervisor phase
    rt = build({"plain": Plain, "pre": Pre})
    rt.start("prefork")
    started_in_supervisor = rt.started  # no worker_start ran: nothing to shut down there
    assert calls == ["pre.startup"]
    rt.start("worker")
    assert calls[1:] == ["plain.startup", "plain.worker_start", "pre.worker_start"]
    assert (started_in_supervisor, rt.started) == (False, True)

    calls.clear()
    build({"plain": Plain, "pre": Pre}).start()  # one process: everything, in that order
    assert calls == ["pre.startup", "plain.startup", "plain.worker_start", "pre.worker_start"]

    class FailingWorkerStart:
        @hookimpl
        def worker_start(self) -> None:
            raise OSError("database locked")

    class Opened:
        @hookimpl
        def worker_start(self) -> None:
            calls.append("opened.worker_start")

        @hookimpl
        def shutdown(self) -> None:
            calls.append("opened.shutdown")

    calls.clear()
    rt = build({"opened": Opened, "bad": FailingWorkerStart})
    with pytest.raises(ConfigError, match="'bad': worker_start failed: OSError: database locked"):
        rt.start()
    # what was opened before the failure is released (a refused reload leaks nothing)
    assert calls == ["opened.worker_start", "opened.shutdown"]
    rt.stop()  # not started: nothing more
    assert calls == ["opened.worker_start", "opened.shutdown"]


def test_undeclared_actions_are_refused() -> None:
    class Weird:
        actions = frozenset({"teleport"})

    with pytest.raises(ConfigError, match="unknown actions"):
        build({"weird": Weird})


def test_a_new_generation_gets_fresh_plugin_objects() -> None:
    class Counter:
        made = 0

        def __init__(self) -> None:
            Counter.made += 1

    build({"counter": Counter})
    build({"counter": Counter})
    assert Counter.made == 2
