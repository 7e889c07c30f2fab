"""The built-in ``arc`` plugin through the harness: chain verification and sealing.

Seals are checked with dkimpy's ``arc_verify`` (independent of our OpenSSL signer), and
chains made by dkimpy's ``arc_sign`` are verified by the plugin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from milterd_plugins.arc import ARCPlugin, verify_chain
from milterd_plugins.dkim.keys import public_txt

from milterd.testing import Harness

MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: list@lists.example.net\r\n"
    b"Subject: hello\r\n"
    b"Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <2@example.com>\r\n"
    b"\r\n"
    b"Hello list.\r\n"
)
UNTRUSTED = "192.0.2.7"


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("arckeys")
    d.chmod(0o700)
    k = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = d / "arc.key"
    path.write_bytes(
        k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    pem = path.read_bytes()
    return {"path": path, "pem": pem, "txt": public_txt(k)}


def zones(key: dict[str, Any]) -> dict[str, Any]:
    return {
        "arc1._domainkey.example.net": {"TXT": [key["txt"]]},
        "hop._domainkey.relay.example.org": {"TXT": [key["txt"]]},
    }


def dnsfunc(key: dict[str, Any]) -> Any:
    table = {k + ".": v["TXT"][0].encode() for k, v in zones(key).items()}
    return lambda name, timeout=5: table.get(name.decode())


def dkimpy_seal(key: dict[str, Any], msg: bytes, arc_result: str, srv: str) -> bytes:
    """A hop sealed by dkimpy itself (as relay.example.org)."""
    # the previous hop's own A-R is not passed on (only its ARC copy)
    msg = b"".join(
        line for line in msg.splitlines(keepends=True) if not line.startswith(b"Authentication-")
    )
    msg = f"Authentication-Results: {srv}; arc={arc_result}\r\n".encode() + msg
    sig = dkim.arc_sign(
        msg,
        b"hop",
        b"relay.example.org",
        key["pem"],
        srv.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    return b"".join(sig) + msg


def config(key: dict[str, Any], **arc: Any) -> dict[str, Any]:
    return {
        "milterd": {"authserv_id": "mx.example.net"},
        "plugins": {
            "authres": {},
            "arc": {
                "selector": "arc1",
                "domain": "example.net",
                "key_file": str(key["path"]),
                **arc,
            },
        },
    }


def run(key: dict[str, Any], data: bytes, **arc: Any) -> Any:
    with Harness(config(key, **arc), plugins={"arc": ARCPlugin}, zones=zones(key)) as h:
        return h.send(data, client_ip=UNTRUSTED)


def arc_results(out: Any) -> list[tuple[str, dict[str, str]]]:
    return [(r.result, dict(r.properties)) for r in out.results if r.method == "arc"]


def test_no_chain_is_none_and_first_seal_verifies(key: dict[str, Any]) -> None:
    out = run(key, MSG)
    assert not out.errors
    assert arc_results(out) == [("none", {})]
    names = [n for n, _ in out.headers()][:4]
    assert names == [
        "ARC-Seal",
        "ARC-Message-Signature",
        "ARC-Authentication-Results",
        "Authentication-Results",
    ]
    assert "cv=none" in (out.header("ARC-Seal") or "")
    aar = out.header("ARC-Authentication-Results") or ""
    assert aar.startswith("i=1;") and "mx.example.net" in aar and "arc=none" in aar
    cv, _, reason = dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))
    assert cv == dkim.CV_Pass, reason


def test_passing_chain_is_verified_and_extended(key: dict[str, Any]) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    assert dkim.arc_verify(hop1, dnsfunc=dnsfunc(key))[0] == dkim.CV_Pass
    out = run(key, hop1)
    assert arc_results(out) == [("pass", {"header.oldest-pass": "0", "smtp.remote-ip": UNTRUSTED})]
    assert "i=2" in (out.header("ARC-Seal") or "") and "cv=pass" in (out.header("ARC-Seal") or "")
    cv, results, reason = dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))
    assert cv == dkim.CV_Pass, reason
    assert len(results) == 2
    # and our own verifier agrees on our own output (a third hop)
    assert (
        verify_chain(out.delivered, lambda n: zones(key)[n.rstrip(".")]["TXT"][0].encode())[0]
        == "pass"
    )


def test_modified_message_fails(key: dict[str, Any]) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    out = run(key, hop1.replace(b"Hello list.", b"Hello list!"))
    ((result, props),) = arc_results(out)
    assert result == "fail" and props == {"smtp.remote-ip": UNTRUSTED}
    assert "cv=fail" in (out.header("ARC-Seal") or "")


def test_oldest_pass_when_older_ams_breaks(key: dict[str, Any]) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    # a list changes the subject between hop 1 and hop 2, then seals again with cv=pass
    changed = hop1.replace(b"Subject: hello", b"Subject: [list] hello")
    hop2 = dkimpy_seal(key, changed, "pass", "relay.example.org")
    assert dkim.arc_verify(hop2, dnsfunc=dnsfunc(key))[0] == dkim.CV_Pass
    out = run(key, hop2)
    assert arc_results(out) == [("pass", {"header.oldest-pass": "2", "smtp.remote-ip": UNTRUSTED})]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AAAA\r\n" + m,
        lambda m: m.replace(b"ARC-Seal: i=1", b"ARC-Seal: i=1\r\nARC-Seal: i=1", 1),
        lambda m: m.replace(b"ARC-Seal: i=1;", b"ARC-Seal: x=1;", 1),
        lambda m: b"ARC-Seal: i=2; cv=pass; garbage\r\n" + m,
        lambda m: b"ARC-Message-Signature: i=1; nonsense ;;; ===\r\n" + m,
        lambda m: m.replace(b"ARC-Message-Signature: i=1", b"ARC-Message-Signature: i=x", 1),
    ],
    ids=["instance-51", "duplicate-seal", "no-instance", "partial-set", "junk-ams", "bad-i"],
)
def test_malformed_sets_fail_without_exceptions(key: dict[str, Any], mutate: Any) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    out = run(key, mutate(hop1))
    assert not out.errors
    ((result, _),) = arc_results(out)
    assert result == "fail"


def test_fifty_instances_limit(key: dict[str, Any]) -> None:
    many = b"".join(
        f"ARC-Seal: i={i}; a=rsa-sha256; cv=pass; d=x.test; s=s; b=AAAA\r\n"
        f"ARC-Message-Signature: i={i}; a=rsa-sha256; d=x.test; s=s; h=from; bh=AA; b=AA\r\n"
        f"ARC-Authentication-Results: i={i}; x.test; arc=pass\r\n".encode()
        for i in range(1, 52)
    )
    result, reason, _ = verify_chain(many + MSG, lambda n: b"")
    assert result == "fail" and "51" in reason


def test_dns_failure_fails_the_chain(key: dict[str, Any]) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    z = zones(key)
    z["hop._domainkey.relay.example.org"] = {"TXT": "TIMEOUT"}
    with Harness(config(key), plugins={"arc": ARCPlugin}, zones=z) as h:
        out = h.send(hop1, client_ip=UNTRUSTED)
    assert [r for r, _ in arc_results(out)] == ["fail"]


def test_trusted_mail_not_verified_nor_sealed(key: dict[str, Any]) -> None:
    with Harness(config(key), plugins={"arc": ARCPlugin}, zones=zones(key)) as h:
        out = h.send(MSG, client_ip=UNTRUSTED, auth="alice")
    assert arc_results(out) == []
    assert out.header("ARC-Seal") is None  # authres writes no A-R for trusted mail


def test_verify_only_without_key(key: dict[str, Any]) -> None:
    cfg: dict[str, Any] = {"plugins": {"authres": {}, "arc": {}}}
    with Harness(cfg, plugins={"arc": ARCPlugin}, zones=zones(key)) as h:
        out = h.send(dkimpy_seal(key, MSG, "none", "relay.example.org"), client_ip=UNTRUSTED)
    assert [r for r, _ in arc_results(out)] == ["pass"]
    assert [n for n, _ in out.headers()].count("ARC-Seal") == 1  # only relay's


def test_sealing_config_is_all_or_nothing(key: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(Exception, match="needs selector, domain and key_file"):
        Harness({"plugins": {"authres": {}, "arc": {"selector": "x"}}}, plugins={"arc": ARCPlugin})
    loose = tmp_path / "loose.key"
    loose.write_bytes(key["pem"])
    loose.chmod(0o644)
    with pytest.raises(Exception, match=r"loose\.key: mode 0644"):
        Harness(config(key, key_file=str(loose)), plugins={"arc": ARCPlugin})


def test_foreign_authentication_results_not_utf8_still_sealed(key: dict[str, Any]) -> None:
    # dkimpy decodes every Authentication-Results strictly to find ours: one with 8-bit
    # junk from another hop raised UnicodeDecodeError and the message was tempfailed.
    msg = b"Authentication-Results: other.example; spf=pass \x80\xff\r\n" + MSG
    out = run(key, msg)
    assert out.errors == [] and out.verdict == "continue"
    assert out.header("ARC-Seal") is not None
    assert b"other.example; spf=pass \x80\xff" in (out.delivered or b"")  # bytes kept
    fetch = lambda n: zones(key)[n.rstrip(".")]["TXT"][0].encode()  # noqa: E731
    assert verify_chain(out.delivered or b"", fetch)[0] == "pass"


def test_bare_cr_inside_a_field_is_sealed_without_failure(key: dict[str, Any]) -> None:
    msg = MSG.replace(b"Subject:", b"X-Odd: a\rContent-Type: b\r\nSubject:", 1)
    out = run(key, msg)
    assert out.errors == [] and out.verdict == "continue"
    assert out.header("ARC-Seal") is not None
