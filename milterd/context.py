"""Per-connection and per-message state, and the :class:`Context` each plugin call receives.

libmilter runs one thread per connection, and one plugin object serves every connection:
whatever a plugin must remember lives here (``ctx.connection_state``,
``ctx.message_state``), never on the plugin object.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from milterd.actions import Change, Result, Symbol, Verdict
from milterd.events import Client, Header
from milterd.hookspecs import CHANGE_STAGES

if TYPE_CHECKING:
    from milterd.config import Settings
    from milterd.dns import Resolver

__all__ = [
    "ConnectionInfo",
    "Context",
    "Entry",
    "Ledger",
    "MessageInfo",
    "Recipient",
    "Services",
]


@dataclass(slots=True)
class Services:
    """Shared services handed to every plugin at :func:`~milterd.hookspecs.startup`.

    ``dry_run``: True in a dry run (``milterd check``, a ``Harness(dry_run=True)``):
    compute everything (verdicts, results, symbols, changes as the daemon would), but
    change no persistent state, create no files or directories, and send nothing (DNS
    lookups are fine). A plugin that stores, learns, records or sends skips that and may
    log at INFO what it would have done (``"dry run: would ..."``); it opens the state it
    reads read-only, and only when it exists. The same flag is ``ctx.dry_run`` at every
    hook. The daemon never runs dry.
    """

    resolver: Resolver
    settings: Settings
    logger: logging.Logger
    dry_run: bool = False


@dataclass(slots=True)
class ConnectionInfo:
    """What is known about the SMTP session. Read-only for plugins."""

    client: Client | None = None
    helo: str = ""
    # The session's (CONNECT, HELO) and the current message's macros; see milterd.events.
    macros: dict[str, str] = field(default_factory=dict)
    internal: bool = False  # client address in [milterd] internal_networks
    id: int = 0  # connection serial number in this process, for the log

    @property
    def auth_user(self) -> str:
        """The SASL login name (``{auth_authen}``), or ``""``."""
        return self.macros.get("{auth_authen}", "")

    @property
    def authenticated(self) -> bool:
        return bool(self.auth_user)

    @property
    def trusted(self) -> bool:
        """Authenticated, or from an internal network: mail we may sign, not check."""
        return self.authenticated or self.internal

    @property
    def daemon_name(self) -> str:
        """The MTA service name (``{daemon_name}``), e.g. Postfix's submission service."""
        return self.macros.get("{daemon_name}", "")


@dataclass(frozen=True, slots=True)
class Recipient:
    address: str
    params: dict[str, str | None] = field(default_factory=dict)


@dataclass(slots=True)
class MessageInfo:
    """The message so far: envelope, headers in order, sizes. Read-only for plugins."""

    sender: str = ""
    sender_params: dict[str, str | None] = field(default_factory=dict)
    recipients: list[Recipient] = field(default_factory=list)
    headers: list[Header] = field(default_factory=list)
    header_bytes: int = 0
    body_size: int = 0
    queue_id: str = ""
    started: float = field(default_factory=time.time)


#: The most of a note's text kept (:meth:`Context.note`): the summary is one line.
MAX_NOTE = 1000


@dataclass(frozen=True, slots=True)
class Note:
    """A fact for the message's summary line (:meth:`Context.note`); nothing acts on it."""

    text: str


@dataclass(frozen=True, slots=True)
class Entry:
    """One ledger line: who contributed what, at which stage."""

    plugin: str
    stage: str
    value: Verdict | Change | Result | Symbol | Note


class Ledger:
    """Everything the plugins contributed to one message, in the order they did it."""

    __slots__ = ("entries", "errors", "timings")

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.errors: list[tuple[str, str, str]] = []  # plugin, stage, description
        self.timings: dict[str, float] = {}  # plugin -> seconds spent, all stages

    def of(self, kind: type[Any]) -> list[Any]:
        return [e.value for e in self.entries if isinstance(e.value, kind)]

    @property
    def results(self) -> list[Result]:
        return self.of(Result)

    @property
    def symbols(self) -> list[Symbol]:
        return self.of(Symbol)

    @property
    def changes(self) -> list[Change]:
        return self.of(Change)

    @property
    def score(self) -> float:
        return round(sum(s.score for s in self.symbols), 3)

    @property
    def notes(self) -> list[str]:
        """The notes (:meth:`Context.note`) as the summary line shows them: ``plugin: text``."""
        return [f"{e.plugin}: {e.value.text}" for e in self.entries if isinstance(e.value, Note)]


class ContributionRefused(RuntimeError):
    """A plugin recorded something it may not record at this stage, or after its deadline."""


class Context:
    """What one plugin call receives as ``ctx``.

    A fresh context is made for every call, so a call that overran its deadline (and is
    still running somewhere) can no longer write to the ledger: its contributions after the
    deadline are refused.
    """

    __slots__ = (
        "_actions",
        "_dry_run",
        "_gate",
        "_ledger",
        "_live",
        "_log",
        "_logger",
        "_stage",
        "config",
        "connection",
        "connection_state",
        "deadline",
        "message",
        "message_state",
        "name",
        "resolver",
        "verdict",
    )

    def __init__(
        self,
        name: str,
        stage: str,
        config: Any,
        logger: logging.Logger,
        connection: ConnectionInfo,
        message: MessageInfo | None,
        ledger: Ledger | None,
        resolver: Resolver,
        connection_state: dict[str, Any],
        message_state: dict[str, Any] | None,
        deadline: float,
        actions: frozenset[str],
        dry_run: bool = False,
    ) -> None:
        self.name = name
        self._stage = stage
        self.config = config
        self._logger = logger
        self._log: logging.LoggerAdapter[logging.Logger] | None = None
        self.connection = connection
        self.message = message
        self._ledger = ledger
        self.resolver = resolver
        self.connection_state = connection_state
        self.message_state = message_state if message_state is not None else {}
        self.deadline = deadline
        self._actions = actions
        self._dry_run = dry_run
        self._live = True
        # Held while a contribution is checked and added, and while the core ends the call
        # (refuses more, drops what it added): a helper thread still running past its
        # deadline cannot slip one in between the two.
        self._gate = threading.Lock()
        #: At ``finalize``: the merged verdict so far (None = continue); at ``outcome``: the
        #: final one. None at every other stage.
        self.verdict: Verdict | None = None

    # --- reading ---------------------------------------------------------------------------

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]:
        """This plugin's logger (``milterd.NAME``); records carry the plugin and queue id."""
        if self._log is None:  # built on first use: most calls never log
            qid = self.message.queue_id if self.message is not None else ""
            self._log = logging.LoggerAdapter(self._logger, {"plugin": self.name, "queue_id": qid})
        return self._log

    @property
    def dry_run(self) -> bool:
        """True in a dry run (``milterd check``): decide as usual, but store, learn,
        record and send nothing; see :class:`Services`."""
        return self._dry_run

    def time_left(self) -> float:
        """Seconds until this call's deadline (never negative). Pass it to slow I/O."""
        return max(0.0, self.deadline - time.monotonic())

    @property
    def results(self) -> list[Result]:
        """Every result recorded so far on this message, by any plugin, in order."""
        return self._ledger.results if self._ledger is not None else []

    def results_for(self, method: str) -> list[Result]:
        """The results recorded so far for one RFC 8601 method (``"spf"``, ``"dkim"``...)."""
        return [r for r in self.results if r.method == method]

    @property
    def symbols(self) -> list[Symbol]:
        return self._ledger.symbols if self._ledger is not None else []

    @property
    def score(self) -> float:
        """The sum of every symbol's score so far."""
        return self._ledger.score if self._ledger is not None else 0.0

    @property
    def changes(self) -> list[Change]:
        return self._ledger.changes if self._ledger is not None else []

    # --- recording -------------------------------------------------------------------------

    def _record(self, value: Change | Result | Symbol | Note, also: str = "") -> None:
        if self._ledger is None or (self._stage not in CHANGE_STAGES and self._stage != also):
            raise ContributionRefused(
                f"plugin {self.name}: nothing can be recorded at {self._stage}"
            )
        with self._gate:
            if not self._live:
                raise ContributionRefused(f"plugin {self.name}: recorded after its deadline")
            self._ledger.entries.append(Entry(self.name, self._stage, value))

    def add_change(self, change: Change) -> None:
        """Record a change (header, recipient, sender, body); applied once at end of message.

        Raises ContributionRefused at connect/helo/abort/close, and when the plugin did not
        declare the change's action in its ``actions`` class attribute.
        """
        if change.action not in self._actions:
            raise ContributionRefused(
                f"plugin {self.name}: {type(change).__name__} needs action "
                f"{change.action!r}, which the plugin did not declare"
            )
        self._record(change)

    def add_result(self, result: Result) -> None:
        """Record an authentication result (RFC 8601 shape) for later plugins and A-R."""
        self._record(result)

    def add_symbol(
        self, name: str, score: float, description: str = "", options: tuple[str, ...] = ()
    ) -> None:
        """Record a score symbol."""
        self._record(Symbol(name, float(score), description, tuple(options)))

    def note(self, text: str) -> None:
        """Say something about this message on its summary line, the one line the core
        logs at ``info`` for every message (``notes=[dkim: signed d=example.com ...]``;
        ``notes`` in the JSON format), instead of a log line of the plugin's own: what a
        signer signed, what a scanner concluded, what an observer did. Nothing acts on a
        note. Accepted where results are (envfrom to finalize) and at ``outcome``, whose
        observers run before the line is written; refused at connect, helo, abort and
        close and after the deadline (ContributionRefused); dropped with the call's
        other contributions when the call fails. At most :data:`MAX_NOTE` characters are
        kept. Costs an append: the line is only formatted when ``info`` is logged."""
        self._record(Note(str(text)[:MAX_NOTE]), also="outcome")
