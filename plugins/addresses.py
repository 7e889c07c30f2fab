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
    """``text`` without its quoted strings and comments (each comment becomes a space), or
    None when a comment or a quoted string is not closed, or a comment closes one it never
    opened."""
    out: list[str] = []
    depth = 0
    quoted = False
    for ch in _chars(text):
        if quoted:
            if ch == '"':
                quoted = False
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
        else:
            out.append(ch)
    return None if depth or quoted else "".join(out)


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
    """``email.utils.getaddresses(values)`` when every value parses as a clean address
    list; None when one does not (see the module's docstring) or nests too deep to parse.
    Empty elements (after a trailing comma, in an empty group) come back as ``("", "")``
    or not at all, as the standard parser has them; a trailing comma is no error."""
    fields = [str(v) for v in values]
    expected = 0
    trailing = 0
    for v in fields:
        b = _bare(v)
        if b is None:
            return None
        body = b.rstrip(", \t\r\n")
        trailing += b.count(",") - body.count(",")  # empty elements at the end
        if body.strip():
            expected += 1 + body.count(",")  # a group's members are separated by commas too
    try:
        parsed = email.utils.getaddresses(fields, **_LENIENT)
    except RecursionError:
        return None
    # Empty entries for the trailing empty elements (the parser returns some, all or none
    # of them, depending on the white space): not counted.
    end = len(parsed)
    while trailing and end and parsed[end - 1] == ("", ""):
        end -= 1
        trailing -= 1
    if end != expected or any("[" in addr for _, addr in parsed):
        return None
    return parsed[:end]
