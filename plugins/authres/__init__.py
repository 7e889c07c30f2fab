"""Built-in ``authres``: one Authentication-Results header (RFC 8601) for every message.

* At end of message, every incoming Authentication-Results field that claims our
  authserv-id is deleted (RFC 8601 section 5: a receiver must not trust results it did not
  produce, and such fields are forgeries), wherever it stands; fields of other
  authserv-ids stay untouched and in order. ARC-Authentication-Results are never touched:
  each is sealed into its ARC set, so deleting one breaks the chain for every later
  hop, and one carrying our authserv-id may be our own from an earlier pass (a message
  that loops back through a list); it is trusted only as far as its sealer (``d=``) is.
* At ``finalize``, after every plugin's ``eom``, one header is added on top with every
  result on the ledger (SPF, DKIM, ARC, DMARC, third-party methods), in pipeline order,
  or ``none`` when no plugin produced any. It is built with the ``authres`` library and
  parses back with it.

Mail from trusted senders (authenticated or internal) gets no header unless
``trusted = true``: there is nothing we verified.
"""

from __future__ import annotations

import re

import authres
from authres import core as ar

from milterd import (
    AddHeader,
    Context,
    DeleteHeader,
    Message,
    PluginConfig,
    Result,
    Services,
    hookimpl,
)

from ..addresses import a_label, browser_a_label

__all__ = [
    "AuthResConfig",
    "AuthenticationResults",
    "authserv_id_of",
    "build_header",
    "strip_comments",
]

_INSTANCE = re.compile(r"^\s*i\s*=\s*\d+\s*;", re.IGNORECASE)
# What may not appear in a header field value: control characters (NUL, CR, LF...) and
# the surrogate escapes that stand for bytes that were not UTF-8.
_UNSAFE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")
CHECKED = ("authentication-results",)


class AuthResConfig(PluginConfig):
    authserv_id: str | None = None  # default: [milterd] authserv_id
    remove_forged: bool = True
    trusted: bool = False  # also stamp mail from authenticated/internal senders


MAX_VALUE = 256  # a property value or reason in our header: a domain (253) fits


def strip_comments(value: str) -> str:
    """``value`` with every RFC 5322 comment, nested to any depth, replaced by a space.

    One linear pass with a depth counter: a fixed number of regular-expression passes
    (there were 5) let a forger hide our authserv-id from us behind deeper nesting while
    other parsers (the authres library, dkimpy's ARC signer) still read it as ours, and
    repeating them until stable is quadratic in the nesting depth. A backslash quotes the
    next character inside a comment (quoted-pair); a quoted-string outside comments is
    copied as it is (a parenthesis there is text). An unclosed comment runs to the end.
    Never raises."""
    out: list[str] = []
    depth = 0
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if depth:
            if c == "\\":
                i += 1
            elif c == "(":
                depth += 1
            elif c == ")":
                depth -= 1
                if not depth:
                    out.append(" ")
        elif c == "(":
            depth = 1
        elif c == '"':
            end = i + 1
            while end < n and value[end] != '"':
                end += 2 if value[end] == "\\" else 1
            out.append(value[i : end + 1])
            i = end
        else:
            out.append(c)
        i += 1
    return "".join(out)


def authserv_id_of(field_name: str, value: str) -> str:
    """The authserv-id an (ARC-)Authentication-Results value claims, lower-cased.

    Comments are ignored, nested to any depth; ARC's ``i=N;`` prefix is skipped. Returns
    ``""`` when there is none. Never raises: forged headers are often malformed on purpose.
    """
    text = strip_comments(value)
    if field_name.lower() == "arc-authentication-results":
        text = _INSTANCE.sub("", text)
    token = text.strip().split(";", 1)[0].strip()
    if token.startswith('"'):  # RFC 8601 2.2: authserv-id is a value, a quoted-string too
        end = token.find('"', 1)
        return token[1:end].replace("\\", "").lower() if end > 0 else ""
    return token.split()[0].lower() if token.split() else ""


def _safe(value: str) -> str:
    """``value`` with every character a header field cannot carry replaced by ``?``.
    Property values and reasons often come from the message itself (a signature's ``i=``
    or ``d=`` tag, a HELO name): a NUL or a line break there must neither break the field
    nor make the whole message fail."""
    return _UNSAFE.sub("?", value) if _UNSAFE.search(value) else value


def _ascii(value: str) -> str:
    """``value`` in ASCII. RFC 8601 with RFC 6532 allows UTF-8 in a value, but the parsers
    that read our field do not: authres (and with it dkimpy's ARC sealing, which then
    seals nothing) refuses any non-ASCII character, quoted or not. A domain, or an
    address's domain, becomes A-labels (IDNA2008 with UTS 46; a name IDNA2008 refuses,
    ``☃.example``, Punycode label by label as browsers do); a non-ASCII local part is left
    out (``jöe@example.com`` -> ``@example.com``, the form RFC 6376 gives ``i=`` for the
    domain alone); any other non-ASCII character becomes ``?``."""
    if value.isascii():
        return value
    local, at, domain = value.rpartition("@")
    if not at:
        local, domain = "", value
    if "." in domain and not any(c.isspace() for c in domain):
        ascii_domain = a_label(domain) or browser_a_label(domain)
        if ascii_domain is not None and ascii_domain.isascii():
            return (local if local.isascii() else "") + at + ascii_domain
    return re.sub(r"[^\x00-\x7f]", "?", value)


# RFC 8601 pvalue: a token (RFC 2045) or an address (an optional local part, "@", a
# domain) goes as it is; anything else (empty, white space, specials) as a quoted-string.
# (Values are ASCII by then, see _ascii.)
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`{|}~-]+")
# The address form: a local part of RFC 5322 atext and dots, "@", a domain-name (RFC 6376:
# labels of letters, digits, "-" and "_"); non-ASCII letters in either (RFC 6532). A value
# such as "x@a=b" or "x@a/b?c" is neither a domain-name nor a token: quoted.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\U0010ffff-"
_LABEL = r"[A-Za-z0-9_\x80-\U0010ffff-]+"
_ADDR = re.compile(rf"[{_ATEXT}.]*@{_LABEL}(?:\.{_LABEL})*")


class _Value(ar.QuotableValue):  # type: ignore[misc]  # authres has no type information
    """A reason (RFC 8601 ``value``: a token or a quoted-string). authres's own
    QuotableValue leaves anything with an "@" unquoted, which a reason may not be
    (``reason=key for a@b not found`` breaks the field), and crashes on an empty value."""

    def quote_if_needed(self) -> str:
        if _TOKEN.fullmatch(self):
            return str(self)
        return '"' + re.sub(r'(["\\])', r"\\\1", str(self)) + '"'


class _PValue(_Value):
    """A property value (RFC 8601 ``pvalue``): a value, or an address as it is."""

    def quote_if_needed(self) -> str:
        return str(self) if _ADDR.fullmatch(self) else str(super().quote_if_needed())


def build_header(authserv_id: str, results: list[Result]) -> str:
    """The field body (without ``Authentication-Results:``) for these results. Control
    characters and undecodable bytes in values and reasons become ``?`` (:func:`_safe`),
    values are made ASCII (:func:`_ascii`);
    values and reasons are quoted where RFC 8601 needs it (:class:`_PValue`, :class:`_Value`);
    properties with an empty value are left out."""
    entries = []
    for r in results:
        props = []
        for k, v in r.properties:
            if not v:  # nothing to say (an empty HELO name, say); "" would trip parsers
                continue
            ptype, _, name = k.partition(".")
            prop = ar.AuthenticationResultProperty(ptype, name)
            # Set after: the constructor would rewrap it. Capped: a forged signature's d= or
            # s= can be any length, and a field line must stay under 998 octets.
            prop.value = _PValue(_ascii(_safe(v)[:MAX_VALUE])[:MAX_VALUE])
            props.append(prop)
        entry = ar.AuthenticationResult(
            method=r.method, version=r.version, result=r.result, properties=props
        )
        if r.reason:  # printable ASCII, as authres makes it (parsers expect no more)
            entry.reason = _Value(re.sub(r"[^\x20-\x7e]", "?", r.reason)[:MAX_VALUE])
        entries.append(entry)
    text = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id, results=entries))
    return text.split(":", 1)[1].strip()


class AuthenticationResults:
    """Stamps Authentication-Results and removes forged ones."""

    actions = frozenset({"add_header", "change_header"})
    isolation = "inline"
    reads_body = False  # headers only: the body is not requested for us
    prefork = True  # startup reads config only

    def __init__(self) -> None:
        self.authserv_id = ""

    @hookimpl
    def config_schema(self) -> type[AuthResConfig]:
        return AuthResConfig

    @hookimpl
    def startup(self, config: AuthResConfig, services: Services) -> None:
        self.authserv_id = config.authserv_id or services.settings.authserv_id

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        if not ctx.config.remove_forged:
            return
        ours = self.authserv_id.lower()
        seen: dict[str, int] = {}
        for h in message.headers:
            lname = h.name.lower()
            if lname not in CHECKED:
                continue
            seen[lname] = seen.get(lname, 0) + 1
            if authserv_id_of(lname, h.value) == ours:
                ctx.add_change(DeleteHeader(h.name, seen[lname]))
                ctx.log.info("removing forged %s #%d claiming %s", h.name, seen[lname], ours)

    @hookimpl
    def finalize(self, ctx: Context) -> None:
        if ctx.connection.trusted and not ctx.config.trusted:
            return
        ctx.add_change(
            AddHeader("Authentication-Results", build_header(self.authserv_id, ctx.results))
        )
