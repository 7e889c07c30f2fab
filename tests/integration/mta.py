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
from collections.abc import Mapping
from types import TracebackType
from typing import Literal, Protocol, Self

from tests.support.postfix import PrivatePostfix
from tests.support.sendmail import PrivateSendmail

__all__ = ["KINDS", "MTA", "Kind", "make_mta", "postfix_socket"]

Kind = Literal["postfix", "sendmail"]
KINDS: tuple[Kind, ...] = ("postfix", "sendmail")

#: Log lines in which the MTA says it gave up waiting for the milter.
MILTER_TIMEOUT_RE: dict[Kind, re.Pattern[str]] = {
    "postfix": re.compile(r"milter.*time(d )?out|timeout.*milter", re.IGNORECASE),
    "sendmail": re.compile(r"Milter.*time(d )?out|timeout.*(milter|filter)", re.IGNORECASE),
}


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
    postfix_options: Mapping[str, object] | None = None,
    sendmail_options: Mapping[str, object] | None = None,
) -> MTA:
    """Return an MTA (not started: use ``with``) of ``kind`` relaying to ``sink_port``.

    :param milter: milterd's socket in libmilter syntax (``Daemon.socket``).
    :param max_message_size: the MTA's own message size limit (bytes), if a test needs it
        above the default (Postfix 10 MB; sendmail: none).
    :param max_header_bytes: the MTA's limit on the header block, if a test needs it above
        the default (sendmail ``MaxHeadersLength`` 32 KiB; Postfix limits per header only).
    :param postfix_options: extra keyword arguments for :class:`PrivatePostfix`.
    :param sendmail_options: extra keyword arguments for :class:`PrivateSendmail`.
    """
    if kind == "postfix":
        main_cf: dict[str, object] = {}
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
            extra_mc="\n".join([*mc, extra]) if extra else "\n".join(mc),
            **sopts,  # type: ignore[arg-type]
        )
    raise ValueError(f"unknown MTA kind {kind!r} (postfix | sendmail)")
