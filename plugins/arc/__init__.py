"""Built-in ``arc``: ARC (RFC 8617) chain verification at ``eom``, sealing at ``finalize``.

* **Verify** (mail from untrusted senders): the chain of ARC sets on the message as
  received, newest first, with dkimpy; one result on the ledger: ``arc=pass|fail|none``
  with ``smtp.remote-ip`` and, on pass, ``header.oldest-pass`` (the oldest instance from
  which every newer ARC-Message-Signature verifies, or 0 when all do: RFC 8617 5.2).
  More than 50 sets, duplicate or missing members, bad tags: ``fail``, never an
  exception.
* **Seal** (when ``selector``, ``domain`` and ``key_file`` are set): adds
  ARC-Authentication-Results (copied from our Authentication-Results), ARC-Message-Signature
  and ARC-Seal as our authserv-id, on top, with ``cv=`` from our ``arc=`` result. It runs
  after ``authres`` (``after = ("authres",)``): at ``finalize`` the message already
  carries the final Authentication-Results header. Only the A-R added in this pass
  reaches dkimpy (:func:`only_our_authres`); no A-R of ours, no seal. Every field is
  added exactly as signed (:func:`seal_ops`, :func:`fold_aar`).
"""

from __future__ import annotations

import re
from typing import Any

import dkim
from pydantic import Field, field_validator

from milterd import (
    AddHeader,
    ConfigPath,
    Context,
    InsertHeader,
    Message,
    PluginConfig,
    Result,
    Services,
    hookimpl,
)

from ..authres import authserv_id_of
from ..dkim import DEFAULT_HEADERS, _config_domain, make_fetch
from ..dkim.keys import FastARC, KeyFileError, SigningKey, load_key
from ..dkim.verify import DNSError, FastARCVerify, NoKey, check_key_record

__all__ = [
    "MAX_INSTANCES",
    "ARCConfig",
    "ARCPlugin",
    "fold_aar",
    "only_our_authres",
    "seal_ops",
    "verify_chain",
]

MAX_INSTANCES = 50
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)
_ARC_NAMES = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")
_ARC_FIELD_NAME = re.compile(r"[\x21-\x39\x3b-\x7e]{1,64}")  # RFC 5322 ftext
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,61}[A-Za-z0-9])?")  # as dkim's


class ARCConfig(PluginConfig):
    verify: bool = True
    selector: str | None = None  # sealing needs selector, domain and key_file
    domain: str | None = None
    key_file: ConfigPath | None = None
    authserv_id: str | None = None  # default: [milterd] authserv_id
    headers: list[str] = [h for h in DEFAULT_HEADERS if h not in ("list-unsubscribe-post",)]
    insecure_keys: bool = False
    min_rsa_bits: int = Field(1024, ge=1024)  # RFC 8301: smaller keys never pass

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str | None) -> str | None:
        """The sealing ``d=``: a host name, stored in A-labels."""
        return _config_domain(v)

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str | None) -> str | None:
        if v is not None and not _SELECTOR.fullmatch(v):
            raise ValueError(f"invalid selector {v!r}")
        return v

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: list[str]) -> list[str]:
        out = [h.strip().lower() for h in v]
        # dkimpy's ARC.sign folds h= itself, at most 72 columns a line: a longer name is
        # broken in two, and the ARC-Message-Signature never verifies.
        bad = [h for h in out if not _ARC_FIELD_NAME.fullmatch(h)]
        if bad:
            raise ValueError(
                f"not a header field name of at most 64 characters: {', '.join(map(repr, bad))}"
            )
        return out


_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def _unfold(value: bytes) -> bytes:
    """``value`` without its folds (a line break before white space), ends stripped."""
    return _FOLD.sub(b"", value).strip()


def only_our_authres(headers: list[list[bytes]], ours: list[str], authserv_id: str) -> bool:
    """Leave in ``headers`` (dkimpy's parsed ``[name, value]`` list, changed in place)
    only the Authentication-Results fields added in this pass (``ours``: their values, as
    added) that claim ``authserv_id``, unfolded; drop every other one. True when one is
    left.

    dkimpy's ARC signer merges *every* A-R whose authserv-id the authres library reads
    as ours into the ARC-Authentication-Results it seals, including a forgery that
    ``authres`` did not recognise and left in place: the seal would vouch for results we
    never produced. Unfolded because the authres library turns a line break inside a
    quoted reason into ``??``, so the AAR would not say what our A-R says. Only this copy
    changes: Authentication-Results is never signed by the AMS (dkimpy refuses to), so the
    signatures do not depend on it."""
    me = authserv_id.lower()
    wanted = [_unfold(v.encode("utf-8", "surrogateescape")) for v in ours]
    wanted = [
        v
        for v in wanted
        if authserv_id_of("authentication-results", v.decode("utf-8", "replace")) == me
    ]
    kept: list[list[bytes]] = []
    found = 0
    for h in headers:
        if h[0].lower() != b"authentication-results":
            kept.append(h)
            continue
        value = _unfold(h[1])
        if value in wanted:
            wanted.remove(value)  # each added field once
            # the exact name: dkimpy looks for A-R fields by it, case-sensitively
            kept.append([b"Authentication-Results", b" " + value + b"\r\n"])
            found += 1
    headers[:] = kept
    return found > 0


def _breaks(value: str, quoted: bool) -> list[int]:
    """Indexes of the white space in ``value`` a fold may go before: outside quoted
    strings and comments, or (``quoted``) anywhere."""
    out: list[int] = []
    depth, in_quote, i = 0, False, 0
    while i < len(value):
        c = value[i]
        if c == "\\" and (in_quote or depth):
            i += 2
            continue
        if c == '"' and not depth:
            in_quote = not in_quote
        elif c == "(" and not in_quote:
            depth += 1
        elif c == ")" and not in_quote and depth:
            depth -= 1
        elif c in " \t" and i and (quoted or not (in_quote or depth)):
            out.append(i)
        i += 1
    return out


def fold_aar(value: str, first: int, width: int = 78) -> str | None:
    """``value`` (one unfolded line) folded before white space so that no line passes
    ``width`` columns where it can be helped, and none passes 998 octets; ``first``:
    columns ``Name: `` takes on the first line. Folds go outside quoted strings and
    comments; only a line that would still pass 998 octets is folded inside them too.
    None when even that is not enough (a run of 998 octets without white space).

    Safe after sealing: the ARC-Seal covers the AAR with relaxed canonicalization (RFC
    8617 5.1.1), which unfolds and compresses white space, so only where the line breaks
    go changes, never what is signed. Needed because the core never refolds an ARC field
    but hard-breaks any line over 998 octets, which would change its content."""
    for quoted in (False, True):
        lines: list[str] = []
        rest, limit = value, width - first
        cuts = _breaks(rest, quoted)
        offset = 0  # index in value of rest[0]
        while len(rest) > limit:
            within = [c - offset for c in cuts if 0 < c - offset <= limit]
            after = [c - offset for c in cuts if c - offset > limit]
            if within:
                cut = within[-1]
            elif after:
                cut = after[0]
            else:
                break
            lines.append(rest[:cut])
            rest, offset, limit = rest[cut:], offset + cut, width
        lines.append(rest)
        if all(
            len(line.encode()) + (first if n == 0 else 0) <= 998 for n, line in enumerate(lines)
        ):
            return "\r\n".join(lines)
    return None


def verify_chain(message: bytes, fetch: Any, min_rsa_bits: int = 1024) -> tuple[str, str, int]:
    """(``pass``/``fail``/``none``, reason, oldest-pass instance or 0). Never raises."""
    try:
        headers, _ = dkim.rfc822_parse(message)
    except Exception as e:
        return "fail", f"message not parsable: {e}", 0
    instances: set[int] = set()
    count = 0
    for name, value in headers:
        if name.lower() in _ARC_NAMES:
            count += 1
            m = _INSTANCE.search(value.replace(b"\r\n", b""))
            if m is None:
                return "fail", f"{name.decode('ascii', 'replace')} without i= tag", 0
            inst = int(m.group(1))
            if not 1 <= inst <= MAX_INSTANCES:
                return "fail", f"ARC instance {inst} out of range 1..{MAX_INSTANCES}", 0
            instances.add(inst)
    if not count:
        return "none", "", 0
    top = max(instances)
    if instances != set(range(1, top + 1)) or count != 3 * top:
        return "fail", f"incomplete or duplicated ARC sets ({count} fields, {top} sets)", 0

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        try:
            record = bytes(fetch(name.decode("ascii", "replace").rstrip(".")))
        except NoKey:
            return b""
        except DNSError as e:
            raise dkim.DnsTimeoutError(str(e)) from None
        # The key record's s= and h= as RFC 6376 3.6.1 has them (dkimpy applies neither):
        # a key not for email, or not for sha256, is no key for this chain.
        record, _flags, problem = check_key_record(record)
        return b"" if problem else record

    try:
        a = FastARCVerify(message, minkey=min_rsa_bits, logger=_quiet())
        cv, data, reason = a.verify(dnsfunc=dnsfunc)
    except Exception as e:
        return "fail", f"ARC verification error: {e}", 0
    if cv != dkim.CV_Pass:
        return "fail", str(reason), 0
    oldest = 0
    for r in sorted(data, key=lambda r: -int(r["instance"])):  # newest first
        if r.get("ams-valid"):
            oldest = int(r["instance"])
        else:
            break
    return "pass", "", oldest


def _quiet() -> Any:
    from ..dkim.verify import _QUIET

    return _QUIET


class ARCPlugin:
    """Verifies ARC chains on receipt, seals as our authserv-id."""

    actions = frozenset({"add_header"})
    after = ("authres",)
    signs = True  # seals at finalize after every plugin that may change the message
    isolation = "inline"  # CPU work and DNS bounded by ctx.time_left(), as in dkim
    prefork = True  # the sealing key loads once, before the workers fork

    def __init__(self) -> None:
        self.key: SigningKey | None = None
        self.authserv_id = ""

    @hookimpl
    def config_schema(self) -> type[ARCConfig]:
        return ARCConfig

    @hookimpl
    def startup(self, config: ARCConfig, services: Services) -> None:
        self.authserv_id = config.authserv_id or services.settings.authserv_id
        parts = (config.selector, config.domain, config.key_file)
        if any(parts) and not all(parts):
            raise ValueError("[plugins.arc] sealing needs selector, domain and key_file")
        if config.key_file:
            try:
                key = load_key(config.key_file, "rsa-sha256", insecure=config.insecure_keys)
            except KeyFileError as e:
                raise ValueError(f"[plugins.arc] key_file: {e}") from None
            self.key = key

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        cfg: ARCConfig = ctx.config
        if not cfg.verify or ctx.connection.trusted:
            return
        result, reason, oldest = verify_chain(message.as_bytes(), make_fetch(ctx), cfg.min_rsa_bits)
        props: list[tuple[str, str]] = []
        if result == "pass":  # IANA: oldest validating AMS instance, or 0 if all pass
            props.append(("header.oldest-pass", str(oldest if oldest > 1 else 0)))
        client = ctx.connection.client
        if result != "none" and client is not None and client.address is not None:
            props.append(("smtp.remote-ip", str(client.address)))
        ctx.add_result(Result("arc", result, reason=reason, properties=tuple(props)))
        if result == "pass":
            ctx.add_symbol("ARC_VALID", 0.0, "valid ARC chain")
        elif result == "fail":
            ctx.add_symbol("ARC_INVALID", 0.0, f"ARC chain fails: {reason}")

    @hookimpl
    def finalize(self, ctx: Context, message: Message) -> None:
        cfg: ARCConfig = ctx.config
        key = self.key
        if key is None or not cfg.selector or not cfg.domain:
            return
        try:
            # dkimpy parses the message here: a header block it cannot parse (a bare CR
            # in a field, say) raises MessageFormatError, a DKIMException like the rest
            a = FastARC(message.as_bytes(), logger=_quiet())
            a.signing_key = key
            present = {n.lower() for n, _ in a.headers}
            include = [h.encode() for h in cfg.headers if h.encode() in present]
            added = [
                c.value
                for c in ctx.changes
                if isinstance(c, AddHeader | InsertHeader)
                and c.name.lower() == "authentication-results"
            ]
            authserv_id = self.authserv_id
            claimed = {authserv_id_of("authentication-results", v) for v in added} - {""}
            if not cfg.authserv_id and authserv_id not in claimed and len(claimed) == 1:
                # Not set for arc, and the only A-R added in this pass (by plugins, never
                # the message's own) claims another id: [plugins.authres] authserv_id
                # differs from [milterd]'s. Seal as that one.
                (authserv_id,) = claimed
            if not only_our_authres(a.headers, added, authserv_id):
                if claimed:  # a configuration mistake, not a kind of message: say so
                    ctx.log.warning(
                        "not sealing: the Authentication-Results added claim %s, not %s; "
                        "set [plugins.arc] authserv_id",
                        ", ".join(sorted(claimed)),
                        authserv_id,
                    )
                else:
                    ctx.log.debug("not sealing: no Authentication-Results of ours added")
                return
            fields = a.sign(
                cfg.selector.encode(),
                cfg.domain.encode(),
                key.pkcs1_pem(),
                authserv_id.encode(),
                include_headers=include,
            )
        except (dkim.DKIMException, UnicodeError) as e:
            ctx.log.warning("not sealing: %s", e)
            return
        if not fields:
            ctx.log.debug("not sealing: no Authentication-Results of ours or chain ended")
            return
        ops = seal_ops(fields)
        if ops is None:
            ctx.log.warning("not sealing: an ARC field would not stay as signed")
            return
        for op in ops:
            ctx.add_change(op)
        ctx.note(f"sealed d={cfg.domain} s={cfg.selector}")  # on the summary line


def seal_ops(fields: list[bytes]) -> list[AddHeader] | None:
    """The header additions for dkimpy's new ARC set (``ARC-Seal``, ``ARC-Message-Signature``,
    ``ARC-Authentication-Results`` as whole fields): AAR first, then AMS, then AS, since
    later additions stand above earlier ones. The AAR is refolded (:func:`fold_aar`).

    None when the core would change any of them (:class:`AddHeader` normalizes values: it
    hard-breaks lines over 998 octets, which would break the seal): every value must come
    out of it exactly as signed. Folds are bare LF: MTAs turn them into CRLF, while a CR
    in a milter header value reaches the wire as CR CR LF (Postfix)."""
    ops: list[AddHeader] = []
    for raw in reversed(fields):
        name, _, value = raw.decode("utf-8", "surrogateescape").partition(":")
        name, value = name.strip(), value.strip(" \r\n")
        if name.lower() == "arc-authentication-results":
            folded = fold_aar(
                _unfold(value.encode("utf-8", "surrogateescape")).decode(
                    "utf-8", "surrogateescape"
                ),
                len(name) + 2,
            )
            if folded is None:
                return None
            value = folded
        value = value.replace("\r\n", "\n")
        op = AddHeader(name, value)
        if op.value != value:
            return None
        ops.append(op)
    return ops
