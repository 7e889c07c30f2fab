"""One factory for "an MTA of kind postfix|sendmail relaying to this sink through this
milter socket", so that an end-to-end test is written once and runs over both.

    with make_mta("sendmail", sink_port=sink.port, milter=daemon.socket) as mta:
        send(mta.host, mta.smtp_port, ...)

``milter`` is milterd's own ``socket`` value (libmilter syntax, ``unix:/path`` or
``inet:PORT@HOST``, i.e. :attr:`tests.integration.daemon.Daemon.socket`); it is translated
for Postfix (``inet:HOST:PORT``).  Both kinds use their documented configuration: sendmail
the verbatim ``etc/sendmail.mc.snippet`` (``F=T``, ``T=C:30s;S:10s;R:10s;E:5m``), Postfix
``milter_default_action = tempfail`` and its default milter timeouts (30 s / 300 s) unless
a test narrows them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Literal, Protocol, Self

from tests.support.postfix import PrivatePostfix
from tests.support.sendmail import PrivateSendmail

__all__ = [
    "DELIVERED_RE",
    "HOLD_RE",
    "KINDS",
    "MTA",
    "Kind",
    "accepted_queue_id",
    "make_mta",
    "postfix_socket",
    "received_queue_id",
]

Kind = Literal["postfix", "sendmail"]
KINDS: tuple[Kind, ...] = ("postfix", "sendmail")

#: Log lines in which the MTA says it gave up waiting for the milter.
MILTER_TIMEOUT_RE: dict[Kind, re.Pattern[str]] = {
    "postfix": re.compile(r"milter.*time(d )?out|timeout.*milter", re.IGNORECASE),
    "sendmail": re.compile(r"Milter.*time(d )?out|timeout.*(milter|filter)", re.IGNORECASE),
}

#: The log line in which the MTA says it holds (quarantines) a message on a milter's
#: request: Postfix moves it to its ``hold`` queue, sendmail keeps it as an ``hf`` file.
HOLD_RE: dict[Kind, re.Pattern[str]] = {
    "postfix": re.compile(r"milter triggers HOLD action"),
    "sendmail": re.compile(r"milter=\S+, quarantine="),
}

#: The log line of one successful delivery (to the sink) per recipient.
DELIVERED_RE: dict[Kind, re.Pattern[str]] = {
    "postfix": re.compile(r" status=sent "),
    "sendmail": re.compile(r" stat=Sent "),
}

_RECEIVED_ID = re.compile(r"\bid ([0-9A-Za-z]+)")


def received_queue_id(received: str | bytes) -> str:
    """The queue id in the MTA's own ``Received:`` field (``... with ESMTP id QID``, or
    Postfix's ``(Postfix, from userid 0) id QID`` for local submission).

    Postfix ids are upper-case hex (``4Cq7...``), sendmail's mixed-case alphanumerics
    (``6B2AfIfa022313``); both MTAs fold the field, which does not matter here.
    """
    text = received.decode(errors="replace") if isinstance(received, bytes) else received
    m = _RECEIVED_ID.search(text)
    if m is None:
        raise ValueError(f"no queue id in {text!r}")
    return m.group(1)


_ACCEPTED_ID = re.compile(r"queued as ([0-9A-Za-z]+)|^\d\.\d\.\d ([0-9A-Za-z]+) Message accepted")


def accepted_queue_id(reply: str) -> str:
    """The queue id in the MTA's 250 reply to the end of DATA (:attr:`SendResult.text`).

    Postfix: ``2.0.0 Ok: queued as QID``; sendmail: ``2.0.0 QID Message accepted for
    delivery``.
    """
    m = _ACCEPTED_ID.search(reply)
    if m is None:
        raise ValueError(f"no queue id in {reply!r}")
    return m.group(1) or m.group(2)


class MTA(Protocol):
    """What both :class:`PrivatePostfix` and :class:`PrivateSendmail` offer."""

    smtp_port: int
    ipv6: bool

    @property
    def host(self) -> str: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def log_text(self) -> str: ...
    def log_mark(self) -> int: ...
    def log_tail(self, lines: int = 40) -> str: ...
    def queue_ids(self) -> list[str]: ...
    def held_ids(self) -> list[str]: ...
    def clear_queue(self) -> None: ...
    def wait_queue_empty(self, timeout: float = 10.0) -> None: ...
    def wait_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


def postfix_socket(milter: str) -> str:
    """libmilter ``inet:PORT@HOST`` -> Postfix ``inet:HOST:PORT``; ``unix:`` unchanged."""
    if milter.startswith("inet:"):
        port, _, host = milter[5:].partition("@")
        return f"inet:{host or '127.0.0.1'}:{port}"
    return milter


def make_mta(
    kind: str,
    *,
    sink_port: int,
    milter: str,
    ipv6: bool = False,
    sasl_users: Mapping[str, str] | None = None,
    max_message_size: int | None = None,
    max_header_bytes: int | None = None,
    relay_networks: Sequence[str] = (),
    postfix_options: Mapping[str, object] | None = None,
    sendmail_options: Mapping[str, object] | None = None,
) -> MTA:
    """Return an MTA (not started: use ``with``) of ``kind`` relaying to ``sink_port``.

    :param milter: milterd's socket in libmilter syntax (``Daemon.socket``).
    :param max_message_size: the MTA's own message size limit (bytes), if a test needs it
        above the default (Postfix 10 MB; sendmail: none).
    :param max_header_bytes: the MTA's limit on the header block, if a test needs it above
        the default (sendmail ``MaxHeadersLength`` 32 KiB; Postfix limits per header only).
    :param relay_networks: client networks besides the default (Postfix: 127.0.0.0/8 and
        ::1; sendmail: 127.0.0.1 only) that may relay without AUTH (IPv4 CIDR with an
        octet-aligned prefix, which both MTAs can express): Postfix ``mynetworks``,
        sendmail ``relay-domains``.
    :param postfix_options: extra keyword arguments for :class:`PrivatePostfix`.
    :param sendmail_options: extra keyword arguments for :class:`PrivateSendmail`.
    """
    if kind == "postfix":
        main_cf: dict[str, object] = {}
        if relay_networks:
            # PrivatePostfix's own mynetworks first, so that setting this only adds
            nets = dict.fromkeys(["127.0.0.0/8", "[::1]/128", *relay_networks])
            main_cf["mynetworks"] = " ".join(nets)
        if max_message_size is not None:
            main_cf["message_size_limit"] = max_message_size
        opts = dict(postfix_options or {})
        main_cf.update(opts.pop("extra_main_cf", None) or {})  # type: ignore[call-overload]
        return PrivatePostfix(
            relay_port=sink_port,
            milters=postfix_socket(milter),
            ipv6=ipv6,
            sasl_users=sasl_users,
            extra_main_cf=main_cf,
            **opts,  # type: ignore[arg-type]
        )
    if kind == "sendmail":
        mc: list[str] = []
        if max_message_size is not None:
            mc.append(f"define(`confMAX_MESSAGE_SIZE', `{max_message_size}')dnl")
        if max_header_bytes is not None:
            mc.append(f"define(`confMAX_HEADERS_LENGTH', `{max_header_bytes}')dnl")
        sopts = dict(sendmail_options or {})
        extra = str(sopts.pop("extra_mc", ""))
        return PrivateSendmail(
            relay_port=sink_port,
            milter=milter,
            ipv6=ipv6,
            sasl_users=sasl_users,
            relay_networks=relay_networks,
            extra_mc="\n".join([*mc, extra]) if extra else "\n".join(mc),
            **sopts,  # type: ignore[arg-type]
        )
    raise ValueError(f"unknown MTA kind {kind!r} (postfix | sendmail)")
