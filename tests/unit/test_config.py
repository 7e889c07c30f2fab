"""Config validation: errors name the file, the section and the key."""

from __future__ import annotations

import os
import re
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
    assert error_of("[plugins.dkmi]\n").endswith("did you mean [plugins.dkim]?")


def test_a_misspelt_section_is_named_as_a_section() -> None:
    assert error_of("[plugin.authres]\n") == (
        "/etc/milterd/test.toml: [plugin]: unknown section (sections are [milterd], [dns] and "
        "[plugins.NAME])"
    )


def test_the_shipped_default_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    c = load(root / "etc" / "milterd.toml")
    Runtime(c, {}, FakeResolver())




def test_the_shipped_config_shows_defaults_unless_it_says_example() -> None:
    """etc/milterd.toml says: "the values shown are the defaults unless marked example".
    Every ``key = value`` line of [milterd] and [dns], commented out or not, and the core
    keys listed for plugin sections, must hold the code's default or say "example"."""
    import tomllib

    from pydantic import BaseModel

    from milterd.config import DnsSettings, PluginSettings, Settings

    root = Path(__file__).resolve().parents[2]
    models: dict[str, type[BaseModel]] = {"milterd": Settings, "dns": DnsSettings}
    line_re = re.compile(r"#?\s*([a-z_]+)\s*=\s*(.*?)\s*(?:#\s*(.*))?$")
    section, checked, wrong = "", 0, []
    for n, line in enumerate((root / "etc" / "milterd.toml").read_text().splitlines(), 1):
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if "Core keys in every section" in line:
            section = "plugin-core"
            continue
        m = line_re.fullmatch(line.strip())
        model: type[BaseModel] | None = (
            PluginSettings if section == "plugin-core" else models.get(section)
        )
        if m is None or model is None or m.group(1) not in model.model_fields:
            continue
        key, raw, comment = m.group(1), m.group(2), m.group(3) or ""
        if "example" in comment or raw == "N":
            continue
        value = tomllib.loads(f"v = {raw}")["v"]
        default = model.model_fields[key].get_default(call_default_factory=True)
        if isinstance(default, list) and all(hasattr(x, "version") for x in default):
            default = [str(x) for x in default]  # networks
        checked += 1
        if value != default and str(value) != str(default):
            wrong.append(f"line {n}: {key} = {raw}, default {default!r}")
    assert checked >= 15 and not wrong, wrong
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


def test_relative_paths_are_taken_from_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`config check` in /etc/milterd and the daemon under systemd (working directory /)
    must read the same files."""
    from milterd_plugins.archive import ArchiveConfig

    from milterd.registry import load_plugins

    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "milterd.toml").write_text(
        '[milterd]\nspool_dir = "spool"\n'
        '[plugins.scoring.bayes]\npath = "/abs/bayes.sqlite"\n'
        '[plugins.archive]\npath = "../archive"\n'
    )
    monkeypatch.chdir("/")
    cfg = load(etc / "milterd.toml")
    assert cfg.milterd.spool_dir == str(etc / "spool")
    _, loaded = load_plugins(cfg)
    archive = {p.name: p.config for p in loaded}["archive"]
    assert archive.path == str(tmp_path / "archive")
    assert cfg.plugin_model("archive", ArchiveConfig).path == str(tmp_path / "archive")
    assert {p.name: p.config for p in loaded}["scoring"].bayes.path == "/abs/bayes.sqlite"
    # text without a file (the harness, tests): nothing to resolve against, left as written
    assert loads('[milterd]\nspool_dir = "spool"\n').milterd.spool_dir == "spool"


def test_accounts_are_checked_naming_the_key() -> None:
    from milterd.config import check_accounts

    with pytest.raises(ConfigError, match=r"\[milterd\] socket_group: no group 'nosuchgroup'"):
        check_accounts(loads('[milterd]\nsocket_group = "nosuchgroup"\n').milterd)
    with pytest.raises(ConfigError, match=r"\[milterd\] user: no user 'nosuchuser'"):
        check_accounts(loads('[milterd]\nuser = "nosuchuser"\n').milterd)
    check_accounts(loads('[milterd]\nuser = "nobody"\nsocket_group = "nogroup"\n').milterd)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_an_unprivileged_daemon_outside_socket_group_is_told_how_to_fix_it() -> None:
    # The systemd unit runs milterd unprivileged; a socket_group not in its
    # SupplementaryGroups= failed with a bare "Operation not permitted".
    from milterd.config import check_accounts

    settings = loads('[milterd]\nsocket = "unix:/tmp/x.sock"\nsocket_group = "root"\n').milterd
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            check_accounts(settings)  # without socket=True: only names are checked
            try:
                check_accounts(settings, socket=True)
            except ConfigError as e:
                code = 0 if "SupplementaryGroups=root" in str(e) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


# --- found by a review (2026-12-03, evening) ------------------------------------------------


def test_a_config_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """It was a UnicodeDecodeError: `milterd run` died with a traceback and exit 1 (which
    systemd restarts), the other commands did not name the file."""
    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[milterd]\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not UTF-8"):
        load(p)


@pytest.mark.parametrize(
    ("text", "what"),
    [
        ('[dns]\nnameservers = ["1.2.3.4:99999"]', "port out of range"),
        ('[dns]\nnameservers = ["[::1]:0"]', "port out of range"),
        ("[milterd]\nmilter_timeout = 4294967296", "less than or equal"),
        ("[milterd]\nshutdown_timeout = 1e10", "less than or equal"),
        ('[milterd]\nsocket = "inet:8895@[::1]"', "needs inet6"),
        ('[milterd]\nsocket = "unix:/' + "d" * 120 + '/s"', "longer than 107 bytes"),
    ],
)
def test_values_run_could_not_use_are_config_errors(text: str, what: str) -> None:
    """Found by a review: each passed `config check`, then `run` failed (a traceback, an
    endless SIGTERM wait, libmilter's bare "cannot opensocket") or every DNS lookup did."""
    with pytest.raises(ConfigError, match=what):
        loads(text)
    assert parse_socket("inet6:8895@[::1]") == ("inet6", "::1", 8895)


def test_every_reader_of_a_config_file_names_it_when_it_is_not_utf8(tmp_path: Path) -> None:
    """A review of the fix above: `milterd plugins` (and a reload) still said only
    "'utf-8' codec can't decode byte 0xff", without the file."""
    import subprocess
    import sys

    p = tmp_path / "bad.toml"
    p.write_bytes(b"\xff\xfe[milterd]\n")
    for cmd in (["plugins"], ["config", "check"]):
        r = subprocess.run([sys.executable, "-m", "milterd.cli", "-c", str(p), *cmd],
                           capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
        assert r.returncode == 2 and f"{p}: not UTF-8" in r.stderr, (cmd, r.stderr)
