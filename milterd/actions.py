"""What plugins contribute: verdicts, changes, results and score symbols.

Every contribution is a frozen value. Plugins never talk to the MTA: they return a verdict
from a hook, or record changes, results and symbols on the message's ledger through their
context. The core merges everything once at end of message (:mod:`milterd.merge`).
"""

from __future__ import annotations

import enum
import math
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
    of the message (``finalize`` included; ``outcome``, ``abort`` and ``close`` are still
    called). Other plugins still run, and signing and archiving still happen. At RCPT it
    concerns that recipient only; at connect or HELO it only skips the plugin's HELO calls.
    """

    severity = Severity.ACCEPT


def _check_reply(code: str, xcode: str | None, text: str, first: str) -> None:
    for what, v, example in (("code", code, f"'{first}50'"), ("text", text, "'Go away'")):
        if not isinstance(v, str):
            raise TypeError(f"reply {what} must be a str such as {example}, got {v!r}")
    if xcode is not None and not isinstance(xcode, str):
        raise TypeError(f"enhanced status code must be a str such as '{first}.7.1' or None")
    if not _REPLY_CODE.fullmatch(code) or code[0] != first:
        raise ValueError(f"SMTP reply code must be {first}xx, got {code!r}")
    if xcode is not None and (not _ENHANCED_CODE.fullmatch(xcode) or xcode[0] != first):
        raise ValueError(f"enhanced status code must be {first}.x.y, got {xcode!r}")
    if "\r" in text or "\n" in text:
        raise ValueError("reply text must be one line")


#: libmilter's smfi_setreply refuses a text over 980 bytes (MAXREPLYLEN), with every "%"
#: doubled; the MTA then sends its own generic reply ("550 5.7.1 Command rejected").
MAX_REPLY_TEXT = 980


def _fit_reply(text: str) -> str:
    """``text``, cut (ending ``...``) to what libmilter sends, so that the harness shows
    the reply the client gets."""
    if len(text) * 3 <= MAX_REPLY_TEXT // 2:  # short: fits whatever its characters
        return text
    widths = [len(c.encode("utf-8", "replace")) * (2 if c == "%" else 1) for c in text]
    if sum(widths) <= MAX_REPLY_TEXT:
        return text
    used, n = 0, 0
    for n, w in enumerate(widths):  # noqa: B007 - n is the cut
        if used + w > MAX_REPLY_TEXT - 3:
            break
        used += w
    return text[:n] + "..."


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
        object.__setattr__(self, "text", _fit_reply(self.text))  # frozen: set once, here


@dataclass(frozen=True, slots=True)
class TempFail(Verdict):
    """Temporary failure (4xx): the client should retry. At RCPT, for that recipient only."""

    code: str = "451"
    xcode: str | None = "4.7.1"
    text: str = "Try again later"
    severity = Severity.TEMPFAIL

    def __post_init__(self) -> None:
        _check_reply(self.code, self.xcode, self.text, "4")
        object.__setattr__(self, "text", _fit_reply(self.text))  # frozen: set once, here


@dataclass(frozen=True, slots=True)
class Discard(Verdict):
    """Accept the message from the client and silently drop it. Outranks every other verdict."""

    severity = Severity.DISCARD


@dataclass(frozen=True, slots=True)
class Quarantine(Verdict):
    """Accept the message but hold it in the MTA's quarantine (Postfix: the hold queue).

    Quarantine does not end the stage: later plugins still run and their changes still
    apply. ``reason`` is passed to the MTA. Any plugin may return it: the MTA is always
    asked for the quarantine action, whatever the plugins declare.
    """

    severity = Severity.QUARANTINE


# --- changes -------------------------------------------------------------------------------


class Change:
    """Base of every change a plugin may record. Applied once at end of message."""

    __slots__ = ()

    action: str = ""  # the negotiation action this change needs (see milterd.negotiation)


_BREAK = re.compile(r"\r\n|\r|\n")
_ESCAPED = re.compile("[\udc80-\udcff]+")  # bytes kept by surrogateescape decoding


def _lines(value: str) -> list[str]:
    """``value`` split at its line breaks (CRLF, bare CR, bare LF), as ``_BREAK.split``;
    with CRLF only, or no CR at all (the usual cases), without the regex (5 us a field)."""
    if "\r" not in value:
        return value.split("\n")
    n = value.count("\r\n")
    if value.count("\r") == n == value.count("\n"):
        return value.split("\r\n")
    return _BREAK.split(value)


# Signatures cover their own field as written: never refolded.
_NO_REFOLD = frozenset(
    {"dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results"}
)
FOLD_WIDTH = 78  # RFC 5322 2.1.1: SHOULD; 998 is the MUST
MAX_LINE = 998


def _check_header(name: str, value: str) -> str:
    """Check a header field a plugin adds or changes; return the value to use.

    Raises ValueError for an invalid name or a NUL. Otherwise the value is made one valid
    field, never refused, because it often quotes what a sender wrote and refusing it
    would defer the message on every retry:

    * trailing line breaks are dropped; a line break not followed by white space (which
      would start another field or end the header block) gets a space after it, so the
      text stays inside this field;
    * bytes that did not decode (an 8-bit header quoted into a new value) are read as
      Windows-1252, so that the value is valid UTF-8 for the MTA;
    * lines longer than 78 characters are folded at white space (signature fields
      excepted); a run without white space that would still pass 998 octets is broken
      every 900 characters, as MTAs do (unfolding then leaves a space in it).
    """
    if not isinstance(name, str) or not isinstance(value, str):
        raise TypeError(
            f"header field name and value must be str, got {type(name).__name__} "
            f"{name!r} and {type(value).__name__} {value!r}"
        )
    if not _HEADER_NAME.fullmatch(name):
        raise ValueError(f"invalid header field name {name!r}")
    if "\0" in value:
        raise ValueError(f"NUL byte in the value of header {name!r}")
    value = value.rstrip("\r\n")
    lines = _lines(value)
    if any(line[:1] not in (" ", "\t") for line in lines[1:]):
        value = "\r\n".join(
            [lines[0]] + [line if line[:1] in (" ", "\t") else " " + line for line in lines[1:]]
        )
    ascii_ = value.isascii()  # the common case: no escapes, one octet a character
    if not ascii_ and _ESCAPED.search(value):
        value = _ESCAPED.sub(
            lambda m: bytes(ord(c) - 0xDC00 for c in m.group()).decode("cp1252", "replace"),
            value,
        )
    lines = _lines(value)
    longest = max(map(len, lines))
    first = len(name) + 2
    if ascii_ and longest <= FOLD_WIDTH and len(lines[0]) + first <= MAX_LINE:
        return value  # nothing to fold or break (every signature field a signer folded)
    if longest > FOLD_WIDTH and name.lower() not in _NO_REFOLD:
        value = fold(value, first)
        lines = _lines(value)
    if any(
        len(line.encode()) > MAX_LINE - (first if i == 0 else 0) for i, line in enumerate(lines)
    ):
        value = "\r\n".join(_hard_break(line) for line in lines)
    return value


def _hard_break(line: str, size: int = 900) -> str:
    """``line`` broken every ``size`` characters with a fold (MTAs do the same; 900 UTF-8
    characters may be more octets, but never past 998 unless they are multi-byte)."""
    if len(line.encode()) <= MAX_LINE - 100:
        return line
    step = size // 4 if len(line.encode()) > len(line) else size  # room for 4-octet chars
    return "\r\n ".join(line[i : i + step] for i in range(0, len(line), step))


def fold(value: str, first: int = 0, width: int = FOLD_WIDTH) -> str:
    """``value`` with every line longer than ``width`` broken before white space (CRLF
    inserted, the white space kept), as RFC 5322 2.2.3 folding. ``first``: columns taken
    on the first line by ``Name: ``. A run without white space stays whole. Unfolding the
    result gives ``value`` back."""
    out: list[str] = []
    for n, physical in enumerate(_lines(value)):
        rest = physical
        limit = width - (first if n == 0 else 0)
        while len(rest) > limit:
            cut = max(rest.rfind(" ", 1, limit + 1), rest.rfind("\t", 1, limit + 1))
            if cut <= 0 or not rest[:cut].strip():  # nothing to break at before the limit
                spaces = [i for i in (rest.find(" ", limit), rest.find("\t", limit)) if i > 0]
                if not spaces:
                    break
                cut = min(spaces)
            out.append(rest[:cut])
            rest = rest[cut:]
            limit = width
        out.append(rest)
    return "\r\n".join(out)


@dataclass(frozen=True, slots=True)
class AddHeader(Change):
    """Append a header field at the bottom of the header block.

    Authentication headers (Authentication-Results, DKIM-Signature, ARC-*, Received-SPF) are
    placed on top instead, whatever the plugin asked: see :func:`milterd.merge.merge`.
    ``value`` is the field body without the leading space; fold long values with
    ``"\\r\\n\\t"`` or ``"\\n\\t"`` (the core gives the MTA the form it expects). The
    core folds lines over 78 characters itself and normalizes the value (see
    ``_check_header``): a break not followed by white space stays inside the field.
    """

    name: str
    value: str
    action = "add_header"

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_header(self.name, self.value))


@dataclass(frozen=True, slots=True)
class InsertHeader(Change):
    """Insert a header field at ``index`` among the message's *original* header fields.

    0 is the very top. The core translates the index for fields deleted before it. Only 0
    is placed exactly alike by Postfix and sendmail; above 0 the MTAs count their own
    fields differently (docs/sendmail.md), so the field may land a place or two off.
    """

    name: str
    value: str
    index: int = 0
    action = "add_header"

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", _check_header(self.name, self.value))
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
        object.__setattr__(self, "value", _check_header(self.name, self.value))
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


#: The largest score one symbol may carry (either sign): a bound no sum of them can overflow.
MAX_SYMBOL_SCORE = 1e9


@dataclass(frozen=True, slots=True)
class Symbol:
    """A named score contribution, as in rspamd and SpamAssassin."""

    name: str
    score: float
    description: str = ""
    options: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # NaN made the total NaN (no threshold ever matched, "nan" in the headers), an
        # infinity rejected or tagged for nothing, and huge values add up to one.
        ok = isinstance(self.score, int | float) and not isinstance(self.score, bool)
        if not ok or not math.isfinite(self.score) or abs(self.score) > MAX_SYMBOL_SCORE:
            raise ValueError(
                f"symbol {self.name!r}: score must be a finite number within "
                f"±{MAX_SYMBOL_SCORE:g}, got {self.score!r}"
            )
