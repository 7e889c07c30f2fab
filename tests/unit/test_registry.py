"""Loading and ordering plugins; pluggy's validation of hook names and arguments."""

from __future__ import annotations

import pytest

from milterd import PluginConfig, hookimpl
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


def test_an_argument_a_hook_never_gets_is_refused_with_what_it_takes() -> None:
    class WrongArg:
        @hookimpl
        def finalize(self, ctx: object, event: object) -> None:  # finalize has no event
            return None

    with pytest.raises(ConfigError, match=r"finalize takes any of: ctx, message$"):
        build({"p": WrongArg})

    class Defaulted:  # pluggy passes nothing for an argument with a default: allowed
        @hookimpl
        def eom(self, ctx: object, extra: object = None) -> None:
            return None

    build({"p": Defaulted})


def test_an_unmarked_hook_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    class Unmarked:
        def envrcpt(self, ctx: object, event: object) -> None:
            return None

        def close(self) -> None:  # an ordinary method named like a hook: no warning
            return None

    build({"p": Unmarked})
    text = caplog.text
    assert "envrcpt(ctx, event) is not marked @hookimpl" in text
    assert "close" not in text and "'p' has no @hookimpl-marked hook" in text


@pytest.mark.parametrize(
    ("attrs", "message"),
    [
        ({"actions": "add_header"}, r"actions must be a list of names such as \['add_header'\]"),
        (
            {"actions": {"delete_header"}},
            r"unknown actions \['delete_header'\]; actions are: add_header, add_recipient, ",
        ),
        ({"after": "spf"}, r"after must be a list of names such as \['spf'\], not a string"),
        ({"macros": {"envfrom": "{auth_authen}"}}, r"macros\['envfrom'\] must be a list"),
        ({"macros": {"rcpt": ["{x}"]}}, r"unknown stages \['rcpt'\]; stages with macros"),
    ],
)
def test_plugin_attributes_that_would_be_misread_are_refused(
    attrs: dict[str, object], message: str
) -> None:
    def eom(self: object) -> None:
        return None

    plugin = type("P", (), {**attrs, "eom": hookimpl(eom)})
    with pytest.raises(ConfigError, match=message):
        build({"p": plugin})


def test_a_schema_field_named_like_a_core_key_is_refused() -> None:
    class Cfg(PluginConfig):
        timeout: float = 30.0  # would silently be the core's per-hook deadline

    class Timeouts:
        @hookimpl
        def config_schema(self) -> type[PluginConfig]:
            return Cfg

    with pytest.raises(ConfigError, match="declares timeout, which the core reserves"):
        build({"p": Timeouts})

    class Instance:
        @hookimpl
        def config_schema(self) -> object:
            return PluginConfig()

    with pytest.raises(ConfigError, match="config_schema must return a model class"):
        build({"p": Instance})
