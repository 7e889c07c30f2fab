"""The ``milterd`` command line: run, plugins, config check, check."""
# (The module docstring is for the docs; --help prints DESCRIPTION, plain text.)

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = os.environ.get("MILTERD_CONFIG", "/etc/milterd/milterd.toml")
DESCRIPTION = (
    "milterd, a milter daemon driven by plugins: run the daemon, list the installed "
    "plugins, check the configuration, or run one message through the pipeline. "
    "Installed plugins add their own commands (listed below)."
)
EPILOG = "Run 'milterd COMMAND --help' for a command's options."


def _cmd_run(args: argparse.Namespace) -> int:
    from milterd.daemon import run

    return run(args.config)


def _cmd_config_check(args: argparse.Namespace) -> int:
    from milterd.config import ConfigError, check_accounts, check_metrics_listen, load
    from milterd.pipeline import Runtime

    try:
        config = load(args.config)
        check_accounts(config.milterd)  # before becoming the user: name the key if unknown
        check_metrics_listen(config.milterd)
        # Root with no user to become: the daemon will likely run as another user (the
        # systemd unit's User=milterd), so the stores (archive, DMARC history, Bayes) must
        # not be created here, owned by root, where that user could not write them:
        # plugins start as in a dry run, which opens nothing that is missing.
        as_root = os.geteuid() == 0 and config.milterd.user is None and config.milterd.group is None
        rt = Runtime(config, dry_run=as_root)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return 2

    # What the supervisor does before forking (load keys, compile rules, check stores),
    # the other plugins' startup and every worker_start (then shutdown), so that a config
    # that passes here starts.
    # As the daemon's user: run as root, a check must not create files root then owns.
    def check() -> None:
        rt.start("prefork")
        # worker_start too, as the daemon's own check does: a file every worker would
        # refuse must not pass here. "check": nothing meant for worker 0 alone starts.
        os.environ["MILTERD_WORKER"] = "check"
        rt.check_startup(worker=True)

    if _as_daemon_user(config.milterd.user, config.milterd.group, check):
        return 2
    from milterd.registry import check_disabled

    for problem in check_disabled(config):  # enabling it later would fail: say so now
        print(f"milterd: warning: {problem}", file=sys.stderr)
    print(f"{args.config}: OK")
    print(f"  socket {config.milterd.socket}, {config.milterd.worker_count()} worker(s)")
    aid = config.milterd.authserv_id
    print(f"  authserv_id {aid}")
    if "." not in aid:  # the host's FQDN as Python finds it: often "localhost" in a VM
        print(
            f"milterd: warning: authserv_id {aid!r} is not a domain name: set [milterd] "
            "authserv_id to this host's name (Authentication-Results are judged by it)",
            file=sys.stderr,
        )
    print("  pipeline: " + (" -> ".join(p.name for p in rt.plugins) or "(no plugins enabled)"))
    if as_root:
        print(
            "  plugins' stores, if any, not checked (run as root, no [milterd] user: none "
            "created or written, as the daemon's user could not write what root made); to "
            "check them too, run this as that user, e.g. runuser -u milterd -- milterd -c "
            "FILE config check"
        )
    return 0


def _as_daemon_user(user: str | None, group: str | None, fn: Callable[[], None]) -> bool:
    """Run ``fn`` with the daemon's privileges (in a child process when we are root and
    the config names a user or group). Returns True when it failed (reason printed)."""
    from milterd.config import ConfigError

    if os.geteuid() != 0 or (user is None and group is None):
        try:
            fn()
        except ConfigError as e:
            print(f"milterd: {e}", file=sys.stderr)
            return True
        return False
    from milterd.daemon import _drop_privileges

    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        status = 2  # anything but a clean return is a failure
        try:
            _drop_privileges(user, group)
            fn()
            status = 0
        except Exception as e:  # ConfigError, or the user/group unknown (KeyError), ...
            print(f"milterd: {e}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    return status != 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from milterd import hookspecs
    from milterd.config import Config, ConfigError, decode, loads
    from milterd.registry import installed, load_entry_point

    # An inventory of what is installed, also wanted before any config exists: a config
    # that cannot be read is a warning (none shown as enabled), one that is invalid an error.
    try:
        data = Path(args.config).read_bytes()
    except OSError as e:
        print(
            f"milterd: warning: {args.config}: cannot read: {e.strerror}; "
            "listing installed plugins, none enabled",
            file=sys.stderr,
        )
        config = Config()
    else:
        try:
            config = loads(decode(data, args.config), args.config)
        except ConfigError as e:
            print(f"milterd: {e}", file=sys.stderr)
            return 2
    enabled = config.enabled_plugins()
    rows: list[dict[str, Any]] = []
    for p in installed():
        row: dict[str, Any] = {
            "name": p.name,
            "distribution": p.dist,
            "version": p.version,
            "entry_point": p.value,
            "enabled": p.name in enabled,
            "order": enabled.index(p.name) + 1 if p.name in enabled else None,
        }
        try:
            obj = load_entry_point(p.name)
            row["hooks"] = [
                h
                for h in (*hookspecs.STAGES, *hookspecs.LIFECYCLE)
                if callable(getattr(obj, h, None)) and hasattr(getattr(obj, h), "milterd_impl")
            ]
        except ConfigError as e:
            row["error"] = str(e)
        rows.append(row)
    missing = [n for n in enabled if n not in {r["name"] for r in rows}]
    for n in missing:
        rows.append({"name": n, "enabled": True, "error": "enabled in config but not installed"})
    if args.hook:
        rows = [r for r in rows if args.hook in r.get("hooks", [])]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in sorted(rows, key=lambda r: (r.get("order") or 999, r["name"])):
        state = (
            f"enabled #{r['order']}"
            if r.get("enabled") and r.get("order")
            else ("ENABLED" if r.get("enabled") else "installed")
        )
        print(f"{r['name']:<16} {state:<12} {r.get('distribution', '-')} {r.get('version', '')}")
        if "hooks" in r:
            print(f"{'':16} hooks: {', '.join(r['hooks']) or '-'}")
        if "error" in r:
            print(f"{'':16} ERROR: {r['error']}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from milterd.actions import Reject, TempFail, Verdict
    from milterd.config import ConfigError, load
    from milterd.dns import StubResolver
    from milterd.logs import setup_logging
    from milterd.testing import Harness

    try:
        raw = Path(args.file).read_bytes() if args.file != "-" else sys.stdin.buffer.read()
    except OSError as e:
        print(f"milterd: {args.file}: {e.strerror}", file=sys.stderr)
        return 2
    try:
        config = load(args.config)
        setup_logging("warning" if not args.verbose else "debug", "text")
        notes = _dry_run_notes(args.verbose)
        # A dry run: the plugins decide as the daemon would, but store, learn, record and
        # send nothing (run as root, a file created here would be root's).
        harness = Harness(config, resolver=StubResolver(config.dns), dry_run=True)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return 2
    with harness:
        out = harness.send(
            raw,
            sender=args.sender,
            recipients=args.rcpt or ["postmaster@localhost"],
            client_ip=args.client_ip,
            helo=args.helo,
            auth=args.auth,
            client_name=args.client_name,
        )
    if args.output and out.delivered is not None:
        Path(args.output).write_bytes(out.delivered)

    def reply(v: Verdict) -> dict[str, str]:
        """The SMTP reply a Reject or TempFail makes the MTA give."""
        if not isinstance(v, Reject | TempFail):
            return {}
        return {"reply": f"{v.code} {v.xcode or ''} {v.text}".replace("  ", " ")}

    # An early verdict (before end of message) has its decision too: plugin and reasons.
    reasons = out.decision.reasons or (
        [(out.decided_by or "milterd", out.early)] if out.early is not None else []
    )
    report: dict[str, Any] = {
        "verdict": out.verdict,
        "stage": out.stage,
        "decided_by": out.decided_by,
        "reasons": [
            {"plugin": p, "verdict": v.word, "reason": v.reason, **reply(v)} for p, v in reasons
        ],
        "refused_recipients": {r: v.word for r, v in out.refused.items()},
        "changes": [
            {
                k: v
                for k, v in (
                    ("op", o.kind),
                    ("plugin", o.plugin),
                    ("name", o.name),
                    ("index", o.index),
                    ("value", o.value),
                    ("address", o.address),
                )
                if v not in ("", None)
            }
            for o in out.ops
        ],
        "results": [
            {
                "method": r.method,
                "result": r.result,
                "reason": r.reason,
                "properties": dict(r.properties),
            }
            for r in out.results
        ],
        "symbols": [
            {"name": s.name, "score": s.score, "description": s.description} for s in out.symbols
        ],
        "score": out.score,
        "errors": [{"plugin": p, "stage": s, "error": d} for p, s, d in out.errors],
        "conflicts": out.decision.conflicts,
        "plugin_ms": {k: round(v * 1000, 3) for k, v in out.timings.items()},
        "notes": out.notes,  # the plugins' ctx.note, as the summary line has them
        "dry_run": [{"plugin": p, "note": n} for p, n in notes],
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        who, where = report["decided_by"], (f" at {out.stage}" if out.stage != "eom" else "")
        print(f"verdict: {report['verdict']}" + (f" (by {who}{where})" if who else where))
        for r in report["reasons"]:
            who = r["plugin"] or "milterd"
            print(f"  {who}: {r['verdict']} {r.get('reply', '')} {r['reason']}".rstrip())
        for rcpt, v in out.refused.items():
            print(f"  recipient {rcpt}: {v.word} {reply(v).get('reply', '')}".rstrip())
        print("changes:" + ("" if report["changes"] else " none"))
        for c in report["changes"]:
            print(
                "  " + " ".join(f"{k}={v!r}" if k == "value" else f"{k}={v}" for k, v in c.items())
            )
        print("results:" + ("" if report["results"] else " none"))
        for r in out.results:
            props = " ".join(f"{k}={v}" for k, v in r.properties)
            print(f"  {r.method}={r.result} {props}".rstrip())
        print(f"score: {report['score']:g}")
        for s in out.symbols:
            print(f"  {s.name} {s.score:+g} {s.description}".rstrip())
        for n in out.notes:
            print(f"note: {n}")
        for err in report["errors"]:
            print(f"error: {err['plugin']} at {err['stage']}: {err['error']}")
        for c in report["conflicts"]:
            print(f"conflict: {c}")
        print(
            "time: " + (", ".join(f"{k} {v:.2f} ms" for k, v in report["plugin_ms"].items()) or "-")
        )
        print("dry run: nothing stored, learned, recorded or sent")
        for p, n in notes:
            print(f"  {p}: {n.removeprefix('dry run: ')}")
        if args.output:
            print(
                f"written: {args.output}"
                if out.delivered is not None
                else "not written: the message would not be delivered"
            )
    return 0


def _dry_run_notes(verbose: bool) -> list[tuple[str, str]]:
    """Collect what the plugins log about what a dry run skipped (INFO lines starting
    with ``dry run:``) as (plugin, text), for ``milterd check`` to print; the stderr log
    keeps its level."""
    import logging

    notes: list[tuple[str, str]] = []

    class Notes(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if text.startswith("dry run:"):
                who = getattr(record, "plugin", "") or record.name.removeprefix("milterd.")
                notes.append((who.split(".")[0], text))

    root = logging.getLogger("milterd")
    if not verbose:  # the notes are INFO records: let them reach the collector only
        for h in root.handlers:
            h.setLevel(logging.WARNING)
        root.setLevel(logging.INFO)
    root.addHandler(Notes(logging.INFO))
    return notes


def _ip_address(text: str) -> str:
    """An argparse type: an IPv4 or IPv6 address (as given)."""
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an IP address: {text!r}") from None
    return text


def parser() -> tuple[argparse.ArgumentParser, Any]:
    ap = argparse.ArgumentParser(prog="milterd", description=DESCRIPTION, epilog=EPILOG)
    ap.add_argument("-V", "--version", action="version", version=_version())
    ap.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"config file (default {DEFAULT_CONFIG}; env MILTERD_CONFIG)",
    )
    sub = ap.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="run the daemon in the foreground").set_defaults(fn=_cmd_run)

    p = sub.add_parser("plugins", help="installed plugins: version, enabled, order, hooks")
    p.add_argument("--json", action="store_true")
    p.add_argument("--hook", help="only plugins implementing this hook")
    p.set_defaults(fn=_cmd_plugins)

    cfg = sub.add_parser("config", help="configuration commands")
    cfg_sub = cfg.add_subparsers(dest="config_command", required=True)
    cfg_sub.add_parser(
        "check", help="validate the config file and every enabled plugin's section"
    ).set_defaults(fn=_cmd_config_check)

    p = sub.add_parser(
        "check",
        help="run one message through the pipeline in process",
        description="Run one message through the configured pipeline in process (DNS from "
        "[dns]) and print the verdict, who decided it, each plugin's verdict, the changes, "
        "the results, the score, the errors and each plugin's time.",
    )
    p.add_argument("file", help="the message (RFC 5322), or - for standard input")
    p.add_argument(
        "--from", dest="sender", default="", help="envelope sender (default '': the null <>)"
    )
    p.add_argument(
        "--rcpt",
        action="append",
        help="envelope recipient, repeatable (default postmaster@localhost)",
    )
    p.add_argument("--client-ip", default="127.0.0.1", type=_ip_address,
                   help="client address (default 127.0.0.1)")  # fmt: skip
    p.add_argument("--client-name", default=None, help="client host name (default [IP])")
    p.add_argument("--helo", default="localhost", help="HELO name (default localhost)")
    p.add_argument("--auth", default=None, help="SASL login name, as {auth_authen}")
    p.add_argument("--output", help="write the message as it would be delivered")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level to stderr")
    p.set_defaults(fn=_cmd_check)
    return ap, sub


def _version() -> str:
    """``milterd X (pymilter Y, Python Z)``: what a bug report needs first."""
    import importlib.metadata as md
    import platform

    from milterd import __version__

    try:
        pymilter = md.version("pymilter")
    except md.PackageNotFoundError:
        pymilter = "not installed"
    return f"milterd {__version__} (pymilter {pymilter}, Python {platform.python_version()})"


def _plugin_commands(sub: Any) -> None:
    """Let every installed plugin add its subcommands (``commands`` hook)."""
    from milterd.config import ConfigError
    from milterd.registry import (
        contained,
        exception_text,
        installed,
        load_entry_point,
        new_manager,
    )

    pm = new_manager()
    for p in installed():
        try:
            obj = load_entry_point(p.name)
        except ConfigError:
            continue  # installed but broken: `milterd plugins` reports it; not enabled = fine
        try:
            if callable(getattr(obj, "commands", None)):
                pm.register(obj() if isinstance(obj, type) else obj, name=p.name)
        except BaseException as e:  # a broken plugin must not break the CLI (sys.exit too)
            if not contained(e):
                raise
            print(
                f"milterd: warning: plugin {p.name!r} skipped: {exception_text(e)}",
                file=sys.stderr,
            )
    for impl in pm.hook.commands.get_hookimpls():
        try:
            impl.function(subparsers=sub)
        except BaseException as e:  # one plugin's broken command must not break `milterd run`
            if not contained(e):
                raise
            print(
                f"milterd: warning: plugin {impl.plugin_name!r} commands skipped: "
                f"{exception_text(e)}",
                file=sys.stderr,
            )


def main(argv: list[str] | None = None) -> int:
    """Run one command. A tool's error that escapes it (a bad config, a path, a value, a
    database) is one line on stderr and exit status 2, not a traceback. ``run`` is left
    alone: the daemon reports its own errors, and its exit status tells systemd whether a
    restart can help."""
    if "run" in (sys.argv[1:] if argv is None else argv):
        # Until the supervisor installs its handlers, a SIGHUP (an early `systemctl
        # reload`) would kill the daemon while it imports the plugins: ignore it till then.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ap, sub = parser()
    _plugin_commands(sub)
    args = ap.parse_args(argv)
    # Whether -c named a file (then it must exist) or the default stands (a tool that can
    # work without a config, e.g. `dmarc report --db`, may go on when it is absent).
    args.config_given = args.config is not None
    if args.config is None:
        args.config = DEFAULT_CONFIG
    if args.command == "run":
        return int(args.fn(args))
    from milterd.config import ConfigError

    try:
        return int(args.fn(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `milterd ... | head`: the reader is gone, nothing to say
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the exit's flush does not fail again
        return 141
    except (ConfigError, OSError, ValueError, sqlite3.Error) as e:
        print(f"milterd {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
