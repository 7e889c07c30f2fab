"""Domain names for DKIM: the ``d=`` we sign with and the key names we look up.

A DKIM domain or selector is a DNS name (RFC 6376 3.1, 3.5), sent to DNS in A-labels
(RFC 8616 section 4: a U-label ``d=`` is looked up as its A-label form). IDNA conversion
is IDNA2008 with the UTS 46 mapping (:func:`milterd_plugins.addresses.a_label`, the
``idna`` package, which dnspython uses too when it is installed), as for DMARC's From
domain: both sides of an alignment convert alike.
"""

from __future__ import annotations

import re

from ..addresses import a_label

__all__ = ["MAX_NAME", "dns_name", "host_name", "key_name", "to_ascii"]

MAX_NAME = 253  # octets of a DNS name in text form, without the trailing dot (RFC 1035)
_HOST_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# Key names: the host name rules plus "_" (the "_domainkey" label itself, and selectors
# and domains seen in the wild); a label is 1..63 octets.
_KEY_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")


def to_ascii(name: str) -> str | None:
    """``name`` lower-cased in A-labels, one trailing dot dropped; None when it cannot be
    converted (a label IDNA refuses, an empty or over-long label). Never raises."""
    if name.endswith("."):
        name = name[:-1]
    if not name.isascii():
        # IDNA2008 (UTS 46), as DMARC's alignment does (RFC 8616: keys of a U-label d=
        # are looked up at its A-labels): Python's IDNA2003 codec read d=straße.de as
        # strasse.de, so a strasse.de key passed for a From at xn--strae-oqa.de.
        ascii_name = a_label(name)
        if ascii_name is None:
            return None
        name = ascii_name
    return name.lower()


def _valid(name: str, label: re.Pattern[str]) -> bool:
    return 0 < len(name) <= MAX_NAME and all(label.fullmatch(part) for part in name.split("."))


def host_name(domain: str) -> str | None:
    """The domain to sign for (``d=``) and to match the signing table against: A-labels,
    lower case, without a trailing dot. None when it is not a host name (an address
    literal such as ``[192.0.2.1]``, an empty or over-long label, characters other than
    letters, digits and inner hyphens, more than 253 octets, a U-label IDNA refuses)."""
    ascii_name = to_ascii(domain)
    if ascii_name is None or not _valid(ascii_name, _HOST_LABEL):
        return None
    return ascii_name


def dns_name(name: str) -> str | None:
    """``name`` (a key's full DNS name) in A-labels, lower case, or None when it is not
    one: the label rules of :func:`key_name`."""
    ascii_name = to_ascii(name)
    if ascii_name is None or not _valid(ascii_name, _KEY_LABEL):
        return None
    return ascii_name


def key_name(selector: str, domain: str) -> str | None:
    """``selector._domainkey.domain`` in A-labels, lower case, or None when that is no
    valid DNS name: an empty label (``a..b``), a label over 63 octets, more than 253
    octets, white space or other characters no DNS name of a key has. Checked before the
    lookup: the resolver reports such a name as a temporary error, and a signature
    that can never verify must not be retried forever (it is a permerror)."""
    s, d = to_ascii(selector), to_ascii(domain)
    if not s or not d:
        return None
    name = f"{s}._domainkey.{d}"
    return name if _valid(name, _KEY_LABEL) else None
