"""DKIM verification (RFC 6376) with the RFC 8301 rules, on top of dkimpy.

One :class:`SigResult` per signature, top down. What dkimpy accepts but we do not:

* ``a=rsa-sha1`` never passes (``fail``, RFC 8301 section 3.1);
* RSA keys under 1024 bits never pass (``fail``, RFC 8301 section 3.2);
* a valid signature whose ``l=`` covers less than the whole body is ``policy``
  (appended text could be anything);
* a signature whose ``h=`` leaves out From is ``permerror`` (RFC 6376 5.4, 6.1.1);
* a key name (``s=``, ``d=``) that is no valid DNS name is ``permerror``, without a
  lookup (the resolver would call it a temporary error);
* DNS trouble is ``temperror``; a missing or unparsable key ``permerror``; a revoked key
  (empty ``p=``) ``fail``; an unparsable signature ``neutral`` (RFC 8601 section 2.7.1).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy, InvalidCanonicalizationPolicyError
from dkim.util import InvalidTagValueList, parse_tag_value

from .keys import canonicalize_body, hash_signed_headers
from .names import key_name, to_ascii

__all__ = [
    "DNSError",
    "FastARCVerify",
    "FastDKIM",
    "FastVerify",
    "NoKey",
    "SigResult",
    "verify_message",
]


class DNSError(Exception):
    """A temporary DNS failure while fetching a key (→ temperror)."""


class NoKey(Exception):
    """No key record at the selector (→ permerror)."""


@dataclass(frozen=True)
class SigResult:
    result: str  # pass fail neutral policy temperror permerror
    reason: str
    d: str = ""
    i: str = ""
    s: str = ""
    a: str = ""
    b: str = ""
    testing: bool = False  # the key record says t=y (RFC 6376 3.6.1)

    def properties(self) -> tuple[tuple[str, str], ...]:
        props = (
            ("header.d", self.d),
            ("header.i", self.i),
            ("header.s", self.s),
            ("header.a", self.a),
            ("header.b", self.b[:8]),
        )
        return tuple((k, v) for k, v in props if v)


def _text(v: bytes | None) -> str:
    return (v or b"").decode("utf-8", "replace")


def _ws(v: bytes) -> bytes:
    return re.sub(rb"\s+", b"", v)


class FastVerify:
    """Mixin over dkimpy's ``DomainSigner.verify_sig_process`` (dkimpy 1.1.8): the same
    steps, with our body and header canonicalization fast paths
    (:func:`~.keys.hash_signed_headers`) and RSA verified by OpenSSL
    (``cryptography``) instead of dkimpy's pure-Python RSA (~0.5 ms less a signature).
    Ed25519 stays with dkimpy (PyNaCl/libsodium). Anything unusual (another hash) goes to
    dkimpy's own code."""

    def verify_sig_process(  # type: ignore[no-untyped-def]
        self, sig, include_headers, sig_header, dnsfunc
    ) -> bool:
        me: Any = self
        if sig.get(b"a", b"").lower() not in (b"rsa-sha256", b"ed25519-sha256"):
            return bool(super().verify_sig_process(sig, include_headers, sig_header, dnsfunc))  # type: ignore[misc]
        if me.tlsrpt == "strict" and not me.seqtlsrpt:
            raise dkim.ValidationError("Message is tlsrpt and Service Type is not tlsrpt")
        if not me.tlsrpt and me.seqtlsrpt:
            raise dkim.ValidationError("Message is not tlsrpt and Service Type is tlsrpt")
        try:
            policy = CanonicalizationPolicy.from_c_value(sig.get(b"c", b"simple/simple"))
        except InvalidCanonicalizationPolicyError as e:
            raise dkim.MessageFormatError(f"invalid c= value: {e.args[0]}") from None
        if b"bh" in sig:
            body = canonicalize_body(policy, me.body)
            if b"l" in sig and not me.tlsrpt:
                body = body[: int(sig[b"l"])]
            bodyhash = hashlib.sha256(body).digest()
            try:
                bh = base64.b64decode(re.sub(rb"\s+", b"", sig[b"bh"]))
            except (TypeError, ValueError) as e:
                raise dkim.MessageFormatError(str(e)) from None
            if bodyhash != bh:
                raise dkim.ValidationError(
                    f"body hash mismatch (got {base64.b64encode(bodyhash)!r}, "
                    f"expected {sig[b'bh']!r})"
                )
        if b"from" in include_headers:
            include_headers.append(b"from")  # dkimpy: extra From fields break the signature
        h = hashlib.sha256()
        relaxed = policy.header_algorithm.name == b"relaxed"
        me.signed_headers = hash_signed_headers(h, relaxed, me.headers, include_headers, sig_header)
        signature = base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"]))
        if me.ktag == b"rsa":
            pub = rsa.RSAPublicNumbers(me.pk["publicExponent"], me.pk["modulus"]).public_key()
            try:
                pub.verify(signature, h.digest(), padding.PKCS1v15(), Prehashed(hashes.SHA256()))
            except InvalidSignature:
                return False
            if me.keysize < me.minkey:
                raise dkim.KeyFormatError(f"public key too small: {me.keysize}")
            return True
        if me.ktag == b"ed25519":
            try:
                me.pk.verify(h.digest(), signature)
            except Exception:  # nacl BadSignatureError, wrong length
                return False
            return True
        raise dkim.UnknownKeyTypeError(me.ktag)


class FastDKIM(FastVerify, dkim.DKIM):  # type: ignore[misc]
    """dkimpy's DKIM with :class:`FastVerify`."""


class FastARCVerify(FastVerify, dkim.ARC):  # type: ignore[misc]
    """dkimpy's ARC with :class:`FastVerify`."""


def verify_message(
    message: bytes,
    fetch: Callable[[str], bytes],
    *,
    max_signatures: int = 3,
    min_rsa_bits: int = 1024,
) -> list[SigResult]:
    """Verify up to ``max_signatures`` DKIM-Signature fields of ``message`` (CRLF bytes).

    ``fetch(name)`` returns the key TXT record for ``selector._domainkey.domain`` (no
    trailing dot), raises :class:`NoKey` or :class:`DNSError`. Never raises otherwise.
    """
    try:
        d = FastDKIM(message, minkey=min_rsa_bits, logger=_QUIET)
    except Exception as e:  # unparsable header block
        return [SigResult("permerror", f"message not parsable: {e}")]
    sigs = [(n, v) for n, v in d.headers if n.lower() == b"dkim-signature"]
    out: list[SigResult] = []
    testing: set[int] = set()  # signatures whose key record says t=y
    for idx, (_, raw) in enumerate(sigs[:max_signatures]):
        try:
            tags = parse_tag_value(raw)
        except InvalidTagValueList as e:
            out.append(SigResult("neutral", f"malformed signature: {e}"))
            continue
        except Exception as e:
            out.append(SigResult("neutral", f"malformed signature: {e}"))
            continue
        dom = _text(tags.get(b"d")).lower()
        ident = _text(tags.get(b"i")) or (f"@{dom}" if dom else "")
        base: dict[str, Any] = {
            # reported in A-labels, as SPF's domains: DMARC aligns with them, and an
            # Authentication-Results value parses back only in ASCII
            "d": to_ascii(dom) or dom,
            "i": _ascii_domain_part(ident),
            "s": _text(tags.get(b"s")),
            "a": _text(tags.get(b"a")).lower(),
            "b": _text(_ws(tags.get(b"b", b""))),
        }
        try:
            dkim.validate_signature_fields(tags)
        except dkim.DKIMException as e:
            out.append(SigResult("neutral", f"invalid signature: {e}", **base))
            continue
        except Exception as e:
            out.append(SigResult("neutral", f"invalid signature: {e}", **base))
            continue
        if base["a"] == "rsa-sha1":
            out.append(SigResult("fail", "rsa-sha1 is not accepted (RFC 8301)", **base))
            continue
        if base["a"] not in ("rsa-sha256", "ed25519-sha256"):
            out.append(SigResult("neutral", f"unknown algorithm {base['a']}", **base))
            continue
        if b"from" not in [h.strip().lower() for h in tags[b"h"].split(b":")]:
            # RFC 6376 5.4 and 6.1.1: From MUST be signed; a signature that leaves it out
            # says nothing about the author and passing it let anyone replace From
            out.append(SigResult("permerror", "From not signed", **base))
            continue
        name = key_name(base["s"], dom)
        if name is None:
            # the resolver would report it as a temporary error, retried forever
            out.append(
                SigResult("permerror", f"invalid key name {base['s']}._domainkey.{dom}", **base)
            )
            continue
        try:
            record = fetch(name)
        except DNSError as e:
            out.append(SigResult("temperror", f"key lookup failed: {e}", **base))
            continue
        except NoKey:
            out.append(SigResult("permerror", f"no key for signature at {name}", **base))
            continue
        if _revoked(record):
            # RFC 6376 3.6.1: an empty p= means the key was revoked; "fail" as OpenDKIM
            # (DKIM_STAT_REVOKED, reported with bad signatures) and dkimpy (verify() is
            # False) report it, not permerror: the signature is known to be invalid
            out.append(SigResult("fail", f"key revoked at {name}", **base))
            continue
        record, flags, problem = check_key_record(record)
        if b"y" in flags:
            testing.add(idx)
        if problem:
            out.append(SigResult("permerror", problem, **base))
            continue
        if b"s" in flags and ident.rpartition("@")[2].lower().rstrip(".") != dom.rstrip("."):
            # t=s: the i= domain must be d= itself, not a subdomain of it
            out.append(SigResult("permerror", "key forbids an i= subdomain (t=s)", **base))
            continue
        try:
            _pk, bits, ktag, _ = dkim.evaluate_pk(name.encode(), record)
        except Exception as e:
            out.append(SigResult("permerror", f"bad key record: {e}", **base))
            continue
        want = b"ed25519" if base["a"].startswith("ed25519") else b"rsa"
        if ktag != want:
            out.append(SigResult("permerror", "key type does not match a=", **base))
            continue
        if ktag == b"rsa" and bits < min_rsa_bits:
            out.append(SigResult("fail", f"RSA key of {bits} bits is too small (RFC 8301)", **base))
            continue
        try:
            ok = d.verify(idx, dnsfunc=lambda _n, timeout=5, r=record: r)
        except dkim.ValidationError as e:
            msg = str(e)
            kind = "fail" if "body hash mismatch" in msg else "neutral"
            out.append(SigResult(kind, msg, **base))
            continue
        except dkim.KeyFormatError as e:
            out.append(SigResult("fail", str(e), **base))
            continue
        except Exception as e:
            out.append(SigResult("neutral", f"cannot verify: {e}", **base))
            continue
        if not ok:
            out.append(SigResult("fail", "signature did not verify", **base))
            continue
        if b"l" in tags:
            try:
                covered = int(tags[b"l"])
            except ValueError:
                covered = -1
            body_len = _canon_len(d.body, tags)
            if covered > body_len:  # RFC 6376 3.5: l= MUST NOT exceed the body
                out.append(SigResult("permerror", "l= exceeds the body", **base))
                continue
            if covered != body_len:
                out.append(SigResult("policy", "l= covers only part of the body", **base))
                continue
        out.append(SigResult("pass", "", **base))
    # One result per signature, in order: those whose key is in testing mode are reported
    # as such, and a failure of theirs is treated as no signature at all (see _testing).
    return [_testing(r) if i in testing else r for i, r in enumerate(out)]


def check_key_record(record: bytes, hash_alg: bytes = b"sha256") -> tuple[bytes, set[bytes], str]:
    """The key record as dkimpy should read it, its ``t=`` flags, and why it cannot be
    used for this signature (``""`` if it can). RFC 6376 3.6.1, which dkimpy does not
    apply: ``v=``, when present, comes first; ``s=`` is a colon-separated list of service
    types, usable when it holds ``email`` or ``*`` (unknown types are ignored; dkimpy
    refused any list); ``h=`` lists the hash algorithms the key may be used with.
    A record that does not parse is returned as it is, for dkimpy to report."""
    try:
        tags = parse_tag_value(record)
    except Exception:
        return record, set(), ""
    names = list(tags)
    if b"v" in tags and (names[0] != b"v" or tags[b"v"].strip() != b"DKIM1"):
        return record, set(), "key record: v=DKIM1 must come first"
    flags = {f.strip().lower() for f in tags.get(b"t", b"").split(b":") if f.strip()}
    if b"s" in tags:
        services = {x.strip().lower() for x in tags[b"s"].split(b":")}
        if not services & {b"email", b"*"}:
            return record, flags, f"key is not for email (s={_text(tags[b's'])})"
        record = b"; ".join(k + b"=" + v for k, v in tags.items() if k != b"s")
    if b"h" in tags:
        allowed = {x.strip().lower() for x in tags[b"h"].split(b":")}
        if hash_alg not in allowed:
            return record, flags, f"key does not allow {_text(hash_alg)} (h={_text(tags[b'h'])})"
    return record, flags, ""


def _testing(r: SigResult) -> SigResult:
    """A signature whose key is in testing mode (t=y). RFC 6376 3.6.1: verifiers MUST NOT
    treat such mail differently from unsigned mail, even when the signature fails: a
    result other than pass becomes ``neutral`` (no action, no DKIM_INVALID, scored as
    nothing), its reason saying why."""
    if r.result == "pass":
        return replace(r, testing=True)
    return replace(r, result="neutral", reason=f"key in testing mode (t=y): {r.result}: "
                   f"{r.reason}", testing=True)  # fmt: skip


def _revoked(record: bytes) -> bool:
    """Whether the key record is well formed with an empty ``p=`` (a revoked key)."""
    try:
        tags = parse_tag_value(record)
    except Exception:  # malformed: evaluate_pk reports it
        return False
    return b"p" in tags and not _ws(tags[b"p"])


def _canon_len(body: bytes, tags: dict[bytes, bytes]) -> int:
    try:
        policy = CanonicalizationPolicy.from_c_value(tags.get(b"c", b"simple/simple"))
    except InvalidCanonicalizationPolicyError:
        return -1
    return len(policy.canonicalize_body(body))


def _quiet_logger() -> logging.Logger:
    """dkimpy logs every verification failure at ERROR; we record results instead."""
    log = logging.getLogger("milterd.dkim.dkimpy")
    log.setLevel(logging.CRITICAL + 1)
    log.propagate = False
    return log


_QUIET = _quiet_logger()


def _ascii_domain_part(identity: str) -> str:
    """An ``i=`` as reported: its domain in A-labels (as ``header.d``)."""
    local, at, domain = identity.rpartition("@")
    return f"{local}@{to_ascii(domain) or domain}" if at else identity
