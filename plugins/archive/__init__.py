"""Built-in ``archive``: a durable, verifiable copy of every selected message.

* ``eom`` only remembers the message as received (headers + the core's spool).
* ``finalize`` (messages that will be delivered, including quarantined ones): the copy as
  delivered (every earlier plugin's changes applied; list ``archive`` last) and/or as
  received is written atomically and indexed *before* the MTA gets its answer. A failed
  write returns ``451 4.3.0`` with ``required = true``; with ``required = false`` the
  message passes and the error is logged.
* ``outcome`` (every message that reached end of message): the final verdict is stored;
  rejected, discarded and tempfailed messages are archived here when the rules select
  them (as received: nothing is delivered), and a copy written at ``finalize`` whose final
  verdict the rules do not select is removed again.

Nothing is written before ``finalize``/``outcome``, so aborted transactions leave nothing.
In a dry run (``milterd check``: ``services.dry_run``) the store is neither opened nor
created and nothing is written or pruned: the plugin logs at INFO what it would archive.
Storage is behind :class:`~milterd_plugins.archive.store.ArchiveBackend`.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.policy
import ipaddress
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from importlib.metadata import entry_points
from typing import Any, Literal

from pydantic import Field, field_validator

from milterd import (
    ConfigPath,
    Context,
    Message,
    PluginConfig,
    Services,
    TempFail,
    Verdict,
    hookimpl,
)

from .store import ArchiveBackend, FileStore, Record, StoreError, message_id_key, new_id

__all__ = [
    "ArchiveConfig",
    "ArchivePlugin",
    "PruneError",
    "Rule",
    "open_backend",
    "parse_duration",
    "prune",
    "selected",
]

VerdictWord = Literal["continue", "accept", "quarantine", "tempfail", "reject", "discard"]
VERDICTS: tuple[VerdictWord, ...] = (
    "continue",
    "accept",
    "quarantine",
    "tempfail",
    "reject",
    "discard",
)
DELIVERING: tuple[VerdictWord, ...] = ("continue", "accept", "quarantine")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*")
_UNITS = {"": 86400, "s": 1, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
BACKEND_GROUP = "milterd.archive_backends"
SLOW_THREADS = 8  # helper threads for the disk work of outcome()
PRUNER_JOIN_S = 2.0  # how long shutdown waits for the deletion under way (daemon.STOP_MARGIN)


class AmbiguousDuration(ValueError):
    """A duration whose unit could mean two things (``6m``: minutes or months?)."""


MIN_PRUNE_INTERVAL, MAX_PRUNE_INTERVAL = 60.0, 366 * 86400.0


def parse_duration(text: str) -> float:
    """``"90d"``, ``"12h"``, ``"2w"``, ``"1y"``, ``"30min"``, ``"45s"`` (bare number: days).

    There is no ``m``: minutes or months? In a retention setting that slip deletes mail,
    so it is refused with a hint rather than guessed."""
    m = _DURATION.fullmatch(text.lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (e.g. 90d, 12h, 2w, 1y)")
    number, unit = m.groups()
    if unit in ("m", "mo", "month", "months"):
        raise AmbiguousDuration(
            f"ambiguous duration {text!r}: write {number}min for minutes, or days for months "
            f"(e.g. 180d)"
        )
    if unit not in _UNITS:
        raise ValueError(f"not a duration: {text!r} (units: s, min, h, d, w, y; e.g. 90d)")
    return float(number) * _UNITS[unit]


def _check_patterns(v: list[str], null_sender: bool) -> list[str]:
    out = []
    for raw in v:
        p = raw.strip().lower()
        if p == "<>" and null_sender:  # the null sender (bounces), as Postfix's maps write it
            out.append(p)
            continue
        _local, at, domain = p.rpartition("@")
        if not p or p.count("@") > 1 or " " in p or (at and not domain):
            raise ValueError(f"invalid address pattern {raw!r}")
        labels = domain.removeprefix(".").split(".")
        if (
            "*" in p
            or "<" in p
            or ">" in p
            or not all(labels)
            or (at and domain.startswith("."))
        ):
            raise ValueError(
                f"address pattern {raw!r} can never match: patterns are an address "
                "(user@example.com), a domain (example.com, @example.com) or a domain "
                "and its subdomains (.example.com); no wildcards, angle brackets or empty "
                "labels" + (", and <> for the null sender" if null_sender else "")
            )
        out.append(p)
    return out


def _sender_patterns(v: list[str]) -> list[str]:
    return _check_patterns(v, null_sender=True)


def _recipient_patterns(v: list[str]) -> list[str]:
    return _check_patterns(v, null_sender=False)  # a recipient is never the null address


class Rule(PluginConfig):
    """One selection rule; every criterion given must match (empty = any)."""

    archive: bool = True  # false: a matching message is not archived
    direction: Literal["any", "inbound", "outbound"] = "any"
    senders: list[str] = []  # "user@example.com", "example.com", ".example.com" (subdomains)
    recipients: list[str] = []  # idem; matches when any envelope recipient matches
    verdicts: list[VerdictWord] = list(VERDICTS)

    _p = field_validator("senders")(_sender_patterns)
    _r = field_validator("recipients")(_recipient_patterns)


class ArchiveConfig(PluginConfig):
    path: ConfigPath = "/var/lib/milterd/archive"
    store: Literal["delivered", "received", "both"] = "delivered"
    compress: Literal["none", "zstd"] = "none"
    compress_level: int = Field(3, ge=1, le=19)
    required: bool = True  # a failed write tempfails a message that would be delivered
    fsync: bool = True  # fsync file and directory (off: faster, not crash-safe)
    index_synchronous: Literal["full", "normal"] = "full"
    rules: list[Rule] = []  # first match wins
    default: bool = True  # archive a message no rule matches ...
    verdicts: list[VerdictWord] = list(DELIVERING)  # ... when its verdict is one of these
    retention: str = ""  # e.g. "365d": older copies are pruned automatically; "" keeps all
    prune_interval: str = "1h"
    backend: str = "files"  # or the name of an entry point in milterd.archive_backends
    release_host: str = "127.0.0.1"
    release_port: int = Field(25, gt=0, lt=65536)
    release_from: str | None = None  # envelope sender of released mail; default: original

    @field_validator("retention", "prune_interval")
    @classmethod
    def _dur(cls, v: str) -> str:
        if v:
            parse_duration(v)
        return v

    @field_validator("retention")
    @classmethod
    def _retention(cls, v: str) -> str:
        # "0" would prune every message as soon as it is stored, on every pass: surely
        # meant as "keep for ever", which is "" (the default).
        if v and parse_duration(v) <= 0:
            raise ValueError(f'retention {v!r} would delete every message; "" keeps all')
        return v

    @field_validator("prune_interval")
    @classmethod
    def _interval(cls, v: str) -> str:
        # 0 made retention a busy loop; beyond a year Event.wait overflows (the pruner
        # thread died). A pass needs no more often than a minute, nor less than yearly.
        if not MIN_PRUNE_INTERVAL <= parse_duration(v) <= MAX_PRUNE_INTERVAL:
            raise ValueError(f"prune_interval {v!r}: from 1min to 1y")
        return v


# --- selection ----------------------------------------------------------------------------


def _addr_match(addr: str, pattern: str) -> bool:
    a = addr.lower()
    if pattern == "<>":
        return a in ("", "<>")
    if "@" in pattern:
        return a == pattern if not pattern.startswith("@") else a.endswith(pattern)
    domain = a.rpartition("@")[2]
    if pattern.startswith("."):
        return domain.endswith(pattern) or domain == pattern[1:]
    return domain == pattern


def _rule_matches(
    rule: Rule, direction: str, sender: str, recipients: list[str], verdict: str
) -> bool:
    if rule.direction not in ("any", direction):
        return False
    if verdict not in rule.verdicts:
        return False
    if rule.senders and not any(_addr_match(sender, p) for p in rule.senders):
        return False
    return not rule.recipients or any(
        _addr_match(r, p) for r in recipients for p in rule.recipients
    )


def selected(
    cfg: ArchiveConfig, direction: str, sender: str, recipients: list[str], verdict: str
) -> bool:
    """Whether a message with this envelope and final verdict is archived."""
    for rule in cfg.rules:
        if _rule_matches(rule, direction, sender, recipients, verdict):
            return rule.archive
    return cfg.default and verdict in cfg.verdicts


def open_backend(cfg: ArchiveConfig, readonly: bool = False, create: bool = True) -> ArchiveBackend:
    """The configured store: ``files`` (built in) or a factory registered in the entry-point
    group ``milterd.archive_backends`` and called as ``factory(cfg, readonly=...)``.
    ``create=False`` (the command line): the ``files`` store must already exist (raises
    StoreError otherwise) even when opened writable; only the daemon creates one."""
    if cfg.backend == "files":
        return FileStore(
            cfg.path,
            compress=cfg.compress == "zstd",
            level=cfg.compress_level,
            fsync=cfg.fsync,
            synchronous=cfg.index_synchronous,
            readonly=readonly,
            create=create,
        )
    for ep in entry_points(group=BACKEND_GROUP):
        if ep.name == cfg.backend:
            backend: ArchiveBackend = ep.load()(cfg, readonly=readonly)
            return backend
    raise ValueError(f"unknown archive backend {cfg.backend!r} (entry points: {BACKEND_GROUP})")


def _direction(ctx: Context) -> str:
    return "outbound" if ctx.connection.trusted else "inbound"


def _record(ctx: Context, message: Message, verdict: str, now: float) -> Record:
    info = ctx.message
    client = ctx.connection.client
    addr = ""
    if client is not None and client.address is not None:
        addr = str(client.address)
        if isinstance(client.address, ipaddress.IPv6Address) and client.address.ipv4_mapped:
            addr = str(client.address.ipv4_mapped)
    # The three header fields in one pass over the parsed header (first of each wins).
    mid = subject = date = None
    for h in message.headers:
        name = h.name.lower()
        if name == "message-id":
            mid = h.value if mid is None else mid
        elif name == "subject":
            subject = h.value if subject is None else subject
        elif name == "date":
            date = h.value if date is None else date
    return Record(
        id=new_id(now),
        received=now,
        sender=info.sender if info else "",
        recipients=[r.address for r in info.recipients] if info else [],
        client_address=addr,
        client_name=client.hostname if client is not None else "",
        helo=ctx.connection.helo,
        auth_user=ctx.connection.auth_user,
        queue_id=info.queue_id if info else "",
        message_id=message_id_key(mid or ""),
        subject=_subject(subject or ""),
        date=_FOLD.sub("", date or "").strip(),
        verdict=verdict,
        score=ctx.score,
        results=[_result_text(r) for r in ctx.results],
        direction=_direction(ctx),
    )


_FOLD = re.compile(r"\r?\n(?=[ \t])")
#: How much of a Subject is RFC 2047-decoded for the index (see _subject).
MAX_DECODE = 8192


def _subject(value: str) -> str:
    """The Subject as text for the index: unfolded (RFC 5322 2.2.3: the line breaks go,
    the white space stays) and RFC 2047 encoded words decoded, so that a search finds
    what a mail reader shows. Never raises: a malformed encoded word is left as it is
    (or, where the decoder recovers, decoded as far as it can)."""
    text = _FOLD.sub("", value).strip()
    if "=?" not in text:  # the common case, and the daemon's hot path: no decoding
        return text
    # Only the first MAX_DECODE characters: the decoder's time grows with the square of
    # the encoded words (360 KB of them took 30 s, past the write's deadline, so such a
    # message was deferred at every try); the rest is indexed as it stands.
    head, rest = text[:MAX_DECODE], text[MAX_DECODE:]
    try:
        return (str(email.policy.default.header_factory("subject", head)) + rest).strip()
    except Exception:  # the decoder's own bugs included: an index row must be written
        return text


def _result_text(r: Any) -> str:
    props = " ".join(f"{k}={v}" for k, v in r.properties)
    return f"{r.method}={r.result}" + (f" {props}" if props else "")


# Up to this body size a copy is handed to the store as one buffer (one write, one hash
# update); larger bodies (spooled to disk by the core) are streamed in chunks.
ONE_BUFFER = 1 << 20


def _chunks(message: Message) -> Iterable[bytes]:
    """The message as stored: header block, blank line, body (CRLF)."""
    if message.body_size <= ONE_BUFFER:
        return (message.header_bytes() + b"\r\n" + message.body(),)
    return _stream(message)


def _stream(message: Message) -> Iterator[bytes]:
    yield message.header_bytes() + b"\r\n"
    yield from message.body_chunks()


# --- the plugin ---------------------------------------------------------------------------


class ArchivePlugin:
    """Keeps a durable copy of selected messages, indexed for search."""

    actions: frozenset[str] = frozenset()  # records nothing, changes nothing
    # finalize writes on the core's helper thread (a hard deadline for a hung disk); eom
    # only keeps a reference; outcome usually only looks at the verdict, so it runs
    # inline (a thread hop costs ~0.1-0.2 ms of CPU a message) and sends its rare disk
    # work (a verdict update, a removal, a rejected message's copy) to _slow(), which
    # keeps the same hard deadline.
    isolation = {"default": "inline", "finalize": "thread", "outcome": "inline"}
    prefork = True  # startup checks the store; each worker opens its own (worker_start)
    after = ("authres", "dkim", "arc", "spf", "dmarc", "scoring", "tagging")

    def __init__(self) -> None:
        self.cfg: ArchiveConfig | None = None
        self.backend: ArchiveBackend | None = None
        self._stop = threading.Event()
        self._pruner: threading.Thread | None = None
        self._pool: cf.ThreadPoolExecutor | None = None
        self._stuck = 0  # helper threads still in disk work past its call's deadline
        self._pool_lock = threading.Lock()
        self.dry_run = False

    @hookimpl
    def config_schema(self) -> type[ArchiveConfig]:
        return ArchiveConfig

    @hookimpl
    def startup(self, config: ArchiveConfig, services: Services) -> None:
        # Runs once in the supervisor, before the fork (prefork): check the store opens,
        # and remove temporary files of writers that no longer run; the store is closed
        # again, since an SQLite connection must not cross a fork. Each worker opens its
        # own in worker_start.
        self.cfg = config
        self.log = services.logger
        self.dry_run = services.dry_run
        if self.dry_run:  # milterd check: no store opened, created or cleaned
            return
        try:
            backend = open_backend(config)
        except Exception as e:
            if config.required:
                raise
            # required = false: start anyway, every write will fail and be logged.
            self.log.error("archive store %s unavailable: %s", config.path, e)
            return
        try:
            if isinstance(backend, FileStore):
                n = backend.clean_temp()  # temp names carry the writer's pid: live ones stay
                if n:
                    self.log.warning("removed %d temporary file(s) left by a crashed writer", n)
        finally:
            backend.close()

    @hookimpl
    def worker_start(self) -> None:
        config = self.cfg
        assert config is not None
        if self.dry_run:  # no store, no pruner: finalize and outcome only say what they would do
            return
        try:
            self.backend = open_backend(config)
        except Exception as e:
            if config.required:
                raise
            self.log.error("archive store %s unavailable: %s", config.path, e)
            self.backend = None
        # One pruner per daemon, not one per worker: worker 0 (or the only process).
        if (
            config.retention
            and self.backend is not None
            and os.environ.get("MILTERD_WORKER", "0") == "0"
        ):
            self._pruner = threading.Thread(
                target=self._prune_loop, name="archive-prune", daemon=True
            )
            self._pruner.start()

    @hookimpl
    def shutdown(self) -> None:
        self._stop.set()
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # let started disk work finish before the store closes
        # The pruner stops between two deletions (prune() checks _stop); closing the store
        # under a deletion would leave that message half removed until the next prune.
        if self._pruner is not None:
            self._pruner.join(PRUNER_JOIN_S)
            if self._pruner.is_alive():
                self.log.warning("retention prune still running at shutdown; store left open")
                return
        if self.backend is not None:
            self.backend.close()

    def _slow(self, ctx: Context, what: str, fn: Callable[[], object]) -> None:
        """Run ``fn`` (disk work at ``outcome``) on a helper thread and wait for it until
        the call's deadline, so an inline ``outcome`` keeps the hard deadline a thread
        call has. Past the deadline the work goes on alone (``fn`` must clean up after
        itself, as ``_write`` does) and the call returns; errors are logged."""
        # Every thread still stuck in disk work past its deadline (a hung store): do not
        # queue more behind them, where each item would keep its message until the disk
        # came back. (Threads merely busy do not count: the work waits its turn.)
        with self._pool_lock:
            if self._stuck >= SLOW_THREADS:
                ctx.log.error("archive %s not started: the store's earlier work hangs", what)
                return
            if self._pool is None:  # first use: in the worker process, after any fork
                self._pool = cf.ThreadPoolExecutor(
                    max_workers=SLOW_THREADS, thread_name_prefix="archive"
                )
            fut = self._pool.submit(fn)
        try:
            fut.result(timeout=ctx.time_left())
        except cf.TimeoutError:
            ctx.log.error("archive %s not done within the plugin's timeout", what)
            if not fut.cancel():  # started: its thread is stuck until the work returns
                with self._pool_lock:
                    self._stuck += 1
                fut.add_done_callback(self._returned)
        except Exception as e:
            ctx.log.error("archive %s failed: %s", what, e)

    def _returned(self, _: cf.Future[object]) -> None:
        with self._pool_lock:
            self._stuck -= 1

    def _prune_loop(self) -> None:
        assert self.cfg is not None and self.backend is not None
        backend = self.backend
        interval = parse_duration(self.cfg.prune_interval)
        while not self._stop.is_set():
            try:
                n = prune(backend, parse_duration(self.cfg.retention), stop=self._stop)
                if n:
                    self.log.info("retention: pruned %d message(s)", n)
            except PruneError as e:
                self.log.error("retention: pruned %d message(s); %s", e.pruned, e)
            except Exception as e:
                self.log.error("retention prune failed: %s", e)
            self._stop.wait(interval)

    # --- hooks ----------------------------------------------------------------------------

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        ctx.message_state["received"] = message

    @staticmethod
    def _copies(ctx: Context, delivered: Message | None) -> dict[str, Message]:
        """The copies to store: ``delivered`` and/or ``received``, as configured."""
        received: Message | None = ctx.message_state.get("received")
        want = ctx.config.store
        copies = {}
        if delivered is not None and want in ("delivered", "both"):
            copies["delivered"] = delivered
        if received is not None and (want in ("received", "both") or delivered is None):
            copies["received"] = received
        return copies

    def _would_write(self, ctx: Context, delivered: Message | None, verdict: str) -> None:
        """A dry run's stand-in for :meth:`_write`: log what would be stored."""
        copies = self._copies(ctx, delivered)
        what = ", ".join(
            f"{kind} copy, {len(m.header_bytes()) + 2 + m.body_size} bytes"
            for kind, m in copies.items()
        )
        ctx.log.info("dry run: would archive (%s; verdict %s)", what, verdict)

    def _write(self, ctx: Context, delivered: Message | None, verdict: str) -> Record:
        if self.backend is None:
            raise OSError(f"archive store {ctx.config.path} is not available")
        copies = self._copies(ctx, delivered)
        meta_src = delivered if delivered is not None else copies.get("received")
        assert meta_src is not None
        rec = _record(ctx, meta_src, verdict, time.time())
        stored = self.backend.store(rec, {k: _chunks(m) for k, m in copies.items()})
        if ctx.time_left() <= 0:
            # The core gave up on this call (on_error applied): the message was not
            # answered with our copy in mind, so take the copy back.
            self.backend.delete(stored.id)
            raise TimeoutError("archive write finished after the plugin's deadline")
        return stored

    @hookimpl
    def finalize(self, ctx: Context, message: Message) -> Verdict | None:
        cfg: ArchiveConfig = ctx.config
        info = ctx.message
        sender = info.sender if info else ""
        rcpts = [r.address for r in info.recipients] if info else []
        direction = _direction(ctx)
        # The merged verdict so far (continue, accept or quarantine); a later finalize plugin
        # may still change it, and outcome() then corrects the stored verdict or removes it.
        word = ctx.verdict.word if ctx.verdict is not None else "continue"
        if not selected(cfg, direction, sender, rcpts, word):
            return None
        if ctx.dry_run:
            self._would_write(ctx, message, word)
            ctx.message_state["archived"] = ""  # outcome: what would have been stored
            return None
        try:
            rec = self._write(ctx, message, word)
        except Exception as e:
            ctx.log.error("archive write failed: %s", e)
            # outcome() must not try again: on a hung or full store that would double the
            # message's wait and the errors (the failure is logged once, here).
            ctx.message_state["failed"] = True
            if cfg.required:
                return TempFail(
                    "451", "4.3.0", "Archive unavailable, try again later", reason="archive"
                )
            return None
        ctx.message_state["archived"] = rec.id
        return None

    @hookimpl
    def outcome(self, ctx: Context, verdict: Verdict | None, message: Message) -> None:
        cfg: ArchiveConfig = ctx.config
        word = verdict.word if verdict is not None else "continue"
        info = ctx.message
        sender = info.sender if info else ""
        rcpts = [r.address for r in info.recipients] if info else []
        want = selected(cfg, _direction(ctx), sender, rcpts, word)
        done: str | None = ctx.message_state.get("archived")
        if ctx.dry_run:
            if done is not None and not want:
                ctx.log.info("dry run: would remove the copy again (final verdict %s)", word)
            elif done is None and want:
                ctx.message_state.setdefault("received", message)
                self._would_write(ctx, message if word in DELIVERING else None, word)
            return
        if self.backend is None:
            if want and done is None:
                ctx.log.error("archive store unavailable: %s message not archived", word)
            return
        if done is not None:
            backend = self.backend
            if not want:
                self._slow(ctx, "removal", lambda: backend.delete(done))
            elif word != "continue":
                self._slow(ctx, "verdict update", lambda: backend.set_verdict(done, word))
            return
        if not want or ctx.message_state.get("failed"):
            return
        delivers = word in DELIVERING
        ctx.message_state.setdefault("received", message)  # eom did not run (core limit)
        self._slow(
            ctx,
            f"write ({word} message, not held back)",
            lambda: self._write(ctx, message if delivers else None, word),
        )

    @hookimpl
    def commands(self, subparsers: Any) -> None:
        from .cli import add_commands

        add_commands(subparsers)


def prune(
    backend: ArchiveBackend,
    age: float,
    now: float | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Delete every message archived more than ``age`` seconds ago. Returns the count.
    (The ``files`` store's ``delete`` also removes a past day's directory it empties.)
    With ``stop``, returns early once it is set, between two deletions. A message that
    cannot be deleted does not stop the others: at the end :class:`PruneError` carries
    the count deleted and each failure. An index error (locked, read-only, damaged) is
    not one message's: it stops the run there, with the same PruneError."""
    cutoff = (now if now is not None else time.time()) - age
    n = 0
    failed: list[str] = []
    for id_ in backend.older_than(cutoff):
        if stop is not None and stop.is_set():
            break
        try:
            if backend.delete(id_):
                n += 1
        except (StoreError, OSError, sqlite3.Error) as e:
            text = str(e) or type(e).__name__
            failed.append(text if text.startswith(id_) else f"{id_}: {text}")
            if isinstance(e, sqlite3.Error):  # every other message would fail the same way
                break
    if failed:
        raise PruneError(n, failed)
    return n


class PruneError(StoreError):
    """Some messages could not be pruned: ``pruned`` were, ``failures`` says why not the
    others (one line each)."""

    def __init__(self, pruned: int, failures: list[str]) -> None:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        super().__init__(f"{len(failures)} message(s) not pruned: {failures[0]}{more}")
        self.pruned = pruned
        self.failures = failures
