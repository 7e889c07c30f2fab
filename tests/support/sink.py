"""An SMTP sink on 127.0.0.1 that records every message it receives.

:class:`SmtpSink` runs an aiosmtpd server in a background thread (aiosmtpd's
``Controller``).  Every accepted transaction becomes a :class:`SinkMessage`.

Line endings and bytes: the sink uses ``decode_data=False`` and stores aiosmtpd's
``envelope.original_content``.  aiosmtpd reads DATA line by line up to ``CRLF``, removes
only the dot-stuffing (RFC 5321 4.5.2) and the terminating ``.CRLF``, and joins the lines
unchanged, so ``data`` is exactly the message as it travelled on the wire: CRLF line
endings preserved, 8-bit bytes preserved, the final ``CRLF`` of the last line included.
(A bare LF inside a line is kept too, although Postfix would already have turned it into
CRLF.)

Lines longer than ``line_length_limit`` (default 1001 octets incl. CRLF, the RFC limit
plus a transparency dot) make aiosmtpd answer ``500`` for the whole message; Postfix's smtp
client folds longer lines before relaying, so this only matters for direct clients.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from tests.support.postfix import free_port

__all__ = ["SinkMessage", "SmtpSink"]


@dataclass(frozen=True)
class SinkMessage:
    """One message as received by the sink.

    :ivar mail_from: envelope sender (``""`` for the null sender ``<>``).
    :ivar rcpt_tos: envelope recipients in RCPT order.
    :ivar data: raw message bytes exactly as received (CRLF kept, dot-stuffing removed).
    :ivar received_at: ``time.time()`` when DATA completed.
    :ivar mail_options: ESMTP MAIL parameters, e.g. ``["BODY=8BITMIME", "SMTPUTF8"]``.
    :ivar rcpt_options: ESMTP RCPT parameters (of the last RCPT, as aiosmtpd keeps them).
    :ivar peer: the client's (host, port).
    :ivar helo: the HELO/EHLO name the client used.
    """

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    received_at: float
    mail_options: list[str] = field(default_factory=list)
    rcpt_options: list[str] = field(default_factory=list)
    peer: tuple[str, int] | None = None
    helo: str | None = None

    def header(self, name: str) -> list[str]:
        """Return all values of header ``name`` (case-insensitive), unfolded, as str.

        A convenience for assertions; parsing is deliberately simple (RFC 5322 header
        block up to the first empty line, continuation lines joined with a space).
        """
        head = self.data.split(b"\r\n\r\n", 1)[0].decode("utf-8", errors="surrogateescape")
        values: list[list[str]] = []
        collecting = False
        for line in head.split("\r\n"):
            if line[:1] in (" ", "\t"):
                if collecting:
                    values[-1].append(line.strip())
                continue
            key, sep, value = line.partition(":")
            collecting = bool(sep) and key.strip().lower() == name.lower()
            if collecting:
                values.append([value.strip()])
        return [" ".join(parts) for parts in values]

    @property
    def body(self) -> bytes:
        """The body: everything after the first empty line (``b""`` if there is none)."""
        parts = self.data.split(b"\r\n\r\n", 1)
        return parts[1] if len(parts) == 2 else b""


class _Handler:
    """aiosmtpd handler: stores the envelope, answers with the sink's configured reply."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        reply = self._sink.data_response
        if reply.startswith("250"):
            peer = session.peer
            self._sink._record(
                SinkMessage(
                    mail_from=str(envelope.mail_from or ""),
                    rcpt_tos=[str(r) for r in envelope.rcpt_tos],
                    data=bytes(envelope.original_content or b""),
                    received_at=time.time(),
                    mail_options=list(envelope.mail_options or []),
                    rcpt_options=list(envelope.rcpt_options or []),
                    peer=(str(peer[0]), int(peer[1])) if peer else None,
                    helo=session.host_name,
                )
            )
        return reply

    async def handle_RCPT(  # noqa: N802
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        reply = self._sink.rcpt_responses.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"


class SmtpSink:
    """Record-everything SMTP server on ``127.0.0.1:port`` (aiosmtpd in a thread).

    Accepts 8BITMIME and SMTPUTF8 and messages up to ``data_size_limit`` bytes.

    :param port: None picks a free port.
    :param data_size_limit: largest accepted message in bytes (default 64 MiB).
    :param hostname: the name in the sink's greeting.  Must differ from Postfix's
        ``myhostname``, or Postfix refuses to deliver ("greeted me with my own hostname").
    :param line_length_limit: longest accepted line in octets incl. CRLF.

    Behaviour knobs (may be changed while running):

    * :attr:`data_response` -- reply to the end of DATA; anything not starting with ``250``
      is returned to the client and the message is *not* recorded (e.g. ``"451 4.3.0 try
      later"`` to make Postfix defer).
    * :attr:`rcpt_responses` -- lower-cased address -> reply for RCPT TO (e.g. ``"550 5.1.1
      no such user"``); other recipients get ``250``.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        data_size_limit: int = 64 * 1024 * 1024,
        hostname: str = "sink.test",
        line_length_limit: int = 1001,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.host = "127.0.0.1"
        self.data_size_limit = data_size_limit
        self.hostname = hostname
        self.line_length_limit = line_length_limit
        self.data_response = "250 2.0.0 OK: queued by sink"
        self.rcpt_responses: dict[str, str] = {}
        self._messages: list[SinkMessage] = []
        self._cond = threading.Condition()
        self._controller: Controller | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Start listening; returns when the server accepts connections.  Idempotent."""
        if self._controller is not None:
            return
        limit = self.line_length_limit

        class _SinkSMTP(SMTP):
            # The class attribute also sizes asyncio's StreamReader buffer.
            line_length_limit = limit

        kwargs: dict[str, Any] = {
            "decode_data": False,
            "enable_SMTPUTF8": True,
            "data_size_limit": self.data_size_limit,
            "hostname": self.hostname,
            "ident": "milterd-test-sink",
        }

        class _Controller(Controller):
            def factory(self) -> SMTP:
                return _SinkSMTP(self.handler, **kwargs)

        controller = _Controller(_Handler(self), hostname=self.host, port=self.port)
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop the server thread.  Idempotent; recorded messages stay available."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- records

    def _record(self, message: SinkMessage) -> None:
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    @property
    def messages(self) -> list[SinkMessage]:
        """A snapshot (copy) of all messages recorded so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def clear(self) -> None:
        """Forget all recorded messages."""
        with self._cond:
            self._messages.clear()

    def wait_for(self, count: int = 1, timeout: float = 10.0) -> list[SinkMessage]:
        """Wait until at least ``count`` messages were recorded; return all of them.

        :raises TimeoutError: if fewer than ``count`` arrived within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._messages) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"sink received {len(self._messages)} of {count} messages in {timeout}s"
                    )
                self._cond.wait(remaining)
            return list(self._messages)
