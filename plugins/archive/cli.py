"""``milterd archive ...``: search, show, export, verify, prune, release.

Every subcommand reads ``[plugins.archive]`` from the ``-c`` config file (the section need
not be enabled); ``--path DIR`` overrides the store directory of the ``files`` backend.
No subcommand creates an archive: a path without an index is an error (only the daemon
creates one). Exit status: 0 success, 1 problems found / nothing matched / a stored copy
failed its check / delivery failed, 2 usage, configuration or path error. Errors are
one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import smtplib
import sqlite3
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from milterd import ConfigError, load_config

from ..cliargs import port_number
from .store import CopyError, StoreError, message_id_key

__all__ = ["CommandError", "add_commands", "parse_when"]

OUTPUT_MODE = 0o640  # exported files: as the archive's own copies


class CommandError(Exception):
    """A subcommand cannot go on: the message goes to stderr as one line, ``status`` is
    the exit status (2 usage/configuration/path, 1 failed)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``fn`` with its errors turned into one line on stderr and an exit status: a copy
    that fails its check (CopyError) 1, configuration, path and value errors 2."""

    def run(args: argparse.Namespace) -> int:
        where = f"milterd archive {getattr(args, 'archive_cmd', '') or ''}".rstrip()
        try:
            return fn(args)
        except CommandError as e:
            status, msg = e.status, str(e)
        except CopyError as e:
            status, msg = 1, str(e)
        except BrokenPipeError:  # `... | head`: milterd's main ends quietly (141)
            raise
        except (ConfigError, StoreError, ValueError, OSError, sqlite3.Error) as e:
            status, msg = 2, str(e) or type(e).__name__
        print(f"{where}: {_safe(msg)}", file=sys.stderr)
        return status

    return run


def parse_when(text: str) -> float:
    """Epoch seconds for an ISO 8601 date or time (``2026-11-22``, ``2026-11-22T10:00``,
    ``2026-11-22 10:00:00``, ``2026-12-03T02:17:50Z``, ``...+01:00``: without a zone,
    UTC) or a duration ago (``7d``, ``12h``). Raises ValueError naming the value."""
    from . import AmbiguousDuration, parse_duration

    t = text.strip()
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        pass
    else:
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        return dt.timestamp()
    try:
        return time.time() - parse_duration(t)
    except AmbiguousDuration:  # "6m": its message says what to write instead
        raise
    except ValueError:
        raise ValueError(
            f"not a time: {text!r} (e.g. 2026-11-22, 2026-11-22T10:00:00Z, 7d, 12h)"
        ) from None


# Characters that would act on a terminal instead of showing: C0 and C1 controls (ESC
# sequences, CR, BS), DEL, line/paragraph separators and the bidirectional overrides.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _safe(text: Any) -> str:
    """``text`` for a terminal: control characters escaped (ESC as ``\\x1b``)."""

    def esc(m: re.Match[str]) -> str:
        c = ord(m.group())
        return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"

    return _CONTROL.sub(esc, str(text))


def _config(args: argparse.Namespace) -> Any:
    from . import ArchiveConfig

    conf = ArchiveConfig.model_validate({})
    try:
        conf = load_config(args.config).plugin_model("archive", ArchiveConfig)
    except ConfigError as e:
        if args.path is None:
            raise
        print(f"warning: {e}; using --path", file=sys.stderr)
    if args.path is not None:
        conf = conf.model_copy(update={"path": args.path})
    return conf


def _backend(args: argparse.Namespace, readonly: bool = True, cfg: Any = None) -> Any:
    """The configured store, which must exist (CommandError, status 2, otherwise)."""
    from . import open_backend

    if cfg is None:
        cfg = _config(args)
    try:
        return open_backend(cfg, readonly=readonly, create=False)
    except (StoreError, OSError, sqlite3.Error) as e:
        raise CommandError(f"cannot open the archive at {cfg.path}: {e}") from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return min(n, 2**63 - 1)  # SQLite's largest integer: more means "all" anyway


def _query(args: argparse.Namespace) -> Any:
    from .store import Query

    def when(option: str, text: str | None) -> float | None:
        if not text:
            return None
        try:
            return parse_when(text)
        except ValueError as e:
            raise CommandError(f"{option}: {e}") from None

    return Query(
        sender=args.sender,
        recipient=args.recipient,
        subject=args.subject,
        message_id=args.message_id,
        since=when("--since", args.since),
        until=when("--until", args.until),
        verdict=args.verdict,
        queue_id=args.queue_id,
        limit=args.limit,
    )


def _given(text: str) -> str:
    """A query value: an empty one (a script's unset variable) would match every message,
    and ``export`` would then write the whole archive."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value (leave the option out to match any)")
    return text


def _message_id(text: str) -> str:
    """``--message-id``: a value whose id is empty (``<>``, ``< >``) would match every
    message without a Message-ID, not the one meant."""
    if not message_id_key(_given(text)):
        raise argparse.ArgumentTypeError(f"no id in {text!r}")
    return text


def _archive_id(text: str) -> str:
    """An archive ID argument: an empty one (a script's unset variable) is refused, not
    taken as "no ID" (``export ""`` would otherwise write the whole archive)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty ID")
    return text


def _add_query_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--from", dest="sender", type=_given,
        help="envelope sender address, or @domain; <> for the null sender (bounces)",
    )  # fmt: skip
    p.add_argument(
        "--to", dest="recipient", type=_given, help="any envelope recipient address, or @domain"
    )
    p.add_argument("--subject", type=_given, help="substring of the (decoded) Subject")
    p.add_argument(
        "--message-id", type=_message_id, help="exact Message-ID (with or without <>)"
    )
    p.add_argument(
        "--since", type=_given,
        help="ISO 8601 date/time (UTC unless it has a zone), or a duration ago (7d)",
    )  # fmt: skip
    p.add_argument(
        "--until", type=_given,
        help="idem, exclusive: --until 2026-11-23 ends with 2026-11-22 (UTC)",
    )  # fmt: skip
    p.add_argument(
        "--verdict",
        choices=["continue", "accept", "quarantine", "tempfail", "reject", "discard"],
    )
    p.add_argument("--queue-id", type=_given)
    p.add_argument(
        "--limit", type=_positive, metavar="N", help="only the newest N (listed oldest first)"
    )


def _row(rec: Any) -> str:
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(rec.received))
    rcpts = _safe(",".join(rec.recipients))
    sender, subject = _safe(rec.sender), _safe(rec.subject)
    return (
        f"{rec.id:<30} {when:<19} {rec.verdict:<10} {sender[:30]:<30} "
        f"{rcpts[:40]:<40} {subject[:40]}"
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
        raise CommandError(f"{args.id}: not in the archive", 1)
    if args.raw:
        sys.stdout.buffer.write(store.read(rec, args.copy))  # checked before any byte
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
        print(f"{k + ':':<16} {_safe(', '.join(v) if isinstance(v, list) else v)}")
    for kind, c in rec.copies.items():
        print(f"{'copy ' + kind + ':':<16} {_safe(c.path)} ({c.size} bytes, sha256 {c.sha256})")
    return 0


def _select(store: Any, args: argparse.Namespace) -> list[Any]:
    if args.id is not None:
        rec = store.get(args.id)
        return [rec] if rec is not None else []
    return list(store.search(_query(args)))


_FROM_LINE = re.compile(rb"(?m)^(>*From )")
# White space, controls and anything not ASCII (mbox readers such as Python's mailbox
# decode the From_ line as ASCII).
_NOT_IN_FROM_LINE = re.compile(r"[\s\x00-\x1f\x7f-\U0010ffff]")


def mbox_entry(rec: Any, data: bytes) -> bytes:
    """One message as an mboxrd entry: ``From SENDER ASCTIME`` (the envelope sender, or
    MAILER-DAEMON for the null sender; white space, controls and non-ASCII in it as
    ``_``; the archive time in UTC), the message with CRLF as LF and every line matching
    ``>*From `` quoted with one more ``>``, a final line end, and a blank line. Nothing
    else is changed (bare CR, header spelling, MIME structure stay as stored)."""
    sender = _NOT_IN_FROM_LINE.sub("_", rec.sender) or "MAILER-DAEMON"
    sep = f"From {sender} {time.asctime(time.gmtime(rec.received))}\n"
    body = _FROM_LINE.sub(rb">\1", data.replace(b"\r\n", b"\n"))
    if not body.endswith(b"\n"):
        body += b"\n"
    return sep.encode("utf-8", "replace") + body + b"\n"


def _output(path: Path) -> Path:
    """``path``, checked for an export to write: it must be missing or a regular file.
    Raises CommandError (status 2) for anything else: a directory, a device, a FIFO or a
    socket is never replaced by the rename that writes the result, and a symbolic link
    is neither replaced nor followed (a link planted in a shared directory would make a
    root export overwrite whatever it points to with message content)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return path
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CommandError(f"cannot write {path}: a symbolic link (give the real path)")
    if not stat.S_ISREG(st.st_mode):
        raise CommandError(f"cannot write {path}: not a regular file")
    return path


@contextlib.contextmanager
def _replacing(
    path: Path, mode: int, owner: tuple[int, int] | None = None
) -> Iterator[IO[bytes]]:
    """A new file in ``path``'s directory that replaces ``path`` (rename) only when the
    block ends without an exception; otherwise it is removed and ``path`` untouched.
    Opening it raises CommandError (status 2: a path error), as does a ``path`` that is
    not a regular file (see :func:`_output`)."""
    path = _output(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e}") from None
    try:
        os.fchmod(fd, mode)
        if owner is not None:  # a user's mailbox stays the user's (root may export to it)
            try:
                os.fchown(fd, *owner)
            except OSError:  # not root: keep what may be kept (the group, say)
                for ids in ((owner[0], -1), (-1, owner[1])):
                    with contextlib.suppress(OSError):
                        os.fchown(fd, *ids)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _export_mbox(store: Any, records: list[Any], path: Path, kind: str | None) -> None:
    """Append the messages to the mbox ``path`` (created when missing). The result is
    written to a new file (a copy of the old contents first) renamed over ``path`` at the
    end: a failure leaves ``path`` as it was. One message in memory at a time."""
    mode, old_size = OUTPUT_MODE, 0
    owner: tuple[int, int] | None = None
    path = _output(path)
    with contextlib.suppress(FileNotFoundError):
        st = path.stat()
        mode, old_size, owner = stat.S_IMODE(st.st_mode), st.st_size, (st.st_uid, st.st_gid)
    with _replacing(path, mode, owner) as out:
        if old_size:
            with path.open("rb") as old:
                shutil.copyfileobj(old, out)
                old.seek(-min(2, old_size), os.SEEK_END)
                tail = old.read()
            # An mbox entry ends with a blank line before the next "From " line.
            if not tail.endswith(b"\n"):
                out.write(b"\n\n")
            elif tail != b"\n\n":
                out.write(b"\n")
        for rec in records:
            out.write(mbox_entry(rec, store.read(rec, kind)))


_QUERY_OPTIONS = ("sender", "recipient", "subject", "message_id", "since", "until", "verdict",
                  "queue_id", "limit")  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    given = [o for o in _QUERY_OPTIONS if getattr(args, o) is not None]
    if args.id is not None and given:
        names = ", ".join("--" + ("from" if o == "sender" else "to" if o == "recipient"
                                  else o.replace("_", "-")) for o in given)  # fmt: skip
        raise CommandError(f"give an ID or query options, not both ({names})")
    store = _backend(args)
    records = _select(store, args)
    if not records:
        raise CommandError("nothing matched", 1)
    try:
        if args.mbox:
            _export_mbox(store, records, Path(args.mbox), args.copy)
        else:
            out = Path(args.eml)
            try:
                out.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise CommandError(f"cannot create {out}: {e}") from None
            for rec in records:
                data = store.read(rec, args.copy)
                # The received copy as the store names it: both copies can sit side by side.
                name = f"{rec.id}.received.eml" if args.copy == "received" else f"{rec.id}.eml"
                with _replacing(out / name, OUTPUT_MODE) as f:
                    f.write(data)
    except OSError as e:  # writing the output (disk full...): the export failed
        raise CommandError(f"export failed: {e}", 1) from None
    print(f"exported {len(records)} message(s)", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _backend(args)
    problems = store.verify()
    for p in problems:
        if args.json:
            print(json.dumps({"kind": p.kind, "id": p.id, "path": p.path, "detail": p.detail}))
        else:
            where = f"{p.id or '-'} {_safe(p.path)}" if p.path else p.id or "-"
            print(f"{p.kind}: {where}: {_safe(p.detail)}")
    if not args.json:
        print(f"{len(problems)} problem(s)", file=sys.stderr)
    return 1 if problems else 0


def cmd_prune(args: argparse.Namespace) -> int:
    from . import PruneError, parse_duration, prune

    cfg = _config(args)
    age_text = args.older_than or cfg.retention
    if not age_text:
        raise CommandError("give --older-than DURATION (or set retention in the config)")
    try:
        age = parse_duration(age_text)
    except ValueError as e:
        raise CommandError(f"--older-than: {e}") from None
    # Writable, but never created: a wrong or unmounted path is an error, not a new archive.
    store = _backend(args, readonly=args.dry_run, cfg=cfg)
    if args.dry_run:
        ids = store.older_than(time.time() - age)
        for i in ids:
            print(i)
        print(f"would prune {len(ids)} message(s)", file=sys.stderr)
        return 0
    try:
        n = prune(store, age)
    except PruneError as e:  # the others are pruned: say so, and each failure
        for f in e.failures:
            print(f"milterd archive prune: {_safe(f)}", file=sys.stderr)
        print(f"pruned {e.pruned} message(s), {len(e.failures)} not", file=sys.stderr)
        return 1
    print(f"pruned {n} message(s)", file=sys.stderr)
    return 0


_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def cmd_release(args: argparse.Namespace) -> int:
    cfg = _config(args)
    store = _backend(args, cfg=cfg)
    rec = store.get(args.id)
    if rec is None:
        raise CommandError(f"{args.id}: not in the archive", 1)
    if rec.verdict not in ("quarantine", "reject", "discard", "tempfail") and not args.force:
        raise CommandError(f"{args.id}: verdict {rec.verdict}: nothing to release (--force)", 1)
    damage = getattr(store, "damage", None)  # the files store's; another may not have it
    if not args.to and damage is not None and (why := damage(rec.id)):
        # A damaged recipients column would be sent as one address: say so instead.
        raise CommandError(f"{args.id}: the index row is damaged ({why}); give --to", 1)
    data = store.read(rec, args.copy)  # CopyError (exit 1) rather than send other bytes
    host = args.host or cfg.release_host
    port = args.port if args.port is not None else cfg.release_port
    # release_from = "" is the null sender, as --from '' is (not "unset").
    sender = (
        args.sender
        if args.sender is not None
        else (cfg.release_from if cfg.release_from is not None else rec.sender)
    )
    rcpts = args.to or rec.recipients
    fail = f"{args.id}: release to {host}:{port} failed"
    try:
        with smtplib.SMTP(host, port, timeout=30) as s:
            s.ehlo_or_helo_if_needed()
            options: list[str] = []
            if not all(a.isascii() for a in [sender, *rcpts]):
                # Non-ASCII addresses (RFC 6531) need SMTPUTF8 in MAIL FROM.
                if not s.has_extn("smtputf8"):
                    raise CommandError(
                        f"{fail}: an address is not ASCII and the server does not offer SMTPUTF8",
                        1,
                    )
                options.append("SMTPUTF8")
            if _EIGHT_BIT.search(data) and s.has_extn("8bitmime"):
                options.append("BODY=8BITMIME")  # RFC 6152; without it: sent as it is
            refused = s.sendmail(sender, rcpts, data, mail_options=options)
    except (OSError, smtplib.SMTPException, UnicodeError, ValueError) as e:
        raise CommandError(f"{fail}: {e}", 1) from None
    for r, (code, text) in refused.items():
        print(f"{_safe(r)}: refused {code} {_safe(text.decode(errors='replace'))}", file=sys.stderr)
    ok = [r for r in rcpts if r not in refused]
    print(f"{args.id}: released to {_safe(', '.join(ok))} via {host}:{port}")
    # Some recipients refused: not done (1), so that a script sees it; the message went
    # to the others (listed above), so running it again with only the refused --to is safe.
    return 1 if refused else 0


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("archive", help="search, verify, export, prune, release")
    p.set_defaults(fn=lambda a: (p.print_help(), 2)[1])
    sub = p.add_subparsers(dest="archive_cmd")

    def add(name: str, fn: Any, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("--path", help="archive directory (overrides the config)")
        sp.set_defaults(fn=_guarded(fn))
        parser: argparse.ArgumentParser = sp
        return parser

    s = add("search", cmd_search, "find archived messages")
    _add_query_args(s)
    s.add_argument("--json", action="store_true", help="one JSON object a line")

    s = add("show", cmd_show, "one message's metadata (or --raw bytes)")
    s.add_argument("id", type=_archive_id)
    g = s.add_mutually_exclusive_group()
    g.add_argument("--json", action="store_true")
    g.add_argument("--raw", action="store_true", help="write the stored bytes to stdout")
    s.add_argument("--copy", choices=["delivered", "received"])

    s = add("export", cmd_export, "write messages to an mbox file or .eml files")
    s.add_argument(
        "id", nargs="?", type=_archive_id, help="one message; or select with the query options"
    )
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
    s.add_argument("id", type=_archive_id)
    s.add_argument("--to", action="append", metavar="ADDRESS", help="default: the recipients")
    s.add_argument("--from", dest="sender", help="envelope sender (default: the original)")
    s.add_argument("--host", help="SMTP host (default: release_host)")
    s.add_argument("--port", type=port_number, help="SMTP port (default: release_port)")
    s.add_argument("--copy", choices=["delivered", "received"])
    s.add_argument("--force", action="store_true", help="also release delivered mail")
