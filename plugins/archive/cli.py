"""``milterd archive ...``: search, show, export, verify, prune, release.

Every subcommand reads ``[plugins.archive]`` from the ``-c`` config file (the section need
not be enabled); ``--path DIR`` overrides the store directory of the ``files`` backend.
Exit status: 0 success, 1 problems found / nothing matched / delivery failed, 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import calendar
import json
import mailbox
import smtplib
import sys
import time
from pathlib import Path
from typing import Any

from milterd import ConfigError, load_config

__all__ = ["add_commands", "parse_when"]


def parse_when(text: str) -> float:
    """``2026-11-22``, ``2026-11-22T10:00[:00]`` (UTC) or a duration ago (``7d``, ``12h``)."""
    from . import parse_duration

    for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d"):
        try:
            return float(calendar.timegm(time.strptime(text, fmt)))
        except ValueError:
            continue
    return time.time() - float(parse_duration(text))


def _config(args: argparse.Namespace) -> Any:
    from . import ArchiveConfig

    options: dict[str, Any] = {}
    try:
        cfg = load_config(args.config)
        options = cfg.plugin_options("archive")
    except ConfigError as e:
        if args.path is None:
            raise
        print(f"warning: {e}; using --path", file=sys.stderr)
    if args.path is not None:
        options["path"] = args.path
    return ArchiveConfig(**options)


def _backend(args: argparse.Namespace, readonly: bool = True) -> Any:
    from . import open_backend

    return open_backend(_config(args), readonly=readonly)


def _query(args: argparse.Namespace) -> Any:
    from .store import Query

    return Query(
        sender=args.sender,
        recipient=args.recipient,
        subject=args.subject,
        message_id=args.message_id,
        since=parse_when(args.since) if args.since else None,
        until=parse_when(args.until) if args.until else None,
        verdict=args.verdict,
        queue_id=args.queue_id,
        limit=args.limit,
    )


def _add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="sender", help="envelope sender address, or @domain")
    p.add_argument("--to", dest="recipient", help="any envelope recipient address, or @domain")
    p.add_argument("--subject", help="substring of the Subject")
    p.add_argument("--message-id", help="exact Message-ID (with or without <>)")
    p.add_argument("--since", help="YYYY-MM-DD[THH:MM[:SS]] UTC, or a duration ago (7d)")
    p.add_argument("--until", help="idem, exclusive")
    p.add_argument(
        "--verdict",
        choices=["continue", "accept", "quarantine", "tempfail", "reject", "discard"],
    )
    p.add_argument("--queue-id")
    p.add_argument("--limit", type=int)


def _row(rec: Any) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.received))
    rcpts = ",".join(rec.recipients)
    return (
        f"{rec.id:<30} {when:<19} {rec.verdict:<10} {rec.sender[:30]:<30} "
        f"{rcpts[:40]:<40} {rec.subject[:40]}"
    )


def cmd_search(args: argparse.Namespace) -> int:
    store = _backend(args)
    records = store.search(_query(args))
    if args.json:
        for r in records:
            print(json.dumps(r.as_dict(), sort_keys=True))
    else:
        print(f"{'ID':<30} {'RECEIVED (UTC)':<19} {'VERDICT':<10} {'FROM':<30} {'TO':<40} SUBJECT")
        for r in records:
            print(_row(r))
        print(f"{len(records)} message(s)")
    return 0 if records else 1


def cmd_show(args: argparse.Namespace) -> int:
    store = _backend(args)
    rec = store.get(args.id)
    if rec is None:
        print(f"{args.id}: not in the archive", file=sys.stderr)
        return 1
    if args.raw:
        sys.stdout.buffer.write(store.read(rec, args.copy))
        return 0
    if args.json:
        print(json.dumps(rec.as_dict(), sort_keys=True, indent=2))
        return 0
    d = rec.as_dict()
    for k in (
        "id", "received_iso", "verdict", "direction", "sender", "recipients", "client_address",
        "client_name", "helo", "auth_user", "queue_id", "message_id", "subject", "date",
        "score", "results", "size", "sha256",
    ):  # fmt: skip
        v = d[k]
        print(f"{k + ':':<16} {', '.join(v) if isinstance(v, list) else v}")
    for kind, c in rec.copies.items():
        print(f"{'copy ' + kind + ':':<16} {c.path} ({c.size} bytes, sha256 {c.sha256})")
    return 0


def _select(store: Any, args: argparse.Namespace) -> list[Any]:
    if args.id:
        rec = store.get(args.id)
        return [rec] if rec is not None else []
    return list(store.search(_query(args)))


def cmd_export(args: argparse.Namespace) -> int:
    store = _backend(args)
    records = _select(store, args)
    if not records:
        print("nothing matched", file=sys.stderr)
        return 1
    if args.mbox:
        box = mailbox.mbox(args.mbox, create=True)
        box.lock()
        try:
            for rec in records:
                data = store.read(rec, args.copy).replace(b"\r\n", b"\n")
                msg = mailbox.mboxMessage(data)
                msg.set_from(rec.sender or "MAILER-DAEMON", time.gmtime(rec.received))
                box.add(msg)
            box.flush()
        finally:
            box.unlock()
            box.close()
    else:
        out = Path(args.eml)
        out.mkdir(parents=True, exist_ok=True)
        for rec in records:
            (out / f"{rec.id}.eml").write_bytes(store.read(rec, args.copy))
    print(f"exported {len(records)} message(s)", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _backend(args)
    problems = store.verify()
    for p in problems:
        if args.json:
            print(json.dumps({"kind": p.kind, "id": p.id, "path": p.path, "detail": p.detail}))
        else:
            print(f"{p.kind}: {p.id or '-'} {p.path}: {p.detail}")
    if not args.json:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import parse_duration, prune

    cfg = _config(args)
    age_text = args.older_than or cfg.retention
    if not age_text:
        print("give --older-than DURATION (or set retention in the config)", file=sys.stderr)
        return 2
    store = _backend(args, readonly=False)
    age = parse_duration(age_text)
    if args.dry_run:
        ids = store.older_than(time.time() - age)
        for i in ids:
            print(i)
        print(f"would prune {len(ids)} message(s)", file=sys.stderr)
        return 0
    n = prune(store, age)
    print(f"pruned {n} message(s)", file=sys.stderr)
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _backend(args)
    rec = store.get(args.id)
    if rec is None:
        print(f"{args.id}: not in the archive", file=sys.stderr)
        return 1
    if rec.verdict not in ("quarantine", "reject", "discard", "tempfail") and not args.force:
        print(f"{args.id}: verdict {rec.verdict}: nothing to release (--force)", file=sys.stderr)
        return 1
    data = store.read(rec, args.copy)
    host = args.host or cfg.release_host
    port = args.port or cfg.release_port
    sender = args.sender if args.sender is not None else (cfg.release_from or rec.sender)
    rcpts = args.to or rec.recipients
    try:
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.ehlo_or_helo_if_needed()
            refused = s.sendmail(sender, rcpts, data)
    except (OSError, smtplib.SMTPException) as e:
        print(f"{args.id}: release to {host}:{port} failed: {e}", file=sys.stderr)
        return 1
    for r, (code, text) in refused.items():
        print(f"{r}: refused {code} {text.decode(errors='replace')}", file=sys.stderr)
    ok = [r for r in rcpts if r not in refused]
    print(f"{args.id}: released to {', '.join(ok)} via {host}:{port}")
    return 0 if ok else 1


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("archive", help="search, verify, export, prune, release")
    p.set_defaults(fn=lambda a: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="archive_cmd")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--path", help="archive directory (overrides the config)")
        sp.set_defaults(fn=fn)
        parser: argparse.ArgumentParser = sp
        return parser

    s = add("search", cmd_search, "find archived messages")
    _add_query_args(s)
    s.add_argument("--json", action="store_true", help="one JSON object a line")

    s = add("show", cmd_show, "one message's metadata (or --raw bytes)")
    s.add_argument("id")
    s.add_argument("--json", action="store_true")
    s.add_argument("--raw", action="store_true", help="write the stored bytes to stdout")
    s.add_argument("--copy", choices=["delivered", "received"])

    s = add("export", cmd_export, "write messages to an mbox file or .eml files")
    s.add_argument("id", nargs="?", help="one message; or select with the query options")
    _add_query_args(s)
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--mbox", metavar="FILE")
    g.add_argument("--eml", metavar="DIR")
    s.add_argument("--copy", choices=["delivered", "received"])

    s = add("verify", cmd_verify, "check every file against the index")
    s.add_argument("--json", action="store_true")

    s = add("prune", cmd_prune, "delete messages older than a duration")
    s.add_argument("--older-than", metavar="DURATION", help="e.g. 365d (default: retention)")
    s.add_argument("--dry-run", action="store_true")

    s = add("release", cmd_release, "re-inject a quarantined or rejected copy through SMTP")
    s.add_argument("id")
    s.add_argument("--to", action="append", metavar="ADDRESS", help="default: the recipients")
    s.add_argument("--from", dest="sender", help="envelope sender (default: the original)")
    s.add_argument("--host", help="SMTP host (default: release_host)")
    s.add_argument("--port", type=int, help="SMTP port (default: release_port)")
    s.add_argument("--copy", choices=["delivered", "received"])
    s.add_argument("--force", action="store_true", help="also release delivered mail")
