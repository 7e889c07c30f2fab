"""An SMTP client for tests that reports server answers instead of raising.

:func:`send` drives one transaction step by step (connect, EHLO, optional AUTH, MAIL,
RCPT..., DATA) with :mod:`smtplib` and returns a :class:`SendResult` describing how far it
got and what the server said.  4xx/5xx replies are data, not exceptions; only programming
errors and timeouts of the local socket escape.

``data`` is sent as given (smtplib only dot-stuffs bytes and appends ``CRLF.CRLF``): use
CRLF line endings if you want to compare bytes end to end.
"""

from __future__ import annotations

import contextlib
import smtplib
from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["SendResult", "send"]


@dataclass
class SendResult:
    """What happened in one :func:`send` call.

    :ivar stage: the last step attempted: ``"connect"``, ``"ehlo"``, ``"auth"``, ``"mail"``,
        ``"rcpt"``, ``"data"`` or ``"done"`` (the server answered the end of DATA with 2xx).
    :ivar code: the SMTP code of the reply that ended the transaction (the DATA reply when
        ``stage == "done"``; ``-1`` if the server disconnected without a reply).
    :ivar text: that reply's text (multi-line replies joined with newlines).
    :ivar refused: per-recipient refusals: address -> (code, text).
    :ivar accepted_rcpts: recipients the server accepted at RCPT.
    :ivar replies: every (command, code, text) exchanged, for debugging.
    """

    stage: str = "connect"
    code: int = -1
    text: str = ""
    refused: dict[str, tuple[int, str]] = field(default_factory=dict)
    accepted_rcpts: list[str] = field(default_factory=list)
    replies: list[tuple[str, int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True if the message was accepted (2xx after DATA) for at least one recipient."""
        return self.stage == "done" and 200 <= self.code < 300

    @property
    def tempfail(self) -> bool:
        """True if the transaction ended with a 4xx reply."""
        return 400 <= self.code < 500

    @property
    def rejected(self) -> bool:
        """True if the transaction ended with a 5xx reply."""
        return 500 <= self.code < 600


def _text(raw: bytes | str) -> str:
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw


def send(
    host: str,
    port: int,
    sender: str,
    rcpts: Sequence[str] | str,
    data: bytes,
    helo: str = "client.example",
    timeout: float = 30,
    auth: tuple[str, str] | None = None,
    *,
    source_address: tuple[str, int] | None = None,
    mail_options: Sequence[str] = (),
    rcpt_options: Sequence[str] = (),
) -> SendResult:
    """Send one message and report every reply; never raises on 4xx/5xx.

    :param host: ``"127.0.0.1"`` or ``"::1"`` (IPv6 works: smtplib uses
        ``socket.create_connection``).
    :param sender: envelope sender; ``""`` sends ``MAIL FROM:<>``.
    :param rcpts: one address or a list.
    :param data: the message bytes (use CRLF).
    :param auth: (user, password) -- AUTH PLAIN if offered, else smtplib's choice.
    :param source_address: local (host, port) to bind, e.g. ``("::1", 0)``.
    :param mail_options: ESMTP MAIL parameters; ``SMTPUTF8`` is added automatically when
        an address is non-ASCII and the server offers it, ``BODY=8BITMIME`` when ``data``
        has 8-bit bytes and the server offers it.
    :param rcpt_options: ESMTP RCPT parameters for every recipient.
    :returns: a :class:`SendResult`; ``result.ok`` means the message was accepted.
    :raises TimeoutError: if the server does not answer within ``timeout`` seconds.
    :raises OSError: if the TCP connection cannot be made (e.g. connection refused).
    """
    if isinstance(rcpts, str):
        rcpts = [rcpts]
    result = SendResult()
    client = smtplib.SMTP(local_hostname=helo, timeout=timeout, source_address=source_address)

    def note(cmd: str, code: int, msg: bytes | str) -> tuple[int, str]:
        text = _text(msg)
        result.replies.append((cmd, code, text))
        return code, text

    def finish(stage: str, code: int, msg: bytes | str) -> SendResult:
        result.stage = stage
        result.code, result.text = code, _text(msg)
        return result

    code: int
    msg: bytes | str
    try:
        result.stage = "connect"
        code, msg = client.connect(host, port)
        note("connect", code, msg)
        if code != 220:
            return finish("connect", code, msg)

        result.stage = "ehlo"
        code, msg = client.ehlo()
        note("EHLO", code, msg)
        if not 200 <= code < 300:
            code, msg = client.helo()
            note("HELO", code, msg)
            if not 200 <= code < 300:
                return finish("ehlo", code, msg)

        if auth is not None:
            result.stage = "auth"
            user, password = auth
            try:
                if "plain" in client.esmtp_features.get("auth", "").lower().split():
                    client.user, client.password = user, password
                    code, msg = client.auth("PLAIN", client.auth_plain)
                else:
                    code, msg = client.login(user, password)
            except smtplib.SMTPAuthenticationError as e:
                code, msg = e.smtp_code, e.smtp_error
            except smtplib.SMTPNotSupportedError as e:
                return finish("auth", 502, str(e))
            note("AUTH", code, msg)
            if not 200 <= code < 300:
                return finish("auth", code, msg)

        opts = list(mail_options)
        upper = {o.upper() for o in opts}
        all_addrs = [sender, *rcpts]
        if (
            any(not a.isascii() for a in all_addrs)
            and client.has_extn("smtputf8")
            and "SMTPUTF8" not in upper
        ):
            opts.append("SMTPUTF8")
        if (
            any(b > 0x7F for b in data)
            and client.has_extn("8bitmime")
            and not any(o.startswith("BODY=") for o in upper)
        ):
            opts.append("BODY=8BITMIME")

        result.stage = "mail"
        code, msg = client.mail(sender, opts)
        note("MAIL", code, msg)
        if code != 250:
            return finish("mail", code, msg)

        result.stage = "rcpt"
        last: tuple[int, bytes | str] = (code, msg)
        for rcpt in rcpts:
            code, msg = client.rcpt(rcpt, list(rcpt_options))
            note(f"RCPT {rcpt}", code, msg)
            last = (code, msg)
            if code in (250, 251):
                result.accepted_rcpts.append(rcpt)
            else:
                result.refused[rcpt] = (code, _text(msg))
        if not result.accepted_rcpts:
            _rset(client)
            return finish("rcpt", *last)

        result.stage = "data"
        code, msg = client.data(data)
        note("DATA", code, msg)
        if not 200 <= code < 300:
            _rset(client)
            return finish("data", code, msg)
        finish("done", code, msg)
    except smtplib.SMTPServerDisconnected as e:
        # Postfix drops the connection after 421; keep the stage reached.
        result.code, result.text = -1, f"disconnected: {e}"
        return result
    except smtplib.SMTPResponseException as e:  # e.g. a 4xx/5xx to the DATA command itself
        return finish(result.stage, e.smtp_code, e.smtp_error)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPException, OSError):
            client.close()
    return result


def _rset(client: smtplib.SMTP) -> None:
    """Send RSET, ignoring any failure (the session may already be dead)."""
    with contextlib.suppress(smtplib.SMTPException, OSError):
        client.rset()
