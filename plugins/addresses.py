"""Address-list parsing the built-ins share, safe on hostile input.

``email.utils.getaddresses`` guesses where a field is malformed: ``a@evil.example
b@bank.example`` (two addresses, no comma) comes back as one address ``@bank.example``
plus an empty entry, and ``x <a@b.example> y`` as two. A plugin that believed the guess
could sign or judge the wrong address. CPython's fix for this (CVE-2023-27043, the
``strict`` parsing of 3.11.10 and 3.12.6) is not in every Python 3.11 we run on, so the
same checks are made here whatever the version: balanced comments, no ``[`` left over in
an address (a domain literal that did not parse), and exactly one address per comma (a
comma inside a quoted display name or a comment does not count). A field that fails them
does not parse: the caller treats it as malformed.

The parser also recurses once per nested comment or quoted pair: a few hundred "(" in a
From field raise RecursionError, and a plugin that let it through would fail, so that
every such message was tempfailed. Such a field does not parse either.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable, Iterator

__all__ = ["getaddresses"]


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
    for ch in _chars(text):
        if quoted:
            if ch == '"':
                quoted = False
            continue
        if literal:
            if ch == "]":
                literal = False
                out.append("[]")
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
        elif ch == "[":
            literal = True
        else:
            out.append(ch)
    return None if depth or quoted or literal else "".join(out)


# Python 3.11.10+, 3.12.6+ and 3.13 parse strictly by default and answer [("", "")] for a
# field they refuse, which would count as one clean (empty) entry here: ask for the
# lenient parse, and make the checks below on every version alike.
_LENIENT: dict[str, bool] = (
    {"strict": False} if getattr(email.utils, "supports_strict_parsing", False) else {}
)


def bare(value: str) -> str | None:
    """A header value without its quoted strings and comments, or None when they are not
    balanced (what is left of an address list is its addresses, commas and group
    syntax)."""
    return _bare(value)


def getaddresses(values: Iterable[str]) -> list[tuple[str, str]] | None:
    """The addresses of ``values`` as ``email.utils.getaddresses`` gives them, without
    the empty entries it returns for empty elements (``a,,b``, a trailing comma, an empty
    group, a blank field); None when a value is not a clean address list (see the
    module's docstring) or nests too deep to parse.

    Each field is checked on its own: as many entries as non-blank elements between its
    commas (outside quoted strings, comments and domain literals; a group's name does not
    count), and as many addresses with an ``@`` as there are ``@`` outside them. The
    second catches the parser swallowing one address into another's domain, however the
    commas around them are padded."""
    out: list[tuple[str, str]] = []
    for v in values:
        field = str(v)
        b = _bare(field)
        if b is None:
            return None
        elements = [e.split(":", 1)[1] if ":" in e else e for e in b.split(",")]
        expected = sum(1 for e in elements if e.replace(";", "").strip())
        if not expected:
            continue  # blank, a comment, an empty group: no address
        try:
            parsed = [e for e in email.utils.getaddresses([field], **_LENIENT) if e != ("", "")]
        except RecursionError:
            return None
        if (
            len(parsed) != expected
            or sum(1 for _, a in parsed if "@" in a) != b.count("@")
            or any("[" in addr for _, addr in parsed)
        ):
            return None
        out += parsed
    return out
