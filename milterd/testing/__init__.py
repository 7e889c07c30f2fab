"""The harness plugin authors test with: a message through the real pipeline, in process.

``milterd.testing`` is the public test API (alongside ``milterd`` itself): :class:`Harness`,
:class:`HarnessSession`, :class:`Outcome`, :class:`FakeResolver`, :class:`PluginFailed`
and :func:`split_message`.

No libmilter and no MTA: :class:`Harness` drives the same :class:`~milterd.pipeline.Session`
the daemon's bridge drives, stage by stage, as Postfix would (connect, helo, MAIL, RCPT...,
DATA, headers, end of headers, body chunks, end of message). DNS comes from a
:class:`FakeResolver` built from a dictionary of zones. Each stage gets only the macros
negotiated for it (the core's and those the enabled plugins declare), as from an MTA.

Example::

    from milterd.testing import Harness

    def test_adds_header():
        # raise_errors: a plugin's exception fails the test, with the plugin's traceback
        with Harness({"example": {"greeting": "hi"}}, plugins={"example": MyPlugin},
                     raise_errors=True) as h:
            out = h.send(b"Subject: x\\r\\n\\r\\nbody\\r\\n", sender="a@example.org",
                         recipients=["b@example.com"])
        assert out.verdict == "continue"
        assert out.header("X-Greeting") == "hi"

pytest fixtures (``milterd_harness``, ``fake_resolver``) come with the opt-in pytest plugin:
``pytest -p milterd.testing.pytest_plugin``, or in a conftest.py
``pytest_plugins = ["milterd.testing.pytest_plugin"]``.
"""

from __future__ import annotations

import email.utils
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from milterd.actions import Discard, Result, Symbol, Verdict
from milterd.config import Config, ConfigError, from_dict
from milterd.context import Context, Ledger
from milterd.dns import DNSTempError, NXDomain
from milterd.events import Client, parse_address
from milterd.merge import Decision, Op, merge
from milterd.pipeline import CORE, Runtime, Session
from milterd.registry import LoadedPlugin, contained

__all__ = [
    "FakeResolver",
    "Harness",
    "HarnessSession",
    "Outcome",
    "PluginFailed",
    "split_message",
]

#: The ``authserv_id`` a harness uses unless the configuration sets one, so that
#: Authentication-Results fields do not depend on the machine the tests run on.
AUTHSERV_ID = "mx.test.example"

#: One plugin failure: (plugin, stage, description), as in the daemon's log, e.g.
#: ``("mine", "eom", "exception: KeyError: 'hits'")``; the description starts with the
#: kind: ``exception``, ``timeout`` or ``bad-return``.
Error = tuple[str, str, str]


class FakeResolver:
    """A resolver answering from a dictionary: ``{name: {rdtype: [text, ...]}}``.

    Names are case-insensitive, with or without the trailing dot. A name absent from the
    dictionary, or one that cannot exist in DNS (over 253 octets, an empty or 64-octet
    label), is NXDOMAIN, as with the daemon's resolver; a present name without the type
    is NODATA (``[]``). A value of ``"TIMEOUT"`` instead of a list raises DNSTempError,
    as a silent server would. Every query is appended to :attr:`queries`.
    """

    def __init__(self, zones: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.zones: dict[str, dict[str, Any]] = {}
        self.queries: list[tuple[str, str]] = []
        for name, records in (zones or {}).items():
            self.zones[name.lower().rstrip(".")] = {k.upper(): v for k, v in records.items()}

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        key = name.lower().rstrip(".")
        self.queries.append((key, rdtype.upper()))
        if key not in self.zones or not _valid_dns_name(key):
            raise NXDomain(name)
        value = self.zones[key].get(rdtype.upper(), [])
        if value == "TIMEOUT":
            raise DNSTempError(f"{name}/{rdtype}: timeout (fake)")
        return [str(v) for v in value]


def _valid_dns_name(name: str) -> bool:
    """Whether ``name`` (no trailing dot) can exist in DNS: at most 253 octets, labels of
    1-63. The daemon's resolver answers NXDOMAIN for any other without asking a server."""
    encoded = name.encode("utf-8", "surrogateescape")
    return len(encoded) <= 253 and all(0 < len(p) <= 63 for p in encoded.split(b"."))


_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def split_message(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Split a message into header fields (name, raw value as an MTA sends it: leading
    space kept, the lines of a folded field joined by a bare LF, as Postfix and sendmail
    send them) and the body with CRLF line ends, as an MTA does: a field name is
    printable ASCII without ":" (white space may precede the colon), and the first line
    that is neither a field nor a continuation ends the header block (it and what follows
    are the body). A body whose last line has no line end gets one (SMTP's DATA ends with
    CRLF "." CRLF, so what the MTA passes on always ends a line). Never raises."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    lines = head.split(b"\n")
    # Each field's lines, joined once at the end: linear in a field of many folds.
    fields: list[tuple[str, list[bytes]]] = []
    for i, line in enumerate(lines if head else []):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(line)
            continue
        m = _FIELD.match(line)
        if m is None:  # not a header field: the header block ends here
            rest = b"\n".join(lines[i:])
            body = rest + (sep + body if sep else b"")
            break
        fields.append((m.group(1).decode("ascii"), [line[m.end() :]]))
    if body and not body.endswith(b"\n"):
        body += b"\n"
    return [(n, b"\n".join(v)) for n, v in fields], body.replace(b"\n", b"\r\n")


class PluginFailed(Exception):
    """A plugin call failed while a :class:`Harness` made with ``raise_errors=True`` ran.

    Raised after the pipeline finished with the message (or the connection), so the
    failure's ``on_error`` policy was applied first. Chained (``raise ... from``) to the
    first exception a plugin raised, so that pytest shows the plugin's own traceback.
    ``errors`` lists every failure (plugin, stage, description); ``outcome`` is the
    :class:`Outcome` of the send, or None (``abandon``, ``close``).
    """

    def __init__(self, errors: list[Error], outcome: Outcome | None = None) -> None:
        self.errors = list(errors)
        self.outcome = outcome
        text = "; ".join(f"plugin {p!r} failed at {s}: {d}" for p, s, d in self.errors)
        super().__init__(text)


@dataclass
class Outcome:
    """What the pipeline decided for one message.

    ``verdict`` is a word (``"reject"``); ``early`` and the values of ``refused`` are
    :class:`~milterd.Verdict` objects (``Reject``...: ``.code``, ``.xcode``, ``.text``,
    ``.reason``, ``.word``). ``errors`` lists every plugin failure while the message was
    handled (plugin, stage, description), in order, at every stage including ``outcome``
    and ``abort`` (and, for :meth:`Harness.send`, which opens a connection for the message,
    ``connect``, ``helo`` and ``close``); ``exceptions`` holds (plugin, stage, exception
    object) for those that were exceptions.
    """

    decision: Decision  # .verdict (Verdict or None), .plugin (who decided), .reasons, .ops
    delivered: bytes | None  # the message exactly as it would be delivered, or None
    results: list[Result]
    symbols: list[Symbol]
    score: float
    errors: list[Error]
    timings: dict[str, float]  # plugin -> seconds, all its calls for this message
    stage: str  # the stage that decided: "eom", or an earlier one
    early: Verdict | None = None  # the verdict given before end of message, if any
    refused: dict[str, Verdict] = field(default_factory=dict)  # per recipient at RCPT
    exceptions: list[tuple[str, str, BaseException]] = field(default_factory=list)
    #: the plugins' notes (``ctx.note``) as the summary line shows them, ``plugin: text``
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``continue``, ``accept``, ``quarantine``, ``tempfail``, ``reject``, ``discard``."""
        if self.early is not None:
            return self.early.word
        return self.decision.word

    @property
    def decided_by(self) -> str:
        """The plugin whose verdict decided (``milterd`` for the core's limits), or ""."""
        return self.decision.plugin

    @property
    def ops(self) -> list[Op]:
        """The MTA operations the daemon would apply, in order (``Op.kind``: ``addheader``,
        ``insheader``, ``chgheader``, ``addrcpt``, ``delrcpt``, ``chgfrom``, ``replbody``,
        ``quarantine``; ``Op.plugin`` says whose change it is). Empty when the message
        is not delivered."""
        return self.decision.ops

    def header(self, name: str) -> str | None:
        """The value of the first header field ``name`` (case-insensitive) of the
        delivered message, unfolded (RFC 5322 2.2.3: each CRLF before white space goes,
        the white space stays) and without the leading and trailing white space; or
        None. The folded bytes are in :attr:`delivered`."""
        if self.delivered is None:
            return None
        for field_name, value in split_message(self.delivered)[0]:
            if field_name.lower() == name.lower():
                return _unfold(value)
        return None

    def headers(self) -> list[tuple[str, str]]:
        """The delivered message's header fields in order: (name, value), each value
        unfolded and stripped as :meth:`header` returns it."""
        if self.delivered is None:
            return []
        return [(n, _unfold(v)) for n, v in split_message(self.delivered)[0]]


def _unfold(value: bytes) -> str:
    return value.replace(b"\n", b"").decode("utf-8", "surrogateescape").strip()


def _config(
    config: str | Mapping[str, Any] | Config | None, plugins: Mapping[str, object]
) -> Config:
    """The harness's Config. TOML text and the full dict form (``milterd``, ``dns``,
    ``plugins`` keys) get the fixed :data:`AUTHSERV_ID` unless they set one, as the
    shorthand form does; a Config object is used as it is."""
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        try:
            sections: dict[str, Any] = tomllib.loads(config)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"<memory>: not valid TOML: {e}") from None
        full = True
    else:
        sections = dict(config or {})
        full = "milterd" in sections or "dns" in sections or "plugins" in sections
    data: dict[str, Any] = {"milterd": {"authserv_id": AUTHSERV_ID}, "plugins": {}}
    if full:
        data.update({k: v for k, v in sections.items() if k not in ("milterd", "plugins")})
        core = sections.get("milterd", {})
        data["milterd"] = {**data["milterd"], **core} if isinstance(core, Mapping) else core
        data["plugins"] = dict(sections.get("plugins", {}))
    else:  # shorthand: {plugin name: its section}
        data["plugins"] = {k: dict(v) for k, v in sections.items()}
    for name in plugins:
        data["plugins"].setdefault(name, {})
    return from_dict(data)


class _Traced:
    """A hook implementation as :meth:`Runtime.call` takes it, keeping the exception the
    plugin raised (the core keeps only its text)."""

    __slots__ = ("_function", "argnames", "exc")

    def __init__(self, impl: Any) -> None:
        self._function: Callable[..., Any] = impl.function
        self.argnames: tuple[str, ...] = impl.argnames
        self.exc: BaseException | None = None

    def function(self, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # pytest: show the plugin's frames, not this one
        try:
            return self._function(**kwargs)
        except BaseException as e:
            if contained(e):
                self.exc = e
            raise


class Harness:
    """A configured pipeline that messages can be sent through, in process.

    ``config``: TOML text, a dict shaped like the file, a shorthand dict of plugin sections
    (``{"example": {"greeting": "hi"}}``), or a :class:`Config`. ``authserv_id`` is
    ``mx.test.example`` unless the text or dict sets it (a Config is used as it is).
    ``plugins`` maps plugin names to classes or objects used instead of installed entry
    points (names not given here are loaded from entry points); they are enabled unless
    their section says ``enabled = false``.
    ``zones`` builds a FakeResolver; ``resolver`` is used instead when given.
    ``raise_errors``: raise :class:`PluginFailed`, chained to the plugin's exception, when
    a plugin call failed (after the pipeline applied its ``on_error`` policy).
    ``dry_run``: run as ``milterd check`` does: the plugins decide as usual but store,
    learn, record and send nothing (``services.dry_run``, ``ctx.dry_run``).
    """

    def __init__(
        self,
        config: str | Mapping[str, Any] | Config | None = None,
        *,
        plugins: Mapping[str, object] | None = None,
        zones: Mapping[str, Mapping[str, Any]] | None = None,
        resolver: Any = None,
        raise_errors: bool = False,
        dry_run: bool = False,
    ) -> None:
        self.plugins = dict(plugins or {})
        self.resolver = resolver if resolver is not None else FakeResolver(zones)
        self.raise_errors = raise_errors
        self.config = _config(config, self.plugins)
        self.runtime = Runtime(self.config, self.plugins, self.resolver, dry_run=dry_run)
        # Every plugin call goes through Runtime.call: watch it to see failures at every
        # stage (not only those with a message ledger) and the exceptions themselves.
        self._sessions: dict[int, HarnessSession] = {}
        self._runtime_call = self.runtime.call
        self.runtime.call = self._call  # type: ignore[method-assign]
        self.runtime.start()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runtime.stop()

    def _call(
        self,
        p: LoadedPlugin,
        impl: Any,
        stage: str,
        ctx: Context,
        args: dict[str, Any],
        budget: float,
        progress: Callable[[], None] | None,
        ledger: Ledger | None,
    ) -> Verdict | None:
        conn = self._sessions.get(ctx.connection.id)
        if conn is None:
            return self._runtime_call(p, impl, stage, ctx, args, budget, progress, ledger)
        traced = _Traced(impl)
        # Without a message (connect, helo, outcome, close) the core records failures on
        # no ledger: give it a scratch one to read them from.
        book = ledger if ledger is not None else Ledger()
        mark = len(book.errors)
        v = self._runtime_call(p, traced, stage, ctx, args, budget, progress, book)
        for error in book.errors[mark:]:
            conn._failed(error, traced.exc if error[2].startswith("exception:") else None)
        if v is not None and v.ends_stage:
            conn._verdicts.append((p.name, v))
        return v

    def send(
        self,
        message: bytes | str,
        *,
        sender: str = "sender@example.org",
        recipients: Iterable[str] = ("rcpt@example.com",),
        client_ip: str = "192.0.2.1",
        client_name: str | None = None,
        helo: str = "client.example.org",
        auth: str | None = None,
        queue_id: str = "4TESTQID",
        macros: Mapping[str, str] | None = None,
        chunk_size: int = 65535,
    ) -> Outcome:
        """Send one message through the pipeline on a new connection, as an MTA would.
        ``out.errors`` covers the whole connection (connect to close)."""
        __tracebackhide__ = True
        conn = self.session(client_ip=client_ip, client_name=client_name, helo=helo,
                            macros=macros)  # fmt: skip
        try:
            out = conn._send(message, sender=sender, recipients=recipients, auth=auth,
                             queue_id=queue_id, chunk_size=chunk_size)  # fmt: skip
        finally:
            conn._close()
        out.errors, out.exceptions = list(conn.errors), conn.exceptions
        conn._check(out)
        return out

    def session(
        self,
        *,
        client_ip: str = "192.0.2.1",
        client_name: str | None = None,
        helo: str = "client.example.org",
        macros: Mapping[str, str] | None = None,
    ) -> HarnessSession:
        """A connection (CONNECT and HELO now) that can carry several messages, as an SMTP
        session does: ``with h.session() as s: s.send(...); s.send(...)``. Plugins see
        one connection (``ctx.connection_state`` lives on) and one message after the
        other; :meth:`HarnessSession.abandon` leaves a message half sent, as RSET or a
        lost client does."""
        return HarnessSession(self, client_ip, client_name, helo, macros)


class HarnessSession:
    """One connection through a :class:`Harness`; see :meth:`Harness.session`.

    ``errors`` lists every plugin failure on the connection so far, at every stage
    (``connect``, ``helo``, the messages', ``close``), in order; ``exceptions`` the
    exception objects among them, as (plugin, stage, exception).

    Macros: each stage gets the names negotiated for it (the core's and those the enabled
    plugins declare in ``macros``), with these values: ``j`` (``mx.test.example``),
    ``{daemon_name}`` (``smtpd``), ``{client_addr}``, ``{client_name}``, ``i`` (the queue
    id), ``{auth_authen}`` and ``{auth_type}`` (with ``auth``), ``{mail_addr}``,
    ``{rcpt_addr}``, and those of ``macros`` (which win over the session-wide ones).
    """

    def __init__(
        self,
        harness: Harness,
        client_ip: str,
        client_name: str | None,
        helo: str,
        macros: Mapping[str, str] | None,
    ) -> None:
        self.harness = harness
        self.session = Session(harness.runtime, capture=True)
        self.errors: list[Error] = []
        self._excs: list[BaseException | None] = []  # parallel to errors
        self._verdicts: list[tuple[str, Verdict]] = []  # (plugin, verdict) that ended a stage
        self._reported = 0  # errors[:_reported] were raised already (raise_errors)
        harness._sessions[self.session.conn.id] = self
        self.count = 0
        self.negotiated = harness.runtime.negotiation.macros
        addr = parse_address(client_ip) if client_ip else None
        # As the daemon: an address written as IPv6 (::ffff:192.0.2.7 too) came over an
        # AF_INET6 socket. {client_addr} as both MTAs send it: "IPv6:" before an IPv6 one.
        v6 = addr is not None and ":" in client_ip
        family = "unknown" if addr is None else ("inet6" if v6 else "inet")
        name = client_name or (f"[{client_ip}]" if client_ip else "localhost")
        client = Client(name, family, addr, 25000 if addr else None)  # type: ignore[arg-type]
        self.values: dict[str, str] = {
            "j": "mx.test.example",
            "{daemon_name}": "smtpd",
            "{client_addr}": (
                f"IPv6:{client_ip}" if v6 and client_ip[:5].lower() != "ipv6:" else client_ip
            ),
            "{client_name}": client_name or ("unknown" if client_ip else "localhost"),
            **(macros or {}),
        }
        # A verdict at CONNECT or HELO answers every message of the session (a Discard
        # there comes back at each MAIL FROM, from the core, as in the daemon).
        self.early: tuple[Verdict, str] | None = None
        self._early_decision = Decision(None)
        mark = len(self._verdicts)
        v = self.session.on_connect(name, client, self._macros("connect"))
        if v is None:
            mark = len(self._verdicts)
            v = self.session.on_helo(helo, self._macros("helo"))
            stage = "helo"
        else:
            stage = "connect"
        if v is not None:
            self.early = (v, stage)
            who = self._decider(v, mark)
            self._early_decision = Decision(v, who, [(who, v)])

    def __enter__(self) -> HarnessSession:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        __tracebackhide__ = True
        self._close()
        if exc_type is None:
            self._check(None)

    @property
    def exceptions(self) -> list[tuple[str, str, BaseException]]:
        return _exceptions(self.errors, self._excs)

    def close(self) -> list[Error]:
        """End the connection (plugins' ``close``). Returns the failures at close."""
        __tracebackhide__ = True
        mark = len(self.errors)
        self._close()
        self._check(None)
        return self.errors[mark:]

    def _close(self) -> None:
        try:
            self.session.on_close()
        finally:
            self.harness._sessions.pop(self.session.conn.id, None)

    def _failed(self, error: Error, exc: BaseException | None) -> None:
        self.errors.append(error)
        self._excs.append(exc)

    def _check(self, outcome: Outcome | None) -> None:
        """With ``raise_errors``: raise the failures not raised yet."""
        __tracebackhide__ = True  # pytest: from the test's line to the plugin's
        new, excs = self.errors[self._reported :], self._excs[self._reported :]
        self._reported = len(self.errors)
        if new and self.harness.raise_errors:
            cause = next((e for e in excs if e is not None), None)
            raise PluginFailed(new, outcome) from cause

    def _decider(self, v: Verdict, mark: int) -> str:
        """Who gave ``v`` (a verdict that ended a stage since ``mark``): the plugin, or
        the core (its limits)."""
        return next((p for p, x in reversed(self._verdicts[mark:]) if x is v), CORE)

    def _macros(self, stage: str, values: Mapping[str, str] | None = None) -> dict[str, str]:
        """The macros an MTA would send at ``stage``: those negotiated for it, with a value
        (``values``: this message's, then the session's)."""
        have = {**self.values, **(values or {})}
        return {k: have[k] for k in self.negotiated.get(stage, ()) if k in have}

    def _queue_id(self, queue_id: str | None) -> str:
        self.count += 1
        return queue_id or ("4TESTQID" if self.count == 1 else f"4TESTQ{self.count:02d}")

    def send(
        self,
        message: bytes | str,
        *,
        sender: str = "sender@example.org",
        recipients: Iterable[str] = ("rcpt@example.com",),
        auth: str | None = None,
        queue_id: str | None = None,
        chunk_size: int = 65535,
    ) -> Outcome:
        """Send one message over this connection (MAIL to end of message). The queue id
        is ``4TESTQID`` for the first message, ``4TESTQ02``, ``4TESTQ03``... after it,
        unless given. ``out.errors``: the failures from MAIL to the end of this message
        (the connection's are in :attr:`errors`)."""
        __tracebackhide__ = True
        mark = len(self.errors)
        out = self._send(message, sender=sender, recipients=recipients, auth=auth,
                         queue_id=queue_id, chunk_size=chunk_size)  # fmt: skip
        out.errors = self.errors[mark:]
        out.exceptions = _exceptions(out.errors, self._excs[mark:])
        self._check(out)  # with connect/helo failures not raised yet
        return out

    def _message_values(self, qid: str, sender: str, auth: str | None) -> dict[str, str]:
        values = {"i": qid, "{mail_addr}": sender}
        if auth:
            values.update({"{auth_authen}": auth, "{auth_type}": "PLAIN"})
        return values

    def _send(
        self,
        message: bytes | str,
        *,
        sender: str,
        recipients: Iterable[str],
        auth: str | None,
        queue_id: str | None,
        chunk_size: int,
    ) -> Outcome:
        session, qid = self.session, self._queue_id(queue_id)
        refused: dict[str, Verdict] = {}
        if self.early is not None:
            return self._early(self._early_decision, self.early[1], refused)
        values = self._message_values(qid, _strip(sender), auth)
        mark = len(self._verdicts)
        early = session.on_envfrom(_strip(sender), {}, self._macros("envfrom", values))
        if early is not None:
            return self._early(self._decision(early, mark), "envfrom", refused)
        refused_by: list[tuple[str, Verdict]] = []  # (who, verdict) per refusal
        accepted = 0
        for rcpt in recipients:
            mark = len(self._verdicts)
            rcpt_macros = self._macros("envrcpt", {**values, "{rcpt_addr}": _strip(rcpt)})
            v = session.on_envrcpt(_strip(rcpt), {}, rcpt_macros)
            if isinstance(v, Discard):  # the whole message, as the MTAs do
                return self._early(self._decision(v, mark), "envrcpt", refused)
            if v is not None:
                refused[rcpt] = v
                refused_by.append((self._decider(v, mark), v))
            else:
                accepted += 1
        if not accepted:  # the MTA ends the transaction: the strongest refusal is the verdict
            session.on_abort()
            worst = max(refused_by, key=lambda pv: pv[1].severity) if refused_by else None
            decision = (
                Decision(worst[1], worst[0], refused_by) if worst is not None else Decision(None)
            )
            return self._early(decision, "envrcpt", refused)
        # Every stage is fed, even those negotiation would skip: plugins are only called
        # for the stages they hook, and the delivered copy needs the whole message.
        for stage, step in _content(
            session, message, chunk_size, self._macros("data", values),
            self._macros("eoh", values),
        ):  # fmt: skip
            mark = len(self._verdicts)
            early = step()
            if early is not None:
                return self._early(self._decision(early, mark), stage, refused)
        decision = session.on_eom(self._macros("eom", values))
        ledger_view = session.last_ledger
        return Outcome(
            decision=decision,
            delivered=session.delivered if decision.delivers else None,
            results=ledger_view.results,
            symbols=ledger_view.symbols,
            score=ledger_view.score,
            errors=list(ledger_view.errors),
            timings=dict(ledger_view.timings),
            stage="eom",
            refused=refused,
            notes=ledger_view.notes,
        )

    def _decision(self, v: Verdict, mark: int) -> Decision:
        """The Decision for a verdict that ended the message before its end, as the daemon
        logs it: merged from the message's ledger (who decided, every verdict so far)."""
        decision = merge(self.session.last_ledger.entries)
        if decision.verdict is None:
            who = self._decider(v, mark)
            decision = Decision(v, who, [(who, v)])
        return decision

    def _early(self, decision: Decision, stage: str, refused: dict[str, Verdict]) -> Outcome:
        ledger = self.session.last_ledger
        return Outcome(
            decision,
            None,
            ledger.results,
            ledger.symbols,
            ledger.score,
            list(ledger.errors),
            dict(ledger.timings),
            stage,
            early=decision.verdict,
            refused=refused,
            notes=ledger.notes,
        )

    def abandon(
        self,
        message: bytes | str = b"",
        *,
        after: str = "envrcpt",
        sender: str = "sender@example.org",
        recipients: Iterable[str] = ("rcpt@example.com",),
        queue_id: str | None = None,
    ) -> list[Error]:
        """Start a message and abandon it (plugins' ``abort``) after stage ``after``:
        ``envfrom``, ``envrcpt``, ``header`` (its first header field), ``eoh`` or
        ``body``. The connection stays open for the next message. Returns the plugin
        failures meanwhile (``abort`` included), as ``Outcome.errors``."""
        __tracebackhide__ = True
        stages = ("envfrom", "envrcpt", "header", "eoh", "body")
        if after not in stages:
            raise ValueError(f"after: one of {', '.join(stages)}")
        session, qid = self.session, self._queue_id(queue_id)
        if self.early is not None:
            return []
        mark = len(self.errors)
        values = self._message_values(qid, _strip(sender), None)
        session.on_envfrom(_strip(sender), {}, self._macros("envfrom", values))
        if after != "envfrom":
            for rcpt in recipients:
                rcpt_macros = self._macros("envrcpt", {**values, "{rcpt_addr}": _strip(rcpt)})
                session.on_envrcpt(_strip(rcpt), {}, rcpt_macros)
            if after != "envrcpt":
                for stage, step in _content(
                    session, message, 65535, self._macros("data", values),
                    self._macros("eoh", values),
                ):  # fmt: skip
                    step()
                    if stage == after:
                        break
        session.on_abort()
        self._check(None)
        return self.errors[mark:]


def _exceptions(
    errors: list[Error], excs: list[BaseException | None]
) -> list[tuple[str, str, BaseException]]:
    return [(p, s, e) for (p, s, _), e in zip(errors, excs, strict=True) if e is not None]


def _content(
    session: Session,
    message: bytes | str,
    chunk_size: int,
    data_macros: dict[str, str],
    eoh_macros: dict[str, str],
) -> list[tuple[str, Callable[[], Verdict | None]]]:
    """The DATA .. body steps for ``message``."""
    raw = message.encode("utf-8", "surrogateescape") if isinstance(message, str) else message
    fields, body = split_message(raw)
    steps: list[tuple[str, Callable[[], Verdict | None]]] = [
        ("data", partial(session.on_data, data_macros))
    ]
    steps += [("header", partial(session.on_header, n, v)) for n, v in fields]
    steps.append(("eoh", partial(session.on_eoh, eoh_macros)))
    steps += [
        ("body", partial(session.on_body, body[i : i + chunk_size]))
        for i in range(0, len(body), chunk_size)
    ]
    return steps


def _strip(addr: str) -> str:
    """An envelope address as the bridge passes it on: angle brackets removed, nothing
    else (a source route or a quoted local part stays as the MTA sent it). ``Name <a@b>``
    is accepted for convenience."""
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        return addr[1:-1]
    if "<" in addr and addr.endswith(">"):
        return email.utils.parseaddr(addr)[1] or addr
    return addr
