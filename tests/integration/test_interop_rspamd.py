"""DKIM and ARC interoperability with rspamd, an independent implementation (Debian's
``rspamd``; its DKIM code is its own C, its ARC module Lua on top of it; milterd's rests
on dkimpy and OpenSSL).

* milterd signs (rsa-sha256, ed25519-sha256), rspamd's ``dkim`` module verifies:
  ``R_DKIM_ALLOW``; a changed body: ``R_DKIM_REJECT``.
* milterd seals (``arc`` after ``authres``, as its authserv-id), rspamd's ``arc`` module
  verifies: ``ARC_ALLOW``, also for a chain of two milterd hops with their own
  authserv-ids and keys (i=1, i=2); a body changed after sealing: ``ARC_REJECT``.
* rspamd signs (``dkim_signing``, for an authenticated ``User``) and seals (``arc``,
  inbound mail, the recipient's domain), milterd verifies: ``dkim=pass``, ``arc=pass``.
* Mixed chains: milterd i=1 + rspamd i=2 verified by milterd, and rspamd i=1 + milterd
  i=2 verified by rspamd.
* Canonicalization corner cases (white space, empty body, no final line end, folded and
  empty fields...) in all four directions.
* One known divergence, rspamd's policy rather than a mismatch: it fails any DKIM
  signature over a field RFC 5322 allows once when the message has two of them.

Written against rspamd 3.4 (Debian 3.4-1), which verifies and signs ed25519-sha256 (RFC
8463); its ARC module seals with rsa-sha256 only.

The milterd side runs in process (:class:`milterd.testing.Harness`: the crypto is the
point here, not the MTA path), with its real resolver (``[dns]``) asking the test DNS
server on loopback, which serves every key to both. rspamd is one private instance for
the module, on loopback, its resolver pointed at the same server, every other DNS- or
network-based module off; messages go to its ``/checkv2`` with the envelope as request
headers.
"""

from __future__ import annotations

import base64
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from milterd_plugins.dkim.keys import public_txt

from milterd.config import DnsSettings
from milterd.dns import StubResolver
from milterd.testing import Harness, Outcome
from tests.support.dnsserver import ZoneServer
from tests.support.keys import write_key
from tests.support.opendkim import opendkim_verify
from tests.support.rspamd import RSPAMD_OFF, Rspamd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

UNTRUSTED = "192.0.2.7"  # not in rspamd's local_addrs nor milterd's internal networks
SENDER_IP = "198.51.100.25"  # the client rspamd is told about
#: rspamd modules left on here (the rest of RSPAMD_OFF stays off).
ON = ("dkim", "arc", "dkim_signing")

# Our ARC hops: (authserv-id = sealing domain, selector, key name)
HOP1 = ("mx1.example.net", "arc1", "arc1")
HOP2 = ("mx2.example.org", "arc2", "arc2")
RELAY = "relay.example.net"  # rspamd seals mail to this domain (use_domain = recipient)


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def _rspamd_ed25519(key: ed25519.Ed25519PrivateKey) -> bytes:
    """An Ed25519 private key as rspamd reads it (``rspamadm dkim_keygen -t ed25519``):
    base64 of the 32-byte seed followed by the 32-byte public key."""
    seed = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(seed + pub)


@dataclass
class Env:
    rspamd: Rspamd
    dns: ZoneServer
    keydir: Path  # milterd's keys (0600, in a 0700 directory)

    def resolver(self) -> StubResolver:
        """milterd's own resolver, asking the test DNS server."""
        return StubResolver(DnsSettings(nameservers=[f"127.0.0.1:{self.dns.port}"], timeout=2))

    def harness(self, plugins: dict[str, Any], authserv_id: str = "mx.test.example") -> Harness:
        config = {"milterd": {"authserv_id": authserv_id}, "plugins": plugins}
        return Harness(config, resolver=self.resolver(), raise_errors=True)

    def check(
        self, data: bytes, rcpt: str = "bob@example.net", user: str | None = None
    ) -> dict[str, Any]:
        """rspamd's verdict on ``data``, received from an untrusted client (or, with
        ``user``, submitted by that authenticated user)."""
        headers = {
            "IP": SENDER_IP,
            "Helo": "mail.example.org",
            "From": "alice@example.org",
            "Rcpt": rcpt,
            "Queue-Id": uuid.uuid4().hex[:12].upper(),
        }
        if user:
            headers["User"] = user
        return self.rspamd.check(data, headers)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    keydir = tmp_path_factory.mktemp("interop-keys")
    keydir.chmod(0o700)
    k = {n: _rsa() for n in ("m_rsa", "arc1", "arc2", "r_rsa", "r_arc")}
    m_ed = ed25519.Ed25519PrivateKey.generate()
    r_ed = ed25519.Ed25519PrivateKey.generate()
    for name in ("m_rsa", "arc1", "arc2"):
        write_key(keydir / f"{name}.key", k[name])
    write_key(keydir / "m_ed.key", m_ed)
    zone = {
        # milterd's DKIM keys (From: example.com) and ARC keys (one per hop)
        "mr2026._domainkey.example.com": public_txt(k["m_rsa"]),
        "me2026._domainkey.example.com": public_txt(m_ed),
        f"{HOP1[1]}._domainkey.{HOP1[0]}": public_txt(k["arc1"]),
        f"{HOP2[1]}._domainkey.{HOP2[0]}": public_txt(k["arc2"]),
        # rspamd's DKIM keys (From: example.org) and ARC key
        "rr2026._domainkey.example.org": public_txt(k["r_rsa"]),
        "re2026._domainkey.example.org": public_txt(r_ed),
        f"rarc._domainkey.{RELAY}": public_txt(k["r_arc"]),
    }
    with ZoneServer({n: {"TXT": [v]} for n, v in zone.items()}) as zs:
        r = Rspamd(
            disabled=[m for m in RSPAMD_OFF if m not in ON],
            nameserver=f"127.0.0.1:{zs.port}",
            tlds=["com", "net", "org"],
        )
        try:
            rr = r.file("keys/rr2026.key", _pem(k["r_rsa"]))
            re_ = r.file("keys/re2026.key", _rspamd_ed25519(r_ed))
            rarc = r.file("keys/rarc.key", _pem(k["r_arc"]))
            # DKIM signing: authenticated submissions only, d= the From domain as it is.
            r.override(
                "dkim_signing.conf",
                f"""
sign_authenticated = true; sign_local = false; sign_inbound = false;
allow_username_mismatch = true; use_domain = "header"; use_esld = false;
try_fallback = false;
domain {{ example.org {{ selectors [
  {{ path = "{rr}"; selector = "rr2026"; }},
  {{ path = "{re_}"; selector = "re2026"; }}
] }} }}
""",
            )
            # ARC sealing: inbound mail, as the recipient's domain (only RELAY has a key).
            r.override(
                "arc.conf",
                f"""
sign_inbound = true; sign_authenticated = false; sign_local = false;
allow_hdrfrom_mismatch = true; use_domain = "recipient"; use_esld = false;
try_fallback = false;
domain {{ {RELAY} {{ path = "{rarc}"; selector = "rarc"; }} }}
""",
            )
        except BaseException:
            r.stop()
            raise
        with r:
            yield Env(r, zs, keydir)


# --- helpers ---------------------------------------------------------------------------------


def message(
    domain: str, body: str = "Hello Bob,\r\n\r\nthe figures are attached in spirit.\r\n"
) -> bytes:
    mid = uuid.uuid4().hex
    return (
        f"From: Alice <alice@{domain}>\r\n"
        "To: Bob <bob@example.net>\r\n"
        "Subject: quarterly figures\r\n"
        "Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
        f"Message-ID: <{mid}@{domain}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        "\r\n" + body
    ).encode()


def on_the_wire(out: Outcome) -> bytes:
    """The message milterd delivered as an MTA writes it: every line end CRLF (milterd
    folds the fields it adds with bare LF; MTAs turn those into CRLF)."""
    assert out.delivered is not None, out.decision
    return re.sub(rb"\r?\n", b"\r\n", bytes(out.delivered))


def symbols(reply: dict[str, Any]) -> dict[str, list[str]]:
    """rspamd's symbols: name -> options."""
    return {n: list(s.get("options") or []) for n, s in (reply.get("symbols") or {}).items()}


def rspamd_added(reply: dict[str, Any]) -> list[tuple[str, str]]:
    """The header fields rspamd asks the MTA to add (``milter.add_headers``; DKIM
    signatures may come as the top-level ``dkim-signature`` instead): (name, value)."""
    out: list[tuple[str, str]] = []
    for name, v in ((reply.get("milter") or {}).get("add_headers") or {}).items():
        for item in v if isinstance(v, list) else [v]:
            out.append((name, item["value"] if isinstance(item, dict) else str(item)))
    if not any(n.lower() == "dkim-signature" for n, _ in out):
        sigs = reply.get("dkim-signature") or []
        out += [("DKIM-Signature", s) for s in (sigs if isinstance(sigs, list) else [sigs])]
    return out


def with_fields(fields: list[tuple[str, str]], data: bytes) -> bytes:
    """``data`` with these fields on top, in this order, folds as CRLF."""
    top = b"".join(f"{n}: {v}\r\n".encode() for n, v in fields)
    return re.sub(rb"\r?\n", b"\r\n", top) + data


def arc_sealed_by_rspamd(env: Env, data: bytes) -> bytes:
    """``data`` as rspamd seals it for a recipient at RELAY: ARC-Seal,
    ARC-Message-Signature, ARC-Authentication-Results on top (RFC 8617 order)."""
    reply = env.check(data, rcpt=f"bob@{RELAY}")
    assert "ARC_SIGNED" in symbols(reply), symbols(reply)
    added = dict(rspamd_added(reply))
    names = ("ARC-Seal", "ARC-Message-Signature", "ARC-Authentication-Results")
    assert all(n in added for n in names), added
    return with_fields([(n, added[n]) for n in names], data)


def dkim_signer(env: Env, keys: list[str]) -> Harness:
    """milterd signing mail from example.com with these keys (``rsa``, ``ed``)."""
    return env.harness(
        {
            "dkim": {
                "keys": {
                    "rsa": {"selector": "mr2026", "file": str(env.keydir / "m_rsa.key")},
                    "ed": {"selector": "me2026", "file": str(env.keydir / "m_ed.key")},
                },
                "signing": [{"pattern": "example.com", "keys": keys}],
            }
        }
    )


def arc_sealer(env: Env, hop: tuple[str, str, str]) -> Harness:
    """A milterd that verifies (dkim, arc), writes its A-R and seals as ``hop``."""
    domain, selector, key = hop
    return env.harness(
        {
            "dkim": {},
            "authres": {},
            "arc": {
                "selector": selector,
                "domain": domain,
                "key_file": str(env.keydir / f"{key}.key"),
            },
        },
        authserv_id=domain,
    )


def verifier(env: Env) -> Harness:
    return env.harness({"dkim": {}, "authres": {}, "arc": {}})


def field(data: bytes, name: str) -> str:
    """The first ``name`` field of ``data``, unfolded."""
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    for f in re.split(r"\r\n(?![ \t])", head):
        n, _, v = f.partition(":")
        if n.lower() == name.lower():
            return re.sub(r"\r\n(?=[ \t])", "", v).strip()
    raise AssertionError(f"no {name} in {head}")


def results(out: Outcome, method: str) -> list[tuple[str, dict[str, str]]]:
    return [(r.result, dict(r.properties)) for r in out.results if r.method == method]


# --- milterd signs, rspamd verifies ----------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "algs"),
    [
        (["rsa"], ["rsa-sha256"]),
        (["ed"], ["ed25519-sha256"]),
        (["rsa", "ed"], ["rsa-sha256", "ed25519-sha256"]),
    ],
    ids=["rsa", "ed25519", "both"],
)
def test_milterd_dkim_signature_passes_in_rspamd(
    env: Env, keys: list[str], algs: list[str]
) -> None:
    with dkim_signer(env, keys) as h:
        out = h.send(message("example.com"), sender="alice@example.com", auth="alice")
    data = on_the_wire(out)
    sigs = [v for n, v in out.headers() if n.lower() == "dkim-signature"]
    assert sorted(a for s in sigs for a in re.findall(r"(?:^|;)\s*a=([\w-]+)", s)) == sorted(algs)
    syms = symbols(env.check(data))
    assert "R_DKIM_REJECT" not in syms and "R_DKIM_PERMFAIL" not in syms, syms
    sels = {"rsa": "mr2026", "ed": "me2026"}
    assert sorted(syms.get("R_DKIM_ALLOW", [])) == sorted(
        f"example.com:s={sels[k]}" for k in keys
    ), syms


def test_milterd_dkim_signature_changed_body_rejected_by_rspamd(env: Env) -> None:
    with dkim_signer(env, ["rsa"]) as h:
        out = h.send(message("example.com"), sender="alice@example.com", auth="alice")
    data = on_the_wire(out).replace(b"in spirit", b"in spirits")
    syms = symbols(env.check(data))
    assert "R_DKIM_REJECT" in syms and "R_DKIM_ALLOW" not in syms, syms


# --- milterd seals, rspamd verifies ----------------------------------------------------------


def test_milterd_arc_seal_passes_in_rspamd(env: Env) -> None:
    with arc_sealer(env, HOP1) as h:
        out = h.send(message("example.org"), client_ip=UNTRUSTED)
    assert "cv=none" in (out.header("ARC-Seal") or "")
    assert f"d={HOP1[0]}" in (out.header("ARC-Seal") or "")
    syms = symbols(env.check(on_the_wire(out)))
    assert syms.get("ARC_ALLOW") == [f"{HOP1[0]}:s={HOP1[1]}:i=1"], syms
    assert not {"ARC_REJECT", "ARC_INVALID", "ARC_DNSFAIL"} & set(syms), syms


def test_two_milterd_hops_pass_in_rspamd(env: Env) -> None:
    with arc_sealer(env, HOP1) as h:
        hop1 = on_the_wire(h.send(message("example.org"), client_ip=UNTRUSTED))
    with arc_sealer(env, HOP2) as h:
        out = h.send(hop1, client_ip=UNTRUSTED)
    # the second hop verified the first and sealed i=2 with cv=pass, as its own id
    assert results(out, "arc")[0][0] == "pass"
    seal = out.header("ARC-Seal") or ""
    assert "i=2" in seal and "cv=pass" in seal and f"d={HOP2[0]}" in seal, seal
    aar = out.header("ARC-Authentication-Results") or ""
    assert aar.startswith(f"i=2; {HOP2[0]}"), aar
    syms = symbols(env.check(on_the_wire(out)))
    assert syms.get("ARC_ALLOW") == [f"{HOP2[0]}:s={HOP2[1]}:i=2"], syms
    assert not {"ARC_REJECT", "ARC_INVALID", "ARC_DNSFAIL"} & set(syms), syms


def test_body_changed_after_milterd_seal_rejected_by_rspamd(env: Env) -> None:
    with arc_sealer(env, HOP1) as h:
        out = h.send(message("example.org"), client_ip=UNTRUSTED)
    changed = on_the_wire(out).replace(b"in spirit", b"in spirits")
    syms = symbols(env.check(changed))
    assert "ARC_REJECT" in syms and "ARC_ALLOW" not in syms, syms


# --- rspamd signs and seals, milterd verifies ------------------------------------------------


def test_rspamd_dkim_signatures_pass_in_milterd(env: Env) -> None:
    data = message("example.org")
    reply = env.check(data, user="alice")
    assert sorted(symbols(reply).get("DKIM_SIGNED", [])) == [
        "example.org:s=re2026",
        "example.org:s=rr2026",
    ], symbols(reply)
    signed = with_fields(
        [(n, v) for n, v in rspamd_added(reply) if n.lower() == "dkim-signature"],
        data,
    )
    with verifier(env) as h:
        out = h.send(signed, client_ip=UNTRUSTED)
    got = sorted((r, p.get("header.s"), p.get("header.a")) for r, p in results(out, "dkim"))
    assert got == [
        ("pass", "re2026", "ed25519-sha256"),
        ("pass", "rr2026", "rsa-sha256"),
    ], out.results


def test_rspamd_arc_seal_passes_in_milterd(env: Env) -> None:
    sealed = arc_sealed_by_rspamd(env, message("example.org"))
    assert b"cv=none" in sealed and f"d={RELAY}".encode() in sealed
    with verifier(env) as h:
        out = h.send(sealed, client_ip=UNTRUSTED)
    assert results(out, "arc") == [
        ("pass", {"header.oldest-pass": "0", "smtp.remote-ip": UNTRUSTED})
    ], out.results
    assert "arc=pass" in (out.header("Authentication-Results") or "")


def test_body_changed_after_rspamd_seal_fails_in_milterd(env: Env) -> None:
    sealed = arc_sealed_by_rspamd(env, message("example.org"))
    with verifier(env) as h:
        out = h.send(sealed.replace(b"in spirit", b"in spirits"), client_ip=UNTRUSTED)
    assert [r for r, _ in results(out, "arc")] == ["fail"], out.results


# --- mixed chains ----------------------------------------------------------------------------


def test_milterd_then_rspamd_chain_passes_in_milterd(env: Env) -> None:
    with arc_sealer(env, HOP1) as h:
        hop1 = on_the_wire(h.send(message("example.org"), client_ip=UNTRUSTED))
    hop2 = arc_sealed_by_rspamd(env, hop1)  # rspamd verified i=1 and sealed i=2, cv=pass
    seal = field(hop2, "ARC-Seal")
    assert "i=2;" in seal and "cv=pass" in seal, seal
    with verifier(env) as h:
        out = h.send(hop2, client_ip=UNTRUSTED)
    assert results(out, "arc") == [
        ("pass", {"header.oldest-pass": "0", "smtp.remote-ip": UNTRUSTED})
    ], out.results


def test_rspamd_then_milterd_chain_passes_in_rspamd(env: Env) -> None:
    hop1 = arc_sealed_by_rspamd(env, message("example.org"))
    with arc_sealer(env, HOP2) as h:
        out = h.send(hop1, client_ip=UNTRUSTED)
    assert results(out, "arc")[0][0] == "pass", out.results
    seal = out.header("ARC-Seal") or ""
    assert "i=2" in seal and "cv=pass" in seal, seal
    syms = symbols(env.check(on_the_wire(out)))
    assert syms.get("ARC_ALLOW") == [f"{HOP2[0]}:s={HOP2[1]}:i=2"], syms


# --- canonicalization edge cases, both directions --------------------------------------------

#: name -> (header edit (old, new) on :func:`message`, body)
EDGES: dict[str, tuple[tuple[bytes, bytes], str]] = {
    "ws-body": ((b"", b""), "trailing space \r\n\ttabbed  line\t\r\n   \r\nlast\r\n\r\n\r\n"),
    "empty-body": ((b"", b""), ""),
    "no-final-crlf": ((b"", b""), "no final line end"),
    "long-lines": ((b"", b""), ("x" * 990 + "\r\n") * 3),
    "utf8-body": ((b"", b""), "Gr\u00fc\u00dfe, \u65e5\u672c\u8a9e\r\n"),
    "folded-subject": (
        (b"Subject: quarterly figures", b"Subject: quarterly\r\n\t  figures   and\r\n more  "),
        "x\r\n",
    ),
    "no-space-after-colon": ((b"Date: ", b"Date:"), "x\r\n"),
    "case-and-tabs": ((b"To: ", b"tO:\t  "), "x\r\n"),
    "empty-value": ((b"MIME-Version", b"Reply-To:\r\nMIME-Version"), "x\r\n"),
    "folded-cc": ((b"MIME-Version", b"Cc: a@x.example,\r\n\tb@y.example\r\nMIME-Version"), "x\r\n"),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_edge_cases_both_ways(env: Env, edge: str) -> None:
    """Header and body canonicalization corner cases: milterd's DKIM signatures and ARC
    seal verify in rspamd, rspamd's verify in milterd."""
    (old, new), body = EDGES[edge]

    def make(domain: str) -> bytes:
        return message(domain, body).replace(old, new, 1) if old else message(domain, body)

    with dkim_signer(env, ["rsa", "ed"]) as h:
        signed = h.send(make("example.com"), sender="alice@example.com", auth="alice")
    syms = symbols(env.check(on_the_wire(signed)))
    assert len(syms.get("R_DKIM_ALLOW", [])) == 2 and "R_DKIM_REJECT" not in syms, syms
    with arc_sealer(env, HOP1) as h:
        sealed = h.send(make("example.org"), client_ip=UNTRUSTED)
    syms = symbols(env.check(on_the_wire(sealed)))
    assert "ARC_ALLOW" in syms and "ARC_REJECT" not in syms, syms

    data = make("example.org")
    reply = env.check(data, user="alice")
    rsigned = with_fields(
        [(n, v) for n, v in rspamd_added(reply) if n.lower() == "dkim-signature"], data
    )
    rsealed = arc_sealed_by_rspamd(env, data)
    with verifier(env) as h:
        out = h.send(rsigned, client_ip=UNTRUSTED)
        assert [r for r, _ in results(out, "dkim")] == ["pass", "pass"], out.results
        out = h.send(rsealed, client_ip=UNTRUSTED)
        assert [r for r, _ in results(out, "arc")] == ["pass"], out.results


# --- a known divergence: rspamd's own policy, not a signature mismatch -----------------------


@pytest.mark.parametrize(
    "dup", ["Subject: again", "Cc: a@x.example\r\nCc: c@z.example"], ids=["subject", "cc"]
)
def test_duplicated_unique_header_fails_only_in_rspamd(env: Env, dup: str) -> None:
    """A signed field RFC 5322 allows once (To, Cc, Subject, From, Message-ID...) present
    twice (a second Subject; two Cc): rspamd breaks the DKIM check on purpose
    (``rspamd_dkim_canonize_header`` in src/libserver/dkim.c hashes a random cookie and
    logs "artificially break DKIM check"), when verifying and when signing alike.
    milterd's signature over such a message verifies in milterd, dkimpy and OpenDKIM;
    rspamd rejects it. rspamd signs such a message all the same, with a signature nobody
    can verify."""
    data = message("example.com").replace(b"MIME-Version", f"{dup}\r\nMIME-Version".encode())
    with dkim_signer(env, ["rsa"]) as h:
        wire = on_the_wire(h.send(data, sender="alice@example.com", auth="alice"))
    with verifier(env) as h:
        assert [r for r, _ in results(h.send(wire, client_ip=UNTRUSTED), "dkim")] == ["pass"]
    records = {n: v["TXT"][0] for n, v in env.dns.zone().items()}
    assert dkim.verify(wire, dnsfunc=lambda n, timeout=5: records[n.decode().rstrip(".")].encode())
    # OpenDKIM refuses a configuration under a world-writable directory (/tmp)
    work = Path(tempfile.mkdtemp(prefix="milterd-interop-odk-", dir="/var/lib"))
    try:
        work.chmod(0o755)
        odk = opendkim_verify(records, wire, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert "verification" in odk and "succeeded" in odk, odk
    mark = len(env.rspamd.log_text())
    syms = symbols(env.check(wire))
    assert "R_DKIM_REJECT" in syms and "R_DKIM_ALLOW" not in syms, syms
    name = dup.split(":", maxsplit=1)[0].lower()
    assert f"header {name} is intended to be unique" in env.rspamd.log_text()[mark:]
    assert "artificially break DKIM check" in env.rspamd.log_text()[mark:]
    # rspamd signs such a message all the same, with a signature that cannot verify
    other = data.replace(b"example.com", b"example.org")
    reply = env.check(other, user="alice")
    rsigned = with_fields(
        [(n, v) for n, v in rspamd_added(reply) if n.lower() == "dkim-signature"], other
    )
    assert rsigned != other
    with verifier(env) as h:
        out = h.send(rsigned, client_ip=UNTRUSTED)
    assert [r for r, _ in results(out, "dkim")] == ["fail", "fail"], out.results
