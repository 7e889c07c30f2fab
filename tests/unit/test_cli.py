"""The command line, run as a user would (a subprocess), on real files."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from milterd_testplugins import Mark

from milterd import Reject, cli, hookimpl

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


def milterd(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "milterd.cli"]
    if config is not None:
        cmd += ["-c", str(config)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    p = tmp_path / "milterd.toml"
    p.write_text(
        '[milterd]\nauthserv_id = "mx.cli"\n[plugins.t_reject_rcpt]\n'
        '[plugins.example_header]\ngreeting = "from cli"\n[plugins.authres]\ntrusted = true\n'
    )
    return p


def test_version_names_milterd_pymilter_and_python() -> None:
    import importlib.metadata as md
    import platform

    import milterd as pkg

    r = milterd("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (
        f"milterd {pkg.__version__} (pymilter {md.version('pymilter')}, "
        f"Python {platform.python_version()})"
    )
    assert md.version("milterd") == pkg.__version__  # pyproject.toml and the package agree


def test_config_check_ok_and_broken(config: Path, tmp_path: Path) -> None:
    ok = milterd("config", "check", config=config)
    assert ok.returncode == 0 and "t_reject_rcpt -> example_header -> authres" in ok.stdout
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.example_header]\ngreeting = 3\n")
    res = milterd("config", "check", config=bad)
    assert res.returncode == 2 and f"{bad}: [plugins.example_header] greeting:" in res.stderr


def test_config_check_refuses_a_metrics_address_this_host_cannot_listen_on(
    tmp_path: Path,
) -> None:
    # README: config check checks metrics_listen "so a file it passes starts"; it only
    # checked the syntax, and `run` then exited 2 (a review). IP literals only: no DNS.
    cfg = tmp_path / "m.toml"
    cfg.write_text('[milterd]\nauthserv_id = "mx.cli"\nmetrics_listen = "192.0.2.1:9899"\n')
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 2
    assert "[milterd] metrics_listen '192.0.2.1:9899': cannot listen on '192.0.2.1'" in res.stderr
    # A local address passes, even with its port taken (a running daemon holds it).
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        cfg.write_text(f'[milterd]\nauthserv_id = "mx.cli"\nmetrics_listen = "127.0.0.1:{port}"\n')
        assert milterd("config", "check", config=cfg).returncode == 0


def test_config_check_runs_worker_start_so_a_file_every_worker_refuses_fails(
    tmp_path: Path,
) -> None:
    # The daemon refuses such a file (exit 2) before any worker forks; config check passed
    # it, though the README says a file it passes starts (a review).
    cfg = tmp_path / "w.toml"
    cfg.write_text('[milterd]\nauthserv_id = "mx.cli"\n[plugins.t_mark]\nfail_worker_start = 1\n')
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 2, res.stdout
    assert "t_mark told to fail at worker_start" in res.stderr


def test_config_check_names_an_unknown_account_by_its_key(tmp_path: Path) -> None:
    cfg = tmp_path / "u.toml"
    cfg.write_text('[milterd]\nuser = "nosuchuser"\n')
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 2
    assert res.stderr.strip() == "milterd: [milterd] user: no user 'nosuchuser' on this host"


def test_config_check_runs_prefork_startup_so_a_missing_key_is_caught(tmp_path: Path) -> None:
    cfg = tmp_path / "dkim.toml"
    missing = tmp_path / "nope.key"
    cfg.write_text(
        f'[plugins.dkim]\n[plugins.dkim.keys.k]\nselector = "s"\nfile = "{missing}"\n'
        '[[plugins.dkim.signing]]\npattern = "example.org"\nkeys = ["k"]\n'
    )
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 2, res
    assert "plugin 'dkim': startup failed" in res.stderr and str(missing) in res.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: checks the privilege drop")
def test_config_check_as_root_checks_as_the_daemon_user_and_creates_nothing(
    tmp_path: Path,
) -> None:
    base = Path(tempfile.mkdtemp(dir="/var/tmp"))  # tmp_path's parents are root-only
    base.chmod(0o755)
    private = base / "root-only"
    private.mkdir(mode=0o700)
    cfg = tmp_path / "archive.toml"
    cfg.write_text(
        f'[milterd]\nuser = "nobody"\n[plugins.archive]\npath = "{private / "archive"}"\n'
    )
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 2, res
    assert "plugin 'archive': startup failed" in res.stderr and "Permission denied" in res.stderr
    assert not (private / "archive").exists()  # root created nothing nobody cannot use
    private.chmod(0o777)
    ok = milterd("config", "check", config=cfg)
    assert ok.returncode == 0, ok.stderr
    assert (private / "archive").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    shutil.rmtree(base)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: what root creates")
def test_config_check_as_root_without_a_user_creates_no_store(tmp_path: Path) -> None:
    """docs/operations.md has admins run config check as root with `user` unset (the unit
    starts milterd as milterd): stores it created would be root's, and the daemon could
    not write them (with archive required = true, every message 451)."""
    cfg = tmp_path / "stores.toml"
    cfg.write_text(
        f'[plugins.dmarc]\nhistory_db = "{tmp_path / "dmarc" / "history.sqlite"}"\n'
        f'[plugins.archive]\npath = "{tmp_path / "archive"}"\n'
    )
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 0, res.stderr
    assert "stores, if any, not checked" in res.stdout and "runuser -u milterd" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stores.toml"]


def test_plugins_lists_installed_enabled_order_hooks_and_broken_ones(config: Path) -> None:
    res = milterd("plugins", "--json", config=config)
    rows = {r["name"]: r for r in json.loads(res.stdout)}
    assert rows["example_header"]["enabled"] and rows["example_header"]["order"] == 2
    assert rows["example_header"]["distribution"] == "milterd-example-header"
    assert rows["authres"]["hooks"] == ["eom", "finalize", "config_schema", "startup"]
    assert not rows["t_mark"]["enabled"]
    assert "broken on purpose" in rows["t_broken"]["error"]
    res = milterd("plugins", "--hook", "envrcpt", config=config)
    assert "t_reject_rcpt" in res.stdout and "authres" not in res.stdout


def test_check_prints_and_writes_what_the_daemon_would_do(config: Path, tmp_path: Path) -> None:
    eml = tmp_path / "in.eml"
    eml.write_bytes(MSG)
    out = tmp_path / "out.eml"
    res = milterd(
        "check",
        str(eml),
        "--from",
        "a@example.org",
        "--rcpt",
        "b@example.com",
        "--rcpt",
        "reject-x@example.com",
        "--client-ip",
        "192.0.2.7",
        "--json",
        "--output",
        str(out),
        config=config,
    )
    report = json.loads(res.stdout)
    assert report["verdict"] == "continue"
    assert report["refused_recipients"] == {"reject-x@example.com": "reject"}
    assert [c["op"] for c in report["changes"]] == ["insheader", "addheader"]
    assert set(report["plugin_ms"]) == {"t_reject_rcpt", "example_header", "authres"}
    delivered = out.read_bytes()
    assert delivered.startswith(b"Authentication-Results: mx.cli; none\r\nFrom: a@example.org\r\n")
    assert delivered.endswith(b"Subject: hi\r\nX-Milterd-Example: from cli\r\n\r\nHello.\r\n")
    text = milterd(
        "check", str(eml), "--from", "a@example.org", "--rcpt", "b@example.com", config=config
    )
    assert "verdict: continue" in text.stdout and "example_header" in text.stdout


def test_plugins_contribute_commands() -> None:
    res = milterd("t-mark-echo", "hello", config=Path("/x.toml"))
    assert res.returncode == 0 and res.stdout.strip() == "echo hello /x.toml"


def test_the_test_plugins_are_not_installed_where_make_run_runs_the_daemon() -> None:
    """Only the suite puts them on the path: an administrator's `milterd plugins` after
    `make run` (same virtual environment) lists no t_* plugin and no t-mark-echo."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", "/nonexistent.toml", "plugins"],
        capture_output=True, text=True, timeout=60, check=False, env=env, cwd="/",
    )
    assert res.returncode == 0 and "authres" in res.stdout, res
    assert "t_mark" not in res.stdout and "testplugins" not in res.stdout
    with_path = milterd("-c", "/nonexistent.toml", "plugins")
    assert "t_mark" in with_path.stdout  # the check above can fail


def test_a_plugin_whose_commands_hook_raises_does_not_break_the_cli(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(self: object, subparsers: object) -> None:
        raise ModuleNotFoundError("No module named 'half_written'")

    monkeypatch.setattr(Mark, "commands", hookimpl(broken))
    assert cli.main(["-c", "/nonexistent.toml", "plugins", "--hook", "envrcpt"]) == 0
    err = capsys.readouterr().err
    assert "plugin 't_mark' commands skipped: ModuleNotFoundError" in err


@pytest.mark.parametrize(
    "error", [OSError(28, "No space left on device"), ValueError("bad date"), KeyError("x")]
)
def test_a_tools_error_is_one_line_with_status_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: Exception
) -> None:
    def fail(args: object) -> int:
        raise error

    def commands(self: object, subparsers: Any) -> None:
        subparsers.add_parser("t-fail").set_defaults(fn=fail)

    monkeypatch.setattr(Mark, "commands", hookimpl(commands))
    if isinstance(error, KeyError):  # a bug, not a tool error: it still shows where it is
        with pytest.raises(KeyError):
            cli.main(["-c", "/nonexistent.toml", "t-fail"])
        return
    assert cli.main(["-c", "/nonexistent.toml", "t-fail"]) == 2
    assert capsys.readouterr().err == f"milterd t-fail: {error}\n"


def test_check_reports_who_decided_a_verdict_given_before_end_of_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A reject at MAIL (as SPF gives) names its plugin and the SMTP reply, as a reject at
    end of message does."""

    def envfrom(self: object) -> Reject:
        return Reject("550", "5.7.23", "SPF validation failed", reason="spf fail")

    monkeypatch.setattr(Mark, "envfrom", hookimpl(envfrom), raising=False)
    # check sets up the daemon's logging (no propagation): not in this process's tests.
    monkeypatch.setattr("milterd.logs.setup_logging", lambda *args: None)
    cfg = tmp_path / "m.toml"
    cfg.write_text("[plugins.t_mark]\n")
    eml = tmp_path / "in.eml"
    eml.write_bytes(MSG)
    assert cli.main(["-c", str(cfg), "check", str(eml), "--from", "a@example.org", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "reject" and report["stage"] == "envfrom"
    assert report["decided_by"] == "t_mark"
    assert report["reasons"] == [
        {
            "plugin": "t_mark",
            "verdict": "reject",
            "reason": "spf fail",
            "reply": "550 5.7.23 SPF validation failed",
        }
    ]
    assert cli.main(["-c", str(cfg), "check", str(eml), "--from", "a@example.org"]) == 0
    text = capsys.readouterr().out
    assert "verdict: reject (by t_mark at envfrom)\n" in text
    assert "  t_mark: reject 550 5.7.23 SPF validation failed spf fail\n" in text


def test_check_names_the_plugin_that_refused_every_recipient(config: Path, tmp_path: Path) -> None:
    eml = tmp_path / "in.eml"
    eml.write_bytes(MSG)
    res = milterd("check", str(eml), "--rcpt", "reject-x@example.com", "--json", config=config)
    report = json.loads(res.stdout)
    assert report["verdict"] == "reject" and report["stage"] == "envrcpt"
    assert report["decided_by"] == "t_reject_rcpt"
    assert report["reasons"][0]["reply"] == "550 5.1.1 Recipient refused by test plugin"
    text = milterd("check", str(eml), "--rcpt", "reject-x@example.com", config=config).stdout
    assert "verdict: reject (by t_reject_rcpt at envrcpt)" in text
    assert "recipient reject-x@example.com: reject 550 5.1.1 Recipient refused" in text


def test_top_level_help_is_plain_text_and_names_every_command() -> None:
    res = milterd("--help")
    assert res.returncode == 0 and "``" not in res.stdout
    for command in ("run", "plugins", "config", "check", "t-mark-echo"):
        assert command in res.stdout
    check = milterd("check", "--help").stdout
    for option in ("--client-name", "--verbose", "standard input", "postmaster@localhost"):
        assert option in check


def test_plugins_warns_when_the_config_cannot_be_read_and_still_lists(tmp_path: Path) -> None:
    res = milterd("plugins", "--json", config=tmp_path / "missing.toml")
    assert res.returncode == 0, res.stderr
    assert f"warning: {tmp_path / 'missing.toml'}: cannot read: No such file" in res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)}  # stdout stays valid JSON
    assert "authres" in rows and not any(r["enabled"] for r in rows.values())
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.example_header\n")
    res = milterd("plugins", config=bad)  # unreadable is a warning, broken an error
    assert res.returncode == 2 and "not valid TOML" in res.stderr


def test_config_check_warns_about_the_sections_of_disabled_plugins(tmp_path: Path) -> None:
    # Never loaded by the daemon: a typo there would surface only the day it is enabled.
    cfg = tmp_path / "dis.toml"
    cfg.write_text(
        '[plugins.authres]\n[plugins.spf]\nenabled = false\nHELO_rejct = "Fail"\n'
        "[plugins.dkmi]\nenabled = false\n"
    )
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 0 and "pipeline: authres" in res.stdout
    assert f"warning: [plugins.spf] (disabled): {cfg}: [plugins.spf] HELO_rejct: unknown key" in (
        res.stderr
    )
    assert "[plugins.dkmi] (disabled): no plugin 'dkmi' is installed; did you mean " in res.stderr


def test_check_refuses_a_client_ip_that_is_not_one(tmp_path: Path, config: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(MSG)
    res = milterd("check", str(msg), "--client-ip", "notanip", config=config)
    assert res.returncode == 2 and "not an IP address: 'notanip'" in res.stderr


def test_config_check_names_the_authserv_id_and_warns_about_a_bare_one(tmp_path: Path) -> None:
    cfg = tmp_path / "m.toml"
    cfg.write_text('[milterd]\nauthserv_id = "localhost"\n[plugins.authres]\n')
    res = milterd("config", "check", config=cfg)
    assert res.returncode == 0 and "authserv_id localhost" in res.stdout
    assert "authserv_id 'localhost' is not a domain name" in res.stderr
    cfg.write_text('[milterd]\nauthserv_id = "mx.example.org"\n[plugins.authres]\n')
    res = milterd("config", "check", config=cfg)
    assert "authserv_id mx.example.org" in res.stdout and "warning" not in res.stderr


def test_a_closed_pipe_is_no_error(config: Path) -> None:
    res = subprocess.run(
        f"{sys.executable} -m milterd.cli -c {config} plugins | head -c1",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert "Broken pipe" not in res.stderr and "Traceback" not in res.stderr


def test_listing_the_commands_imports_no_prometheus_client() -> None:
    # `milterd run` sets prometheus-client's multiprocess directory before importing it;
    # a plugin's command module that imported the core at load (scoring's bayes commands
    # importing milterd.testing) imported it first, and /metrics served nothing.
    code = (
        "import sys, contextlib, io\n"
        "from milterd import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    cli.main(['--help'])\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.stdout.strip() == "False", out.stderr
