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
  carries the final Authentication-Results header. No A-R of ours, no seal.
"""

from __future__ import annotations

import re
from typing import Any

import dkim

from milterd import AddHeader, Context, Message, PluginConfig, Result, Services, hookimpl

from ..dkim import DEFAULT_HEADERS, make_fetch
from ..dkim.keys import FastARC, KeyFileError, SigningKey, load_key
from ..dkim.verify import DNSError, FastARCVerify, NoKey

__all__ = ["MAX_INSTANCES", "ARCConfig", "ARCPlugin", "verify_chain"]

MAX_INSTANCES = 50
_INSTANCE = re.compile(rb"(?:^|;)\s*i\s*=\s*(\d+)", re.IGNORECASE)
_ARC_NAMES = (b"arc-seal", b"arc-message-signature", b"arc-authentication-results")


class ARCConfig(PluginConfig):
    verify: bool = True
    selector: str | None = None  # sealing needs selector, domain and key_file
    domain: str | None = None
    key_file: str | None = None
    authserv_id: str | None = None  # default: [milterd] authserv_id
    headers: list[str] = [h for h in DEFAULT_HEADERS if h not in ("list-unsubscribe-post",)]
    insecure_keys: bool = False
    min_rsa_bits: int = 1024


def _decodable_authres(a: Any) -> None:
    """Make every Authentication-Results value of the parsed message UTF-8 (invalid bytes
    as U+FFFD) in place. dkimpy's ARC signer decodes them all strictly to find ours, so one
    with 8-bit junk from another hop raised UnicodeDecodeError and sealing failed. Only
    for the copy dkimpy reads, and only when the AMS does not sign these fields (then
    their bytes do not matter to the seal; ours is UTF-8 anyway)."""
    for h in a.headers:
        if h[0].lower() == b"authentication-results":
            try:
                h[1].decode("utf-8")
            except UnicodeDecodeError:
                h[1] = h[1].decode("utf-8", "replace").encode("utf-8")


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
            return bytes(fetch(name.decode("ascii", "replace").rstrip(".")))
        except NoKey:
            return b""
        except DNSError as e:
            raise dkim.DnsTimeoutError(str(e)) from None

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
            if b"authentication-results" not in include:
                _decodable_authres(a)
            fields = a.sign(
                cfg.selector.encode(),
                cfg.domain.encode(),
                key.pkcs1_pem(),
                self.authserv_id.encode(),
                include_headers=include,
            )
        except (dkim.DKIMException, UnicodeError) as e:
            ctx.log.warning("not sealing: %s", e)
            return
        if not fields:
            ctx.log.debug("not sealing: no Authentication-Results of ours or chain ended")
            return
        # later additions stand above earlier ones: add AAR, then AMS, then AS on top
        for raw in reversed(fields):
            name, _, value = raw.decode("utf-8", "surrogateescape").partition(":")
            value = value.strip(" \r\n").replace("\r\n", "\n")  # LF folds: see dkim
            ctx.add_change(AddHeader(name.strip(), value))
        ctx.log.info("sealed ARC d=%s s=%s", cfg.domain, cfg.selector)
