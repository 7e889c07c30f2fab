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
from milterd_plugins.arc import ARCPlugin, fold_aar, seal_ops, verify_chain
from milterd_plugins.dkim.keys import public_txt

from milterd import AddHeader, Context, Result, hookimpl
from milterd.testing import Harness, split_message

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
    assert out.notes == ["arc: sealed d=example.net s=arc1"]  # on the summary line


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


class Results:
    """Records fixed results at eom (what a verifying plugin would report)."""

    results: list[Result] = []

    @hookimpl
    def eom(self, ctx: Context) -> None:
        for r in self.results:
            ctx.add_result(r)


def run_with(key: dict[str, Any], data: bytes, results: list[Result], **cfg: Any) -> Any:
    recorder = type("Rec", (Results,), {"results": results})
    conf = config(key)
    conf["plugins"]["authres"].update(cfg)
    plugins = {"results": recorder, "arc": ARCPlugin}
    with Harness(conf, plugins=plugins, zones=zones(key)) as h:
        return h.send(data, client_ip=UNTRUSTED)


def unfolded(value: str) -> str:
    return " ".join(value.split())


FORGED = (
    b"Authentication-Results: ((((((x)))))) mx.example.net; dkim=pass header.d=bank.example\r\n"
)


def test_seal_covers_only_the_authentication_results_we_added(key: dict[str, Any]) -> None:
    # authres keeps the forgery (remove_forged = false): dkimpy would merge it into the
    # AAR, since the authres library reads its authserv-id as ours
    out = run_with(key, FORGED + MSG, [], remove_forged=False)
    assert "bank.example" in (out.delivered or b"").decode()  # still there, unsealed
    aar = out.header("ARC-Authentication-Results") or ""
    assert unfolded(aar) == "i=1; mx.example.net; arc=none"
    assert dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))[0] == dkim.CV_Pass


def test_no_seal_without_an_authentication_results_added_now(key: dict[str, Any]) -> None:
    # a trusted sender gets no A-R of ours: an incoming one claiming our id is not sealed
    conf = config(key)
    conf["plugins"]["authres"]["remove_forged"] = False
    with Harness(conf, plugins={"arc": ARCPlugin}, zones=zones(key)) as h:
        out = h.send(FORGED + MSG, client_ip=UNTRUSTED, auth="alice")
    assert out.header("ARC-Seal") is None


def test_aar_says_what_our_authentication_results_says(key: dict[str, Any]) -> None:
    # the core folds our A-R inside the quoted reason; the authres library turned that
    # line break into "??" in the AAR
    reason = "the body hash did not match (got 'abc', expected 'def'); " * 3
    out = run_with(key, MSG, [Result("dkim", "fail", reason=reason)])
    ar = out.header("Authentication-Results") or ""
    aar = out.header("ARC-Authentication-Results") or ""
    assert b"\n" in dict(split_message(out.delivered or b"")[0])["Authentication-Results"]
    assert unfolded(aar) == "i=1; " + unfolded(ar)
    assert "??" not in aar
    assert dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))[0] == dkim.CV_Pass


def test_long_aar_is_folded_before_the_core_would_break_it(key: dict[str, Any]) -> None:
    # five 250-character values without white space: one AAR line of 1300 octets, which
    # the core hard-breaks (inserting a space) after we signed it
    props = tuple((f"header.{k}", k * 250) for k in "dsiab")
    out = run_with(key, MSG, [Result("dkim", "neutral", properties=props)])
    header_block = (out.delivered or b"").split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in header_block.split(b"\r\n")) <= 998
    ar = out.header("Authentication-Results") or ""
    assert unfolded(out.header("ARC-Authentication-Results") or "") == "i=1; " + unfolded(ar)
    cv, _, reason = dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))
    assert cv == dkim.CV_Pass, reason


def test_fold_aar_keeps_quoted_strings_whole_unless_a_line_gets_too_long() -> None:
    value = 'i=1; mx.example.net; dkim=fail reason="' + "word " * 20 + '" header.d=example.com'
    folded = fold_aar(value, len("ARC-Authentication-Results: "))
    assert folded is not None and folded.replace("\r\n", "") == value
    quoted = folded.split('"')[1]
    assert "\r\n" not in quoted
    long_quoted = 'i=1; mx.example.net; dkim=fail reason="' + "word " * 300 + '"'
    folded = fold_aar(long_quoted, 28)
    assert folded is not None and folded.replace("\r\n", "") == long_quoted
    assert max(len(line) for line in folded.split("\r\n")) <= 78
    assert fold_aar("i=1; mx.example.net; x=" + "y" * 1000, 28) is None


def test_seal_ops_refuses_a_field_the_core_would_change() -> None:
    long_run = b"ARC-Message-Signature: i=1; h=" + b"x" * 1200 + b"\r\n"
    assert seal_ops([long_run]) is None
    ok = b"ARC-Seal: i=1; cv=none; a=rsa-sha256;\r\n b=abc\r\n"
    ops = seal_ops([ok])
    assert ops is not None and [(o.name, o.value) for o in ops] == [
        ("ARC-Seal", "i=1; cv=none; a=rsa-sha256;\n b=abc")
    ]


@pytest.mark.parametrize("n", [60, 69, 75, 90, 120])
def test_long_sealing_domain_verifies(key: dict[str, Any], n: int) -> None:
    # dkimpy's fold broke a d= of 69+ characters inside the value
    body = "x" * (n - 4)
    dom = ".".join(body[i : i + 40] for i in range(0, len(body), 40)) + ".com"
    z = {**zones(key), f"arc1._domainkey.{dom}": {"TXT": [key["txt"]]}}
    with Harness(config(key, domain=dom), plugins={"arc": ARCPlugin}, zones=z) as h:
        out = h.send(MSG, client_ip=UNTRUSTED)
    table = {k + ".": v["TXT"][0].encode() for k, v in z.items()}
    cv, _, reason = dkim.arc_verify(
        out.delivered, dnsfunc=lambda name, timeout=5: table.get(name.decode())
    )
    assert cv == dkim.CV_Pass, reason
    fetch = lambda nm: z[nm]["TXT"][0].encode()  # noqa: E731
    assert verify_chain(out.delivered or b"", fetch)[0] == "pass"


def test_config_bounds(key: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="min_rsa_bits"):
        Harness(config(key, min_rsa_bits=512), plugins={"arc": ARCPlugin})
    with pytest.raises(Exception, match="invalid domain"):
        Harness(config(key, domain="exa mple.net"), plugins={"arc": ARCPlugin})


@pytest.mark.parametrize(
    ("extra", "expect"),
    [("s=email:tlsrpt; ", "pass"), ("h=sha1; ", "fail"), ("s=tlsrpt; ", "fail")],
)
def test_the_key_records_s_and_h_tags_apply_to_arc_too(
    key: dict[str, Any], extra: str, expect: str
) -> None:
    hop1 = dkimpy_seal(key, MSG, "none", "relay.example.org")
    z = zones(key)
    z["hop._domainkey.relay.example.org"] = {
        "TXT": [key["txt"].replace("v=DKIM1; ", "v=DKIM1; " + extra)]
    }
    with Harness(config(key), plugins={"arc": ARCPlugin}, zones=z) as h:
        out = h.send(hop1, client_ip=UNTRUSTED)
    assert [r for r, _ in arc_results(out)] == [expect]


def test_seals_as_authres_when_only_authres_sets_the_authserv_id(key: dict[str, Any]) -> None:
    """[plugins.authres] authserv_id differing from [milterd]'s: arc looked for the
    latter's A-R, found none, and never sealed (a debug line the only trace)."""
    cfg = config(key)
    cfg["plugins"]["authres"] = {"authserv_id": "auth.example.net"}
    with Harness(cfg, plugins={"arc": ARCPlugin}, zones=zones(key)) as h:
        out = h.send(MSG, client_ip=UNTRUSTED)
    aar = out.header("ARC-Authentication-Results") or ""
    assert aar.startswith("i=1;") and "auth.example.net" in aar, out.headers()
    cv, _, reason = dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))
    assert cv == dkim.CV_Pass, reason


def test_another_plugins_authentication_results_is_never_sealed_as_ours(
    key: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    class Scanner:
        actions = frozenset({"add_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(AddHeader("Authentication-Results", "scanner.example.org; x-scan=pass"))

    cfg = config(key)
    cfg["plugins"] = {"scanner": {}, **cfg["plugins"]}
    with Harness(cfg, plugins={"arc": ARCPlugin, "scanner": Scanner}, zones=zones(key)) as h:
        out = h.send(MSG, client_ip=UNTRUSTED)
    aar = out.header("ARC-Authentication-Results") or ""
    assert "mx.example.net" in aar and "scanner" not in aar, aar
    # authres with another id, and the scanner's: which is ours is not known: not sealed
    cfg["plugins"]["authres"] = {"authserv_id": "auth.example.net"}
    with caplog.at_level("WARNING"), Harness(
        cfg, plugins={"arc": ARCPlugin, "scanner": Scanner}, zones=zones(key)
    ) as h:
        out = h.send(MSG, client_ip=UNTRUSTED)
    assert out.header("ARC-Seal") is None
    assert "set [plugins.arc] authserv_id" in caplog.text


@pytest.mark.parametrize("bad", ["x-" + "h" * 70, "x-\u00e9", "", "a b"])
def test_sealed_field_names_must_be_short_field_names(key: dict[str, Any], bad: str) -> None:
    """Found by a review: a 72-character name in ``headers`` was broken in two by dkimpy's
    fold of h=, and no ARC-Message-Signature verified; other non-names were taken too."""
    with pytest.raises(Exception, match="not a header field name"):
        Harness(config(key, headers=["from", bad]), plugins={"arc": ARCPlugin})


def test_a_64_character_field_name_is_sealed_whole(key: dict[str, Any]) -> None:
    name = "x-" + "h" * 62
    data = MSG.replace(b"Subject:", name.encode() + b": v\r\nSubject:", 1)
    out = run(key, data, headers=["from", name, "subject"])
    assert name in (out.header("ARC-Message-Signature") or "").replace("\r\n ", " ")
    cv, _, reason = dkim.arc_verify(out.delivered, dnsfunc=dnsfunc(key))
    assert cv == dkim.CV_Pass, reason
