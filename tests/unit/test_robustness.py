"""Bad input through every built-in plugin at once: no plugin may raise, every message gets a
documented verdict, and the archive stays consistent.

Property-based (Hypothesis, derandomized so CI is repeatable): messages built from
hostile pieces (malformed DKIM-Signature and ARC sets, several or no From fields, bytes
that are not UTF-8, NUL, bare CR and LF, very long lines and fields, broken MIME) and
real signed and sealed messages mutated at random, sent through the harness with spf,
dkim, authres, arc, dmarc, scoring, tagging and archive enabled, against DNS answers that
include valid, malformed and timing-out records. ``HYPOTHESIS_PROFILE=explore`` runs many
more, random, examples (with ``--timeout=0``: pytest-timeout's 120 s are for the CI size).
"""

from __future__ import annotations

import os
import re
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from milterd_plugins.archive.store import FileStore
from milterd_plugins.dkim.keys import public_txt
from milterd_plugins.dmarc import DMARCConfig
from milterd_plugins.dmarc import Store as DMARCStore
from milterd_plugins.dmarc.reports import build_reports

from milterd.testing import Harness, split_message
from tests.support.keys import write_key

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "explore", max_examples=3000, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

VERDICTS = {"continue", "accept", "quarantine", "tempfail", "reject", "discard"}

BASE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: quarterly numbers\r\n"
    b"Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <robust@example.org>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=XX\r\n"
    b"\r\n"
    b"--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Bob.\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"\r\nSGVsbG8gd29ybGQ=\r\n--XX--\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    return {"pem": pem, "txt": public_txt(k)}


def _zones(keys: dict[str, Any]) -> dict[str, Any]:
    return {
        "s1._domainkey.example.org": {"TXT": [keys["txt"]]},
        "bad._domainkey.example.org": {"TXT": ["v=DKIM1; k=rsa; p=!!notbase64!!"]},
        "slow._domainkey.example.org": {"TXT": "TIMEOUT"},
        "hop._domainkey.relay.example.net": {"TXT": [keys["txt"]]},
        "example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 include:broken.example -all"]},
        "broken.example": {"TXT": ["v=spf1 ip4:999.1.2.3/99 redirect= exists:%{zz}"]},
        # example.org's is valid, so that the history records (and reports build from)
        # what the hostile runs send; example.com's is malformed three ways.
        "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; rua=mailto:x@example.org"]},
        "_dmarc.example.com": {"TXT": ["v=DMARC1; p=quarantine; sp=bogus; adkim=q; pct=x"]},
        "example.com": {"TXT": "TIMEOUT"},
    }


@pytest.fixture(scope="module")
def signed(keys: dict[str, Any]) -> list[bytes]:
    """Valid messages to mutate: DKIM-signed (relaxed and simple, with l=), and sealed."""
    out = []
    for canon, length in (((b"relaxed", b"relaxed"), False), ((b"simple", b"simple"), True)):
        sig = dkim.sign(BASE, b"s1", b"example.org", keys["pem"], canonicalize=canon, length=length)
        out.append(sig + BASE)
    ar = b"Authentication-Results: relay.example.net; dkim=pass header.d=example.org\r\n"
    sealed = dkim.arc_sign(
        ar + out[0], b"hop", b"relay.example.net", keys["pem"], b"relay.example.net"
    )
    out.append(b"".join(sealed) + ar + out[0])
    return out


@pytest.fixture(scope="module")
def harness(
    keys: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Harness, Path]]:
    archive: Path = tmp_path_factory.mktemp("robust") / "archive"
    cfg = {
        "plugins": {
            "spf": {},
            "dkim": {},
            "authres": {},
            "arc": {},
            "dmarc": {"history_db": str(archive.parent / "dmarc.sqlite")},
            "scoring": {"bayes": {"enabled": True, "path": str(archive.parent / "bayes.sqlite")}},
            "tagging": {},
            "archive": {"path": str(archive)},
        }
    }
    with Harness(cfg, zones=_zones(keys)) as h:
        yield h, archive


NAMES = [
    b"From", b"To", b"Cc", b"Subject", b"Date", b"Message-ID", b"Reply-To", b"Sender",
    b"DKIM-Signature", b"ARC-Seal", b"ARC-Message-Signature", b"ARC-Authentication-Results",
    b"Authentication-Results", b"Received-SPF", b"Content-Type", b"MIME-Version",
    b"Content-Transfer-Encoding", b"Received", b"X-Spam-Flag", b"List-Id",
]  # fmt: skip
TAGS = st.sampled_from([
    b"v=1", b"v=2", b"a=rsa-sha256", b"a=rsa-sha1", b"a=ed25519-sha256", b"a=", b"d=example.org",
    b"d=", b"d=.", b"s=s1", b"s=bad", b"s=slow", b"s=", b"h=from:to", b"h=", b"h=subject",
    b"bh=", b"bh=AAAA", b"b=", b"b=!!!", b"b=" + b"A" * 400, b"l=0", b"l=-5", b"l=99999999999",
    b"l=x", b"t=9999999999", b"t=-1", b"x=1", b"c=relaxed/simple", b"c=bogus", b"i=@other.test",
    b"i=1", b"i=50", b"i=51", b"i=0", b"cv=pass", b"cv=fail", b"cv=none", b"cv=", b"q=dns/txt",
    b"q=nope", b"z=From:a|To:b", b";", b"=", b"a=rsa-sha256;;", b"\xff\xfe",
])  # fmt: skip
ODD = st.sampled_from([
    b"", b" ", b"\t", b"\x00", b"\r", b"\n", b"\r\n", b"\r\n ", b"\n\t", b"\xc3\x28",
    b"\xed\xa0\x80",
    "ünïcödé".encode(), b"=?utf-8?b?w7w=?=", b"=?bogus?q?x?=", b"<", b">", b"@", b'"', b"\\",
    b"a" * 998, b"b" * 5000, b"<alice@example.org>", b"alice@example.org, eve@evil.test",
    b"undisclosed-recipients:;", b"multipart/mixed; boundary=", b'text/plain; charset="x-bogus"',
])  # fmt: skip


def _value(draw: Any) -> bytes:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return b"; ".join(draw(st.lists(TAGS, max_size=12)))
    if kind == 1:
        return b"".join(draw(st.lists(ODD, max_size=6)))
    if kind == 2:
        return bytes(draw(st.binary(max_size=300)))
    return str(draw(st.text(max_size=80))).encode("utf-8", "surrogatepass")


def _nested_parts(depth: int) -> bytes:
    """Multipart bodies nested ``depth`` deep (boundaries b0, b1, ...)."""
    opening = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    leaf = b"--b%d\r\nContent-Type: text/html\r\n\r\n<a href=http://x.test>x</a>\r\n" % depth
    return opening + leaf + b"".join(b"--b%d--\r\n" % i for i in range(depth, -1, -1))


@st.composite
def hostile_message(draw: Any) -> bytes:
    fields = []
    for _ in range(draw(st.integers(0, 14))):
        # What an MTA passes on as a header field: a name of printable ASCII without ":"
        # (Postfix's is_header(), sendmail's), a value without NUL (the milter protocol
        # ends strings with it); anything else in the value goes.
        name = draw(st.one_of(st.sampled_from(NAMES), st.binary(min_size=1, max_size=12)))
        name = bytes(c for c in name if 0x21 <= c <= 0x7E and c != 0x3A) or b"X"
        fields.append(name + b": " + _value(draw).replace(b"\0", b""))
    body: bytes = draw(
        st.one_of(
            st.binary(max_size=2000),
            st.just(BASE.split(b"\r\n\r\n", 1)[1]),
            st.lists(ODD, max_size=20).map(b"".join),
        )
    )
    if draw(st.integers(0, 4)) == 0:  # MIME nested a few, MAX_DEPTH+ and 1,200 deep
        fields.insert(0, b"Content-Type: multipart/mixed; boundary=b0")
        body = _nested_parts(draw(st.sampled_from([3, 80, 1200])))
    eol: bytes = draw(st.sampled_from([b"\r\n", b"\n", b"\r"]))
    return eol.join(fields) + eol + eol + body


@st.composite
def mutated(draw: Any, originals: list[bytes]) -> bytes:
    msg = bytearray(draw(st.sampled_from(originals)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.integers(0, 4))
        pos = draw(st.integers(0, len(msg)))
        if op == 0 and pos < len(msg):  # flip a byte
            msg[pos] ^= draw(st.integers(1, 255))
        elif op == 1:  # insert junk
            msg[pos:pos] = draw(st.one_of(ODD, st.binary(max_size=40)))
        elif op == 2:  # cut a piece out
            msg[pos : pos + draw(st.integers(1, 200))] = b""
        elif op == 3:  # duplicate a line
            start = msg.rfind(b"\n", 0, pos) + 1
            end = msg.find(b"\n", pos)
            line = bytes(msg[start : end + 1 if end >= 0 else len(msg)])
            msg[start:start] = line
        else:  # truncate
            del msg[pos:]
    return bytes(msg)


ENVELOPE = st.fixed_dictionaries(
    {
        # \udcff: a byte that is not UTF-8, as the bridge decodes it (surrogateescape)
        "sender": st.sampled_from(
            ["alice@example.org", "<>", "", "a@b", "weird@@x", "x@[192.0.2.1]", "ü@ex.test",
             "a\udcff@example.org", "a@exa\x01mple.org", "a@example.org\udcff"]
        ),
        "client_ip": st.sampled_from(
            ["192.0.2.1", "203.0.113.9", "2001:db8::1", "::ffff:192.0.2.1"]
        ),
        "helo": st.sampled_from(["client.example.org", "", "[192.0.2.1]", "a..b", "x" * 300,
                                 "mx\udcff.example.org", "mx\x0b.example.org"]),
    }
)  # fmt: skip


def _check(rig: tuple[Harness, Path], message: bytes, env: dict[str, str]) -> None:
    out = rig[0].send(message, sender=env["sender"], client_ip=env["client_ip"], helo=env["helo"])
    assert out.errors == [], out.errors  # a plugin raised or timed out: a bug
    assert out.verdict in VERDICTS
    # The archive only says no when its disk does: never because of what a message holds.
    assert "archive" not in {p for p, _ in out.decision.reasons}, out.decision
    if out.delivered is not None:
        assert isinstance(out.delivered, bytes)


@given(message=hostile_message(), env=ENVELOPE)
def test_hostile_messages_get_a_verdict_and_no_plugin_fails(
    harness: tuple[Harness, Path], message: bytes, env: dict[str, str]
) -> None:
    _check(harness, message, env)


@given(data=st.data(), env=ENVELOPE)
def test_mutated_signed_and_sealed_messages_get_a_verdict_and_no_plugin_fails(
    harness: tuple[Harness, Path], signed: list[bytes], data: Any, env: dict[str, str]
) -> None:
    _check(harness, data.draw(mutated(signed)), env)


@given(
    messages=st.lists(
        st.tuples(
            hostile_message(),
            st.sampled_from([None, None, "envfrom", "envrcpt", "header", "eoh", "body"]),
            st.sampled_from(["alice@example.org", "<>", "b@example.com"]),
        ),
        min_size=2,
        max_size=4,
    ),
    env=ENVELOPE,
)
def test_hostile_sessions_of_several_messages_some_abandoned(
    harness: tuple[Harness, Path],
    messages: list[tuple[bytes, str | None, str]],
    env: dict[str, str],
) -> None:
    # One connection for several messages, as an SMTP session may carry: no plugin
    # fails on any of them, whatever the one before left behind.
    h = harness[0]
    with h.session(client_ip=env["client_ip"], helo=env["helo"]) as s:
        for message, abandon, sender in messages:
            if abandon is not None:
                s.abandon(message, after=abandon, sender=sender)
                continue
            out = s.send(message, sender=sender)
            assert out.errors == [], out.errors
            assert out.verdict in VERDICTS
            assert "archive" not in {p for p, _ in out.decision.reasons}, out.decision


def test_archive_consistent_after_the_hostile_runs(
    harness: tuple[Harness, Path], signed: list[bytes]
) -> None:
    # Runs after the two above (file order): every archived copy present and matching.
    h, archive = harness
    assert h.send(signed[0]).verdict == "continue"
    store = FileStore(archive, readonly=True)
    try:
        assert store.verify() == []
    finally:
        store.close()
    # And every DMARC aggregate report of what was recorded builds and is well-formed XML
    # (a byte from the envelope once stopped every domain's report).
    history = DMARCStore(str(archive.parent / "dmarc.sqlite"))
    try:
        reports = build_reports(history, DMARCConfig(), 0, int(time.time()) + 1)
    finally:
        history.close()
    assert reports, "nothing recorded"
    for r in reports:
        ET.fromstring(r.xml)


# --- signing and sealing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Harness, dict[str, str]]]:
    """dkim signing every sender's mail with rsa and ed25519 (trusted: authenticated), and
    arc sealing the rest; the public keys, by DNS name, for dkimpy's verifier."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    d = tmp_path_factory.mktemp("signkeys")
    d.chmod(0o700)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    records = {
        "r1._domainkey.example.org": public_txt(rsa_key),
        "e1._domainkey.example.org": public_txt(ed_key),
        "arc1._domainkey.example.net": public_txt(rsa_key),
    }
    cfg = {
        "milterd": {"authserv_id": "mx.example.net"},
        "plugins": {
            "dkim": {
                "keys": {
                    "rsa": {"selector": "r1", "file": str(write_key(d / "r.key", rsa_key))},
                    "ed": {"selector": "e1", "file": str(write_key(d / "e.key", ed_key))},
                },
                "signing": [{"pattern": "*", "keys": ["rsa", "ed"], "domain": "example.org"}],
            },
            "authres": {},
            "arc": {"selector": "arc1", "domain": "example.net", "key_file": str(d / "r.key")},
        },
    }
    zones = {name: {"TXT": [txt]} for name, txt in records.items()}
    with Harness(cfg, zones=zones) as h:
        yield h, records


def _dnsfunc(records: dict[str, str]) -> Any:
    return lambda name, timeout=5: (
        records[n].encode() if (n := name.decode().rstrip(".")) in records else None
    )


SIGNED: Counter[int] = Counter()


def _one_from(message: bytes) -> bytes:
    """The hostile message with exactly one From field (first), so that it is signed."""
    return b"From: Alice <alice@example.org>\r\n" + re.sub(rb"(?im)^from:", b"X-Was:", message)


@given(message=hostile_message().map(_one_from))
def test_what_milterd_signs_verifies_with_dkimpy(
    signer: tuple[Harness, dict[str, str]], message: bytes
) -> None:
    h, records = signer
    out = h.send(message, auth="alice", sender="alice@example.org")
    assert out.errors == [], out.errors
    assert out.verdict == "continue" and out.delivered is not None
    before = sum(1 for n, _ in split_message(message)[0] if n.lower() == "dkim-signature")
    after = sum(1 for n, _ in out.headers() if n.lower() == "dkim-signature")
    # rsa-sha256 and ed25519-sha256; none when dkimpy cannot parse the header block
    # (a bare CR inside a field): logged, delivered unsigned, never a failure
    assert after - before in (0, 2)
    SIGNED[after - before] += 1
    for i in range(after - before):  # every signature we added (on top) verifies
        d = dkim.DKIM(out.delivered)
        assert d.verify(idx=i, dnsfunc=_dnsfunc(records)), (i, out.delivered)


@given(data=st.data())
def test_sealing_hostile_and_mutated_messages_never_fails(
    signer: tuple[Harness, dict[str, str]], signed: list[bytes], data: Any
) -> None:
    h, _ = signer
    message = data.draw(st.one_of(hostile_message(), mutated(signed)))
    out = h.send(message, client_ip="203.0.113.9")
    assert out.errors == [], out.errors
    assert out.verdict in VERDICTS


def test_most_hostile_messages_were_signed() -> None:
    # Runs after the signing test above (file order): it did not pass by signing nothing.
    assert SIGNED[2] > SIGNED[0], SIGNED


# --- hostile DNS answers ---------------------------------------------------------------

TXT_PIECES = st.sampled_from([
    "v=spf1", "v=spf1 ", " -all", " ~all", " +all", " ?all", " include:", " include:%{d}",
    " redirect=", " redirect=example.org", " exists:%{i}.x", " a", " mx", " ptr", " ip4:",
    " ip4:192.0.2.0/33", " ip6:::/129", " exp=", " a:%{l}", "%{", "%%", " " * 3,
    "v=DMARC1", "v=DMARC1;", " p=reject;", " p=", " sp=none", " pct=200", " pct=-1",
    " rua=mailto:", " rua=mailto:a@example.org!10m", " ruf=", " adkim=s", " aspf=x",
    " fo=1:d:s:x", " ri=abc", ";", "=", "v=DKIM1", " k=rsa", " k=ed25519", " k=dsa",
    " p=", " p=AAAA", " p=!!", " h=sha1", " h=sha256", " t=s", " t=y", " s=email",
    "\x00", "\xff", "é", "\\", '"',
])  # fmt: skip
VALID = st.sampled_from([
    "v=spf1 ip4:192.0.2.0/24 -all", "v=spf1 -all", "v=spf1 +all", "v=spf1 include:example.org",
    "v=DMARC1; p=reject", "v=DMARC1; p=quarantine; pct=50; adkim=s; aspf=s", "v=DMARC1; p=none",
])  # fmt: skip
TXT = st.one_of(st.lists(TXT_PIECES, max_size=10).map("".join), VALID)
RECORDS = st.one_of(
    st.lists(TXT, max_size=3),  # several TXT records (and none)
    st.lists(TXT, min_size=1, max_size=2),
    st.just("TIMEOUT"),
)


@given(spf=RECORDS, dmarc=RECORDS, key=RECORDS, data=st.data())
def test_hostile_dns_answers_give_results_not_failures(
    harness: tuple[Harness, Path], signed: list[bytes], spf: Any, dmarc: Any, key: Any,
    data: Any,
) -> None:  # fmt: skip
    h, _ = harness
    zones = h.resolver.zones
    names = ("example.org", "_dmarc.example.org", "s1._domainkey.example.org")
    saved = {n: zones.get(n) for n in names}
    saved_key = (saved["s1._domainkey.example.org"] or {}).get("TXT", [])  # the real key
    try:
        zones["example.org"] = {"TXT": spf}
        zones["_dmarc.example.org"] = {"TXT": dmarc}
        zones["s1._domainkey.example.org"] = {
            "TXT": data.draw(st.one_of(st.just(key), st.just(saved_key)))
        }
        message = data.draw(st.sampled_from(signed))
        _check(harness, message, {"sender": "alice@example.org", "client_ip": "192.0.2.1",
                                   "helo": "example.org"})  # fmt: skip
    finally:
        for n, v in saved.items():
            if v is None:
                zones.pop(n, None)
            else:
                zones[n] = v


DEEP = [b"(" * 2000, b"a@example.org " + b"(" * 2000, b"<" * 2000, b'"' + b"\\(" * 2000]


@pytest.mark.parametrize("value", DEEP, ids=["parens", "addr-parens", "angles", "quoted"])
@pytest.mark.parametrize("name", [
    b"From", b"To", b"Cc", b"Reply-To", b"Sender", b"Subject", b"Content-Type", b"Date",
    b"Content-Disposition", b"Message-ID", b"List-Id", b"Received", b"Return-Path",
    b"Authentication-Results", b"DKIM-Signature", b"ARC-Seal", b"MIME-Version",
])  # fmt: skip
def test_deeply_nested_address_syntax_is_no_failure(
    harness: tuple[Harness, Path], name: bytes, value: bytes
) -> None:
    """Python's address parser recurses once per nested comment: a few hundred "(" in an
    address field must not make a plugin fail (a tempfail for every such message)."""
    head = BASE.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    head = [h for h in head if not h.lower().startswith(name.lower() + b":")]
    message = b"\r\n".join([*head, name + b": " + value]) + b"\r\n\r\nbody\r\n"
    if name != b"From":
        message = b"From: Alice <alice@example.org>\r\n" + message
    _check(harness, message, {"sender": "alice@example.org", "client_ip": "192.0.2.1",
                              "helo": "mail.example.org"})  # fmt: skip


# Postfix's header_size_limit (102,400 bytes: the rest of a larger header is discarded);
# sendmail's MaxHeadersLength is 32 KB.
BIG = 100_000

LARGE_FIELDS = {
    "encoded words": b"Subject: " + b"=?utf-8?q?caf=C3=A9?= " * (BIG // 22),
    "open quote of ;": b'Content-Type: text/plain; name="' + b";" * BIG,
    "boundary of ;": b'Content-Type: multipart/mixed; boundary="' + b";" * BIG,
    "file name of encoded words": b"Content-Disposition: attachment; filename=\""
    + b"=?a?q?b?=" * (BIG // 9) + b'"',
    "comments": b"From: " + b"(" * (BIG // 2) + b"a@example.org" + b")" * (BIG // 2),
    "authentication results": b"Authentication-Results: mx.test; "
    + b"spf=pass smtp.mailfrom=a@example.org; " * (BIG // 38),
    "received-spf": b"Received-SPF: pass " + b"(x; y=z) " * (BIG // 9),
    "dkim tags": b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from; "
    + b"x=1; " * (BIG // 5) + b"bh=; b=",
    "arc seal": b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=example.org; s=s1; "
    + b"t=1; " * (BIG // 5) + b"b=",
    "message-id": b"Message-ID: <" + b"<" * BIG + b"@x>",
    "date": b"Date: " + b"Mon, " * (BIG // 5),
    "folded": b"X-Long: " + b"a\r\n " * (BIG // 4) + b"b",
}


@pytest.mark.parametrize("name", list(LARGE_FIELDS))
def test_one_huge_hostile_field_through_every_plugin_in_bounded_time(
    harness: tuple[Harness, Path], name: str
) -> None:
    """Libraries with time quadratic in a field (the email package's parameter and
    RFC 2047 decoders) made a plugin time out on one large field, so the message was
    deferred at every try (a review). Every built-in at once, each field alone."""
    field = LARGE_FIELDS[name]
    message = b"From: a@example.org\r\nTo: b@example.com\r\n" + field + b"\r\n\r\nhello\r\n"
    if name == "comments":
        message = field + b"\r\nTo: b@example.com\r\n\r\nhello\r\n"
    t0 = time.monotonic()
    _check(harness, message, {"sender": "a@example.org", "client_ip": "192.0.2.1",
                              "helo": "mx.example.org"})  # fmt: skip
    assert time.monotonic() - t0 < 8.0
