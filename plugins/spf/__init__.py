"""Built-in ``spf``: Sender Policy Framework (RFC 7208) checks of HELO and MAIL FROM.

Evaluation is pyspf's (``spf.query``), with every DNS query routed through milterd's
shared resolver (``ctx.resolver``: the configured ``[dns]`` servers, a TTL-honouring
cache, a timeout never beyond the hook's deadline). The policy, what to do with each
result, is spf-engine's: the option names of ``policyd-spf.conf`` (``HELO_reject``,
``Mail_From_reject``, ``PermError_reject``, ``TempError_Defer``, ``Whitelist``,
``Domain_Whitelist``, ``HELO_Whitelist``, ``skip_addresses``, ...) are accepted with the
same names and meanings, and the result -> action table is computed by spf-engine's own
``_get_resultcodes`` at start-up.

Why not spf-engine's checking entry point (``_spfcheck``): it is shaped for a Postfix
policy daemon (a dict of policy attributes in, a Postfix action string out), does its own
DNS through pyspf's module-level resolver, logs to syslog and, at import, opens syslog and
replaces ``sys.excepthook``. So spf-engine is imported once, lazily, at start-up with the
excepthook saved and restored and syslog closed again; only its pure policy function is
called, and only at start-up.

Results on the ledger (RFC 8601 words): ``spf=<result> smtp.mailfrom=<domain>`` for the
MAIL FROM identity (for the null sender the HELO domain, ``postmaster@HELO`` being the
identity checked) and ``spf=<result> smtp.helo=<helo>`` when the HELO check was done.

Test mode (``test_mode = true``, or spf-engine's ``TestOnly = 0``): results and headers
are recorded as usual, but no reject or defer is ever given (each is logged instead).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import sys
import threading
import time
from collections.abc import Iterable
from typing import Any, Literal

import spf
from pydantic import Field, ValidationError, field_validator

from milterd import (
    AddHeader,
    ConfigError,
    ConfigPath,
    Context,
    DNSTempError,
    EnvFrom,
    EnvRcpt,
    NXDomain,
    PluginConfig,
    Reject,
    Resolver,
    Result,
    Services,
    TempFail,
    Verdict,
    hookimpl,
)

from ..addresses import a_label

__all__ = [
    "RESULTS",
    "SPFConfig",
    "SPFPlugin",
    "load_policyd_conf",
    "policy_table",
    "policyd_config",
]

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
NETS = list[ipaddress.IPv4Network | ipaddress.IPv6Network]
Action = Literal["reject", "defer", "prepend"]

#: policyd-spf.conf names that make no sense inside milterd (process, socket and logging
#: settings of the policy daemon / pyspf-milter). Accepted so a file carries over; ignored.
IGNORED_NAMES = (
    "debugLevel",
    "Authserv_Id",
    "Mock",
    "QueueID",
    "Socket",
    "PidFile",
    "UserID",
    "UMask",
    "InternalHosts",
    "IntHosts",
    "MacroList",
    "Per_User",
    "Prospective",
    "Mail_From_pass_restriction",
    "HELO_pass_restriction",
)


def _csv(value: Any) -> list[str]:
    """``"a, b,c"`` or ``["a", "b"]`` -> ``["a", "b", "c"]`` (policyd-spf.conf lists are
    comma-separated strings; TOML may give a list)."""
    if value is None:
        return []
    items: Iterable[Any] = value.split(",") if isinstance(value, str) else value
    return [str(v).strip() for v in items if str(v).strip()]


def _yes(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    return str(value).strip().lower() in ("true", "yes", "1", "on")


class SPFConfig(PluginConfig):
    """spf-engine's option names (same meanings), then milterd's own lower-case keys."""

    HELO_reject: Literal["SPF_Not_Pass", "Softfail", "Fail", "Null", "False", "No_Check"] = "Fail"
    Mail_From_reject: Literal["SPF_Not_Pass", "Softfail", "Fail", "False", "No_Check"] = "Fail"
    PermError_reject: bool = False
    TempError_Defer: bool = False
    skip_addresses: list[str] = ["127.0.0.0/8", "::ffff:127.0.0.0/104", "::1"]
    Whitelist: list[str] = []
    HELO_Whitelist: list[str] = []
    Domain_Whitelist: list[str] = []
    Domain_Whitelist_PTR: list[str] = []
    Reject_Not_Pass_Domains: list[str] = []
    No_Mail: bool = False
    Lookup_Time: float = 20.0
    Whitelist_Lookup_Time: float = 10.0
    Void_Limit: int = 2
    Header_Type: str = "AR"  # SPF (Received-SPF), AR (ledger only), None; "SPF,AR"
    Hide_Receiver: bool = True
    SPF_Enhanced_Status_Codes: bool = True
    Reason_Message: str = "Message {rejectdefer} due to: {spf}. Please see {url}"
    Reason_URL: str = ""
    TestOnly: int = 1  # 0 = test mode (see test_mode); spf-engine's name and meaning
    defaultSeedOnly: int = 1  # noqa: N815 - TestOnly's old name (used when TestOnly unset)
    # Accepted for compatibility with policyd-spf.conf, not used (see IGNORED_NAMES).
    debugLevel: int = 1  # noqa: N815 - spf-engine's name
    Authserv_Id: str = ""
    Mock: bool = False
    QueueID: bool = True
    Socket: str = ""
    PidFile: str = ""
    UserID: str = ""
    UMask: int = 7
    InternalHosts: list[str] = []
    IntHosts: bool = False
    MacroList: list[str] = []
    Per_User: str = ""
    Prospective: str = ""
    Mail_From_pass_restriction: str = ""
    HELO_pass_restriction: str = ""
    # milterd's own keys.
    policyd_spf_conf: ConfigPath | None = None  # read this policyd-spf.conf; keys here win
    # Record results and headers, never reject or defer. Unset: TestOnly decides.
    test_mode: bool | None = None
    decide_at: Literal["envfrom", "envrcpt"] = "envfrom"
    postmaster_exempt: bool = True  # with decide_at = envrcpt: postmaster@ is never refused
    check_trusted: bool = False  # also check authenticated / internal-network clients
    # Seconds kept free below the hook's deadline, at most a quarter of the time left.
    deadline_margin: float = Field(default=0.5, ge=0)

    @field_validator(
        "skip_addresses",
        "Whitelist",
        "HELO_Whitelist",
        "Domain_Whitelist",
        "Domain_Whitelist_PTR",
        "Reject_Not_Pass_Domains",
        "InternalHosts",
        "MacroList",
        mode="before",
    )
    @classmethod
    def _lists(cls, v: Any) -> list[str]:
        return _csv(v)

    @field_validator(
        "PermError_reject",
        "TempError_Defer",
        "No_Mail",
        "Hide_Receiver",
        "SPF_Enhanced_Status_Codes",
        "Mock",
        "QueueID",
        "IntHosts",
        mode="before",
    )
    @classmethod
    def _bools(cls, v: Any) -> bool:
        return _yes(v)

    @property
    def testing(self) -> bool:
        """Test mode: ``test_mode`` when given, else spf-engine's ``TestOnly == 0`` (or its
        old name ``defaultSeedOnly == 0`` when ``TestOnly`` is not given)."""
        if self.test_mode is not None:
            return self.test_mode
        if "TestOnly" in self.model_fields_set:
            return self.TestOnly == 0
        return self.defaultSeedOnly == 0

    @field_validator("Header_Type")
    @classmethod
    def _header_type(cls, v: str) -> str:
        kinds = {k.strip().upper() for k in v.split(",")}
        if not kinds <= {"SPF", "AR", "NONE"}:
            raise ValueError("Header_Type must be SPF, AR, None or SPF,AR")
        return v

    @field_validator("skip_addresses", "Whitelist")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for n in v:
            ipaddress.ip_network(n, strict=False)  # ValueError -> config error
        return v


#: milterd's own keys: in ``[plugins.spf]`` only, not in a policyd-spf.conf.
NATIVE_KEYS = (
    "policyd_spf_conf",
    "test_mode",
    "decide_at",
    "postmaster_exempt",
    "check_trusted",
    "deadline_margin",
)


def _read_policyd_conf(path: str) -> dict[str, tuple[int, str]]:
    """Name -> (line number, value). Raises ConfigError naming the file (and line)."""
    out: dict[str, tuple[int, str]] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                text = line.split("#", 1)[0].strip()
                if not text:
                    continue
                name, eq, value = text.partition("=")
                if not eq or not name.strip():
                    raise ConfigError(f"{path}:{lineno}: expected 'Name = value', got {text!r}")
                out[name.strip()] = (lineno, value.strip())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read: not UTF-8 text ({e.reason})") from None
    return out


def load_policyd_conf(path: str) -> dict[str, str]:
    """Read a ``policyd-spf.conf`` (``Name = value`` lines, ``#`` comments) into a dict.

    The same format spf-engine reads (``Reason_URL`` may contain ``=``); names are checked
    by :class:`SPFConfig` afterwards (:func:`policyd_config`), so an unknown name is a
    configuration error. An unreadable file or a line without ``=`` raises ConfigError
    naming the file.
    """
    return {name: value for name, (_line, value) in _read_policyd_conf(path).items()}


def policyd_config(path: str, overrides: dict[str, Any] | None = None) -> SPFConfig:
    """The policyd-spf.conf at ``path`` validated as SPFConfig, ``overrides`` (the keys
    given in ``[plugins.spf]``) winning. Raises ConfigError, one line per problem, each
    naming the file, the line and the option."""
    entries = _read_policyd_conf(path)
    known = sorted(n for n in SPFConfig.model_fields if n not in NATIVE_KEYS)
    problems = []
    for name, (lineno, _value) in entries.items():
        if name in NATIVE_KEYS:
            problems.append(f"{path}:{lineno}: {name}: a milterd key: set it in [plugins.spf]")
    if problems:
        raise ConfigError("\n".join(problems))
    merged: dict[str, Any] = {name: value for name, (_line, value) in entries.items()}
    merged.update(overrides or {})
    try:
        return SPFConfig.model_validate(merged)
    except ValidationError as err:
        for e in err.errors():
            name = str(e["loc"][0]) if e["loc"] else "(file)"
            where = f"{path}:{entries[name][0]}" if name in entries else path
            if e["type"] == "extra_forbidden":
                close = difflib.get_close_matches(name, known, n=1)
                hint = f"did you mean {close[0]}? " if close else ""
                msg = f"unknown option ({hint}known: {', '.join(known)})"
            else:
                msg = str(e["msg"]).removeprefix("Value error, ")
                if name in entries:
                    msg += f" (got {entries[name][1]!r})"
            problems.append(f"{where}: {name}: {msg}")
        raise ConfigError("\n".join(problems)) from None


# --- spf-engine, imported carefully ---------------------------------------------------------

_engine_lock = threading.Lock()


def _spf_engine() -> Any:
    """Import spf-engine without its import-time side effects (excepthook, syslog ident)."""
    with _engine_lock:
        if "spf_engine" in sys.modules:
            return sys.modules["spf_engine"]
        saved = sys.excepthook
        try:
            import spf_engine
        finally:
            sys.excepthook = saved
            import syslog

            syslog.closelog()  # undo its openlog(); milterd logs through `logging`
        return spf_engine


def policy_table(
    scope: Literal["helo", "mfrom"], policy: str, permerror_reject: bool, temperror_defer: bool
) -> dict[str, Action]:
    """Result word -> action (reject/defer/prepend), as spf-engine decides it.

    Computed by spf-engine's ``_get_resultcodes`` with a synthetic request; ``policy`` is
    the HELO_reject / Mail_From_reject value (``SPF_Not_Pass`` also stands for a domain in
    ``Reject_Not_Pass_Domains``).
    """
    engine = _spf_engine()
    conf = {
        "debugLevel": 0,
        "HELO_reject": policy,
        "Mail_From_reject": policy,
        "PermError_reject": str(permerror_reject),
        "TempError_Defer": str(temperror_defer),
    }
    data = {"sender": "x@example.invalid", "helo_name": "example.invalid"}
    actions, _local = engine._get_resultcodes(data, conf, scope)
    table: dict[str, Action] = {}
    for action, words in actions.items():
        for w in words:
            table[w.lower()] = action
    return table


# --- DNS through milterd's resolver ---------------------------------------------------------

#: The longest term (mechanism or modifier) of an SPF record evaluated; see _lookup.
MAX_TERM = 1024
#: What pyspf takes for an SPF record (RFC 7208 4.5).
_SPF_RECORD = re.compile(r"v=spf1(?: |$)", re.I)

_dns = threading.local()
_original_lookup = spf.DNSLookup


def _lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20) -> list[Any]:
    """pyspf's DNSLookup signature, answered by the calling thread's milterd resolver."""
    resolver: Resolver | None = getattr(_dns, "resolver", None)
    if resolver is None:
        return list(_original_lookup(name, qtype, strict, timeout))
    left = min(float(timeout), _dns.deadline - time.monotonic())
    if left <= 0:
        raise spf.TempError("DNS lookup time exceeded")
    try:
        texts = resolver.lookup(name, qtype, timeout=left)
    except NXDomain:
        return []
    except DNSTempError as e:
        raise spf.TempError(f"DNS {e}") from None
    except ValueError:  # a name dnspython refuses (empty label...): no such name
        return []
    key = (name, qtype)
    out: list[Any] = []
    for text in texts:
        t = text
        # pyspf expands a domain-spec in time quadratic in its labels (a 60 KB
        # "exists:%{d}.a.a..." took 35 s of CPU for every message): a term no domain
        # name can need (a name has at most 253 octets) makes the record a permerror.
        # (Split on spaces alone, as pyspf does: a tab is no separator to it.) Another TXT
        # string that long becomes an empty one: an exp= explanation is expanded the same
        # way, and the number of strings must stay (two explanations are none, 6.2).
        if qtype in ("TXT", "SPF") and any(len(term) > MAX_TERM for term in t.split(" ")):
            if _SPF_RECORD.match(t):
                raise spf.PermError(f"SPF record of {name} has a term over {MAX_TERM} bytes")
            t = ""
        if qtype in ("TXT", "SPF"):
            out.append((key, (t.encode("utf-8", "surrogateescape"),)))
        elif qtype == "MX":
            pref, _, host = t.partition(" ")
            out.append((key, (int(pref), host.rstrip("."))))
        elif qtype == "PTR":
            out.append((key, t.rstrip(".")))
        else:
            out.append((key, t))
    return out


class _Using:
    """Route this thread's pyspf lookups through ``resolver`` until ``deadline``."""

    def __init__(self, resolver: Resolver, deadline: float) -> None:
        self.resolver, self.deadline = resolver, deadline

    def __enter__(self) -> None:
        _dns.resolver, _dns.deadline = self.resolver, self.deadline

    def __exit__(self, *exc: object) -> None:
        _dns.resolver = None


def _in(address: ipaddress.IPv4Address | ipaddress.IPv6Address, nets: NETS) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        mapped: ipaddress.IPv4Address | ipaddress.IPv6Address = address.ipv4_mapped
        return any(address in n or mapped in n for n in nets)
    return any(address in n for n in nets)


_ROUTE = re.compile(r"^@[^:]*:")  # RFC 5321 source route: @a,@b:user@c


def split_sender(sender: str) -> tuple[str, str]:
    """(local part, domain) of a MAIL FROM address as SPF checks it: a source route
    dropped, split at the *last* ``@`` (a quoted local part may hold one: pyspf splits at
    the first, and ``"a@b"@example.org`` was checked as another domain: ``none`` instead of
    ``fail``), the domain lower case without one trailing dot (``example.org.`` is the same
    name; pyspf called it malformed: ``none``). No ``@``: the whole string is the domain,
    as pyspf and spf-engine take it."""
    sender = _ROUTE.sub("", sender.strip())
    local, at, domain = sender.rpartition("@")
    if not at:
        local, domain = "", sender
    domain = domain.lower()
    if domain.endswith(".") and not domain.endswith(".."):
        domain = domain[:-1]
    return local, domain


def _domain_of(sender: str) -> str:
    return split_sender(sender)[1]


def _strip_dot(name: str) -> str:
    """A HELO name without one trailing dot (``mx.example.org.`` is the same name)."""
    return name[:-1] if name.endswith(".") and not name.endswith("..") else name


def _temperror_text(domain: str) -> str:
    """A temperror's explanation: what the client may see (no resolver, no DNS library text)."""
    return f"SPF temporary error: DNS lookup for {domain or 'the sender domain'} failed"


def _reason(result: str, exp: str) -> str:
    """The A-R reason: the explanation, but not DNS error details (server addresses)."""
    if result == "pass":
        return ""
    if result == "temperror":
        return "SPF Temporary Error: DNS lookup failed"
    return _sanitize(exp)


def _sanitize(text: str) -> str:
    """Printable ASCII only (a reply text, a header comment); anything else a space."""
    return "".join(c if " " <= c <= "~" else " " for c in text)[:400]


_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


def _value(text: str) -> str:
    """An RFC 7208 9.1 key-value-pair value: a dot-atom as it is, else a quoted-string
    with ``\\`` and ``"`` escaped (a HELO ``a b;c=d`` must not add a pair of its own)."""
    text = _sanitize(text)
    if _DOT_ATOM.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    """Text for inside ``( )``: parentheses and backslashes escaped."""
    return re.sub(r"([()\\])", r"\\\1", _sanitize(text))


class SPFPlugin:
    """Checks HELO and MAIL FROM with SPF at MAIL FROM; acts at MAIL FROM or RCPT."""

    actions = frozenset({"add_header"})
    reads_body = False
    # Every blocking call (DNS) is bounded by ctx.time_left(): no thread hop needed.
    isolation = "inline"
    prefork = True  # startup builds tables; DNS goes through the per-call resolver

    def __init__(self) -> None:
        self.conf: SPFConfig | None = None
        self.tables: dict[tuple[str, bool], dict[str, Action]] = {}
        self.skip: NETS = []
        self.whitelist: NETS = []

    @hookimpl
    def config_schema(self) -> type[SPFConfig]:
        return SPFConfig

    @hookimpl
    def startup(self, config: SPFConfig, services: Services) -> None:
        if config.policyd_spf_conf:
            config = policyd_config(config.policyd_spf_conf, config.model_dump(exclude_unset=True))
        self.conf = config
        log = services.logger
        for name in IGNORED_NAMES:
            if name in config.model_fields_set:
                log.info("spf: %s is a policy-daemon setting, ignored in milterd", name)
        if config.testing:
            why = (
                "test_mode = true"
                if config.test_mode
                else "TestOnly = 0"
                if "TestOnly" in config.model_fields_set
                else "defaultSeedOnly = 0"
            )
            log.warning(
                "spf: TEST MODE (%s): SPF results and headers are recorded, but no message "
                "is rejected or deferred for SPF",
                why,
            )
        stage = services.settings.command_timeout
        if config.deadline_margin > stage / 2:
            log.warning(
                "spf: deadline_margin %gs is more than half of [milterd] command_timeout "
                "(%gs); it is cut to a quarter of the time a call has left",
                config.deadline_margin,
                stage,
            )
        self.skip = [ipaddress.ip_network(n, strict=False) for n in config.skip_addresses]
        self.whitelist = [ipaddress.ip_network(n, strict=False) for n in config.Whitelist]
        pe, td = config.PermError_reject, config.TempError_Defer
        self.tables = {
            ("helo", False): policy_table("helo", config.HELO_reject, pe, td),
            ("helo", True): policy_table("helo", "SPF_Not_Pass", pe, td),
            ("mfrom", False): policy_table("mfrom", config.Mail_From_reject, pe, td),
            ("mfrom", True): policy_table("mfrom", "SPF_Not_Pass", pe, td),
        }
        # RFC 7208 4.6.4 limits: pyspf keeps them as module constants (10 DNS-querying
        # terms is pyspf's MAX_LOOKUP); the void limit is configurable, as in spf-engine,
        # and set before each evaluation (_check) from that message's configuration.
        spf.DNSLookup = _lookup  # idempotent; falls back to pyspf's own without a resolver

    # --- evaluation --------------------------------------------------------------------------

    def _usable(self, ctx: Context) -> float:
        """Seconds DNS may take now: the call's time left minus ``deadline_margin``, the
        margin cut to a quarter of the time left. A plugin ``timeout`` (or what remains of
        the stage) at or below the margin then still leaves time for lookups instead of
        making every check an instant temperror."""
        assert self.conf is not None
        left = ctx.time_left()
        return left - min(self.conf.deadline_margin, left / 4)

    def _timeout(self, ctx: Context, budget: float) -> float:
        """A timeout for one direct lookup (allow-lists, No_Mail)."""
        return max(0.0, min(budget, self._usable(ctx)))

    def _deadline(self, ctx: Context, budget: float) -> float:
        return time.monotonic() + max(0.0, min(budget, self._usable(ctx)))

    def _check(
        self, ctx: Context, ip: str, sender: str, helo: str, budget: float
    ) -> tuple[str, str]:
        """(result, explanation) of one SPF evaluation; never raises. The explanation may
        reach the SMTP reply and the headers: a temperror's is only "DNS lookup for
        <domain> failed" (the DNS error, which names the resolver, goes to the log)."""
        domain = _domain_of(sender)
        deadline = self._deadline(ctx, budget)
        querytime = deadline - time.monotonic()
        if querytime <= 0:
            ctx.log.info("spf: temperror for %s: no time left for SPF lookups", domain)
            return "temperror", _temperror_text(domain)
        try:
            with _Using(ctx.resolver, deadline):
                helo = _strip_dot(helo)
                helo_ascii = a_label(helo)  # (HELO names too, RFC 7208 4.3)
                if not sender and helo_ascii is None:
                    return "none", ""  # RFC 7208 4.3: no valid domain, no lookup
                helo = helo_ascii or helo
                q = spf.query(i=ip, s=sender, h=helo, timeout=querytime, querytime=querytime)
                if sender:  # pyspf's own split is wrong for these (see split_sender)
                    local, domain = split_sender(sender)
                    # RFC 7208 4.3: internationalized domains are looked up as A-labels;
                    # one IDNA2008 refuses is no valid domain: none, without a lookup
                    ascii_domain = a_label(domain)
                    if ascii_domain is None:
                        return "none", ""
                    domain = ascii_domain
                    q.l, q.o, q.d = local or "postmaster", domain, domain
                    # RFC 7208 4.3: an empty local part is "postmaster", and %{s} (7.3)
                    # is that <sender>: not "@example.org" or the bare domain.
                    q.s = f"{q.l}@{domain}"
                # pyspf reads the void limit from a module constant: set from this
                # message's config each time (set once at startup, a refused reload's
                # value stayed for every worker forked after it).
                spf.MAX_VOID_LOOKUPS = ctx.config.Void_Limit
                res, _code, exp = q.check()
        except Exception as e:  # pyspf bugs on hostile input must not cost the message
            ctx.log.warning("spf: evaluation of %s failed: %r", sender, e)
            return "permerror", "SPF evaluation error"
        res = {"error": "temperror", "unknown": "permerror", "ambiguous": "permerror"}.get(res, res)
        if res == "temperror":
            ctx.log.info("spf: temperror for %s: %s", domain, exp)
            return res, _temperror_text(domain)
        return (res if res in RESULTS else "permerror"), str(exp or "")

    def _bypass(self, ctx: Context, addr: Any, ip: str, sender: str, helo: str) -> str:
        """Why this client is not checked at all, or ``""``."""
        conf = self.conf
        assert conf is not None
        if _in(addr, self.skip):
            return "skip_addresses"
        if _in(addr, self.whitelist):
            return "Whitelist"
        budget = conf.Whitelist_Lookup_Time
        if conf.HELO_Whitelist and (a_label(helo) or helo.lower()) in {
            a_label(h) or h.lower() for h in conf.HELO_Whitelist
        }:
            rdtype = "AAAA" if addr.version == 6 else "A"
            try:
                found = ctx.resolver.lookup(helo, rdtype, timeout=self._timeout(ctx, budget))
            except (NXDomain, DNSTempError):
                found = []
            if any(ipaddress.ip_address(a) == addr for a in found):
                return "HELO_Whitelist"
        for domain in conf.Domain_Whitelist:
            if self._check(ctx, ip, f"postmaster@{domain}", domain, budget)[0] == "pass":
                return "Domain_Whitelist"
        if conf.Domain_Whitelist_PTR:
            try:
                names = ctx.resolver.lookup(
                    addr.reverse_pointer, "PTR", timeout=self._timeout(ctx, budget)
                )
            except (NXDomain, DNSTempError):
                names = []
            for name in (n.rstrip(".").lower() for n in names[:1]):
                if any(name.endswith(d.lower()) for d in conf.Domain_Whitelist_PTR):
                    return "Domain_Whitelist_PTR"
        return ""

    def _no_mail_record(self, ctx: Context, domain: str) -> bool:
        assert self.conf is not None
        try:
            timeout = self._timeout(ctx, self.conf.Lookup_Time)
            recs = ctx.resolver.lookup(domain, "TXT", timeout=timeout)
        except (NXDomain, DNSTempError):
            return False
        return [r for r in recs if r.lower().startswith("v=spf1")] == ["v=spf1 -all"]

    def _verdict(
        self,
        ctx: Context,
        scope: Literal["helo", "mfrom"],
        result: str,
        exp: str,
        identity: str,
        domain: str,
        ip: str,
    ) -> Verdict | None:
        conf = self.conf
        assert conf is not None
        # in A-labels on both sides: a U-label sender is the same domain as its A-labels
        ascii_domain = a_label(domain) or domain
        local = any(
            spf.domainmatch([a_label(d) or d], ascii_domain) for d in conf.Reject_Not_Pass_Domains
        )
        action = self.tables[(scope, local)].get(result, "prepend")
        if action == "reject" and conf.No_Mail and not self._no_mail_record(ctx, domain):
            action = "prepend"
        if action == "prepend":
            return None
        enhanced = conf.SPF_Enhanced_Status_Codes
        if result in ("fail", "softfail", "neutral") and local:
            exp = f"Receiver policy for SPF {result.capitalize()}"
        template = conf.Reason_Message
        url = ""
        if conf.Reason_URL:
            url = conf.Reason_URL.format(scope, identity, ip, "")
        else:  # spf-engine's default points at a site that no longer exists
            template = re.sub(r"\.?\s*Please see \{url\}\.?", "", template)
        text = _sanitize(
            template.format(
                rejectdefer="rejected" if action == "reject" else "deferred",
                spf=exp or f"SPF {result}",
                url=url,
            ).strip()
        )
        reason = f"spf {scope} {identity} {result}"
        if conf.testing:
            ctx.log.info("spf: test mode: would %s (%s): %s", action, reason, text)
            return None
        if action == "defer":
            return TempFail("451", "4.7.24" if enhanced else "4.7.1", text, reason=reason)
        xcode = ("5.7.24" if result == "permerror" else "5.7.23") if enhanced else "5.7.1"
        return Reject("550", xcode, text, reason=reason)

    def _helo_result(self, ctx: Context, ip: str, helo: str) -> tuple[str, str]:
        """The HELO check, once per connection, client address and HELO name. A
        ``temperror`` (a DNS failure, or this message's time spent) is not kept: the next
        message on the connection asks again instead of inheriting it."""
        key = f"spf.helo {ip} {helo.lower()}"
        cached: tuple[str, str] | None = ctx.connection_state.get(key)
        if cached is None:
            assert self.conf is not None
            cached = self._check(ctx, ip, f"postmaster@{helo}", helo, self.conf.Lookup_Time)
            if cached[0] != "temperror":
                ctx.connection_state[key] = cached
        return cached

    @hookimpl
    def envfrom(self, ctx: Context, event: EnvFrom) -> Verdict | None:
        conf = self.conf
        assert conf is not None
        conn = ctx.connection
        if conn.trusted and not conf.check_trusted:
            return None
        client = conn.client
        if client is None or client.address is None:
            return None
        addr = client.address
        ip = str(addr.ipv4_mapped if addr.version == 6 and addr.ipv4_mapped else addr)
        sender = event.sender
        helo = conn.helo or (_domain_of(sender) or "unknown")
        skipped = self._bypass(ctx, addr, ip, sender, helo)
        if skipped:
            ctx.log.debug("spf: not checked (%s)", skipped)
            return None

        verdict: Verdict | None = None
        helo_res: tuple[str, str] | None = None
        if conf.HELO_reject != "No_Check" and conn.helo:  # no HELO given: nothing to check
            helo_res = self._helo_result(ctx, ip, helo)
            # A-labels: DMARC aligns with them, and an A-R value parses back only in ASCII
            ctx.add_result(
                Result("spf", helo_res[0], properties=(("smtp.helo", a_label(helo) or helo),))
            )
            if not (conf.HELO_reject == "Null" and sender):
                verdict = self._verdict(ctx, "helo", *helo_res, helo, helo, ip)

        mfrom: tuple[str, str] | None = None
        if conf.Mail_From_reject != "No_Check":
            if sender:
                domain = _domain_of(sender)
                mfrom = self._check(ctx, ip, sender, helo, conf.Lookup_Time)
            else:  # null sender: postmaster@HELO is the identity (RFC 7208 2.4)
                domain = helo
                mfrom = helo_res or self._helo_result(ctx, ip, helo)
            ctx.add_result(
                Result(
                    "spf",
                    mfrom[0],
                    reason=_reason(*mfrom),
                    properties=(("smtp.mailfrom", a_label(domain) or domain),),
                )
            )
            if verdict is None:
                verdict = self._verdict(ctx, "mfrom", *mfrom, sender or helo, domain, ip)

        if "SPF" in conf.Header_Type.upper() and (mfrom or helo_res):
            result, exp = mfrom or helo_res  # type: ignore[misc]
            ident = "mailfrom" if mfrom else "helo"
            receiver = "" if conf.Hide_Receiver else f" receiver={conn.macros.get('j', '')};"
            # Domains in A-labels, as in Authentication-Results (_value keeps ASCII only)
            local_part, at, sender_domain = sender.rpartition("@")
            envelope_from = (
                f"{local_part}@{a_label(sender_domain) or sender_domain}" if at else sender
            )
            value = (
                f"{result} ({_comment(exp) or 'SPF ' + result}) client-ip={_value(ip)};"
                f" envelope-from={_value(envelope_from)}; helo={_value(a_label(helo) or helo)};"
                f"{receiver} identity={ident}"
            )
            ctx.add_change(AddHeader("Received-SPF", value))

        if verdict is None:
            return None
        if conf.decide_at == "envfrom":
            return verdict
        ctx.message_state["spf.verdict"] = verdict
        return None

    @hookimpl
    def envrcpt(self, ctx: Context, event: EnvRcpt) -> Verdict | None:
        verdict: Verdict | None = ctx.message_state.get("spf.verdict")
        if verdict is None:
            return None
        assert self.conf is not None
        local = event.recipient.strip("<>").rpartition("@")[0] or event.recipient.strip("<>")
        if self.conf.postmaster_exempt and local.lower() == "postmaster":
            return None
        return verdict
