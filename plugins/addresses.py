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
    None when a comment is not closed or closes one it never opened."""
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
    return None if depth else "".join(out)


def getaddresses(values: Iterable[str]) -> list[tuple[str, str]] | None:
    """``email.utils.getaddresses(values)`` when every value parses as a clean address
    list (an empty element, as after a trailing comma or in an empty group, is kept as
    ``("", "")`` the way it returns them); None when one does not (see the module's
    docstring) or nests too deep to parse."""
    fields = [str(v) for v in values]
    expected = 0
    for v in fields:
        bare = _bare(v)
        if bare is None:
            return None
        expected += 1 + bare.count(",")  # a group's members are separated by commas too
    try:
        parsed = email.utils.getaddresses(fields)
    except RecursionError:
        return None
    if len(parsed) != expected or any("[" in addr for _, addr in parsed):
        return None
    return parsed
