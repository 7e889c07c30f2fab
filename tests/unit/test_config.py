"""Config validation: errors name the file, the section and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from milterd import PluginConfig, hookimpl
from milterd.config import ConfigError, load, loads, parse_socket
from milterd.pipeline import Runtime
from milterd.testing import FakeResolver


class Greeter:
    class Config(PluginConfig):
        greeting: str = "hi"
        repeat: int = 1

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return self.Config

    @hookimpl
    def eom(self) -> None:
        return None


def error_of(text: str, plugins: dict[str, object] | None = None) -> str:
    with pytest.raises(ConfigError) as e:
        Runtime(loads(text, "/etc/milterd/test.toml"), plugins or {}, FakeResolver())
    return str(e.value)


def test_unknown_key_in_milterd_section() -> None:
    assert (
        error_of("[milterd]\nsockett = 'x'\n")
        == "/etc/milterd/test.toml: [milterd] sockett: unknown key"
    )


def test_wrong_type_names_the_key() -> None:
    msg = error_of("[dns]\ntimeout = 'soon'\n")
    assert msg.startswith("/etc/milterd/test.toml: [dns] timeout:")


def test_plugin_core_key_and_plugin_own_key_errors() -> None:
    assert "[plugins.greeter] on_error:" in error_of(
        "[plugins.greeter]\non_error = 'explode'\n", {"greeter": Greeter}
    )
    assert error_of("[plugins.greeter]\nrepeat = 'twice'\n", {"greeter": Greeter}).startswith(
        "/etc/milterd/test.toml: [plugins.greeter] repeat:"
    )
    assert error_of("[plugins.greeter]\ncolour = 'red'\n", {"greeter": Greeter}).endswith(
        "[plugins.greeter] colour: unknown key"
    )


def test_plugin_without_schema_rejects_any_own_key() -> None:
    class Bare:
        @hookimpl
        def eom(self) -> None:
            return None

    assert "[plugins.bare] anything: unknown key" in error_of(
        "[plugins.bare]\nanything = 1\n", {"bare": Bare}
    )


def test_not_toml_and_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"test.toml: not valid TOML"):
        loads("[milterd\n", "test.toml")
    with pytest.raises(ConfigError, match=r"missing.toml: cannot read"):
        load(tmp_path / "missing.toml")


def test_enabled_and_order() -> None:
    c = loads("[plugins.b]\n[plugins.a]\norder = 1\n[plugins.c]\nenabled = false\n[plugins.d]\n")
    assert c.enabled_plugins() == ["a", "b", "d"]


def test_sockets() -> None:
    assert parse_socket("unix:/run/m.sock") == ("unix", "/run/m.sock", 0)
    assert parse_socket("inet:8895@127.0.0.1") == ("inet", "127.0.0.1", 8895)
    assert parse_socket("inet6:8895@[::1]") == ("inet6", "::1", 8895)
    assert "socket" in error_of("[milterd]\nsocket = 'tcp://x'\n")


def test_enabled_plugin_not_installed_is_named() -> None:
    assert "plugin 'nonesuch' is enabled but not installed" in error_of("[plugins.nonesuch]\n")


def test_the_shipped_default_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    c = load(root / "etc" / "milterd.toml")
    Runtime(c, {}, FakeResolver())


class Weighted:
    class Config(PluginConfig):
        score: float = 1.0

    @hookimpl
    def config_schema(self) -> type[PluginConfig]:
        return self.Config

    @hookimpl
    def eom(self) -> None:
        return None


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_infinity_are_refused(value: str) -> None:
    """TOML has nan and inf; a score of nan never compares, inf breaks int()."""
    msg = error_of(f"[plugins.w]\nscore = {value}\n", {"w": Weighted})
    assert msg.startswith("/etc/milterd/test.toml: [plugins.w] score:")
    assert "[dns] timeout:" in error_of(f"[dns]\ntimeout = {value}\n")
