"""Address-list parsing the built-ins share, safe on hostile input.

``email.utils.getaddresses`` recurses once per nested comment or quoted pair: a few
hundred "(" in a From field raise RecursionError, and a plugin that let it through would
fail, so that every such message was tempfailed. Such a field is treated as one that
does not parse.
"""

from __future__ import annotations

import email.utils
from collections.abc import Iterable

__all__ = ["getaddresses"]


def getaddresses(values: Iterable[str]) -> list[tuple[str, str]] | None:
    """``email.utils.getaddresses(values)``, or None when the values nest too deep to
    parse (the caller treats them as malformed)."""
    try:
        return email.utils.getaddresses(list(values))
    except RecursionError:
        return None
