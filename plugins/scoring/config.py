"""The ``[plugins.scoring]`` schema: rules, result scores, blocklists, Bayes, actions."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from milterd import ConfigPath, PluginConfig

from .scanners import MAX_SCANNER_SCORE

#: A score in the configuration: finite (TOML's inf and nan are refused already) and
#: within what a scanner may report, so that no sum of them overflows and a scanner's
#: score times its weight stays within what one symbol may carry (milterd's
#: MAX_SYMBOL_SCORE, 1e9 = MAX_SCANNER_SCORE x MAX_WEIGHT).
Score = Annotated[float, Field(ge=-MAX_SCANNER_SCORE, le=MAX_SCANNER_SCORE)]
MAX_WEIGHT = 1000.0
#: A scanner's weight: every score it reports is multiplied by it.
Weight = Annotated[float, Field(ge=-MAX_WEIGHT, le=MAX_WEIGHT)]

__all__ = [
    "ActionThresholds",
    "BayesConfig",
    "DnsblConfig",
    "DomainOverride",
    "GreylistConfig",
    "MimeConfig",
    "ReturnCode",
    "RspamdConfig",
    "RuleConfig",
    "ScoringConfig",
    "SpamdConfig",
]

#: ``method=result`` -> score for results recorded by other plugins (SPF, DKIM, ARC, DMARC).
#: The symbol name is ``METHOD_RESULT`` upper-cased unless ``result_names`` says otherwise.
DEFAULT_RESULT_SCORES: dict[str, float] = {
    "spf=pass": -0.2,
    "spf=fail": 2.0,
    "spf=softfail": 0.5,
    "spf=neutral": 0.0,
    "spf=none": 0.1,
    "spf=temperror": 0.0,
    "spf=permerror": 0.5,
    "dkim=pass": -0.2,
    "dkim=fail": 1.0,
    "dkim=neutral": 0.0,
    "dkim=none": 0.1,
    "dkim=temperror": 0.0,
    "dkim=permerror": 0.5,
    "arc=pass": -0.1,
    "arc=fail": 1.0,
    "arc=none": 0.0,
    "dmarc=pass": -0.5,
    "dmarc=fail": 3.5,
    "dmarc=none": 0.1,
    "dmarc=temperror": 0.0,
    "dmarc=permerror": 0.0,
}

RuleType = Literal[
    "header",
    "body",
    "raw",
    "uri",
    "sender",
    "recipient",
    "helo",
    "client",
    "attachment",
    "content_type",
    "size",
    "meta",
]
PATTERN_TYPES = frozenset(
    ("header", "body", "raw", "sender", "recipient", "helo", "attachment", "content_type")
)


class RuleConfig(PluginConfig):
    """One ``[[plugins.scoring.rules]]`` entry; its ``name`` is the symbol it adds."""

    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    type: RuleType
    score: Score = 1.0
    description: str = ""
    enabled: bool = True
    pattern: str | None = None  # regex for the pattern types
    case_sensitive: bool = False
    header: str | None = None  # type=header: one header name; None or "ALL": every header
    domains: list[str] = []  # type=uri: domain or any subdomain of it
    networks: list[str] = []  # type=client: CIDR networks
    min_size: int | None = None  # type=size: bytes, inclusive
    max_size: int | None = None
    expression: str | None = None  # type=meta: SYM && (A || !B), also and/or/not

    @model_validator(mode="after")
    def _check(self) -> RuleConfig:
        if self.type in PATTERN_TYPES and not self.pattern:
            raise ValueError(f"rule {self.name}: type {self.type} needs 'pattern'")
        if self.type == "uri" and not (self.domains or self.pattern):
            raise ValueError(f"rule {self.name}: type uri needs 'domains' or 'pattern'")
        if self.type == "client":
            if not self.networks:
                raise ValueError(f"rule {self.name}: type client needs 'networks'")
            for n in self.networks:
                ipaddress.ip_network(n, strict=False)
        if self.type == "size" and self.min_size is None and self.max_size is None:
            raise ValueError(f"rule {self.name}: type size needs min_size and/or max_size")
        if self.type == "meta" and not self.expression:
            raise ValueError(f"rule {self.name}: type meta needs 'expression'")
        return self

    @field_validator("domains")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [d.lower().strip(".") for d in v]


class ReturnCode(PluginConfig):
    symbol: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")
    score: Score = 1.0
    description: str = ""


_BIT_NET = ipaddress.ip_network("127.0.0.0/24")


class DnsblConfig(PluginConfig):
    """One ``[[plugins.scoring.dnsbl]]`` list (RFC 5782)."""

    zone: str
    type: Literal["ip", "uri"] = "ip"
    symbol: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$")  # any listing code
    score: Score = 1.0
    description: str = ""
    #: answer address or CIDR network (``"127.0.0.2"``, ``"127.0.1.0/24"``) -> symbol.
    returncodes: dict[str, ReturnCode] = {}
    #: SURBL/URIBL "multi" style: the last octet of an answer 127.0.0.N is a bit field;
    #: each ``returncodes`` key (an address 127.0.0.B) matches when all of B's bits are in N.
    bitmask: bool = False
    ipv6: bool = True  # query IPv6 clients (nibble reversal)
    check_test_points: bool = True  # RFC 5782 section 5 at start-up

    @field_validator("zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        return v.lower().strip(".")

    @field_validator("returncodes")
    @classmethod
    def _codes(cls, v: dict[str, ReturnCode]) -> dict[str, ReturnCode]:
        for key in v:
            ipaddress.ip_network(key, strict=False)
        return v

    @model_validator(mode="after")
    def _bits(self) -> DnsblConfig:
        if self.bitmask:
            for key in self.returncodes:
                addr = ipaddress.ip_address(key) if "/" not in key else None
                if addr is None or addr not in _BIT_NET or int(addr) & 0xFF == 0:
                    raise ValueError(
                        f"dnsbl {self.zone}: with bitmask = true, returncodes keys are "
                        f"addresses 127.0.0.1 to 127.0.0.255 (bits of the last octet), not {key!r}"
                    )
        return self


def _off(v: Any) -> Any:
    """TOML has no null: ``false`` or ``"off"`` turns an action off."""
    if v is False or (isinstance(v, str) and v.strip().lower() in ("off", "none", "never")):
        return None
    return v


Threshold = Annotated[float | None, BeforeValidator(_off)]


class ActionThresholds(PluginConfig):
    """Score at or above which each action applies (``None``, ``false`` or ``"off"``: never).
    The highest wins: reject > quarantine > rewrite_subject > add_header > greylist."""

    reject: Threshold = 15.0
    quarantine: Threshold = None
    rewrite_subject: Threshold = 8.0
    add_header: Threshold = 5.0
    greylist: Threshold = None


class DomainOverride(PluginConfig):
    """``[plugins.scoring.domains."example.com"]``: for mail to that recipient domain."""

    actions: dict[str, Threshold] = {}  # replaces single thresholds
    disabled_rules: list[str] = []
    enabled_rules: list[str] = []  # rules with enabled = false, turned on here

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: dict[str, float | None]) -> dict[str, float | None]:
        for key in v:
            if key not in ActionThresholds.model_fields:
                raise ValueError(f"unknown action {key!r}")
        return v


class MimeConfig(PluginConfig):
    """Built-in attachment checks."""

    enabled: bool = True
    executable: Score = 4.0  # MIME_EXE_ATTACHMENT
    double_extension: Score = 3.0  # MIME_DOUBLE_EXTENSION
    archive: Score = 0.5  # MIME_ARCHIVE_ATTACHMENT
    too_complex: Score = 3.0  # MIME_TOO_COMPLEX: MIME too deep or too large to parse
    executable_extensions: list[str] = [
        "exe", "scr", "com", "pif", "bat", "cmd", "vbs", "vbe", "js", "jse", "wsf", "wsh",
        "msi", "msp", "hta", "cpl", "jar", "ps1", "lnk", "reg", "dll", "iso", "img",
    ]  # fmt: skip
    archive_extensions: list[str] = ["zip", "rar", "7z", "gz", "tgz", "bz2", "xz", "tar", "cab"]


class BayesConfig(PluginConfig):
    enabled: bool = False
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: ConfigPath = "/var/lib/milterd/bayes.sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "milterd:bayes"
    min_spam: int = Field(default=20, ge=1)  # messages learned before classifying
    min_ham: int = Field(default=20, ge=1)
    spam_threshold: float = Field(default=0.9, gt=0.5, le=1)  # probability -> BAYES_SPAM
    ham_threshold: float = Field(default=0.1, ge=0, lt=0.5)  # probability -> BAYES_HAM
    spam_score: Score = 3.0
    ham_score: Score = -2.0
    max_tokens: int = Field(default=2000, ge=10)  # per message, first seen
    autolearn: bool = False
    autolearn_spam: float = 12.0  # final score at or above: learn as spam
    autolearn_ham: float = -1.0  # final score at or below: learn as ham
    timeout: float = Field(default=1.0, gt=0)  # per storage call


class GreylistConfig(PluginConfig):
    backend: Literal["sqlite", "redis"] = "sqlite"
    path: ConfigPath = "/var/lib/milterd/greylist.sqlite"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "milterd:grey"
    delay: float = Field(default=300.0, ge=0)  # seconds a new triplet is refused
    expire: float = Field(default=36 * 86400.0, gt=0)  # seconds a passed triplet is kept
    pending_expire: float = Field(default=86400.0, gt=0)  # an unretried triplet
    ipv4_prefix: int = Field(default=24, ge=8, le=32)
    ipv6_prefix: int = Field(default=64, ge=16, le=128)
    text: str = "Greylisted, please try again later"

    @model_validator(mode="after")
    def _retry_possible(self) -> GreylistConfig:
        # A pending triplet forgotten before its delay is over can never pass: every
        # retry would start a new one, and the mail would be deferred until it bounced.
        if self.pending_expire <= self.delay:
            raise ValueError(
                f"pending_expire ({self.pending_expire:g}s) must be longer than delay "
                f"({self.delay:g}s): otherwise no retry can ever pass"
            )
        return self


class SpamdConfig(PluginConfig):
    """``[plugins.scoring.spamd]``: SpamAssassin's spamd as a score source."""

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(default=783, gt=0, lt=65536)
    user: str | None = None  # spamd's per-user preferences
    timeout: float = Field(default=10.0, gt=0)
    max_size: int = Field(default=512 << 10, gt=0)  # larger messages are not sent
    mode: Literal["rules", "total"] = "rules"  # a symbol per rule, or one for the total
    prefix: str = "SA_"  # rules mode: SA_<RULE>
    symbol: str = "SPAMD"  # total mode
    weight: Weight = 1.0  # every score is multiplied by this
    add_received: bool = True  # prepend a Received field naming the client


class RspamdConfig(PluginConfig):
    """``[plugins.scoring.rspamd]``: rspamd as a score source (its normal worker)."""

    enabled: bool = False
    url: str = "http://127.0.0.1:11333"
    password: str | None = None
    timeout: float = Field(default=10.0, gt=0)
    max_size: int = Field(default=512 << 10, gt=0)
    mode: Literal["rules", "total"] = "rules"
    prefix: str = "RSPAMD_"
    symbol: str = "RSPAMD"
    weight: Weight = 1.0
    keep_zero: bool = False  # also keep rspamd's zero-score symbols


class ScoringConfig(PluginConfig):
    rules: list[RuleConfig] = []
    results: dict[str, Score] = {}  # "spf=fail" = 3.0, merged over the defaults
    result_names: dict[str, str] = {}  # "spf=fail" = "R_SPF_FAIL"
    result_defaults: bool = True  # start from DEFAULT_RESULT_SCORES
    gtube: Annotated[Score | None, BeforeValidator(_off)] = 1000.0  # GTUBE symbol score;
    # 0, false or "off": not recognised
    scan_bytes: int = Field(default=2 << 20, ge=1024)  # decoded+raw bytes scanned per message
    scan_time: float = Field(default=2.0, gt=0)  # seconds of rule matching per message
    scan_incomplete: Score = 0.0  # SCAN_INCOMPLETE score
    scan_trusted: bool = False  # also score mail from authenticated/internal clients
    mime: MimeConfig = MimeConfig()
    dnsbl: list[DnsblConfig] = []
    # all lookups of one message; at least 0.2 s (each lookup keeps a 0.12 s margin)
    dnsbl_timeout: float = Field(default=2.0, ge=0.2)
    dnsbl_threads: int = Field(default=8, ge=1, le=64)
    max_uri_lookups: int = Field(default=20, ge=0)  # URL domains looked up per list
    bayes: BayesConfig = BayesConfig()
    actions: ActionThresholds = ActionThresholds()
    domains: dict[str, DomainOverride] = {}
    reject_code: str = Field(default="550", pattern=r"^5\d\d$")
    reject_xcode: str = Field(default="5.7.1", pattern=r"^5\.\d{1,3}\.\d{1,3}$")
    reject_text: str = "Message rejected as spam"
    subject_template: str = "***SPAM*** {subject}"  # {subject}, {score}
    spam_header: str = "X-Spam"  # added with value "Yes" by the add_header action
    greylist: GreylistConfig = GreylistConfig()
    spamd: SpamdConfig = SpamdConfig()
    rspamd: RspamdConfig = RspamdConfig()

    @field_validator("subject_template")
    @classmethod
    def _template(cls, v: str) -> str:
        # Checked here so that a typo refuses the configuration at start or reload instead
        # of failing (and deferring) every message that reaches rewrite_subject.
        try:
            v.format(subject="subject", score="1.0")
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise ValueError(
                f"subject_template {v!r}: only {{subject}} and {{score}} are known ({e!r})"
            ) from e
        if "\r" in v or "\n" in v:
            raise ValueError("subject_template must be one line")
        return v

    @field_validator("spam_header")
    @classmethod
    def _header_name(cls, v: str) -> str:
        if v and not re.fullmatch(r"[!-9;-~]+", v):  # RFC 5322 field name; "" turns it off
            raise ValueError(f"spam_header {v!r} is not a header field name")
        return v

    @field_validator("results")
    @classmethod
    def _results(cls, v: dict[str, float]) -> dict[str, float]:
        for key in v:
            method, sep, result = key.partition("=")
            if not sep or not method or not result:
                raise ValueError(f"result key must be method=result, got {key!r}")
        return {k.lower(): s for k, s in v.items()}

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: dict[str, DomainOverride]) -> dict[str, DomainOverride]:
        return {k.lower().strip("."): o for k, o in v.items()}

    @model_validator(mode="after")
    def _unique(self) -> ScoringConfig:
        seen: set[str] = set()
        for r in self.rules:
            if r.name in seen:
                raise ValueError(f"rule {r.name} defined twice")
            seen.add(r.name)
        if "\r" in self.reject_text or "\n" in self.reject_text:
            raise ValueError("reject_text must be one line")
        return self
