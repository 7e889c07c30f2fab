"""Built-in ``dkim``: DKIM signing (RSA and Ed25519) and verification (RFC 6376, 8301, 8463).

* **Signing** at ``finalize``, for trusted senders only (authenticated, internal network,
  a configured MTA service name, or local submission): the message exactly as it will be
  delivered, after every other plugin's changes. The From address picks a rule of the
  signing table; each key of the rule adds one DKIM-Signature on top.
* **Verification** at ``eom``, for everybody else: up to ``max_signatures`` signatures,
  top down, one result each on the ledger (``dkim=pass`` ... with ``header.d/i/s/a/b``),
  or ``dkim=none``. A configurable action per overall result.

Keys are loaded and checked (mode 0600, safe directory) at ``startup``: a reload swaps keys
and tables atomically, since it builds a fresh plugin object. See docs/plugins/dkim.md.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any, Literal

import dkim
from pydantic import Field, field_validator, model_validator

from milterd import (
    AddHeader,
    ConfigPath,
    Context,
    DNSTempError,
    Message,
    NXDomain,
    PluginConfig,
    Quarantine,
    Reject,
    Result,
    Services,
    TempFail,
    Verdict,
    hookimpl,
)

from ..addresses import getaddresses
from .keys import KeyFileError, SigningKey, fast_sign, load_key, parse_headers
from .names import dns_name, host_name, to_ascii
from .verify import DNSError, NoKey, SigResult, verify_message

__all__ = [
    "DEFAULT_HEADERS",
    "DEFAULT_OVERSIGN",
    "DKIMConfig",
    "DKIMPlugin",
    "KeyEntry",
    "SigningRule",
    "from_address",
    "is_trusted_sender",
    "make_fetch",
    "sign_order",
    "signed_names",
    "signing_headers",
]

#: Signed as many times as they occur (RFC 6376 section 5.4.1 plus MIME and list fields).
DEFAULT_HEADERS = (
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
    "in-reply-to",
    "references",
    "list-id",
    "list-help",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "list-subscribe",
    "list-post",
    "list-owner",
    "list-archive",
    "resent-date",
    "resent-from",
    "resent-sender",
    "resent-to",
    "resent-cc",
    "resent-message-id",
)
#: Fields RFC 5322 3.6 allows at most once (From has its own check: never signed twice).
ONCE_ONLY = frozenset(
    {"sender", "reply-to", "to", "cc", "bcc", "subject", "date", "message-id",
     "in-reply-to", "references"}
)  # fmt: skip

#: Signed once more than they occur, so that adding one breaks the signature.
#: Fields an MTA may add *after* the milter signed (sendmail adds Date and Message-ID to a
#: submission that lacks them). Oversigning them while absent would sign "no such field"
#: and break the signature at every verifier, so they are oversigned only when present.
ADDED_BY_MTA = frozenset({"date", "message-id"})

DEFAULT_OVERSIGN = (
    "from",
    "reply-to",
    "subject",
    "date",
    "message-id",
    "to",
    "cc",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "in-reply-to",
    "references",
)
_NEVER_SIGN = frozenset(
    ("return-path", "received", "comments", "keywords", "bcc", "resent-bcc", "dkim-signature")
)

# RFC 5322 ftext: printable US-ASCII but the colon, at least one.
_FIELD_NAME_TEXT = re.compile(r"[\x21-\x39\x3b-\x7e]+")

Action = Literal["accept", "tempfail", "reject", "quarantine"]
RESULTS = ("pass", "fail", "neutral", "policy", "temperror", "permerror", "none")


def _config_domain(v: str | None) -> str | None:
    """A configured ``d=``: a host name, stored in A-labels (lower case, no trailing dot)."""
    if v is None:
        return None
    name = host_name(v)
    if name is None:
        raise ValueError(f"invalid domain {v!r} (not a host name)")
    return name


class KeyEntry(PluginConfig):
    """One row of the key table."""

    selector: str
    file: ConfigPath
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] | None = None  # default: from the key
    domain: str | None = None  # d=; default: the domain of the From address

    @field_validator("domain")
    @classmethod
    def _dom(cls, v: str | None) -> str | None:
        return _config_domain(v)

    @field_validator("selector")
    @classmethod
    def _sel(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?", v):
            raise ValueError(f"invalid selector {v!r}")
        return v


class SigningRule(PluginConfig):
    """One row of the signing table: first matching pattern wins."""

    pattern: str  # "example.com", "*.example.com", "user@example.com", "*@example.com", "*"
    keys: list[str] = Field(min_length=1)  # key table names; several = several signatures
    domain: str | None = None  # d= for this rule (overrides the key's and the From domain)

    @field_validator("domain")
    @classmethod
    def _dom(cls, v: str | None) -> str | None:
        return _config_domain(v)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        """Lower case, the domain part in A-labels (label by label: "*" stays), since the
        From domain is matched in A-labels; surrounding white space and a final dot
        dropped. A pattern that could never match (an empty local part or label) is
        refused: its mail would go out unsigned with no more than a debug line."""
        local, at, domain = v.strip().lower().rpartition("@")
        domain = domain.removesuffix(".") if domain != "." else domain
        if at and not local:
            raise ValueError(
                f"pattern {v!r} can never match: write *@{domain} (any address in the "
                f"domain) or {domain}"
            )
        labels = [
            lab if "*" in lab or lab.isascii() else to_ascii(lab) for lab in domain.split(".")
        ]
        if any(lab is None for lab in labels):
            raise ValueError(f"invalid pattern {v!r}")
        if not all(labels):
            raise ValueError(
                f"pattern {v!r} can never match (an empty label): *.example.com matches "
                "the subdomains, example.com the domain"
            )
        return local + at + ".".join(lab or "" for lab in labels)


class DKIMConfig(PluginConfig):
    sign: bool = True
    verify: bool = True
    keys: dict[str, KeyEntry] = {}
    signing: list[SigningRule] = []
    canonicalization: str = "relaxed/relaxed"
    headers: list[str] = list(DEFAULT_HEADERS)
    oversign: list[str] = list(DEFAULT_OVERSIGN)
    expire: int = Field(0, ge=0)  # x= seconds after t=; 0: no x= tag (negative: refused)
    sign_daemons: list[str] = []  # {daemon_name} values whose mail is signed, e.g. submission
    sign_local: bool = True  # local submission: no client address or a loopback one
    insecure_keys: bool = False  # skip the key file permission checks
    max_signatures: int = Field(3, ge=1, le=20)
    min_rsa_bits: int = Field(1024, ge=1024)
    actions: dict[str, Action] = {}  # result -> action; unset results: accept
    reject_text: str = "DKIM verification failed"
    tempfail_text: str = "DKIM key lookup failed, try again later"

    @field_validator("canonicalization")
    @classmethod
    def _canon(cls, v: str) -> str:
        parts = v.lower().split("/")
        if len(parts) == 1:
            parts.append("simple")
        if len(parts) != 2 or any(p not in ("simple", "relaxed") for p in parts):
            raise ValueError("must be header/body with simple or relaxed, e.g. relaxed/relaxed")
        return "/".join(parts)

    @field_validator("headers", "oversign")
    @classmethod
    def _hdrs(cls, v: list[str]) -> list[str]:
        out = [h.strip().lower() for h in v]
        invalid = [h for h in out if not _FIELD_NAME_TEXT.fullmatch(h)]
        if invalid:  # it would go into h= as it is (a space, a colon, 8-bit: 451 for all)
            raise ValueError(
                f"not a header field name: {', '.join(map(repr, invalid))} (RFC 5322: "
                "printable ASCII without spaces or colon)"
            )
        semi = [h for h in out if ";" in h]
        if semi:  # RFC 6376 3.2: a tag value has no ";", which ends the tag: h= would break
            raise ValueError(
                f"a field name with ';' cannot be listed in a DKIM-Signature's h= tag: "
                f"{', '.join(map(repr, semi))}"
            )
        bad = sorted(set(out) & _NEVER_SIGN)
        if bad:
            raise ValueError(f"these fields must not be signed: {', '.join(bad)}")
        return out

    @field_validator("actions")
    @classmethod
    def _actions(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if k not in RESULTS:
                raise ValueError(f"unknown result {k!r} (one of {', '.join(RESULTS)})")
        return v

    @model_validator(mode="after")
    def _tables(self) -> DKIMConfig:
        if "from" not in self.headers:
            raise ValueError("headers must include from")
        for rule in self.signing:
            for k in rule.keys:
                if k not in self.keys:
                    raise ValueError(f"signing rule {rule.pattern!r}: no key {k!r} in keys")
        return self


# "Display Name <local@domain>" or "local@domain" with nothing RFC 5322 gives a special
# meaning to (quotes, comments, groups, several addresses, routes): the common From, whose
# address getaddresses would return as is. Anything else goes through getaddresses.
_ATOMS = r"[^\s\"\\(),:;<>@\[\]]+"
# (No "\s*" in front of the display name, which takes white space itself: the two would
# split a long run of spaces every way, quadratic in its length.)
_SIMPLE_FROM = re.compile(
    rf"(?:[^\"\\(),:;<>@\[\]]*<({_ATOMS}@{_ATOMS})>|\s*({_ATOMS}@{_ATOMS}))\s*"
)


def from_address(message: Message) -> tuple[str | None, str]:
    """The one From address (lower-cased), or None and why not."""
    froms = message.get_all("From")
    if not froms:
        return None, "no From header"
    if len(froms) > 1:
        return None, f"{len(froms)} From headers"
    simple = _SIMPLE_FROM.fullmatch(froms[0])
    if simple is not None:  # ~1 µs instead of ~25 µs in getaddresses
        return (simple.group(1) or simple.group(2)).lower(), ""
    parsed = getaddresses(froms)
    if parsed is None:  # e.g. two addresses without a comma, unbalanced comments
        return None, "From does not parse as an address list"
    addrs = [a for _, a in parsed if a]
    if len(addrs) != 1:
        return None, f"{len(addrs)} addresses in From"
    addr = addrs[0].strip().lower()
    local, at, domain = addr.rpartition("@")
    if not at or not domain:
        return None, f"From address {addr!r} has no domain"
    if not local:
        return None, f"From address {addr!r} has no local part"
    return addr, ""


_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")


def signing_headers(message: Message) -> list[list[bytes]]:
    """The header fields as dkimpy's ``rfc822_parse`` returns them (``[name, value]``, the
    value from after the colon to its final CRLF, folds as CRLF), built from the fields
    the MTA sent instead of re-parsing the header block; about 1 µs a field instead of 3.
    A field ``rfc822_parse`` would treat differently (a name it does not accept, an empty
    or unindented line inside a value) sends the whole block through it."""
    out: list[list[bytes]] = []
    for h in message.headers:
        name = h.name.encode("ascii", "surrogateescape")
        value = h.raw
        if b"\n" in value:  # folds as the MTA sent them (LF or CRLF) to CRLF
            value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        folds = value.count(b"\r\n")
        if not _FIELD_NAME.fullmatch(name) or (
            folds and folds != value.count(b"\r\n ") + value.count(b"\r\n\t")
        ):
            return parse_headers(message.header_bytes())
        out.append([name, value + b"\r\n"])
    return out


def sign_order(headers: Iterable[str], oversign: Iterable[str]) -> tuple[tuple[str, bool], ...]:
    """The names to sign (lower case, configured order, each once), each with whether it
    is oversigned. Computed once per configuration: per message only the counts of the
    fields present change (:func:`signed_names`)."""
    over = list(oversign)
    return tuple((h, h in over) for h in dict.fromkeys([*headers, *over]))


def field_counts(headers: list[list[bytes]]) -> dict[str, int]:
    """How often each field name (lower case) occurs in ``headers``."""
    present: dict[str, int] = {}
    for name, _ in headers:
        n = name.decode("ascii", "replace").lower()
        present[n] = present.get(n, 0) + 1
    return present


def signed_names(
    order: tuple[tuple[str, bool], ...],
    headers: list[list[bytes]],
    present: dict[str, int] | None = None,
) -> list[str]:
    """The ``h=`` list for one message: each name of ``order`` as often as its field
    occurs, plus once more when oversigned. A field in ``ADDED_BY_MTA`` is oversigned only
    when present (an MTA may add it after signing). ``present``: ``field_counts(headers)``
    when the caller has it already."""
    if present is None:
        present = field_counts(headers)
    include: list[str] = []
    for h, oversigned in order:
        seen = present.get(h, 0)
        extra = oversigned and (seen > 0 or h not in ADDED_BY_MTA)
        include += [h] * (seen + (1 if extra else 0))
    return include


def is_trusted_sender(ctx: Context, config: DKIMConfig) -> bool:
    """Mail we sign: authenticated, internal network, a configured MTA service, or local
    submission (no client address, or a loopback one: Postfix ``non_smtpd_milters``)."""
    conn = ctx.connection
    if conn.trusted:
        return True
    if conn.daemon_name and conn.daemon_name in config.sign_daemons:
        return True
    client = conn.client
    if not config.sign_local:
        return False
    # Postfix's non_smtpd_milters (sendmail/pickup) show "localhost [127.0.0.1]"
    if client is None or client.address is None:
        return True
    addr = client.address
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return bool(addr.is_loopback or (mapped is not None and mapped.is_loopback))


def make_fetch(ctx: Context) -> Any:
    """A key fetcher over ``ctx.resolver`` for :func:`verify_message` (and ARC): returns
    the key record, raises :class:`NoKey` (also for a name that is no valid DNS name,
    never looked up) or :class:`DNSError`. Results are cached for the message."""
    cache: dict[str, bytes | Exception] = {}

    def fetch(name: str) -> bytes:
        name = name.rstrip(".")
        if name not in cache:
            ascii_name = dns_name(name)
            if ascii_name is None:  # the resolver would call it a temporary error
                cache[name] = NoKey(name)
                raise NoKey(name)
            try:
                recs = ctx.resolver.lookup(ascii_name, "TXT", timeout=max(0.05, ctx.time_left()))
                keyrecs = [r for r in recs if "p=" in r] or recs
                cache[name] = keyrecs[0].encode("utf-8", "replace") if keyrecs else NoKey(name)
            except NXDomain:
                cache[name] = NoKey(name)
            except DNSTempError as e:
                cache[name] = DNSError(str(e) or "timeout")
            except Exception as e:  # a resolver bug must not fail the whole message
                ctx.log.warning("key lookup %s: %s: %s", name, type(e).__name__, e)
                cache[name] = DNSError(f"{type(e).__name__}: {e}")
        v = cache[name]
        if isinstance(v, Exception):
            raise v
        return v

    return fetch


class DKIMPlugin:
    """Signs trusted mail at finalize, verifies the rest at end of message."""

    actions = frozenset({"add_header", "quarantine"})
    signs = True  # finalize after every plugin that may change the message (see registry)
    # CPU work, plus DNS lookups bounded by ctx.time_left(): no thread hop needed (~0.3 ms
    # a message saved); [plugins.dkim] isolation = "thread" restores the hard deadline.
    isolation = "inline"
    prefork = True  # keys load once, before the workers fork, and are shared

    def __init__(self) -> None:
        self.keys: dict[str, SigningKey] = {}
        self.config: DKIMConfig | None = None
        self.sign_order: tuple[tuple[str, bool], ...] = ()

    @hookimpl
    def config_schema(self) -> type[DKIMConfig]:
        return DKIMConfig

    @hookimpl
    def startup(self, config: DKIMConfig, services: Services) -> None:
        keys: dict[str, SigningKey] = {}
        if config.sign:
            for name, entry in config.keys.items():
                try:
                    keys[name] = load_key(
                        entry.file, entry.algorithm, insecure=config.insecure_keys
                    )
                except KeyFileError as e:
                    raise ValueError(f"[plugins.dkim] keys.{name}: {e}") from None
        if config.sign and config.keys and not config.signing:
            services.logger.warning(
                "dkim: %d key(s) configured but no [[plugins.dkim.signing]] rule: nothing "
                "is signed", len(config.keys),
            )  # fmt: skip
        self.sign_order = sign_order(config.headers, config.oversign)
        self.keys, self.config = keys, config  # one assignment each: never half a table

    @hookimpl
    def commands(self, subparsers: Any) -> None:
        from .cli import add_commands

        add_commands(subparsers)

    # --- verification -------------------------------------------------------------------

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> Verdict | None:
        cfg: DKIMConfig = ctx.config
        if not cfg.verify or (
            is_trusted_sender(ctx, cfg) and self._signs(cfg, message, ctx.message_state)
        ):
            # Mail we sign is ours: not verified. Trusted mail we do not sign (a relay of
            # another domain's mail, fetchmail on loopback, sign = false) is verified, as
            # OpenDKIM does, so that DMARC and the log have its result.
            return None
        results = verify_message(
            message.as_bytes(),
            make_fetch(ctx),
            max_signatures=cfg.max_signatures,
            min_rsa_bits=cfg.min_rsa_bits,
        )
        if not results:
            ctx.add_result(Result("dkim", "none"))
            ctx.add_symbol("DKIM_NA", 0.0, "no DKIM signature")
        for r in results:
            ctx.add_result(Result("dkim", r.result, reason=r.reason, properties=r.properties()))
            if r.result == "pass":
                ctx.add_symbol("DKIM_VALID", 0.0, f"valid DKIM signature d={r.d}")
            elif r.result in ("fail", "policy", "neutral", "permerror") and not r.testing:
                ctx.add_symbol("DKIM_INVALID", 0.0, f"dkim={r.result} d={r.d}: {r.reason}")
        return self._action(cfg, overall(results))

    def _signs(self, cfg: DKIMConfig, message: Message, state: dict[str, Any]) -> bool:
        """Whether finalize will sign this message (for a trusted sender)."""
        if not cfg.sign or not cfg.signing:
            return False
        return self._target(cfg, message, state)[2] is not None

    @staticmethod
    def _target(
        cfg: DKIMConfig, message: Message, state: dict[str, Any]
    ) -> tuple[str, str, SigningRule | None, str]:
        """(address, From domain in A-labels, signing rule or None, why not) for the
        message's From. Worked out once a message: finalize, which sees the message as
        delivered, reuses eom's unless a plugin changed the From fields in between."""
        froms = tuple(message.get_all("From"))
        cached = state.get("dkim_target")
        if cached is not None and cached[0] == froms:
            return cached[1]  # type: ignore[no-any-return]
        target: tuple[str, str, SigningRule | None, str]
        addr, why = from_address(message)
        if addr is None:
            target = ("", "", None, f"not signing: {why}")
        else:
            local, _, raw_domain = addr.rpartition("@")
            from_domain = host_name(raw_domain)
            if from_domain is None:
                # an address literal, an empty label, a U-label IDNA refuses...: no valid
                # d= exists for it (a UTF-8 domain used to raise and defer the message)
                why = f"not signing: From domain {raw_domain!r} is not a host name"
                target = ("", "", None, why)
            else:
                addr = f"{local}@{from_domain}"  # matched and signed in A-labels
                rule = match_rule(cfg.signing, addr)
                target = (addr, from_domain, rule, "" if rule else f"no signing rule for {addr}")
        state["dkim_target"] = (froms, target)
        return target

    @staticmethod
    def _action(cfg: DKIMConfig, result: str) -> Verdict | None:
        action = cfg.actions.get(result, "accept")
        if action == "tempfail":
            return TempFail("451", "4.7.5", cfg.tempfail_text, reason=f"dkim={result}")
        if action == "reject":
            return Reject("550", "5.7.20", cfg.reject_text, reason=f"dkim={result}")
        if action == "quarantine":
            return Quarantine(reason=f"dkim={result}")
        return None

    # --- signing ------------------------------------------------------------------------

    @hookimpl
    def finalize(self, ctx: Context, message: Message) -> None:
        cfg: DKIMConfig = ctx.config
        if not cfg.sign or not cfg.signing or not is_trusted_sender(ctx, cfg):
            return
        keys = self.keys  # this generation's table (a reload makes a new object)
        addr, from_domain, rule, why = self._target(cfg, message, ctx.message_state)
        if not addr:
            ctx.log.warning("%s", why)
            return
        if rule is None:
            ctx.log.debug("not signing: %s", why)
            return
        try:
            headers = signing_headers(message)
        except dkim.MessageFormatError as e:
            # A header block dkimpy cannot parse (a bare CR inside a field, say): a
            # signature over it would not verify with dkimpy either. Deliver it unsigned.
            ctx.log.warning("not signing: header block not parseable: %s", e)
            return
        seen = field_counts(headers)
        include = signed_names(self.sign_order, headers, seen)
        twice = sorted(n for n in ONCE_ONLY if seen.get(n, 0) > 1)
        if twice:
            # Signed all the same (dkimpy and OpenDKIM verify it), but rspamd fails every
            # signature over such a message on purpose, and so may others.
            ctx.log.warning(
                "signing a message with a field RFC 5322 allows once present more than "
                "once (%s): some verifiers (rspamd) fail such signatures",
                ", ".join(twice),
            )
        body = message.body()
        hc, bc = cfg.canonicalization.split("/")
        for kname in rule.keys:
            entry, key = cfg.keys[kname], keys[kname]
            domain = (rule.domain or entry.domain or from_domain).lower()
            value = fast_sign(
                headers,
                body,
                key,
                domain=domain,
                selector=entry.selector,
                include_headers=include,
                canonicalize=(hc, bc),
                expire=cfg.expire or None,
            )
            # folded with bare LF: MTAs turn it into CRLF; a CR in a milter header value
            # would reach the wire as CR CR LF (Postfix)
            ctx.add_change(AddHeader("DKIM-Signature", value.replace("\r\n", "\n")))
            # on the message's summary line, not a second line per message
            ctx.note(f"signed d={domain} s={entry.selector} a={key.algorithm}")


def match_rule(rules: list[SigningRule], address: str) -> SigningRule | None:
    """First rule whose pattern matches: with ``@`` against the address, else against
    the domain; ``*`` wildcards (``*.example.com`` = subdomains only)."""
    domain = address.rsplit("@", 1)[1]
    for rule in rules:
        pat = rule.pattern.lower()
        target = address if "@" in pat else domain
        if fnmatch.fnmatchcase(target, pat):
            return rule
    return None


def overall(results: list[SigResult]) -> str:
    """One word for the action: pass if any passes, else temperror if any, else the top
    signature's result; ``none`` without signatures. A signature whose key is in testing
    mode (``t=y``) and does not pass counts as no signature (RFC 6376 3.6.1: such mail is
    treated as unsigned), so no action applies to it but ``none``'s."""
    results = [r for r in results if r.result == "pass" or not r.testing]
    if not results:
        return "none"
    words: list[str] = [r.result for r in results]
    if "pass" in words:
        return "pass"
    if "temperror" in words:
        return "temperror"
    return words[0]
