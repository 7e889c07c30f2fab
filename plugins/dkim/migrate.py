"""``milterd dkim import-opendkim``: an opendkim.conf(5) turned into a milterd.toml fragment.

The fragment (stdout) holds ``[milterd]``/``[dns]`` keys where OpenDKIM had an equivalent and
``[plugins.dkim]`` with its key table and signing rules, ordered so that milterd's "first
matching rule wins" picks the same keys OpenDKIM's SigningTable lookup picked. What cannot
be converted is a comment in the fragment and a line on stderr, naming the OpenDKIM file
and line. Data sets read: ``file:`` (or a bare absolute path), ``refile:``, ``csl:`` and a
plain comma list; databases (``db:``, ``dsn:``, ``ldap:``, ``lua:``, ...) are reported.
"""

from __future__ import annotations

import contextlib
import fnmatch
import ipaddress
import json
import os
import re
import socket
import stat
import textwrap
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

__all__ = ["HostList", "MigrateError", "Result", "convert", "convert_file", "host_list"]

#: libopendkim's default SignHeaders (RFC 4871 5.5 / RFC 6376 5.4.1 "SHOULD be signed").
OPENDKIM_SIGN_HEADERS = (
    "from",
    "sender",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "content-id",
    "content-description",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
)
NEVER_SIGN = (
    "return-path",
    "received",
    "comments",
    "keywords",
    "bcc",
    "resent-bcc",
    "dkim-signature",
)
_TRUE, _FALSE = "TtYy1", "FfNn0"
_ACTIONS = {"a": "accept", "r": "reject", "t": "tempfail", "q": "quarantine", "d": "discard"}
# OpenDKIM's On-* word -> milterd's result word (None: milterd has no such result)
_ON = {
    "badsignature": "fail",
    "keynotfound": "permerror",
    "dnserror": "temperror",
    "nosignature": "none",
    "signatureerror": None,
    "internalerror": None,
    "security": None,
}
_ON_NAMES = {
    "badsignature": "On-BadSignature",
    "keynotfound": "On-KeyNotFound",
    "dnserror": "On-DNSError",
    "nosignature": "On-NoSignature",
    "signatureerror": "On-SignatureError",
    "internalerror": "On-InternalError",
    "security": "On-Security",
}
_ON_DEFAULTS = {
    "dnserror": "tempfail",
    "internalerror": "tempfail",
    "security": "tempfail",
    "signatureerror": "reject",
}
_ON_NOTE = {
    "fail": "OpenDKIM's bad signature",
    "permerror": "OpenDKIM's key not found (NXDOMAIN/no key); milterd's permerror also covers "
    "a signature not covering From, an invalid s=/d= name and an unparsable key record",
    "temperror": "a DNS error; milterd picks temperror only when no signature passes",
    "none": "no signature",
}
#: Options with no milterd equivalent or handled elsewhere: name (lower case) -> note.
ELSEWHERE = {
    "socket": "handled elsewhere in milterd: [milterd] socket (local:/PATH is unix:/PATH)",
    "userid": "handled elsewhere in milterd: [milterd] user, group",
    "umask": "handled elsewhere in milterd: [milterd] socket_mode",
    "pidfile": "handled elsewhere in milterd: systemd tracks the process, no pid file",
    "syslog": "handled elsewhere in milterd: logs go to stderr/the journal ([milterd] log_level)",
    "syslogsuccess": "handled elsewhere in milterd: milterd logs each signature at info",
    "syslogfacility": "handled elsewhere in milterd: the journal/syslog configuration",
    "syslogname": "handled elsewhere in milterd: the journal's identifier (milterd)",
    "logwhy": 'handled elsewhere in milterd: [milterd] log_level = "debug"',
    "logresults": "handled elsewhere in milterd: results are in Authentication-Results "
    "([plugins.authres]) and the log",
    "background": "handled elsewhere in milterd: it runs in the foreground under systemd",
    "autorestart": "handled elsewhere in milterd: the supervisor restarts workers",
    "autorestartcount": "handled elsewhere in milterd: the supervisor restarts workers",
    "autorestartrate": "handled elsewhere in milterd: the supervisor restarts workers",
    "milterdebug": "handled elsewhere in milterd: [milterd] log_level",
    "enablecoredumps": "handled elsewhere in milterd: systemd (LimitCORE)",
    "changerootdirectory": "handled elsewhere in milterd: systemd sandboxing, no chroot",
    "temporarydirectory": "handled elsewhere in milterd: [milterd] spool_dir",
    "alwaysaddarheader": "handled elsewhere in milterd: [plugins.authres] always adds one "
    "(dkim=none for unsigned mail)",
    "keepauthresults": "handled elsewhere in milterd: [plugins.authres] remove_forged",
    "removearfrom": "handled elsewhere in milterd: [plugins.authres] removes only fields "
    "claiming our authserv-id",
    "removearall": "handled elsewhere in milterd: [plugins.authres] remove_forged",
    "authservidwithjobid": "no equivalent: the authserv-id never holds the queue id",
    "softwareheader": "no equivalent: no DKIM-Filter header is added",
    "peerlist": "no equivalent: milterd has no per-client bypass",
    "externalignorelist": "nothing to convert: it only suppressed log messages",
    "exemptdomains": "no equivalent: mail is never skipped by sender domain",
    "dontsignmailto": "no equivalent: signing never depends on the recipients",
    "senderheaders": "no equivalent: milterd picks the rule by the From address only",
    "sendermacro": "no equivalent: milterd picks the rule by the From address only",
    "removeoldsignatures": "no equivalent: existing signatures are kept",
    "bodylengthdb": "no equivalent: milterd never adds l=",
    "maximumsignedbytes": "no equivalent: milterd never adds l=",
    "diagnostics": "no equivalent: milterd never adds z=",
    "diagnosticdirectory": "no equivalent: no diagnostic reports",
    "minimum": "no equivalent: a partial l= signature is always dkim=policy",
    "mustbesigned": "no equivalent",
    "trustsignaturesfrom": "no equivalent: every signature is verified (up to max_signatures)",
    "clockdrift": "no equivalent: dkimpy's expiry check is used",
    "boguskey": "no equivalent",
    "unprotectedkey": "no equivalent: no DNSSEC checks",
    "trustanchorfile": "no equivalent: no DNSSEC checks",
    "resolverconfiguration": "no equivalent: see [dns]",
    "resolvertracing": "no equivalent",
    "dnsconnect": "no equivalent: UDP first",
    "querycache": "handled elsewhere in milterd: the resolver caches ([dns] cache_size)",
    "quarantine": 'no equivalent: use actions, e.g. fail = "quarantine"',
    "redirectfailuresto": "no equivalent: no redirection",
    "captureunknownerrors": "no equivalent: see on_error",
    "requiredheaders": "no equivalent: malformed headers are not refused by the dkim plugin",
    "strictheaders": "no equivalent",
    "ignoremalformedmail": "no equivalent",
    "weaksyntaxchecks": "no equivalent",
    "fixcrlf": "no equivalent: the MTA hands milterd CRLF lines",
    "domainkeyscompat": "no equivalent: DomainKeys (RFC 4870) records are never used",
    "allowsha1only": "no equivalent: rsa-sha1 never passes (RFC 8301)",
    "disablecryptoinit": "no equivalent",
    "requestreports": "no equivalent: no DKIM reporting (RFC 6651)",
    "sendreports": "no equivalent: no DKIM reporting (RFC 6651)",
    "reportaddress": "no equivalent: no DKIM reporting (RFC 6651)",
    "reportbccaddress": "no equivalent: no DKIM reporting (RFC 6651)",
    "mtacommand": "no equivalent: no reports are sent",
    "smtpuri": "no equivalent: no reports are sent",
    "setuppolicyscript": "no equivalent: no Lua; signing is decided by the signing table",
    "screenpolicyscript": "no equivalent: no Lua",
    "finalpolicyscript": "no equivalent: no Lua; see actions",
    "statisticspolicyscript": "no equivalent: no Lua",
    "statistics": "no equivalent: see [milterd] metrics_listen",
    "statisticsname": "no equivalent",
    "statisticsprefix": "no equivalent",
    "anonymousstatistics": "no equivalent",
    "keeptemporaryfiles": "no equivalent",
    "strictestmode": "no equivalent",
    "stricttestmode": "no equivalent",
    "testdnsdata": "no equivalent",
    "testpublickeys": "no equivalent",
    "selectcanonicalizationheader": "no equivalent: "
    "the canonicalization is fixed by the configuration",
    "replaceheaders": "no equivalent",
    "replacerules": "no equivalent",
    "popdbfile": "no equivalent",
    "resignall": "no equivalent",
    "resignmailto": "no equivalent",
    "identityheader": "no equivalent",
    "identityheaderremove": "no equivalent",
    "softstart": "no equivalent: no SQL/LDAP",
    "vbr-certifiers": "no equivalent: no VBR",
    "vbr-purgefields": "no equivalent: no VBR",
    "vbr-trustedcertifiers": "no equivalent: no VBR",
    "vbr-trustedcertifiersonly": "no equivalent: no VBR",
    "vbr-type": "no equivalent: no VBR",
    "ldapauthmechanism": "no equivalent: no LDAP",
    "ldapauthname": "no equivalent: no LDAP",
    "ldapauthrealm": "no equivalent: no LDAP",
    "ldapauthuser": "no equivalent: no LDAP",
    "ldapbindpassword": "no equivalent: no LDAP",
    "ldapbinduser": "no equivalent: no LDAP",
    "ldapdisablecache": "no equivalent: no LDAP",
    "ldaptimeout": "no equivalent: no LDAP",
    "ldapkeepaliveidle": "no equivalent: no LDAP",
    "ldapusetls": "no equivalent: no LDAP",
    "ldapkeepaliveinterval": "no equivalent: no LDAP",
    "ldapkeepaliveprobes": "no equivalent: no LDAP",
    "noheaderb": "no equivalent: header.b is always reported",
}
CONVERTED = {
    "mode",
    "domain",
    "selector",
    "keyfile",
    "keytable",
    "signingtable",
    "subdomains",
    "multiplesignatures",
    "canonicalization",
    "signheaders",
    "oversignheaders",
    "signaturettl",
    "minimumkeybits",
    "internalhosts",
    "mta",
    "macrolist",
    "requiresafekeys",
    "signaturealgorithm",
    "maximumsignaturestoverify",
    "basedirectory",
    "include",
    "on-badsignature",
    "on-keynotfound",
    "on-nosignature",
    "on-signatureerror",
    "on-dnserror",
    "on-default",
    "on-internalerror",
    "on-security",
    "authservid",
    "nameservers",
    "dnstimeout",
    "maximumheaders",
    "omitheaders",
}
#: Typed options of opendkim.conf(5): a malformed value is an error wherever it is.
BOOLEANS = {
    "allowsha1only", "alwaysaddarheader", "authservidwithjobid", "autorestart", "background",
    "captureunknownerrors", "diagnostics", "disablecryptoinit", "dnsconnect",
    "domainkeyscompat", "enablecoredumps", "fixcrlf", "identityheaderremove",
    "ignoremalformedmail", "keepauthresults", "keeptemporaryfiles", "ldapdisablecache",
    "ldapusetls", "logresults", "logwhy", "multiplesignatures", "noheaderb", "quarantine",
    "querycache", "removearall", "removeoldsignatures", "requestreports", "requiredheaders",
    "requiresafekeys", "resignall", "resolvertracing", "sendreports", "softstart",
    "softwareheader", "strictheaders", "stricttestmode", "subdomains", "syslog",
    "syslogsuccess", "vbr-trustedcertifiersonly", "weaksyntaxchecks",
}  # fmt: skip
INTEGERS = {
    "autorestartcount", "clockdrift", "dnstimeout", "ldapkeepaliveidle",
    "ldapkeepaliveinterval", "ldapkeepaliveprobes", "ldaptimeout", "maximumheaders",
    "maximumsignaturestoverify", "maximumsignedbytes", "milterdebug", "minimumkeybits",
    "signaturettl",
}  # fmt: skip
_DB_PREFIXES = (
    "db:",
    "dsn:",
    "ldap:",
    "ldaps:",
    "ldapi:",
    "lua:",
    "memcache:",
    "mdb:",
    "erlang:",
    "repute:",
    "socket:",
)
_REGEX_META = set("?[](){}|^$\\")


class MigrateError(Exception):
    """An unreadable or malformed file: one line naming the file and line."""


@dataclass
class Option:
    name: str  # as written
    value: str
    where: str  # "file:line"


@dataclass
class Rule:
    pattern: str
    keys: list[str]
    domain: str | None = None
    comment: list[str] = field(default_factory=list)


@dataclass
class Result:
    toml: str
    notes: list[str]  # every "file:line: option: what happened" line (stderr summary)
    warnings: list[str]


# --- opendkim.conf and data sets --------------------------------------------------------


def _read(path: Path, ref: str) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise MigrateError(f"{ref}{path}: cannot read: {e.strerror}") from None


def parse_conf(path: Path, depth: int = 0, ref: str = "") -> list[Option]:
    """The ``name value`` lines of opendkim.conf: ``#`` starts a comment, ``Include``
    reads another file (five levels at most, as OpenDKIM)."""
    if depth > 5:
        raise MigrateError(f"{ref}Include nested more than five levels")
    out: list[Option] = []
    for n, raw in enumerate(_read(path, ref).splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)  # the name, white space, the value
        name, value = parts[0], parts[1].strip() if len(parts) > 1 else ""
        where = f"{path}:{n}"
        if not value:
            raise MigrateError(f"{where}: {name}: missing value")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", name):
            raise MigrateError(f"{where}: {name!r} is not an option name")
        if name.lower() == "include":
            out += parse_conf(Path(value), depth + 1, f"{where}: Include ")
        else:
            out.append(Option(name, value, where))
    return out


@dataclass
class Dataset:
    kind: str  # "file", "refile", "list" (csl or comma list), or "db" (unreadable kind)
    spec: str
    rows: list[tuple[str, str | None, str]]  # key, value, "file:line"


def read_dataset(opt: Option, base: Path | None) -> Dataset:
    spec = opt.value
    low = spec.lower()
    if low.startswith(_DB_PREFIXES) or (low.endswith(".db") and not low.startswith("csl:")):
        return Dataset("db", spec, [])
    if low.startswith(("file:", "refile:")) or spec.startswith("/"):
        kind = "refile" if low.startswith("refile:") else "file"
        p = Path(spec.split(":", 1)[1] if low.startswith(("file:", "refile:")) else spec)
        if not p.is_absolute() and base is not None:
            p = base / p
        rows: list[tuple[str, str | None, str]] = []
        for n, raw in enumerate(_read(p, f"{opt.where}: {opt.name} ").splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if line:
                parts = line.split(None, 1)
                value = parts[1].strip() if len(parts) > 1 else None
                rows.append((parts[0], value, f"{p}:{n}"))
        return Dataset(kind, spec, rows)
    body = spec[4:] if low.startswith("csl:") else spec
    rows = []
    for raw in body.split(","):
        item = raw.strip()
        if item:
            k, eq, v = item.partition("=")
            rows.append((k.strip(), v.strip() if eq else None, opt.where))
    return Dataset("list", spec, rows)


def _bool(opt: Option) -> bool:
    c = opt.value[:1]
    if c and c in _TRUE:
        return True
    if c and c in _FALSE:
        return False
    raise MigrateError(f"{opt.where}: {opt.name}: {opt.value!r} is not a Boolean")


def _int(opt: Option) -> int:
    try:
        return int(opt.value, 10)
    except ValueError:
        raise MigrateError(f"{opt.where}: {opt.name}: {opt.value!r} is not an integer") from None


# --- patterns -----------------------------------------------------------------------------


def _esc(s: str) -> str:
    """A literal for milterd's fnmatch patterns."""
    return re.sub(r"([*?\[])", r"[\1]", s)


@dataclass(frozen=True)
class Spec:
    """A non-regex SigningTable key: a user (or any) at a host, its subdomains, or any."""

    user: str | None
    kind: str  # "exact", "sub", "any"
    dom: str = ""

    @staticmethod
    def parse(key: str) -> Spec:
        key = key.lower()
        if key == "*":
            return Spec(None, "any")
        user, at, dom = key.rpartition("@")
        u = user if at else None
        if dom == "*" and at:
            return Spec(u, "any")
        if dom.startswith("."):
            return Spec(u, "sub", dom[1:])
        return Spec(u, "exact", dom)

    def order(self) -> tuple[int, bool, int]:
        """OpenDKIM's lookup order: user@host, host, user@.domain (longest first),
        .domain, user@*, *. Also lists every set before the sets that contain it."""
        return ({"exact": 0, "sub": 1, "any": 2}[self.kind], self.user is None, -len(self.dom))

    def pattern(self) -> str:
        dom = {"exact": _esc(self.dom), "sub": "*." + _esc(self.dom), "any": "*"}[self.kind]
        if self.user is None:
            return dom
        return f"{_esc(self.user)}@{dom}"

    def __and__(self, o: Spec) -> Spec | None:
        if self.user is not None and o.user is not None and self.user != o.user:
            return None
        user = self.user if self.user is not None else o.user
        a, b = sorted((self, o), key=lambda s: {"exact": 0, "sub": 1, "any": 2}[s.kind])
        if b.kind == "any":
            return Spec(user, a.kind, a.dom)
        if a.kind == "exact":
            ok = a.dom == b.dom if b.kind == "exact" else a.dom.endswith("." + b.dom)
            return Spec(user, "exact", a.dom) if ok else None
        longer, shorter = (a, b) if len(a.dom) >= len(b.dom) else (b, a)
        if longer.dom == shorter.dom or longer.dom.endswith("." + shorter.dom):
            return Spec(user, "sub", longer.dom)
        return None


def glob_covers(q: str, p: str) -> bool:
    """True when every string glob ``p`` matches is matched by ``q`` (``*`` only; a
    sufficient test: q's ``*`` may stand for any run of p's characters and stars)."""

    @cache
    def m(i: int, j: int) -> bool:
        if i == len(q):
            return j == len(p)
        if q[i] == "*":
            return m(i + 1, j) or (j < len(p) and m(i, j + 1))
        return j < len(p) and p[j] != "*" and p[j] == q[i] and m(i + 1, j + 1)

    return m(0, 0)


def glob_disjoint(a: str, b: str) -> bool:
    """True when no string matches both (their fixed prefixes or suffixes conflict)."""
    if "*" not in a and "*" not in b:
        return a != b
    pa, pb = a.split("*", maxsplit=1)[0], b.split("*", maxsplit=1)[0]
    sa, sb = a.rsplit("*", maxsplit=1)[-1], b.rsplit("*", maxsplit=1)[-1]
    if "*" not in a:
        pa = sa = a
    if "*" not in b:
        pb = sb = b
    return not (pa.startswith(pb) or pb.startswith(pa)) or not (sa.endswith(sb) or sb.endswith(sa))


def refile_patterns(pat: str) -> list[str] | None:
    """milterd patterns matching what the OpenDKIM refile pattern matches against the
    whole From address (``*``: any run of characters; anchored). None: never matches."""
    pat = pat.lower()
    if "@" in pat:
        return [pat]  # milterd matches a pattern with @ against the whole address, too
    if "*" not in pat:
        return None  # no "@" and nothing to span it: no address matches
    if pat.startswith("*") and pat.count("*") == 1:
        return [pat]  # "*.example.com", "*example.com": a suffix of the domain
    return [pat[:i] + "*@*" + pat[i + 1 :] for i, c in enumerate(pat) if c == "*"]


# --- client address lists (OpenDKIM InternalHosts, OpenDMARC IgnoreHosts) ----------------

Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def _spelled(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """The address as OpenDKIM and OpenDMARC write it for their list look-ups (inet_ntop)."""
    return socket.inet_ntop(socket.AF_INET if addr.version == 4 else socket.AF_INET6, addr.packed)


def host_entry(entry: str, daemon: str, negated: bool = False) -> tuple[Net | None, str]:
    """One InternalHosts (``daemon`` "OpenDKIM") or IgnoreHosts ("OpenDMARC") entry, its
    ``!`` removed, read as the daemon matched it. Both look a client up only as strings
    (``dkimf_checkip``, ``dmarcf_checkip``): its address, then ``NET/BITS`` for BITS from the
    full length down to 0, NET being the address with the lower bits cleared (OpenDMARC also
    ``NET/DOTTED-MASK`` for IPv4; OpenDKIM also ``[ADDR]`` and ``[NET]/BITS``). Returns
    (network, "") for an entry that matched those clients; (network, why) for one converted
    with a difference; (None, why) for an address or network that never matched anything;
    (None, "") for a host or domain name."""
    low = entry.lower()
    bracket = low.startswith("[")
    if bracket:
        inner, close, rest = low[1:].partition("]")
        if not close or (rest and not rest.startswith("/")):
            return None, ""
        addr_text, slash, prefix = inner, rest[:1], rest[1:]
    else:
        addr_text, slash, prefix = low.partition("/")
    try:
        addr = ipaddress.ip_address(addr_text)
    except ValueError:
        return None, ""
    never = f"{daemon} never matched it"
    if "%" in addr_text:
        return None, f"{never}: it looked client addresses up without a scope (%zone)"
    bang, hint = "!" if negated else "", ""
    with contextlib.suppress(ValueError):
        meant = ipaddress.ip_network(f"{addr}/{prefix}" if slash else addr, strict=False)
        hint = f"; write {bang}{meant.network_address if not slash else meant} if that was meant"
    if addr_text != _spelled(addr):
        return None, f"{never}: it looked the address up only as {_spelled(addr)}{hint}"
    maxbits: int = addr.max_prefixlen
    bits: int
    if not slash:
        bits = maxbits
    elif prefix.isdigit() and prefix == str(int(prefix)) and int(prefix) <= maxbits:
        bits = int(prefix)
    elif daemon == "OpenDMARC" and addr.version == 4 and not bracket:
        try:
            bits = ipaddress.IPv4Network(f"0.0.0.0/{prefix}").prefixlen
        except ValueError:
            return None, f"{never}: /{prefix} is neither a prefix length nor a netmask{hint}"
        if str(ipaddress.IPv4Network(f"0.0.0.0/{bits}").netmask) != prefix:
            return None, f"{never}: /{prefix} is neither a prefix length nor a netmask{hint}"
    else:
        return None, f"{never}: it looked networks up only as NETWORK/BITS{hint}"
    net = ipaddress.ip_network((addr, bits), strict=False)
    if net.network_address != addr:
        return None, (
            f"{never}: host bits set, and it looked the network up only as {net}; "
            f"write {bang}{net} if the network was meant"
        )
    if bracket and daemon == "OpenDMARC":
        if slash:
            return None, f"{never}: it looked networks up only as NETWORK/BITS{hint}"
        if negated:
            return None, (
                "it had no effect: OpenDMARC compared a bracketed address only with the "
                "client's host name, and an excluded host name did not stop its address "
                "from matching a listed network"
            )
        return net, (
            f"OpenDMARC compared it only with the client's host name, which the MTA sends "
            f"as {low} when the client has no host name (reverse DNS); milterd trusts "
            f"{net.network_address} whatever its host name"
        )
    return net, ""


def carve(pos: list[Net], neg: list[Net]) -> list[str]:
    """The networks of ``pos`` without the clients a more precise (or equal) ``neg`` entry
    excludes, as OpenDKIM and OpenDMARC decide: the most precise listed entry wins, an
    exclusion over an equal entry."""
    out: list[Any] = []
    for p in pos:
        parts: list[Any] = [p]
        for n in neg:
            if n.version != p.version:
                continue
            if n == p:
                parts = []
            elif n.subnet_of(p):  # type: ignore[arg-type]
                nxt: list[Any] = []
                for part in parts:
                    if n.subnet_of(part):
                        nxt += list(part.address_exclude(n))
                    else:
                        nxt.append(part)
                parts = nxt
        out += parts
    v4 = ipaddress.collapse_addresses(x for x in out if x.version == 4)
    v6 = ipaddress.collapse_addresses(x for x in out if x.version == 6)
    return [str(n) for n in [*v4, *v6]]


@dataclass
class HostList:
    networks: list[str]  # what to put in internal_networks
    names: list[str]  # host and domain names (as written, "!" kept): not convertible
    problems: list[tuple[str, str]]  # (where, text): entries dropped or converted differently


def host_list(rows: list[tuple[str, str]], daemon: str) -> HostList:
    """``(entry, "file:line")`` rows of an InternalHosts/IgnoreHosts list as networks."""
    pos: list[Net] = []
    neg: list[Net] = []
    names: list[str] = []
    problems: list[tuple[str, str]] = []
    for entry, where in rows:
        bang = entry.startswith("!")
        net, why = host_entry(entry[1:] if bang else entry, daemon, bang)
        if net is None and not why:
            names.append(entry)
            continue
        if net is None:
            problems.append((where, f"{entry}: not converted: {why}"))
            continue
        if why:
            problems.append((where, f"{entry}: converted to {net}: {why}"))
        (neg if bang else pos).append(net)
    return HostList(carve(pos, neg), names, problems)


# --- conversion ---------------------------------------------------------------------------


class Converter:
    def __init__(self, options: list[Option]) -> None:
        self.opts: dict[str, Option] = {}
        for o in options:  # the last setting of an option wins, as in OpenDKIM
            self.opts[o.name.lower()] = o
        self.notes: list[str] = []
        self.warnings: list[str] = []
        self.milterd: dict[str, object] = {}
        self.dns: dict[str, object] = {}
        self.dkim: dict[str, object] = {}
        self.keys: dict[str, dict[str, str]] = {}
        self.key_comments: dict[str, list[str]] = {}
        self.rules: list[Rule] = []
        self.comments: list[str] = []  # top of [plugins.dkim]
        self.milterd_comments: list[str] = []
        base = self.opts.get("basedirectory")
        self.base = Path(base.value) if base else None

    def note(self, opt: Option, text: str) -> None:
        self.notes.append(f"{opt.where}: {opt.name}: {text}")

    def warn(self, where: str, text: str) -> None:
        self.warnings.append(f"{where}: {text}")
        self.comments.append(f"WARNING {where}: {text}")

    def get(self, name: str) -> Option | None:
        return self.opts.get(name)

    def run(self) -> Result:
        for name, o in self.opts.items():
            if name in BOOLEANS:
                _bool(o)
            elif name in INTEGERS:
                _int(o)
            elif name.startswith("on-"):
                self.action(o)
        for name, o in self.opts.items():
            if name in CONVERTED:
                continue
            text = ELSEWHERE.get(name, "unknown option (not in opendkim.conf(5) 2.11): ignored")
            self.note(o, text)
        self.mode()
        self.trust()
        self.signing_options()
        self.verify_options()
        self.core()
        return Result(self.render(), self.notes, self.warnings)

    # Mode, keys and tables

    def mode(self) -> None:
        o = self.get("mode")
        mode = o.value.lower() if o else "sv"
        if o and (not mode or set(mode) - {"s", "v"}):
            raise MigrateError(f"{o.where}: Mode: {o.value!r}: only s and v are valid")
        sign, verify = "s" in mode, "v" in mode
        self.dkim["sign"], self.dkim["verify"] = sign, verify
        if o:
            self.note(o, f"converted: sign = {str(sign).lower()}, verify = {str(verify).lower()}")
        if sign:
            self.tables()
            if not self.rules:
                self.dkim["sign"] = False
                self.comments.append("sign = false: no key/signing table was converted")

    def _keyfile(self, raw: str, where: str, name: str) -> str | None:
        path = Path(raw)
        if not path.is_absolute():
            if self.base is None:
                self.warn(
                    where,
                    f"key {name}: relative key file {raw} (OpenDKIM read it from "
                    "its working directory; milterd from milterd.toml's directory)",
                )
            else:
                path = self.base / path
        p = str(path)
        if not os.path.exists(p):
            self.warn(where, f"key {name}: key file {p} does not exist")
        elif not os.access(p, os.R_OK):
            self.warn(
                where,
                f"key {name}: key file {p} is not readable by this user "
                "(run as root or as the key's owner to check it)",
            )
        else:
            mode = stat.S_IMODE(os.stat(p).st_mode)
            if mode & 0o077 and self.dkim.get("insecure_keys") is not True:
                self.warn(
                    where,
                    f"key {name}: key file {p} has mode {mode:04o}: milterd "
                    "refuses it at start; chmod 600 it",
                )
        return p

    def add_key(self, name: str, domain: str, selector: str, keyfile: str, where: str) -> bool:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", selector):
            self.warn(where, f"key {name}: selector {selector!r} is not valid in milterd")
            return False
        if "%" in keyfile:
            self.warn(
                where,
                f"key {name}: '%' in the key file ({keyfile}) is not supported: "
                "list one key per domain",
            )
            return False
        if not keyfile.startswith(("/", "./", "../")):
            self.warn(
                where,
                f"key {name}: the private key is inline in the table; milterd "
                "reads keys from files: save it to a file (mode 0600)",
            )
            return False
        p = self._keyfile(keyfile, where, name)
        if p is None:
            return False
        entry = {"selector": selector, "file": p}
        if domain != "%":
            entry["domain"] = domain.lower().rstrip(".")
        self.keys[name] = entry
        self.key_comments[name] = [f"from {where}"]
        return True

    def tables(self) -> None:
        kt, st = self.get("keytable"), self.get("signingtable")
        if kt:
            for n in ("domain", "keyfile", "selector", "subdomains"):
                if (o := self.get(n)) is not None:
                    self.note(o, "ignored: KeyTable is set (as OpenDKIM ignores it)")
            if st is None:
                self.note(
                    kt,
                    "not converted: no SigningTable (SetupPolicyScript is not "
                    "supported): nothing is signed",
                )
                return
            self.key_table(kt)
            self.signing_table(st)
        else:
            if st is not None:
                self.note(st, "ignored: no KeyTable (as OpenDKIM ignores it)")
            self.single_key()

    def single_key(self) -> None:
        dom, kf, sel = self.get("domain"), self.get("keyfile"), self.get("selector")
        if not (dom and kf and sel):
            for o in (dom, kf, sel):
                if o is not None:
                    self.note(o, "not converted: Domain, KeyFile and Selector are needed together")
            return
        if not self.add_key(sel.value, "%", sel.value, kf.value, kf.where):
            return
        for o in (kf, sel):
            self.note(o, f"converted: keys.{sel.value}")
        ds = read_dataset(dom, self.base)
        if ds.kind == "db":
            self.note(dom, f"not converted: data set {ds.spec} cannot be read by milterd")
            return
        sub = self.get("subdomains")
        subdomains = _bool(sub) if sub else False
        # OpenDKIM (mlfi_eoh): the From domain itself, then "*", then with SubDomains its
        # parents from the longest (a.b.example.com: b.example.com, then example.com): every
        # exact rule comes first, then the *.DOMAIN rules, longest DOMAIN first.
        parents: list[Rule] = []
        for raw, _, where in ds.rows:
            key = raw.lower().rstrip(".")
            if ds.kind == "refile":
                if set(key) & _REGEX_META:
                    self.warn(
                        where,
                        f"Domain pattern {key!r}: regular-expression characters "
                        "(OpenDKIM used them as a regex): not converted",
                    )
                    continue
                if "@" in key:
                    self.warn(
                        where,
                        f"Domain pattern {key!r} holds '@': it never matched a "
                        "domain in OpenDKIM: not converted",
                    )
                    continue
                self.rules.append(Rule(key, [sel.value], comment=[f"Domain {where}"]))
                continue
            if key == "*":  # OpenDKIM signs every domain (d= the From domain) for "*"
                self.rules.append(Rule("*", [sel.value], comment=[f"Domain {where}: any domain"]))
                continue
            self.rules.append(Rule(_esc(key), [sel.value], comment=[f"Domain {where}"]))
            if subdomains:
                parents.append(
                    Rule(
                        "*." + _esc(key),
                        [sel.value],
                        domain=key,
                        comment=[f"SubDomains: d={key}, the listed domain"],
                    )
                )
        exact = [r for r in self.rules if r.pattern != "*"]
        self.rules = exact + [r for r in self.rules if r.pattern == "*"]
        self.rules += sorted(parents, key=lambda r: -len(r.domain or ""))
        self.note(dom, f"converted: {len(self.rules)} signing rule(s)")
        if sub:
            self.note(sub, "converted: *.DOMAIN rules signing as DOMAIN")

    def key_table(self, kt: Option) -> None:
        ds = read_dataset(kt, self.base)
        if ds.kind == "db":
            self.note(kt, f"not converted: data set {ds.spec} cannot be read by milterd")
            return
        for name, value, where in ds.rows:
            parts = (value or "").split(":", 2)
            if len(parts) != 3 or not all(parts):
                raise MigrateError(
                    f"{where}: KeyTable entry {name!r}: want 'NAME DOMAIN:SELECTOR:KEYFILE'"
                )
            if name in self.keys:
                self.warn(where, f"key {name} listed twice: the first is used")
                continue
            self.add_key(name, parts[0], parts[1], parts[2], where)
        self.note(kt, f"converted: {len(self.keys)} key(s) in [plugins.dkim.keys]")

    def signing_table(self, st: Option) -> None:
        ds = read_dataset(st, self.base)
        if ds.kind == "db":
            self.note(
                st,
                f"not converted: data set {ds.spec} cannot be read by milterd: nothing is signed",
            )
            return
        ms = self.get("multiplesignatures")
        multi = _bool(ms) if ms else False
        if ms:
            self.note(ms, f"converted: {'all matching rows apply' if multi else 'first match'}")
        # (pattern-ish key, keys, where) rows with their key names checked
        rows: list[tuple[str, list[str], str]] = []
        for key, value, where in ds.rows:
            if not value:
                raise MigrateError(f"{where}: SigningTable entry {key!r}: no key name")
            kname, _, signer = value.partition(":")
            if signer:
                self.warn(where, f"signer {signer!r} (i=) dropped: milterd always signs with i=@d")
            if kname == "%":
                names = [n for n in self.keys if re.fullmatch(r"[a-z0-9.-]+\.[a-z]+", n.lower())]
                self.warn(
                    where,
                    "key name '%' (the From domain): expanded to one rule per "
                    "KeyTable name that is a domain; a From domain with no such key was "
                    "a signing error in OpenDKIM (On-SignatureError), milterd does not "
                    "sign it",
                )
                for n in names:
                    rows.append((f"%{n}|{key}", [n], where))
                continue
            if kname not in self.keys:
                self.warn(
                    where,
                    f"{key}: key {kname!r} was not converted: rule not converted; "
                    "addresses it matched now fall through to the next matching rule",
                )
                continue
            rows.append((key, [kname], where))
        if ds.kind == "refile":
            self.refile_rules(rows, multi)
        else:
            self.exact_rules(rows, multi)
        self.note(
            st,
            f"converted: {len(self.rules)} signing rule(s), in the order OpenDKIM looked them up",
        )

    def exact_rules(self, rows: list[tuple[str, list[str], str]], multi: bool) -> None:
        specs: dict[Spec, tuple[list[str], str]] = {}
        for key, knames, where in rows:
            if key.startswith("%"):
                dom, _, orig = key[1:].partition("|")
                s = Spec.parse(orig) & Spec(None, "exact", dom.lower())
                if s is None:
                    continue
            else:
                s = Spec.parse(key)
            if s in specs and not key.startswith("%"):
                self.warn(where, f"{key} listed twice: OpenDKIM used the first")
                continue
            specs.setdefault(s, (knames, where))
        if multi:  # every set intersection, each with the keys of every row containing it
            closure = set(specs)
            while True:
                new = {x for a in closure for b in closure if (x := a & b) is not None} - closure
                if not new:
                    break
                closure |= new
            ordered = sorted(specs, key=Spec.order)
            for s in sorted(closure, key=Spec.order):
                keys = [k for r in ordered if (s & r) == s for k in specs[r][0]]
                origin = specs[s][1] if s in specs else "intersection of rows"
                self.rules.append(
                    Rule(s.pattern(), list(dict.fromkeys(keys)), comment=[f"SigningTable {origin}"])
                )
            return
        for s in sorted(specs, key=Spec.order):
            knames, where = specs[s]
            self.rules.append(Rule(s.pattern(), knames, comment=[f"SigningTable {where}"]))

    def refile_rules(self, rows: list[tuple[str, list[str], str]], multi: bool) -> None:
        pats: list[tuple[str, list[str], str]] = []
        for key, knames, where in rows:
            if key.startswith("%"):
                dom, _, orig = key[1:].partition("|")
                local, at, dpat = orig.lower().rpartition("@")
                if orig == "*" or (at and (dpat == "*" or "*" not in dpat)):
                    if orig != "*" and not fnmatch.fnmatchcase(dom, dpat):
                        continue
                    pats.append(((local or "*") + "@" + dom.lower(), knames, where))
                else:
                    self.warn(where, f"{orig}: key name '%' with this pattern: not converted")
                continue
            if set(key) & _REGEX_META:
                self.warn(
                    where,
                    f"pattern {key!r}: regular-expression characters (OpenDKIM "
                    "used them as a POSIX regex): rule not converted; addresses it "
                    "matched now fall through to the next matching rule",
                )
                continue
            pats.append((key.lower(), knames, where))
        if multi:
            # all matching rows apply: order subsets first; each rule gets the keys of every
            # row whose pattern contains it (exact when overlapping patterns are nested)
            left = list(pats)
            ordered: list[tuple[str, list[str], str]] = []
            while left:
                pick = next(
                    r
                    for r in left
                    if not any(
                        glob_covers(r[0], o[0]) and not glob_covers(o[0], r[0]) for o in left
                    )
                )
                left.remove(pick)
                ordered.append(pick)
            seen: set[str] = set()
            for i, (p, _, where) in enumerate(ordered):
                if p in seen:
                    continue
                seen.add(p)
                keys = [k for q, kn, _ in pats if glob_covers(q, p) for k in kn]
                for q, _, w2 in ordered[:i]:
                    if not glob_covers(p, q) and not glob_disjoint(p, q) and not glob_covers(q, p):
                        self.warn(
                            where,
                            f"{p} and {q} ({w2}) overlap without one containing "
                            f"the other: an address matching both got both keys from "
                            f"OpenDKIM; milterd gives it only {q}'s rule",
                        )
                self.add_refile(p, list(dict.fromkeys(keys)), where)
            return
        for p, knames, where in pats:
            self.add_refile(p, knames, where)

    def add_refile(self, pat: str, keys: list[str], where: str) -> None:
        out = refile_patterns(pat)
        if out is None:
            self.warn(
                where,
                f"pattern {pat!r} has no '@' and no '*': OpenDKIM matched it "
                "against the whole address, so it never matched: not converted",
            )
            return
        for p in out:
            c = [f"SigningTable {where}: {pat}"]
            if p != pat:
                c.append("OpenDKIM matched it against the whole address: the '@' falls in a '*'")
            self.rules.append(Rule(p, keys, comment=c))

    # who signs

    def trust(self) -> None:
        o = self.get("internalhosts")
        if o is None:
            nets: list[str] = ["127.0.0.1/32"]
            names: list[str] = []
            self.milterd_comments.append(
                "internal_networks: OpenDKIM's default InternalHosts (127.0.0.1 only)"
            )
        else:
            nets, names = self.networks(o)
        self.milterd["internal_networks"] = nets
        local = any(ipaddress.ip_address("127.0.0.1") in ipaddress.ip_network(n) for n in nets)
        self.dkim["sign_local"] = local
        self.milterd_comments.append(
            "internal_networks is milterd-wide. In dkim it does what InternalHosts did: mail "
            "from these clients is signed when a signing rule matches, verified otherwise. "
            "Every other plugin trusts them too, which OpenDKIM's InternalHosts did not "
            "decide: spf and dmarc do not check their mail (unless check_trusted = true), "
            "scoring does not score it (unless scan_trusted = true), tagging does not tag it "
            "(unless tag_trusted = true) nor remove its X-Spam fields, authres adds no "
            "Authentication-Results to it (unless trusted = true), and archive counts it as "
            "outbound"
        )
        self.comments.append(
            "sign_local = "
            + (
                "true: 127.0.0.1 was internal; milterd also signs other loopback "
                "clients (127.0.0.0/8, ::1) and connections without an address "
                "(OpenDKIM took those as 127.0.0.1)"
                if local
                else "false: 127.0.0.1 was not an internal host in OpenDKIM"
            )
        )
        if names:
            self.warn(
                o.where if o else "",
                "InternalHosts: host/domain names cannot be "
                "converted (internal_networks takes addresses): " + ", ".join(names),
            )
        mta = self.get("mta")
        daemons: list[str] = []
        if mta is not None:
            ds = read_dataset(mta, self.base)
            daemons += [k for k, _, _ in ds.rows]
            self.note(mta, "converted: sign_daemons")
        ml = self.get("macrolist")
        if ml is not None:
            ds = read_dataset(ml, self.base)
            for k, v, where in ds.rows:
                macro = k.strip("{}")
                if macro == "daemon_name" and v:
                    daemons += v.split("|")
                    continue
                if macro in ("auth_authen", "auth_type") and not v:
                    continue  # authenticated clients are trusted in milterd anyway
                self.warn(
                    where,
                    f"MacroList {k}{'=' + v if v else ''}: no equivalent: mail "
                    "with this macro is not signed (milterd only knows {daemon_name} "
                    "values)",
                )
            self.note(ml, "converted where it names {daemon_name} values")
        if daemons:
            self.dkim["sign_daemons"] = list(dict.fromkeys(daemons))

    def networks(self, o: Option) -> tuple[list[str], list[str]]:
        ds = read_dataset(o, self.base)
        if ds.kind == "db":
            self.note(o, f"not converted: data set {ds.spec}")
            return [], []
        hl = host_list([(key, where) for key, _, where in ds.rows], "OpenDKIM")
        for where, text in hl.problems:
            self.warn(where, f"InternalHosts {text}")
        self.note(o, f"converted: [milterd] internal_networks ({len(hl.networks)} network(s))")
        return hl.networks, hl.names

    # signature details

    def signing_options(self) -> None:
        o = self.get("canonicalization")
        canon = (o.value if o else "simple").lower()
        if "/" not in canon:
            canon += "/simple"
        if any(c not in ("simple", "relaxed") for c in canon.split("/")):
            raise MigrateError(f"{o.where if o else ''}: Canonicalization: {canon!r} is not valid")
        self.dkim["canonicalization"] = canon
        if o:
            self.note(o, f"converted: canonicalization = {canon}")
        else:
            self.comments.append("canonicalization: OpenDKIM's default simple/simple")
        headers = self.header_list("signheaders", list(OPENDKIM_SIGN_HEADERS))
        omit = self.get("omitheaders")
        if omit is not None:
            drop = set(self.header_list("omitheaders", list(NEVER_SIGN)))
            headers = [h for h in headers if h not in drop or h == "from"]
        dropped = [h for h in headers if h in NEVER_SIGN]
        if dropped:
            self.comments.append(
                "headers: not signable in milterd, left out: " + ", ".join(dropped)
            )
        headers = [h for h in headers if h not in NEVER_SIGN]
        if "from" not in headers:
            headers.insert(0, "from")  # OpenDKIM adds the mandatory From, too
        headers = list(dict.fromkeys(headers))
        self.dkim["headers"] = headers
        over = [h for h in self.header_list("oversignheaders", []) if h not in NEVER_SIGN]
        self.dkim["oversign"] = list(dict.fromkeys(over))
        if {"date", "message-id"} & set(over):
            self.comments.append(
                "oversign: milterd oversigns Date and Message-ID only when "
                "present (an MTA may add them after signing)"
            )
        missing = [h for h in over if h not in headers]
        if missing:
            self.comments.append(
                "oversign: not in headers (OpenDKIM would still list them in "
                "h=, milterd does too): " + ", ".join(missing)
            )
        if (o := self.get("signaturettl")) is not None:
            ttl = _int(o)
            if ttl < 0:
                raise MigrateError(f"{o.where}: SignatureTTL: must not be negative")
            self.dkim["expire"] = ttl
            self.note(o, f"converted: expire = {ttl}")
        if (o := self.get("signaturealgorithm")) is not None:
            alg = o.value.lower()
            if alg == "rsa-sha1":
                self.warn(
                    o.where,
                    "SignatureAlgorithm rsa-sha1: milterd signs rsa-sha256 "
                    "(rsa-sha1 never passes, RFC 8301)",
                )
            else:
                self.note(
                    o,
                    "converted: the algorithm follows each key (rsa-sha256 for RSA "
                    "keys, ed25519-sha256 for Ed25519 keys)",
                )
        if (o := self.get("requiresafekeys")) is not None:
            safe = _bool(o)
            self.dkim["insecure_keys"] = not safe
            self.note(
                o,
                f"converted: insecure_keys = {str(not safe).lower()} (milterd's check "
                "is stricter: no group/other access at all, safe directories)",
            )

    def header_list(self, name: str, default: list[str]) -> list[str]:
        o = self.get(name)
        if o is None:
            return default
        ds = read_dataset(o, self.base)
        items = [k.lower() for k, _, _ in ds.rows]
        if "*" in items:
            out = list(default)
            for it in items:
                if it.startswith("+"):
                    if re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", it[1:]):  # a field name only
                        out.append(it[1:])
                elif it.startswith("-") and it[1:] in out:
                    out.remove(it[1:])
        else:
            out = [i for i in items if re.fullmatch(r"[\x21-\x39\x3b-\x7e]+", i)]
        self.note(o, f"converted: {len(out)} field name(s)")
        return out

    # verification

    def verify_options(self) -> None:
        if (o := self.get("minimumkeybits")) is not None:
            bits = _int(o)
            if bits > 1024:
                self.dkim["min_rsa_bits"] = bits
                self.note(o, f"converted: min_rsa_bits = {bits}")
            else:
                self.note(
                    o,
                    f"not converted: milterd never accepts RSA keys under 1024 bits "
                    f"(RFC 8301); {bits} kept at 1024",
                )
        if (o := self.get("maximumsignaturestoverify")) is not None:
            n = _int(o)
            self.dkim["max_signatures"] = min(max(n, 1), 20)
            self.note(
                o,
                f"converted: max_signatures = {self.dkim['max_signatures']}"
                + ("" if 1 <= n <= 20 else " (milterd allows 1 to 20)"),
            )
        on: dict[str, tuple[str, Option | None]] = {k: (v, None) for k, v in _ON_DEFAULTS.items()}
        if (d := self.get("on-default")) is not None:
            for k in _ON:
                on[k] = (self.action(d), d)
        for k in _ON:
            if (o := self.get("on-" + k)) is not None:
                on[k] = (self.action(o), o)
        actions: dict[str, str] = {}
        for k, (act, src) in on.items():
            word = _ON[k]
            where = src.where if src else "OpenDKIM default"
            if word is None:
                if k == "internalerror":
                    oe = {"accept": "continue", "tempfail": "tempfail", "reject": "reject"}
                    if act in oe:
                        self.dkim["on_error"] = oe[act]
                        if src:
                            self.note(src, f"converted: on_error = {oe[act]}")
                        continue
                if src is not None or act != "accept":
                    msg = {
                        "signatureerror": "milterd delivers a message it cannot sign unsigned "
                        "(logged); a key it cannot load refuses the start",
                        "security": "milterd has no 'security concern' result",
                    }.get(k, "")
                    text = f"{_ON_NAMES[k]} {act}: no equivalent: {msg}"
                    if src is None:
                        self.comments.append(f"{where}: {text}")
                    else:
                        self.note(src, text)
                continue
            if act == "discard":
                self.warn(
                    where,
                    f"{_ON_NAMES[k]} discard: milterd cannot discard; dkim={word} mail is "
                    "accepted instead",
                )
                continue
            if act != "accept":
                actions[word] = act
                self.comments.append(f"actions.{word}: {_ON_NOTE[word]} ({where})")
            if src is not None:
                self.note(src, f"converted: dkim={word} -> {act}")
        if actions:
            self.dkim["actions"] = actions

    def action(self, o: Option) -> str:
        act = _ACTIONS.get(o.value[:1].lower())
        if act is None or not _ACTIONS[o.value[:1].lower()].startswith(o.value.lower()):
            raise MigrateError(
                f"{o.where}: {o.name}: {o.value!r} is not an action "
                "(accept, discard, quarantine, reject, tempfail)"
            )
        return act

    def core(self) -> None:
        if (o := self.get("authservid")) is not None:
            if o.value != "HOSTNAME":
                self.milterd["authserv_id"] = o.value
            self.note(o, "converted: [milterd] authserv_id (default: the host's FQDN)")
        if (o := self.get("nameservers")) is not None:
            self.dns["nameservers"] = [s.strip() for s in o.value.split(",") if s.strip()]
            self.note(o, "converted: [dns] nameservers")
        if (o := self.get("dnstimeout")) is not None:
            if _int(o) > 0:
                self.dns["timeout"] = _int(o)
                self.note(o, "converted: [dns] timeout")
            else:
                self.note(o, "0 (wait for ever) has no equivalent: [dns] timeout stays 3 s")
        if (o := self.get("maximumheaders")) is not None:
            if _int(o) > 0:
                self.milterd["max_header_bytes"] = _int(o)
                self.note(o, "converted: [milterd] max_header_bytes")
            else:
                self.note(o, "0 (no limit) has no equivalent: max_header_bytes stays 1 MiB")
        if (o := self.get("socket")) is not None:
            sock = re.sub(r"^(local|unix):", "unix:", o.value)
            self.milterd_comments.append(
                f"socket: OpenDKIM listened on {o.value}; to keep the "
                f"MTA's milter setting: socket = {_toml(sock)}"
            )
        if (o := self.get("basedirectory")) is not None:
            self.note(o, "converted: relative key files are taken from it")

    # output

    def render(self) -> str:
        out = [
            "# milterd.toml fragment converted from OpenDKIM by `milterd dkim import-opendkim`",
            "# Merge it into milterd.toml; check with `milterd config check`.",
            "",
        ]
        out += ["[milterd]"] + [x for c in self.milterd_comments for x in _comment(c)]
        out += [f"{k} = {_toml(v)}" for k, v in self.milterd.items()]
        if self.dns:
            out += ["", "[dns]"] + [f"{k} = {_toml(v)}" for k, v in self.dns.items()]
        if self.dkim.get("verify"):
            out += [
                "",
                "# OpenDKIM added Authentication-Results itself: in milterd that is the",
                "# authres plugin. Enable it unless milterd.toml has it already:",
                "# [plugins.authres]",
            ]
        out += ["", "[plugins.dkim]"] + [x for c in self.comments for x in _comment(c)]
        out += [f"{k} = {_toml(v)}" for k, v in self.dkim.items()]
        for name, entry in self.keys.items():
            out += ["", *[f"# {c}" for c in self.key_comments[name]]]
            out.append(f"[plugins.dkim.keys.{_key(name)}]")
            out += [f"{k} = {_toml(v)}" for k, v in entry.items()]
        for r in self.rules:
            out += ["", *[x for c in r.comment for x in _comment(c)], "[[plugins.dkim.signing]]"]
            out += [f"pattern = {_toml(r.pattern)}", f"keys = {_toml(r.keys)}"]
            if r.domain:
                out.append(f"domain = {_toml(r.domain)}")
        rest = [n for n in self.notes if "converted:" not in n or "not converted" in n]
        out += ["", "# Not converted (also on stderr):"] + [x for n in rest for x in _comment(n)]
        return "\n".join(out) + "\n"


def _comment(text: str) -> list[str]:
    return textwrap.wrap(
        text,
        96,
        initial_indent="# ",
        subsequent_indent="#   ",
        break_long_words=False,
        break_on_hyphens=False,
    )


def _toml(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_toml(x)}" for k, x in v.items()) + " }"
    raise TypeError(type(v))


def _key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k, ensure_ascii=False)


def convert(options: list[Option]) -> Result:
    return Converter(options).run()


def convert_file(path: str | os.PathLike[str]) -> Result:
    """Convert one opendkim.conf. Raises :class:`MigrateError` (one line) when it, or a
    data set it names, cannot be read or is malformed."""
    return convert(parse_conf(Path(path)))
