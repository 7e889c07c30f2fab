"""One frozen value per milter stage: what a hook receives as ``event``.

Every event carries ``macros``: the MTA macros sent for that stage (names as the MTA sends
them, e.g. ``"i"``, ``"{auth_authen}"``). Macros from earlier stages are in
``ctx.connection.macros``: those of CONNECT and HELO for the whole session, those of the
current message's stages (MAIL to end of message) until the next MAIL, so that a value
of the session's previous message (its queue id, say) never stands in for this one's.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Abort",
    "Body",
    "Client",
    "Close",
    "Connect",
    "Data",
    "EnvFrom",
    "EnvRcpt",
    "Eoh",
    "Eom",
    "Header",
    "Helo",
    "Macros",
    "parse_address",
]

Macros = dict[str, str]
Family = Literal["inet", "inet6", "unix", "unknown"]


@dataclass(frozen=True, slots=True)
class Client:
    """The SMTP client as the MTA describes it at CONNECT.

    ``hostname`` is the verified PTR name or ``[address]`` when there is none.
    ``address`` is None for a unix socket or an unknown family.
    """

    hostname: str
    family: Family
    address: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    port: int | None = None
    path: str | None = None  # unix socket path, when the family is unix

    @property
    def ip(self) -> str:
        """The address as a string, or ``""`` when there is none."""
        return str(self.address) if self.address is not None else ""


# Cached: every connection parses its client address once or twice, and a mail server
# sees the same clients again and again; ip_address() is the costliest part of CONNECT.
# Results are immutable, so sharing them between threads is safe.
@functools.lru_cache(maxsize=4096)
def parse_address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """Parse an address as MTAs write it: ``1.2.3.4``, ``[1.2.3.4]``, ``IPv6:::1``, ``::1``.

    Returns None for anything that is not an IP address. Never raises.
    """
    s = text.strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    if s[:5].lower() == "ipv6:":
        s = s[5:]
    try:
        addr = ipaddress.ip_address(s.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@dataclass(frozen=True, slots=True)
class Connect:
    client: Client
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Helo:
    name: str
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnvFrom:
    """MAIL FROM. ``sender`` is the address without angle brackets (``""`` for ``<>``)."""

    sender: str
    params: dict[str, str | None] = field(default_factory=dict)
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EnvRcpt:
    """RCPT TO. ``recipient`` is the address without angle brackets."""

    recipient: str
    params: dict[str, str | None] = field(default_factory=dict)
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Data:
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Header:
    """One header field. ``value`` is decoded (UTF-8, invalid bytes as surrogate escapes),
    without the single leading space; ``raw`` is the field body exactly as the MTA sent it.
    """

    name: str
    value: str
    raw: bytes


@dataclass(frozen=True, slots=True)
class Eoh:
    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Body:
    chunk: bytes


@dataclass(frozen=True, slots=True)
class Eom:
    """End of message. The message itself is the hook's ``message`` argument."""

    macros: Macros = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Abort:
    """The MTA abandoned the current message (RSET, client gone, another milter rejected)."""


@dataclass(frozen=True, slots=True)
class Close:
    """The connection is closing. Always the last event of a connection."""
