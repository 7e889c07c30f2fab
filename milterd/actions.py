"""What plugins contribute: verdicts, changes, results and score symbols.

Every contribution is a frozen value. Plugins never talk to the MTA: they return a verdict
from a hook, or record changes, results and symbols on the message's ledger through their
context. The core merges everything once at end of message (:mod:`milterd.merge`).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

__all__ = [
    "Accept",
    "AddHeader",
    "AddRecipient",
    "Change",
    "ChangeHeader",
    "ChangeSender",
    "DeleteHeader",
    "DeleteRecipient",
    "Discard",
    "InsertHeader",
    "Quarantine",
    "Reject",
    "ReplaceBody",
    "Result",
    "Severity",
    "Symbol",
    "TempFail",
    "Verdict",
]

_REPLY_CODE = re.compile(r"[45]\d\d")
_ENHANCED_CODE = re.compile(r"[45]\.\d{1,3}\.\d{1,3}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII except ':'


class Severity(enum.IntEnum):
    """Order of verdicts when plugins disagree: the highest wins (see :func:`merge`)."""

    CONTINUE = 0
    ACCEPT = 1
    QUARANTINE = 2
    TEMPFAIL = 3
    REJECT = 4
    DISCARD = 5


@dataclass(frozen=True, slots=True)
class Verdict:
    """Base of every verdict a hook may return. ``None`` from a hook means continue.

    ``reason`` (keyword-only) is for the log and ``milterd check``, never sent to the client.
    """

    reason: str = field(default="", kw_only=True)

    severity = Severity.CONTINUE

    @property
    def ends_stage(self) -> bool:
        """True when no later plugin is called at this stage (reject, tempfail, discard)."""
        return self.severity >= Severity.TEMPFAIL

    @property
    def word(self) -> str:
        """The verdict as one lower-case word, as logged: accept, reject, ..."""
        return self.severity.name.lower()


@dataclass(frozen=True, slots=True)
class Accept(Verdict):
    """This plugin is done with the message and finds nothing wrong.

    Accept is *not* "stop checking": it only stops calling this plugin's hooks for the rest
    of the message. Other plugins still run, and signing and archiving still happen.
    """

    severity = Severity.ACCEPT


def _check_reply(code: str, xcode: str | None, text: str, first: str) -> None:
    if not _REPLY_CODE.fullmatch(code) or code[0] != first:
        raise ValueError(f"SMTP reply code must be {first}xx, got {code!r}")
    if xcode is not None and (not _ENHANCED_CODE.fullmatch(xcode) or xcode[0] != first):
        raise ValueError(f"enhanced status code must be {first}.x.y, got {xcode!r}")
    if "\r" in text or "\n" in text:
        raise ValueError("reply text must be one line")


@dataclass(frozen=True, slots=True)
class Reject(Verdict):
    """Permanent failure (5xx). At RCPT it rejects that recipient only; elsewhere the message.

    At CONNECT and HELO it rejects every later command of the session (the MTA decides the
    exact behaviour; Postfix and sendmail answer 5xx to MAIL FROM).
    """

    code: str = "550"
    xcode: str | None = "5.7.1"
    text: str = "Message rejected"
    severity = Severity.REJECT

    def __post_init__(self) -> None:
        _check_reply(self.code, self.xcode, self.text, "5")


@dataclass(frozen=True, slots=True)
class TempFail(Verdict):
    """Temporary failure (4xx): the client should retry. At RCPT, for that recipient only."""

    code: str = "451"
    xcode: str | None = "4.7.1"
    text: str = "Try again later"
    severity = Severity.TEMPFAIL

    def __post_init__(self) -> None:
        _check_reply(self.code, self.xcode, self.text, "4")


@dataclass(frozen=True, slots=True)
class Discard(Verdict):
    """Accept the message from the client and silently drop it. Outranks every other verdict."""

    severity = Severity.DISCARD


@dataclass(frozen=True, slots=True)
class Quarantine(Verdict):
    """Accept the message but hold it in the MTA's quarantine (Postfix: the hold queue).

    Quarantine does not end the stage: later plugins still run and their changes still
    apply. ``reason`` is passed to the MTA.
    """

    severity = Severity.QUARANTINE


# --- changes -------------------------------------------------------------------------------


class Change:
    """Base of every change a plugin may record. Applied once at end of message."""

    __slots__ = ()

    action: str = ""  # the negotiation action this change needs (see milterd.negotiation)


def _check_header(name: str, value: str) -> None:
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"invalid header field name {name!r}")
    if "\0" in value:
        raise ValueError(f"NUL byte in the value of header {name!r}")


@dataclass(frozen=True, slots=True)
class AddHeader(Change):
    """Append a header field at the bottom of the header block.

    Authentication headers (Authentication-Results, DKIM-Signature, ARC-*, Received-SPF) are
    placed on top instead, whatever the plugin asked: see :func:`milterd.merge.merge`.
    ``value`` is the field body without the leading space; fold long values with
    ``"\\r\\n\\t"`` or ``"\\n\\t"`` (the core gives the MTA the form it expects).
    """

    name: str
    value: str
    action = "add_header"

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)


@dataclass(frozen=True, slots=True)
class InsertHeader(Change):
    """Insert a header field at ``index`` among the message's *original* header fields.

    0 is the very top. The core translates the index for fields deleted before it.
    """

    name: str
    value: str
    index: int = 0
    action = "add_header"

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)
        if self.index < 0:
            raise ValueError("header index must be >= 0")


@dataclass(frozen=True, slots=True)
class ChangeHeader(Change):
    """Replace the value of the ``occurrence``-th (1-based) original field named ``name``."""

    name: str
    value: str
    occurrence: int = 1
    action = "change_header"

    def __post_init__(self) -> None:
        _check_header(self.name, self.value)
        if self.occurrence < 1:
            raise ValueError("header occurrence is 1-based")


@dataclass(frozen=True, slots=True)
class DeleteHeader(Change):
    """Delete the ``occurrence``-th (1-based) original field named ``name``.

    Occurrences always refer to the message as received; the core orders the deletions so
    that earlier deletions do not shift later ones.
    """

    name: str
    occurrence: int = 1
    action = "change_header"

    def __post_init__(self) -> None:
        _check_header(self.name, "")
        if self.occurrence < 1:
            raise ValueError("header occurrence is 1-based")


@dataclass(frozen=True, slots=True)
class AddRecipient(Change):
    """Add an envelope recipient (like Bcc). ``params`` are ESMTP parameters (NAME=VALUE)."""

    address: str
    params: tuple[str, ...] = ()
    action = "add_recipient"


@dataclass(frozen=True, slots=True)
class DeleteRecipient(Change):
    """Remove an envelope recipient given at RCPT TO (as the MTA gave it, with brackets)."""

    address: str
    action = "delete_recipient"


@dataclass(frozen=True, slots=True)
class ChangeSender(Change):
    """Replace the envelope sender. ``params`` are ESMTP parameters (NAME=VALUE)."""

    address: str
    params: tuple[str, ...] = ()
    action = "change_sender"


@dataclass(frozen=True, slots=True)
class ReplaceBody(Change):
    """Replace the whole message body with ``body`` (bytes, CRLF line ends)."""

    body: bytes
    action = "replace_body"


# --- results and symbols -------------------------------------------------------------------

_METHOD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Result:
    """One authentication result, shaped like an RFC 8601 ``resinfo``.

    ``method`` and ``result`` are RFC 8601 words (``spf``/``pass``, ``dkim``/``fail``, ...).
    ``properties`` keep their order: ``(("smtp.mailfrom", "example.com"),)``.
    ``reason`` becomes ``reason="..."``. Later plugins read earlier results through
    :attr:`milterd.Context.results`.
    """

    method: str
    result: str
    reason: str = ""
    properties: tuple[tuple[str, str], ...] = ()
    version: str | None = None

    def __post_init__(self) -> None:
        if not _METHOD.fullmatch(self.method) or not _METHOD.fullmatch(self.result):
            raise ValueError(f"invalid RFC 8601 method/result {self.method!r}={self.result!r}")
        for key, _ in self.properties:
            ptype, _, prop = key.partition(".")
            if not ptype or not prop:
                raise ValueError(f"property must be ptype.property, got {key!r}")

    def prop(self, key: str) -> str | None:
        """The value of property ``key`` (``"header.d"``), or None."""
        for k, v in self.properties:
            if k == key:
                return v
        return None


@dataclass(frozen=True, slots=True)
class Symbol:
    """A named score contribution, as in rspamd and SpamAssassin."""

    name: str
    score: float
    description: str = ""
    options: tuple[str, ...] = field(default=())
