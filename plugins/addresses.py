"""Address-list parsing the built-ins share, safe on hostile input.

``email.utils.getaddresses`` guesses where a field is malformed: ``a@evil.example
b@bank.example`` (two addresses, no comma) comes back as one address ``@bank.example``
plus an empty entry, ``x <a@b.example> y`` as two, ``b@bank.example x`` as
``b@bank.examplex``. A plugin that believed the guess could sign or judge the wrong
address. CPython's ``strict`` parsing (CVE-2023-27043, 3.11.10 and 3.12.6) is not in every
Python we run on and misses some of these, so :func:`getaddresses` makes its own checks,
the same on every version, and a field that fails them does not parse: the caller treats
it as malformed. The checks, on each field unfolded: no CR, LF or NUL left; quoted
strings, comments and domain literals closed; as many addresses as non-blank elements
between commas outside them (a group's name does not count); as many addresses with an
``@`` as there are ``@`` outside them; and the domains the parser found are the domains
that follow those ``@`` (:func:`domains_named`), so that no address was swallowed into
another or changed. No domain literal is accepted (``user@[192.0.2.1]``: no DNS domain
for DKIM or DMARC anyway).

The parser also recurses once per nested comment or quoted pair: a few hundred "(" in a
From field raise RecursionError, and a plugin that let it through would fail, so that
every such message was tempfailed. Such a field does not parse either, nor one longer
than :data:`MAX_FIELD` (the parser's time grows faster than its length).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterable, Iterator

__all__ = ["MAX_FIELD", "a_label", "bare", "browser_a_label", "domains_named", "getaddresses"]

#: Longer address fields do not parse (a From is a few hundred characters at most).
MAX_FIELD = 16384
_FOLD = re.compile(r"\r?\n(?=[ \t])")
# "@domain", white space (a comment, in bare text) allowed around "@" and the dots
_AT_DOMAIN = re.compile(r'@\s*([^\s<>()\[\]",;:@\\.]+(?:\s*\.\s*[^\s<>()\[\]",;:@\\.]+)*)')
_GROUP_NAME = re.compile(r"[^@<>]*:")


def _chars(text: str) -> Iterator[str]:
    """The characters of ``text`` with each quoted pair (backslash and the next
    character) as one item."""
    escape = False
    for ch in text:
        if escape:
            yield "\\" + ch
            escape = False
        elif ch == "\\":
            escape = True
        else:
            yield ch
    if escape:
        yield "\\"


def _bare(text: str) -> str | None:
    """``text`` without its quoted strings and comments (each comment becomes a space)
    and with each domain literal as ``[]`` (RFC 5322 lets one hold ``(``, ``"``, ``,`` and
    ``@``); None when one of them is not closed, or a comment closes one it never
    opened."""
    out: list[str] = []
    depth = 0
    quoted = literal = False
    last = ""  # the last character kept that is not white space
    for ch in _chars(text):
        if quoted:
            if ch == '"':
                quoted = False
            continue
        if literal:
            if ch == "]":
                literal = False
                out.append("[]")
                last = "]"
            continue
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return None
            if depth == 0:
                out.append(" ")
        elif depth:
            continue
        elif ch == '"':
            quoted = True
        elif ch == "[" and last == "@":  # a domain literal
            literal = True
        else:
            out.append(ch)
            if not ch.isspace():
                last = ch
    return None if depth or quoted or literal else "".join(out)


# Python 3.11.10+, 3.12.6+ and 3.13 parse strictly by default and answer [("", "")] for a
# field they refuse, which would count as one clean (empty) entry here: ask for the
# lenient parse, and make the checks below on every version alike.
_LENIENT: dict[str, bool] = (
    {"strict": False} if getattr(email.utils, "supports_strict_parsing", False) else {}
)


def bare(value: str) -> str | None:
    """A header value unfolded and without its quoted strings and comments, or None when
    they are not balanced (what is left of an address list is its addresses, commas and
    group syntax)."""
    return _bare(_FOLD.sub("", value))


def domains_named(text: str) -> list[str]:
    """The domain after each ``@`` in ``text`` (bare text: :func:`bare`), lower case,
    without white space or a final dot."""
    return [re.sub(r"\s+", "", m.group(1)).lower() for m in _AT_DOMAIN.finditer(text)]


def getaddresses(values: Iterable[str]) -> list[tuple[str, str]] | None:
    """The addresses of ``values`` as ``email.utils.getaddresses`` gives them (each field
    unfolded), without the empty entries it returns for empty elements (``a,,b``, a
    trailing comma, an empty group, a blank field); None when a value is not a clean
    address list (see the module's docstring) or nests too deep to parse."""
    out: list[tuple[str, str]] = []
    for v in values:
        field = _FOLD.sub("", str(v)).rstrip("\r\n")
        if len(field) > MAX_FIELD or any(c in field for c in "\r\n\x00"):
            return None
        b = _bare(field)
        if b is None:
            return None
        elements = []
        for e in b.split(","):
            group = _GROUP_NAME.match(e)  # "name:" opens a group; an address has no ":"
            elements.append(e[group.end() :] if group else e)
        expected = sum(1 for e in elements if e.replace(";", "").strip())
        try:
            parsed = [e for e in email.utils.getaddresses([field], **_LENIENT) if e != ("", "")]
        except RecursionError:
            return None
        named = sorted(domains_named(b))
        found = sorted(
            a.rpartition("@")[2].strip().lower().rstrip(".") for _, a in parsed if "@" in a
        )
        if (
            len(parsed) != expected
            or b.count("@") != len(found)
            or named != found
            or any("[" in addr for _, addr in parsed)
        ):
            return None
        out += parsed
    return out


def a_label(domain: str) -> str | None:
    """``domain`` in its ASCII form (A-labels, lower case) as DNS and the
    policies published there know it: IDNA2008 with the UTS 46 mapping, not Python's
    ``"idna"`` codec (IDNA2003), which maps ``straße.de`` to ``strasse.de`` (another
    domain, whose policy would be the one applied) and drops joiners. None when it is no
    valid name that way."""
    name = domain.strip()  # trailing dots are the caller's business, as before
    if name.isascii():  # the common case: no conversion (and no import)
        return name.lower()
    import idna

    try:
        return idna.encode(name, uts46=True, transitional=False).decode("ascii").lower()
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


def browser_a_label(host: str) -> str | None:
    """A host IDNA2008 refuses but a browser opens (``i❤.ws``, ``☃.net``): the UTS 46
    mapping, then Punycode label by label, as browsers do (the WHATWG URL standard skips
    IDNA2008's code point check). None when even that fails. (The punycode codec is
    quadratic in a label's length: callers bound what they pass.)"""
    import idna

    try:
        mapped = idna.uts46_remap(host, std3_rules=False, transitional=False)
        labels = [
            label if label.isascii() else "xn--" + label.encode("punycode").decode("ascii")
            for label in mapped.split(".")
        ]
    except (idna.IDNAError, UnicodeError, ValueError):
        return None
    return ".".join(labels).lower()
