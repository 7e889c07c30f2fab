"""The harness plugin authors test with: a message through the real pipeline, in process.

No libmilter and no MTA: :class:`Harness` drives the same :class:`~milterd.pipeline.Session`
the daemon's bridge drives, stage by stage, as Postfix would (connect, helo, MAIL, RCPT...,
DATA, headers, end of headers, body chunks, end of message). DNS comes from a
:class:`FakeResolver` built from a dictionary of zones.

Example::

    from milterd.testing import Harness

    def test_adds_header():
        with Harness({"example": {"greeting": "hi"}}, plugins={"example": MyPlugin}) as h:
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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from milterd.actions import Result, Symbol, Verdict
from milterd.config import Config, from_dict, loads
from milterd.dns import DNSTempError, NXDomain
from milterd.events import Client, parse_address
from milterd.merge import Decision, Op
from milterd.pipeline import Runtime, Session

__all__ = ["FakeResolver", "Harness", "HarnessSession", "Outcome", "split_message"]


class FakeResolver:
    """A resolver answering from a dictionary: ``{name: {rdtype: [text, ...]}}``.

    Names are case-insensitive, with or without the trailing dot. A name absent from the
    dictionary is NXDOMAIN; a present name without the type is NODATA (``[]``). A value of
    ``"TIMEOUT"`` instead of a list raises DNSTempError, as a silent server would. Every
    query is appended to :attr:`queries`.
    """

    def __init__(self, zones: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.zones: dict[str, dict[str, Any]] = {}
        self.queries: list[tuple[str, str]] = []
        for name, records in (zones or {}).items():
            self.zones[name.lower().rstrip(".")] = {k.upper(): v for k, v in records.items()}

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        key = name.lower().rstrip(".")
        self.queries.append((key, rdtype.upper()))
        if key not in self.zones:
            raise NXDomain(name)
        value = self.zones[key].get(rdtype.upper(), [])
        if value == "TIMEOUT":
            raise DNSTempError(f"{name}/{rdtype}: timeout (fake)")
        return [str(v) for v in value]


_FIELD = re.compile(rb"([\x21-\x39\x3b-\x7e]+)[ \t]*:")


def split_message(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes]:
    """Split a message into header fields (name, raw value as an MTA sends it with
    leading space kept) and the body with CRLF line ends, as an MTA does: a field name is
    printable ASCII without ":" (white space may precede the colon), and the first line
    that is neither a field nor a continuation ends the header block (it and what follows
    are the body). Never raises."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    lines = head.split(b"\n")
    fields: list[tuple[str, bytes]] = []
    for i, line in enumerate(lines if head else []):
        if line[:1] in (b" ", b"\t") and fields:
            last_name, last_value = fields[-1]
            fields[-1] = (last_name, last_value + b"\r\n" + line)
            continue
        m = _FIELD.match(line)
        if m is None:  # not a header field: the header block ends here
            rest = b"\n".join(lines[i:])
            body = rest + (sep + body if sep else b"")
            break
        fields.append((m.group(1).decode("ascii"), line[m.end() :]))
    return fields, body.replace(b"\n", b"\r\n")


@dataclass
class Outcome:
    """What the pipeline decided for one message."""

    decision: Decision
    delivered: bytes | None  # the message exactly as it would be delivered, or None
    results: list[Result]
    symbols: list[Symbol]
    score: float
    errors: list[tuple[str, str, str]]
    timings: dict[str, float]
    stage: str  # the stage that decided: "eom", or an earlier one
    early: Verdict | None = None  # the verdict given before end of message, if any
    refused: dict[str, Verdict] = field(default_factory=dict)  # per recipient at RCPT

    @property
    def verdict(self) -> str:
        """``continue``, ``accept``, ``quarantine``, ``tempfail``, ``reject``, ``discard``."""
        if self.early is not None:
            return self.early.word
        return self.decision.word

    @property
    def ops(self) -> list[Op]:
        return self.decision.ops

    def header(self, name: str) -> str | None:
        """The first header ``name`` of the delivered message, or None."""
        if self.delivered is None:
            return None
        for field_name, value in split_message(self.delivered)[0]:
            if field_name.lower() == name.lower():
                return value.decode("utf-8", "surrogateescape").strip()
        return None

    def headers(self) -> list[tuple[str, str]]:
        """The delivered message's header fields in order (name, value without indent)."""
        if self.delivered is None:
            return []
        return [
            (n, v.decode("utf-8", "surrogateescape").strip())
            for n, v in split_message(self.delivered)[0]
        ]


def _config(
    config: str | Mapping[str, Any] | Config | None, plugins: Mapping[str, object]
) -> Config:
    if isinstance(config, Config):
        return config
    if isinstance(config, str):
        return loads(config)
    data: dict[str, Any] = {"milterd": {"authserv_id": "mx.test.example"}, "plugins": {}}
    if config:
        sections = dict(config)
        if "milterd" in sections or "dns" in sections or "plugins" in sections:
            data.update({k: v for k, v in sections.items() if k != "plugins"})
            data["plugins"] = dict(sections.get("plugins", {}))
        else:  # shorthand: {plugin name: its section}
            data["plugins"] = {k: dict(v) for k, v in sections.items()}
    for name in plugins:
        data["plugins"].setdefault(name, {})
    return from_dict(data)


class Harness:
    """A configured pipeline that messages can be sent through, in process.

    ``config``: TOML text, a dict shaped like the file, a shorthand dict of plugin sections
    (``{"example": {"greeting": "hi"}}``), or a :class:`Config`. ``plugins`` maps plugin
    names to classes or objects used instead of installed entry points (names not given
    here are loaded from entry points). ``zones`` builds a FakeResolver.
    """

    def __init__(
        self,
        config: str | Mapping[str, Any] | Config | None = None,
        *,
        plugins: Mapping[str, object] | None = None,
        zones: Mapping[str, Mapping[str, Any]] | None = None,
        resolver: Any = None,
    ) -> None:
        self.plugins = dict(plugins or {})
        self.resolver = resolver if resolver is not None else FakeResolver(zones)
        self.config = _config(config, self.plugins)
        self.runtime = Runtime(self.config, self.plugins, self.resolver)
        self.runtime.start()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.runtime.stop()

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
        """Send one message through the pipeline on a new connection, as an MTA would."""
        with self.session(client_ip=client_ip, client_name=client_name, helo=helo,
                          macros=macros) as conn:  # fmt: skip
            return conn.send(
                message,
                sender=sender,
                recipients=recipients,
                auth=auth,
                queue_id=queue_id,
                chunk_size=chunk_size,
            )

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
    """One connection through a :class:`Harness`; see :meth:`Harness.session`."""

    def __init__(
        self,
        harness: Harness,
        client_ip: str,
        client_name: str | None,
        helo: str,
        macros: Mapping[str, str] | None,
    ) -> None:
        self.session = Session(harness.runtime, capture=True)
        self.count = 0
        addr = parse_address(client_ip) if client_ip else None
        family = "unknown" if addr is None else ("inet6" if addr.version == 6 else "inet")
        name = client_name or (f"[{client_ip}]" if client_ip else "localhost")
        client = Client(name, family, addr, 25000 if addr else None)  # type: ignore[arg-type]
        conn_macros = {
            "j": "mx.test.example",
            "{daemon_name}": "smtpd",
            "{client_addr}": client_ip,
            **(macros or {}),
        }
        # A verdict at CONNECT or HELO answers every message of the session.
        self.early: tuple[Verdict, str] | None = None
        v = self.session.on_connect(name, client, conn_macros)
        if v is not None:
            self.early = (v, "connect")
            return
        v = self.session.on_helo(helo, {})
        if v is not None:
            self.early = (v, "helo")

    def __enter__(self) -> HarnessSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """End the connection (plugins' ``close``)."""
        self.session.on_close()

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
        unless given."""
        session, qid = self.session, self._queue_id(queue_id)
        refused: dict[str, Verdict] = {}
        if self.early is not None:
            return _early(session, *self.early, refused)
        mail_macros = {
            "i": qid,
            **({"{auth_authen}": auth, "{auth_type}": "PLAIN"} if auth else {}),
        }
        early = session.on_envfrom(_strip(sender), {}, mail_macros)
        if early is not None:
            return _early(session, early, "envfrom", refused)
        accepted = 0
        for rcpt in recipients:
            v = session.on_envrcpt(_strip(rcpt), {}, {"i": qid})
            if v is not None:
                refused[rcpt] = v
            else:
                accepted += 1
        if not accepted:  # the MTA ends the transaction: the strongest refusal is the verdict
            session.on_abort()
            worst = max(refused.values(), key=lambda v: v.severity) if refused else None
            return _early(session, worst, "envrcpt", refused)
        # Every stage is fed, even those negotiation would skip: plugins are only called
        # for the stages they hook, and the delivered copy needs the whole message.
        for stage, step in _content(session, message, chunk_size):
            early = step()
            if early is not None:
                return _early(session, early, stage, refused)
        decision = session.on_eom({"i": qid})
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
        )

    def abandon(
        self,
        message: bytes | str = b"",
        *,
        after: str = "envrcpt",
        sender: str = "sender@example.org",
        recipients: Iterable[str] = ("rcpt@example.com",),
        queue_id: str | None = None,
    ) -> None:
        """Start a message and abandon it (plugins' ``abort``) after stage ``after``:
        ``envfrom``, ``envrcpt``, ``header`` (its first header field), ``eoh`` or
        ``body``. The connection stays open for the next message."""
        stages = ("envfrom", "envrcpt", "header", "eoh", "body")
        if after not in stages:
            raise ValueError(f"after: one of {', '.join(stages)}")
        session, qid = self.session, self._queue_id(queue_id)
        if self.early is not None:
            return
        session.on_envfrom(_strip(sender), {}, {"i": qid})
        if after != "envfrom":
            for rcpt in recipients:
                session.on_envrcpt(_strip(rcpt), {}, {"i": qid})
            if after != "envrcpt":
                for stage, step in _content(session, message, 65535):
                    step()
                    if stage == after:
                        break
        session.on_abort()


def _content(
    session: Session, message: bytes | str, chunk_size: int
) -> list[tuple[str, Callable[[], Verdict | None]]]:
    """The DATA .. body steps for ``message``."""
    raw = message.encode("utf-8", "surrogateescape") if isinstance(message, str) else message
    fields, body = split_message(raw)
    steps: list[tuple[str, Callable[[], Verdict | None]]] = [("data", partial(session.on_data, {}))]
    steps += [("header", partial(session.on_header, n, v)) for n, v in fields]
    steps.append(("eoh", partial(session.on_eoh, {})))
    steps += [
        ("body", partial(session.on_body, body[i : i + chunk_size]))
        for i in range(0, len(body), chunk_size)
    ]
    return steps


def _early(session: Session, v: Verdict | None, stage: str, refused: dict[str, Verdict]) -> Outcome:
    ledger = session.last_ledger
    return Outcome(
        Decision(v),
        None,
        ledger.results,
        ledger.symbols,
        ledger.score,
        list(ledger.errors),
        dict(ledger.timings),
        stage,
        early=v,
        refused=refused,
    )


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
