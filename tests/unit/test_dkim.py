"""The built-in ``dkim`` plugin through the harness: signing, verification, keys, CLI.

Every signature made here is checked by dkimpy's own verifier (independent of our
signing code, which uses OpenSSL); OpenDKIM cross-checks are in the integration tests.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from milterd_plugins.dkim import (
    DEFAULT_HEADERS,
    DKIMPlugin,
    SigningRule,
    match_rule,
    sign_order,
    signed_names,
)
from milterd_plugins.dkim.keys import (
    fast_sign,
    load_key,
    parse_headers,
    public_txt,
)
from milterd_plugins.dkim.migrate import OPENDKIM_SIGN_HEADERS

from milterd import AddHeader, ChangeHeader, Context, Message, hookimpl
from milterd.testing import Harness
from tests.support.dnsserver import ZoneServer
from tests.support.keys import write_key

DATA = Path(__file__).resolve().parent.parent / "data" / "dkim"
MSG = (
    b"From: Alice <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: hello there\r\n"
    b"Date: Sun, 22 Nov 2026 03:00:00 +0000\r\n"
    b"Message-ID: <1@example.com>\r\n"
    b"\r\n"
    b"Hello Bob,\r\nsee you.\r\n"
)
UNTRUSTED = "192.0.2.1"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("keys")
    d.chmod(0o700)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ed_key = ed25519.Ed25519PrivateKey.generate()
    return {
        "dir": d,
        "rsa": (write_key(d / "rsa.key", rsa_key), public_txt(rsa_key)),
        "rsa_new": (write_key(d / "rsa_new.key", rsa_new), public_txt(rsa_new)),
        "ed": (write_key(d / "ed.key", ed_key), public_txt(ed_key)),
    }


def zones(keys: dict[str, Any]) -> dict[str, Any]:
    return {
        "r2026._domainkey.example.com": {"TXT": [keys["rsa"][1]]},
        "r2027._domainkey.example.com": {"TXT": [keys["rsa_new"][1]]},
        "e2026._domainkey.example.com": {"TXT": [keys["ed"][1]]},
        "r2026._domainkey.sub.example.com": {"TXT": [keys["rsa"][1]]},
    }


def sign_config(
    keys: dict[str, Any], signing: list[dict[str, Any]], **extra: Any
) -> dict[str, Any]:
    return {
        "dkim": {
            "keys": {
                "rsa": {"selector": "r2026", "file": str(keys["rsa"][0])},
                "rsa_new": {"selector": "r2027", "file": str(keys["rsa_new"][0])},
                "ed": {"selector": "e2026", "file": str(keys["ed"][0])},
            },
            "signing": signing,
            **extra,
        }
    }


def dnsfunc_for(keys: dict[str, Any]) -> Any:
    table = {k + ".": v["TXT"][0].encode() for k, v in zones(keys).items()}

    def f(name: bytes, timeout: int = 5) -> bytes | None:
        return table.get(name.decode())

    return f


def dkimpy_verify_all(data: bytes, keys: dict[str, Any]) -> list[bool]:
    d = dkim.DKIM(data)
    n = sum(1 for k, _ in d.headers if k.lower() == b"dkim-signature")
    return [dkim.DKIM(data).verify(i, dnsfunc=dnsfunc_for(keys)) for i in range(n)]


def dl(out: Any) -> bytes:
    """The delivered bytes (the message was not refused)."""
    assert out.delivered is not None
    return bytes(out.delivered)


def sig_tags(value: str) -> dict[str, str]:
    tags = {}
    for part in value.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            tags[k.strip()] = "".join(v.split())
    return tags


# --- signing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("names", "algs"),
    [
        (["rsa"], ["rsa-sha256"]),
        (["ed"], ["ed25519-sha256"]),
        (["rsa", "ed"], ["rsa-sha256", "ed25519-sha256"]),
    ],
)
def test_signs_authenticated_mail_rsa_ed25519_and_dual(
    keys: dict[str, Any], names: list[str], algs: list[str]
) -> None:
    cfg = sign_config(keys, [{"pattern": "example.com", "keys": names}])
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, sender="alice@example.com", client_ip=UNTRUSTED, auth="alice")
    assert not out.errors
    sigs = [v for n, v in out.headers() if n.lower() == "dkim-signature"]
    assert sorted(sig_tags(s)["a"] for s in sigs) == sorted(algs)
    assert dl(out).startswith(b"DKIM-Signature:")
    # what was signed, on the summary line (a note), one per signature
    selectors = {"rsa": "r2026", "ed": "e2026"}
    pairs = zip(names, algs, strict=True)
    assert out.notes == [f"dkim: signed d=example.com s={selectors[n]} a={a}" for n, a in pairs]
    assert dkimpy_verify_all(dl(out), keys) == [True] * len(algs)
    # and our own verifier, as a receiving milterd would see it
    with Harness({"dkim": {}}, plugins={"dkim": DKIMPlugin}, zones=zones(keys)) as h2:
        out2 = h2.send(dl(out), client_ip=UNTRUSTED)
    assert [r.result for r in out2.results] == ["pass"] * len(algs)


def test_trusted_mail_we_do_not_sign_is_verified(keys: dict[str, Any]) -> None:
    """As OpenDKIM: mail from a trusted client that no rule signs (another domain's mail
    relayed by an internal host, sign = false) is verified; mail we sign is not."""
    signer = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    with Harness(signer, plugins={"dkim": DKIMPlugin}) as h:
        signed = dl(h.send(MSG, auth="alice"))  # From: example.com, signed by us
    tampered = signed.replace(b"\r\n\r\n", b"\r\n\r\nX", 1)
    for cfg in (
        sign_config(keys, [{"pattern": "example.org", "keys": ["rsa"]}]),  # no rule matches
        {"dkim": {"sign": False}},
    ):
        with Harness(cfg, plugins={"dkim": DKIMPlugin}, zones=zones(keys)) as h:
            for client in (UNTRUSTED, "127.0.0.1"):  # authenticated, and local submission
                auth = "relay" if client == UNTRUSTED else None
                out = h.send(signed, client_ip=client, auth=auth)
                assert [r.result for r in out.results] == ["pass"], (cfg, client)
                out = h.send(tampered, client_ip=client, auth=auth)
                assert [r.result for r in out.results] == ["fail"], (cfg, client)
    with Harness(signer, plugins={"dkim": DKIMPlugin}, zones=zones(keys)) as h:
        out = h.send(signed, auth="alice")  # ours to sign: not verified
    assert [r.method for r in out.results] == []


def test_fast_sign_is_byte_identical_to_dkimpy(
    keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dkim.time, "time", lambda: 1763780000)
    hb, body = MSG.split(b"\r\n\r\n", 1)
    incl = ["from", "from", "to", "subject", "subject", "date", "message-id"]
    for name in ("rsa", "ed"):
        key = load_key(str(keys[name][0]))
        ours = fast_sign(
            parse_headers(hb + b"\r\n"),
            body,
            key,
            domain="example.com",
            selector="s",
            include_headers=incl,
            timestamp=1763780000,
        )
        if name == "rsa":
            priv = key.pkcs1_pem()
        else:
            raw = key.key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
            priv = base64.b64encode(raw)
        theirs = dkim.sign(
            MSG,
            b"s",
            b"example.com",
            priv,
            include_headers=[h.encode() for h in incl],
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=key.algorithm.encode(),
        )
        assert ("DKIM-Signature: " + ours + "\r\n").encode() == theirs


def test_untrusted_mail_is_verified_not_signed(keys: dict[str, Any]) -> None:
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}])
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, client_ip=UNTRUSTED)
    assert out.header("DKIM-Signature") is None
    assert [(r.method, r.result) for r in out.results] == [("dkim", "none")]
    assert [s.name for s in out.symbols] == ["DKIM_NA"]


@pytest.mark.parametrize(
    ("kwargs", "signed"),
    [
        ({"client_ip": "127.0.0.1"}, True),  # internal network (loopback by default)
        ({"client_ip": "", "client_name": "localhost"}, True),  # local submission
        ({"macros": {"{daemon_name}": "submission"}}, True),
        ({"macros": {"{daemon_name}": "smtpd"}}, False),
        ({"auth": "alice"}, True),
        ({}, False),
    ],
)
def test_trusted_senders(keys: dict[str, Any], kwargs: dict[str, Any], signed: bool) -> None:
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["ed"]}], sign_daemons=["submission"])
    kwargs.setdefault("client_ip", UNTRUSTED)
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, **kwargs)
    assert (out.header("DKIM-Signature") is not None) is signed


@pytest.mark.parametrize(
    "msg",
    [
        MSG.replace(b"From: Alice <alice@example.com>\r\n", b""),
        MSG.replace(b"To:", b"From: eve@example.com\r\nTo:"),
        MSG.replace(b"Alice <alice@example.com>", b"alice@example.com, eve@example.com"),
    ],
    ids=["no-from", "two-from-fields", "two-addresses"],
)
def test_never_signs_without_exactly_one_from(
    keys: dict[str, Any], msg: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}])
    with caplog.at_level("WARNING"), Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(msg, auth="alice")
    assert out.header("DKIM-Signature") is None
    assert "not signing" in caplog.text


def test_duplicated_once_only_field_is_signed_with_a_warning(
    keys: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Two Subject fields: signed (dkimpy verifies it), with a warning, as rspamd fails
    such signatures on purpose (tests/integration/test_interop_rspamd.py); one of each
    field, oversigned or not, gives no warning."""
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}])
    with caplog.at_level("WARNING"), Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, auth="alice")
        assert out.header("DKIM-Signature") is not None
        assert "allows once" not in caplog.text
        out = h.send(MSG.replace(b"To:", b"Subject: again\r\nTo:"), auth="alice")
    assert out.header("DKIM-Signature") is not None
    assert "allows once present more than once (subject)" in caplog.text


def test_signing_table_patterns() -> None:
    rules = [
        SigningRule(pattern="ceo@example.com", keys=["a"]),
        SigningRule(pattern="example.com", keys=["b"]),
        SigningRule(pattern="*.example.com", keys=["c"]),
        SigningRule(pattern="*@example.org", keys=["d"]),
        SigningRule(pattern="*", keys=["e"]),
    ]
    got = {
        a: (r.keys[0] if (r := match_rule(rules, a)) else None)
        for a in (
            "ceo@example.com",
            "bob@example.com",
            "bob@mail.example.com",
            "x@example.org",
            "x@other.test",
        )
    }
    assert got == {
        "ceo@example.com": "a",
        "bob@example.com": "b",
        "bob@mail.example.com": "c",
        "x@example.org": "d",
        "x@other.test": "e",
    }
    assert match_rule(rules[:3], "x@notexample.com") is None


def test_rule_domain_and_subdomain_signing(keys: dict[str, Any]) -> None:
    cfg = sign_config(keys, [{"pattern": "*.example.com", "keys": ["rsa"]}])
    msg = MSG.replace(b"alice@example.com", b"alice@sub.example.com")
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(msg, auth="alice")
        out_parent = h.send(MSG, auth="alice")
    assert sig_tags(out.header("DKIM-Signature") or "")["d"] == "sub.example.com"
    assert dkimpy_verify_all(dl(out), keys) == [True]
    assert out_parent.header("DKIM-Signature") is None  # *.example.com: subdomains only


def test_oversigning_defaults_and_added_header_breaks(keys: dict[str, Any]) -> None:
    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, auth="alice")
    hlist = sig_tags(out.header("DKIM-Signature") or "")["h"].split(":")
    assert hlist.count("from") == 2 and hlist.count("subject") == 2
    assert "reply-to" in hlist and "cc" in hlist  # absent but oversigned
    assert "received" not in hlist
    # a Subject (or Reply-To) added on the way breaks the signature
    hdr, body = dl(out).split(b"\r\n\r\n", 1)
    assert dkimpy_verify_all(hdr + b"\r\nSubject: free money\r\n\r\n" + body, keys) == [False]
    assert dkimpy_verify_all(hdr + b"\r\nReply-To: x@evil.test\r\n\r\n" + body, keys) == [False]


def test_signed_names_counts_fields_and_oversigns() -> None:
    order = sign_order(["from", "to", "date", "message-id", "x-b"], ["subject", "from", "date"])
    # configured order, each name once; oversigned ones marked
    assert [h for h, _ in order] == ["from", "to", "date", "message-id", "x-b", "subject"]
    assert dict(order) == {
        "from": True, "to": False, "date": True, "message-id": False, "x-b": False,
        "subject": True,
    }  # fmt: skip
    fields = [[b"From", b" a\r\n"], [b"TO", b" b\r\n"], [b"to", b" c\r\n"], [b"X-B", b" d\r\n"]]
    # From once + oversigned; To twice; no Date: not oversigned while absent (an MTA may
    # add one after signing); Subject absent but oversigned; X-Y not configured
    assert signed_names(order, [*fields, [b"X-Y", b" e\r\n"]]) == [
        "from", "from", "to", "to", "x-b", "subject",
    ]  # fmt: skip
    assert signed_names(order, [[b"Date", b" x\r\n"], *fields])[:4] == [
        "from", "from", "to", "to",
    ]  # fmt: skip
    assert signed_names(order, [[b"Date", b" x\r\n"], *fields]).count("date") == 2


def test_default_headers_cover_rfc6376_list() -> None:
    """Every field RFC 6376 section 5.4.1 says SHOULD be signed is in the default list, and
    so is everything OpenDKIM signs by default (Resent-Sender, which the RFC leaves out)."""
    rfc = [
        "from",
        "reply-to",
        "subject",
        "date",
        "to",
        "cc",
        "resent-date",
        "resent-from",
        "resent-to",
        "resent-cc",
        "in-reply-to",
        "references",
        "list-id",
        "list-help",
        "list-unsubscribe",
        "list-subscribe",
        "list-post",
        "list-owner",
        "list-archive",
    ]
    assert set(rfc) <= set(DEFAULT_HEADERS)
    assert set(OPENDKIM_SIGN_HEADERS) <= set(DEFAULT_HEADERS)
    order = sign_order(list(DEFAULT_HEADERS), [])
    assert "resent-sender" in signed_names(order, [[b"Resent-Sender", b" a@b.example\r\n"]])


@pytest.mark.parametrize(
    ("before", "after", "signed"),
    [
        ("Alice <alice@example.com>", "Mallory <m@elsewhere.example>", False),
        ("Alice <alice@elsewhere.example>", "Alice <alice@example.com>", True),
    ],
)
def test_a_from_another_plugin_changed_is_the_one_signed_for(
    keys: dict[str, Any], before: str, after: str, signed: bool
) -> None:
    """eom works out the From's signing rule (to skip verifying what will be signed) and
    finalize reuses it; a From another plugin changed in between is worked out again."""

    class FromEditor:
        actions = frozenset({"change_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(ChangeHeader("From", after))

    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    with Harness(
        {"plugins": {"dkim": cfg["dkim"], "editor": {}}},
        plugins={"dkim": DKIMPlugin, "editor": FromEditor},
    ) as h:
        out = h.send(MSG.replace(b"Alice <alice@example.com>", before.encode()), auth="alice")
    assert not out.errors
    assert out.header("From") == after
    assert (out.header("DKIM-Signature") is not None) == signed
    assert out.notes == (["dkim: signed d=example.com s=r2026 a=rsa-sha256"] if signed else [])


def test_signature_covers_other_plugins_changes(keys: dict[str, Any]) -> None:
    class Editor:
        actions = frozenset({"add_header", "change_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(AddHeader("X-Scanned", "yes"))
            ctx.add_change(ChangeHeader("Subject", "[ext] hello there"))

    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa", "ed"]}])
    cfg["dkim"]["headers"] = ["from", "to", "subject", "x-scanned"]
    with Harness(
        {"plugins": {"dkim": cfg["dkim"], "editor": {}}},
        plugins={"dkim": DKIMPlugin, "editor": Editor},
    ) as h:
        out = h.send(MSG, auth="alice")
    assert out.header("Subject") == "[ext] hello there"
    assert b"X-Scanned: yes" in dl(out)
    assert "x-scanned" in sig_tags(out.header("DKIM-Signature") or "")["h"]
    assert dkimpy_verify_all(dl(out), keys) == [True, True]


def test_two_selectors_at_once_and_reload_swaps_keys(keys: dict[str, Any]) -> None:
    both = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa", "rsa_new"]}])
    with Harness(both, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, auth="alice")
    sels = sorted(sig_tags(v)["s"] for n, v in out.headers() if n == "DKIM-Signature")
    assert sels == ["r2026", "r2027"]
    assert dkimpy_verify_all(dl(out), keys) == [True, True]
    # a reload is a fresh plugin object with the new table; the old one is unchanged
    old, new = DKIMPlugin(), DKIMPlugin()
    cfg_old = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    cfg_new = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa_new"]}])
    with (
        Harness(cfg_old, plugins={"dkim": old}) as h1,
        Harness(cfg_new, plugins={"dkim": new}) as h2,
    ):
        a, b = h1.send(MSG, auth="alice"), h2.send(MSG, auth="alice")
    assert sig_tags(a.header("DKIM-Signature") or "")["s"] == "r2026"
    assert sig_tags(b.header("DKIM-Signature") or "")["s"] == "r2027"
    assert set(old.keys) == set(new.keys) == {"rsa", "rsa_new", "ed"}
    assert old.keys["rsa"] is not new.keys["rsa"]


# --- key safety -----------------------------------------------------------------------------


def test_startup_refuses_group_readable_key(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    key = write_key(tmp_path / "k.pem", ed25519.Ed25519PrivateKey.generate(), 0o640)
    cfg: dict[str, Any] = {"dkim": {"keys": {"k": {"selector": "s", "file": str(key)}}}}
    with pytest.raises(Exception, match=r"k\.pem: mode 0640"):
        Harness(cfg, plugins={"dkim": DKIMPlugin})
    cfg["dkim"]["insecure_keys"] = True
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        assert h is not None


def test_startup_refuses_key_in_world_writable_dir(tmp_path: Path) -> None:
    d = tmp_path / "shared"
    d.mkdir()
    key = write_key(d / "k.pem", ed25519.Ed25519PrivateKey.generate())
    d.chmod(0o777)
    cfg = {"dkim": {"keys": {"k": {"selector": "s", "file": str(key)}}}}
    with pytest.raises(Exception, match=r"k\.pem: directory .*shared is writable by others"):
        Harness(cfg, plugins={"dkim": DKIMPlugin})


def test_startup_refuses_wrong_algorithm_and_missing_file(
    keys: dict[str, Any], tmp_path: Path
) -> None:
    cfg = {
        "dkim": {
            "keys": {"k": {"selector": "s", "file": str(keys["ed"][0]), "algorithm": "rsa-sha256"}}
        }
    }
    with pytest.raises(Exception, match="holds a ed25519-sha256 key"):
        Harness(cfg, plugins={"dkim": DKIMPlugin})
    cfg = {"dkim": {"keys": {"k": {"selector": "s", "file": str(tmp_path / "nope.pem")}}}}
    with pytest.raises(Exception, match=r"nope\.pem: no such key file"):
        Harness(cfg, plugins={"dkim": DKIMPlugin})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_key_behind_a_directory_the_user_cannot_enter_is_named(keys: dict[str, Any]) -> None:
    from milterd_plugins.dkim.keys import KeyFileError, load_key

    d = Path(tempfile.mkdtemp(prefix="milterd-keys-"))  # root's, 0700
    try:
        key = d / "k.pem"
        shutil.copy(keys["rsa"][0], key)
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    load_key(str(key))
                except KeyFileError as e:
                    code = 0 if "k.pem: cannot read: Permission denied (the daemon" in str(e) else 3
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        shutil.rmtree(d)


def test_keys_without_a_signing_rule_are_warned_about(
    keys: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = {"dkim": {"keys": {"k": {"selector": "s", "file": str(keys["rsa"][0])}}}}
    with Harness(cfg, plugins={"dkim": DKIMPlugin}):
        pass
    assert "1 key(s) configured but no [[plugins.dkim.signing]] rule" in caplog.text


def test_config_errors() -> None:
    with pytest.raises(Exception, match="no key 'missing'"):
        Harness(
            {"dkim": {"signing": [{"pattern": "*", "keys": ["missing"]}]}},
            plugins={"dkim": DKIMPlugin},
        )
    with pytest.raises(Exception, match="must not be signed: received"):
        Harness({"dkim": {"headers": ["from", "received"]}}, plugins={"dkim": DKIMPlugin})
    with pytest.raises(Exception, match="unknown result"):
        Harness({"dkim": {"actions": {"bogus": "reject"}}}, plugins={"dkim": DKIMPlugin})


# --- verification ---------------------------------------------------------------------------


def signed(keys: dict[str, Any], msg: bytes = MSG, name: str = "rsa", **kw: Any) -> bytes:
    key = load_key(str(keys[name][0]))
    hb, body = msg.split(b"\r\n\r\n", 1)
    sel = {"rsa": "r2026", "rsa_new": "r2027", "ed": "e2026"}[name]
    value = fast_sign(
        parse_headers(hb + b"\r\n"),
        body,
        key,
        domain="example.com",
        selector=sel,
        include_headers=kw.pop("include", ["from", "to", "subject", "date"]),
        **kw,
    )
    return b"DKIM-Signature: " + str(value).encode() + b"\r\n" + msg


def verify(keys: dict[str, Any], data: bytes, **cfg: Any) -> Any:
    z = zones(keys)
    z.update(cfg.pop("extra_zones", {}))
    with Harness({"dkim": cfg}, plugins={"dkim": DKIMPlugin}, zones=z) as h:
        return h.send(data, client_ip=UNTRUSTED)


def test_verify_pass_properties(keys: dict[str, Any]) -> None:
    data = signed(keys)
    out = verify(keys, data)
    (r,) = out.results
    assert (r.method, r.result) == ("dkim", "pass")
    props = dict(r.properties)
    b = sig_tags(data.split(b"\r\nFrom:")[0].decode())["b"]
    assert props == {
        "header.d": "example.com",
        "header.i": "@example.com",
        "header.s": "r2026",
        "header.a": "rsa-sha256",
        "header.b": b[:8],
    }
    assert [s.name for s in out.symbols] == ["DKIM_VALID"]


def test_changed_body_and_changed_header_fail(keys: dict[str, Any]) -> None:
    data = signed(keys)
    body_changed = data.replace(b"see you.", b"see you!")
    hdr_changed = data.replace(b"Subject: hello there", b"Subject: hello thera")
    assert [r.result for r in verify(keys, body_changed).results] == ["fail"]
    assert "body hash" in verify(keys, body_changed).results[0].reason
    assert [r.result for r in verify(keys, hdr_changed).results] == ["fail"]


def test_length_tag_with_appended_text_does_not_pass(keys: dict[str, Any]) -> None:
    d = dkim.DKIM(MSG)
    sig = d.sign(
        b"r2026",
        b"example.com",
        load_key(str(keys["rsa"][0])).pkcs1_pem(),
        include_headers=[b"from", b"to", b"subject"],
        length=True,
        canonicalize=(b"relaxed", b"relaxed"),
    )
    exact = sig + MSG
    appended = exact + b"Buy now: http://spam.test/\r\n"
    assert dkim.verify(appended, dnsfunc=dnsfunc_for(keys))  # dkimpy alone says valid
    assert [r.result for r in verify(keys, exact).results] == ["pass"]
    res = verify(keys, appended).results
    assert [r.result for r in res] == ["policy"]
    assert "l=" in res[0].reason


def test_rsa_sha1_never_passes(keys: dict[str, Any]) -> None:
    d = dkim.DKIM(MSG, signature_algorithm=b"rsa-sha1")
    sig = d.sign(
        b"r2026",
        b"example.com",
        load_key(str(keys["rsa"][0])).pkcs1_pem(),
        include_headers=[b"from", b"to", b"subject"],
    )
    assert dkim.verify(sig + MSG, dnsfunc=dnsfunc_for(keys))  # dkimpy accepts it
    (r,) = verify(keys, sig + MSG).results
    assert r.result == "fail" and "rsa-sha1" in r.reason


def test_small_rsa_key_fails(keys: dict[str, Any], tmp_path: Path) -> None:
    # cryptography refuses to make keys under 1024 bits; OpenSSL's command still does
    pem = subprocess.run(
        ["openssl", "genrsa", "-traditional", "768"], capture_output=True, check=True, timeout=30
    ).stdout
    small = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(small, rsa.RSAPrivateKey)
    sig = dkim.DKIM(MSG, minkey=512).sign(
        b"weak", b"example.com", pem, include_headers=[b"from", b"subject"]
    )
    out = verify(
        keys, sig + MSG, extra_zones={"weak._domainkey.example.com": {"TXT": [public_txt(small)]}}
    )
    (r,) = out.results
    assert r.result == "fail" and "768 bits" in r.reason


def test_dns_errors(keys: dict[str, Any]) -> None:
    data = signed(keys)
    tmp = verify(keys, data, extra_zones={"r2026._domainkey.example.com": {"TXT": "TIMEOUT"}})
    assert [r.result for r in tmp.results] == ["temperror"]
    nokey = signed(keys, name="rsa_new").replace(b"s=r2027", b"s=gone")
    assert [r.result for r in verify(keys, nokey).results] == ["permerror"]
    badrec = verify(
        keys, data, extra_zones={"r2026._domainkey.example.com": {"TXT": ["v=DKIM1; p=!!"]}}
    )
    assert [r.result for r in badrec.results] == ["permerror"]


def test_malformed_signature_is_neutral(keys: dict[str, Any]) -> None:
    data = b"DKIM-Signature: v=1; a=rsa-sha256; this is not a tag list\r\n" + MSG
    (r,) = verify(keys, data).results
    assert r.result == "neutral"
    data = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=x; h=from\r\n" + MSG
    (r,) = verify(keys, data).results
    assert r.result == "neutral" and dict(r.properties)["header.d"] == "example.com"


def test_at_most_max_signatures_top_down(keys: dict[str, Any]) -> None:
    # five signatures: ed (top), then four rsa ones below it
    base = MSG
    for name in ("rsa", "rsa", "rsa", "rsa", "ed"):
        base = signed(keys, base, name=name)
    out = verify(keys, base)
    assert [dict(r.properties)["header.a"] for r in out.results] == [
        "ed25519-sha256",
        "rsa-sha256",
        "rsa-sha256",
    ]
    out = verify(keys, base, max_signatures=5)
    assert len(out.results) == 5


@pytest.mark.parametrize(
    ("actions", "zone", "verdict", "code"),
    [
        ({}, "TIMEOUT", "continue", None),
        ({"temperror": "tempfail"}, "TIMEOUT", "tempfail", "451"),
        ({"fail": "reject"}, "bad", "reject", "550"),
        ({"fail": "quarantine"}, "bad", "quarantine", None),
        ({"fail": "reject"}, "good", "continue", None),
    ],
)
def test_actions(
    keys: dict[str, Any], actions: dict[str, str], zone: str, verdict: str, code: str | None
) -> None:
    data = signed(keys)
    if zone == "bad":
        data = data.replace(b"see you.", b"see you?")
    extra = {"r2026._domainkey.example.com": {"TXT": "TIMEOUT"}} if zone == "TIMEOUT" else {}
    out = verify(keys, data, actions=actions, extra_zones=extra)
    assert out.verdict == verdict
    if code:
        v = out.decision.verdict
        assert v is not None and getattr(v, "code", None) == code
        assert getattr(v, "xcode", "") == ("4.7.5" if code == "451" else "5.7.20")


def test_rfc8463_example_verifies() -> None:
    data = (
        (DATA / "rfc8463-signed.eml").read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    )
    z = {
        "brisbane._domainkey.football.example.com": {
            "TXT": [(DATA / "rfc8463-ed25519.txt").read_text().strip()]
        },
        "test._domainkey.football.example.com": {
            "TXT": [(DATA / "rfc8463-rsa.txt").read_text().strip()]
        },
    }
    with Harness({"dkim": {}}, plugins={"dkim": DKIMPlugin}, zones=z) as h:
        out = h.send(data, client_ip=UNTRUSTED)
    got = [
        (r.result, dict(r.properties)["header.a"], dict(r.properties)["header.s"])
        for r in out.results
    ]
    assert got == [("pass", "ed25519-sha256", "brisbane"), ("pass", "rsa-sha256", "test")]
    # and the RFC's private key reproduces the RFC's ed25519 signature
    seed = base64.b64decode((DATA / "rfc8463-ed25519.seed").read_text().strip())
    assert public_txt(ed25519.Ed25519PrivateKey.from_private_bytes(seed)).endswith(
        (DATA / "rfc8463-ed25519.txt").read_text().strip().split("p=")[1]
    )
    tampered = data.replace(b"We lost the game.", b"We won the game.")
    with Harness({"dkim": {}}, plugins={"dkim": DKIMPlugin}, zones=z) as h:
        out = h.send(tampered, client_ip=UNTRUSTED)
    assert [r.result for r in out.results] == ["fail", "fail"]


# --- command line ---------------------------------------------------------------------------


def milterd(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [str(Path(sys.executable).parent / "milterd")]
    if config:
        cmd += ["-c", str(config)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize(("ktype", "alg"), [("rsa", "rsa-sha256"), ("ed25519", "ed25519-sha256")])
def test_keygen_and_testkey(tmp_path: Path, ktype: str, alg: str) -> None:
    out_dir = tmp_path / "keys"
    r = milterd(
        "dkim",
        "keygen",
        "--domain",
        "example.com",
        "--selector",
        "s1",
        "--type",
        ktype,
        "--bits",
        "1024",
        "--out",
        str(out_dir),
    )
    assert r.returncode == 0, r.stderr
    (path,) = out_dir.iterdir()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    key = load_key(str(path))
    assert key.algorithm == alg
    record_line = next(x for x in r.stdout.splitlines() if "IN TXT" in x)
    assert record_line.startswith("s1._domainkey.example.com. IN TXT")
    txt = "".join(part for part in record_line.split('"')[1::2])
    assert txt == key.public_record()
    # refuses to overwrite
    r2 = milterd(
        "dkim",
        "keygen",
        "--domain",
        "example.com",
        "--selector",
        "s1",
        "--type",
        ktype,
        "--out",
        str(out_dir),
    )
    assert r2.returncode != 0 and "exists" in r2.stderr

    other = ed25519.Ed25519PrivateKey.generate()
    with ZoneServer(
        {
            "s1._domainkey.example.com": {"TXT": [txt]},
            "s2._domainkey.example.com": {"TXT": [public_txt(other)]},
        }
    ) as dns_:
        conf = tmp_path / "milterd.toml"
        conf.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns_.port}"]\ntimeout = 2\n\n'
            f'[plugins.dkim]\nsigning = [{{pattern = "example.com", keys = ["a"]}}]\n'
            f'[plugins.dkim.keys.a]\nselector = "s1"\nfile = "{path}"\n'
        )
        ok = milterd("dkim", "testkey", config=conf)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert "OK   a: s1._domainkey.example.com" in ok.stdout
        conf.write_text(conf.read_text().replace('selector = "s1"', 'selector = "s2"'))
        bad = milterd("dkim", "testkey", config=conf)
        assert bad.returncode == 1 and "publishes a different key" in bad.stdout
        conf.write_text(conf.read_text().replace('selector = "s2"', 'selector = "s3"'))
        missing = milterd("dkim", "testkey", config=conf)
        assert missing.returncode == 1 and "no such name" in missing.stdout
        # a character class is a wildcard too: nothing to look up, not a bogus name
        conf.write_text(conf.read_text().replace('"example.com"', '"[ab].example.com"'))
        cls = milterd("dkim", "testkey", config=conf)
        assert cls.returncode == 0 and "SKIP a: no fixed domain" in cls.stdout, cls.stdout
        # a wildcard local part still fixes the domain: looked up (it was skipped, exit 0)
        conf.write_text(conf.read_text().replace('"[ab].example.com"', '"*@example.com"'))
        local = milterd("dkim", "testkey", config=conf)
        assert local.returncode == 1 and "no such name" in local.stdout, local.stdout


def test_signing_is_fast(keys: dict[str, Any]) -> None:
    """OpenSSL signing: well under dkimpy's ~8 ms per RSA-2048 signature."""
    key = load_key(str(keys["rsa"][0]))
    hb, body = MSG.split(b"\r\n\r\n", 1)
    hs = parse_headers(hb + b"\r\n")
    t = time.perf_counter()
    for _ in range(50):
        fast_sign(hs, body, key, domain="example.com", selector="s", include_headers=["from"])
    assert (time.perf_counter() - t) / 50 < 0.004


def test_resolver_bug_is_temperror_not_a_crash(keys: dict[str, Any]) -> None:
    class Broken:
        def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
            raise RuntimeError("resolver exploded")

    with Harness({"dkim": {}}, plugins={"dkim": DKIMPlugin}, resolver=Broken()) as h:
        out = h.send(signed(keys), client_ip=UNTRUSTED)
    assert not out.errors
    assert [r.result for r in out.results] == ["temperror"]


def test_sign_local_false_needs_real_trust(keys: dict[str, Any]) -> None:
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["ed"]}], sign_local=False)
    cfg = {"milterd": {"internal_networks": []}, "plugins": cfg}
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        local = h.send(MSG, client_ip="127.0.0.1")
        authed = h.send(MSG, client_ip="127.0.0.1", auth="alice")
    assert local.header("DKIM-Signature") is None
    assert [r.result for r in local.results] == ["none"]  # verified instead
    assert authed.header("DKIM-Signature") is not None


def test_fast_body_canonicalization_equals_dkimpy() -> None:
    import random

    from dkim.canonicalization import CanonicalizationPolicy
    from milterd_plugins.dkim.keys import canonicalize_body

    rnd = random.Random(8463)
    pieces = [b"a", b" ", b"\t", b"\r\n", b"\r", b"\n", b"x", b"  ", b"\r\n\r\n"]
    for c in (b"relaxed/relaxed", b"relaxed/simple", b"simple/simple", b"simple/relaxed"):
        pol = CanonicalizationPolicy.from_c_value(c)
        for _ in range(5000):
            body = b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 14)))
            assert canonicalize_body(pol, body) == pol.canonicalize_body(body), (c, body)


def outcome(fn: Any) -> str:
    """``True``/``False``, or the exception's class name."""
    try:
        return str(bool(fn()))
    except Exception as e:
        return type(e).__name__


def test_fast_verifier_agrees_with_dkimpy(keys: dict[str, Any]) -> None:
    """Our OpenSSL verify path gives dkimpy's answer on signed and tampered messages."""
    from milterd_plugins.dkim.verify import FastDKIM

    key = load_key(str(keys["rsa"][0]))
    pem = key.pkcs1_pem()
    dns = dnsfunc_for(keys)
    tamper: list[Any] = [
        lambda m: m,
        lambda m: m.replace(b"see you.", b"see you!"),
        lambda m: m.replace(b"see you.", b"see  you.\t"),
        lambda m: m.replace(b"Subject: hello there", b"Subject:  hello   there "),
        lambda m: m.replace(b"Subject: hello there", b"Subject: hello where"),
        lambda m: m + b"\r\n\r\n",
        lambda m: m + b"appended\r\n",
        lambda m: m.replace(b"To:", b"From: eve@example.org\r\nTo:"),
    ]
    checked = 0
    for c in ((b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple")):
        for length in (False, True):
            sig = dkim.DKIM(MSG).sign(
                b"r2026", b"example.com", pem, canonicalize=c, length=length,
                include_headers=[b"from", b"to", b"subject", b"subject"],
            )  # fmt: skip
            for t in tamper:
                data = t(sig + MSG)
                ours = outcome(lambda d=data: FastDKIM(d).verify(0, dnsfunc=dns))
                theirs = outcome(lambda d=data: dkim.DKIM(d).verify(0, dnsfunc=dns))
                assert ours == theirs, (c, length, data)
                checked += 1
    assert checked == 48


class _Recorder:
    """A hasher that keeps what it is fed."""

    def __init__(self) -> None:
        self.data = b""

    def update(self, b: bytes) -> None:
        self.data += b


def test_signed_header_hash_input_equals_dkimpy() -> None:
    """hash_signed_headers feeds the hash exactly what dkimpy's select_headers +
    canonicalize_headers + hash_headers feed it, on generated fields: repeated and
    absent names, names in any case or with trailing space, folds with CRLF or bare LF,
    runs of space and tab, bare CR, vertical tab and form feed."""
    import random

    from dkim.canonicalization import CanonicalizationPolicy
    from milterd_plugins.dkim.keys import hash_signed_headers

    rnd = random.Random(6376)
    names = [b"From", b"from", b"FROM ", b"To", b"Subject", b"Subject\t", b"X-A", b"Date"]
    pieces = [b"a", b"b c", b" ", b"  ", b"\t", b" \t ", b"\r\n ", b"\r\n\t", b"\n ",
              b"\r", b"\x0b", b"\x0c", b"\xc3\xa9", b";", b""]  # fmt: skip
    include_from = [b"from", b"to", b"subject", b"date", b"x-a", b"cc", b"reply-to"]
    checked = 0
    for c in (b"relaxed/relaxed", b"simple/simple"):
        pol = CanonicalizationPolicy.from_c_value(c)
        relaxed = c.startswith(b"relaxed")
        for _ in range(3000):
            headers = [
                [rnd.choice(names), b"".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 6)))
                 + b"\r\n"]
                for _ in range(rnd.randint(0, 8))
            ]  # fmt: skip
            include = [rnd.choice(include_from) for _ in range(rnd.randint(1, 9))]
            sighdr = (b"DKIM-Signature", b" v=1; a=rsa-sha256;\r\n\tbh=x; b=abc\r\n d=e")
            ours, theirs = _Recorder(), _Recorder()
            hash_signed_headers(ours, relaxed, headers, include, sighdr)
            canon = pol.canonicalize_headers(headers)
            dkim.hash_headers(theirs, pol, canon, include, sighdr, {})
            assert ours.data == theirs.data, (c, headers, include)
            checked += 1
    assert checked == 6000


@pytest.mark.parametrize(
    "fields",
    [
        [("From", b" Alice <alice@example.com>"), ("Subject", b" hi")],
        [("Received", b" from a\n\tby b\n\tfor <c>; now"), ("X-Empty", b"")],
        [("Received", b" from a\r\n by b"), ("Subject", b" tab\there  ")],
        [("Subject", b" bare\rcr")],
        # not as rfc822_parse would split them: the whole block goes through it
        [("Bad Name", b" x"), ("From", b" a@example.com")],
        [("Subject", b" two\n\nlines"), ("From", b" a@example.com")],
    ],
)
def test_signing_headers_equal_rfc822_parse(fields: list[tuple[str, bytes]]) -> None:
    from milterd_plugins.dkim import signing_headers

    from milterd import Header, Message

    msg = Message([Header(n, r.decode("utf-8", "surrogateescape").lstrip(" "), r)
                   for n, r in fields], None)  # fmt: skip
    try:
        expected: Any = parse_headers(msg.header_bytes())
    except Exception as e:
        expected = type(e)
    try:
        got: Any = signing_headers(msg)
    except Exception as e:
        got = type(e)
    assert got == expected


@pytest.mark.parametrize(
    "value",
    [
        "Alice <alice@example.com>",
        "alice@Example.COM",
        "  <alice@example.com>  ",
        "J. R. Doe <jr@example.org>",
        "=?utf-8?q?Caf=C3=A9?= <cafe@example.net>",
        '"Doe, John" <john@example.com>',
        "Alice <alice@example.com> (comment)",
        "alice@example.com, bob@example.com",
        "Group: alice@example.com;",
        "<@route:alice@example.com>",
        "Alice <alice@[192.0.2.1]>",
        "not an address",
        "alice@",
        "",
    ],
)
def test_from_address_fast_path_agrees_with_getaddresses(value: str) -> None:
    """The regular-expression shortcut gives what the getaddresses path gives."""
    from milterd_plugins.addresses import getaddresses
    from milterd_plugins.dkim import from_address

    from milterd import Header, Message

    got = from_address(Message([Header("From", value, b" " + value.encode())], None))
    addrs = [a for _, a in getaddresses([value]) or () if a]
    if len(addrs) != 1 or not all(addrs[0].rpartition("@")[::2]):
        assert got[0] is None
    else:
        assert got == (addrs[0].strip().lower(), "")


def test_header_block_dkimpy_cannot_parse_is_delivered_unsigned(
    keys: dict[str, Any], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # signing_headers falls back to dkimpy's parser for fields an MTA should not send
    # (a name with control characters, an unindented line inside a value), and that parser
    # raises on what it cannot read: the message is delivered unsigned with a warning,
    # not failed (it raised out of finalize before: found by tests/unit/test_robustness.py
    # through the harness, which passed such fields on).
    import milterd_plugins.dkim as dkim_plugin

    def unparseable(message: Any) -> Any:
        raise dkim.MessageFormatError("Unexpected characters in RFC822 header: b'\\x01'")

    monkeypatch.setattr(dkim_plugin, "signing_headers", unparseable)
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}])
    with caplog.at_level("WARNING"), Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, auth="alice")
    assert out.errors == [] and out.verdict == "continue"
    assert out.header("DKIM-Signature") is None
    assert "not signing: header block not parseable" in caplog.text


# --- review fixes: From not signed, key names, From domains, long domains ---------------------


def signed_without_from(keys: dict[str, Any], msg: bytes = MSG) -> bytes:
    """A valid rsa-sha256 signature whose h= leaves out From (dkimpy's sign refuses to
    make one; its signer's gen_header does not check)."""
    import hashlib

    from dkim.canonicalization import CanonicalizationPolicy
    from dkim.crypto import parse_pem_private_key

    pem = load_key(str(keys["rsa"][0])).pkcs1_pem()
    policy = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
    d = dkim.DKIM(msg)
    d.hasher = hashlib.sha256
    bh = base64.b64encode(hashlib.sha256(policy.canonicalize_body(d.body)).digest())
    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"c", b"relaxed/relaxed"),
        (b"d", b"example.com"),
        (b"s", b"r2026"),
        (b"h", b"subject : to"),
        (b"bh", bh),
        (b"b", b"0" * 60),
    ]
    value = d.gen_header(
        fields, [b"subject", b"to"], policy, b"DKIM-Signature", parse_pem_private_key(pem)
    )
    return b"DKIM-Signature: " + bytes(value) + msg


def test_signature_not_covering_from_is_permerror(keys: dict[str, Any]) -> None:
    data = signed_without_from(keys)
    assert dkim.verify(data, dnsfunc=dnsfunc_for(keys))  # dkimpy alone: valid
    forged = data.replace(b"From: Alice <alice@example.com>", b"From: CEO <ceo@example.com>")
    (r,) = verify(keys, forged).results
    assert (r.result, r.reason) == ("permerror", "From not signed")


class Recording:
    """A resolver that records every lookup and fails like a broken network."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        from milterd import DNSTempError

        self.names.append(name)
        raise DNSTempError(f"{name}: timeout")


@pytest.mark.parametrize(
    ("s", "d"),
    [
        ("a..b", "example.com"),
        ("x" * 64, "example.com"),
        ("s", ("a" * 60 + ".") * 5 + "com"),
        ("s", "exa mple.com"),
        ("", "example.com"),
        ("s\\", "example.com"),
    ],
)
def test_invalid_key_name_is_permerror_without_a_lookup(s: str, d: str) -> None:
    data = (
        f"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d={d}; s={s}; h=from;"
        " bh=AAAA; b=AAAA\r\n"
    ).encode() + MSG
    res = Recording()
    cfg = {"dkim": {"actions": {"temperror": "tempfail"}}}
    with Harness(cfg, plugins={"dkim": DKIMPlugin}, resolver=res) as h:
        out = h.send(data, client_ip=UNTRUSTED)
    assert out.verdict == "continue"  # not deferred forever
    assert [r.result for r in out.results] in (["permerror"], ["neutral"])
    assert res.names == []


def test_utf8_key_name_is_looked_up_as_a_labels(keys: dict[str, Any]) -> None:
    from milterd_plugins.dkim.names import key_name

    assert key_name("Sel", "Bücher.Example.") == "sel._domainkey.xn--bcher-kva.example"


@pytest.mark.parametrize(
    ("from_", "d"),
    [
        ("j@bücher.example", "xn--bcher-kva.example"),
        ("J@B\u00dcCHER.EXAMPLE", "xn--bcher-kva.example"),
        ("a@example.com.", "example.com"),
        ("a@[192.0.2.1]", None),
        ("a@exa_mple.com", None),
    ],
)
def test_from_domain_signed_in_a_labels_or_not_at_all(
    keys: dict[str, Any], from_: str, d: str | None
) -> None:
    msg = f"From: {from_}\r\nTo: b@example.net\r\nSubject: s\r\n\r\nbody\r\n".encode()
    cfg = sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}], on_error="tempfail")
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(msg, auth="alice")
    assert not out.errors and out.verdict == "continue"
    sig = out.header("DKIM-Signature")
    assert (sig_tags(sig)["d"] if sig else None) == d
    if d is not None:
        z = {f"r2026._domainkey.{d}.": keys["rsa"][1].encode()}
        assert dkim.verify(dl(out), dnsfunc=lambda n, timeout=5: z.get(n.decode()))


def test_signing_table_and_configured_domains_in_a_labels(keys: dict[str, Any]) -> None:
    rule = SigningRule(pattern="*@Bücher.Example", keys=["rsa"], domain="Bücher.Example.")
    assert rule.pattern == "*@xn--bcher-kva.example"
    assert rule.domain == "xn--bcher-kva.example"
    with pytest.raises(Exception, match="invalid domain"):
        SigningRule(pattern="*", keys=["rsa"], domain="[192.0.2.1]")


def long_domain(n: int) -> str:
    """A domain of exactly ``n`` characters, labels of at most 40."""
    body = "x" * (n - 4)
    return ".".join(body[i : i + 40] for i in range(0, len(body), 40)) + ".com"


@pytest.mark.parametrize("canon", [("relaxed", "relaxed"), ("simple", "simple")])
def test_long_domains_verify(keys: dict[str, Any], canon: tuple[str, str]) -> None:
    # dkimpy's fold broke d= and i= of 69+ characters inside the value
    from milterd_plugins.dkim.verify import NoKey, verify_message

    for name in ("rsa", "ed"):
        key = load_key(str(keys[name][0]))
        for n in range(40, 121):
            dom = long_domain(n)
            hb = f"From: a@{dom}\r\nSubject: s\r\n".encode()
            value = fast_sign(
                parse_headers(hb),
                b"x\r\n",
                key,
                domain=dom,
                selector="s",
                include_headers=["from", "subject"],
                canonicalize=canon,
            )
            tags = dict((k.strip(), v) for k, _, v in (t.partition("=") for t in value.split(";")))
            assert tags["d"] == dom and tags["i"] == "@" + dom, value
            data = b"DKIM-Signature: " + value.encode() + b"\r\n" + hb + b"\r\nx\r\n"
            rec = keys[name][1].encode()
            assert dkim.verify(data, dnsfunc=lambda _n, timeout=5, r=rec: r), (n, value)

            def fetch(nm: str, want: str = f"s._domainkey.{dom}", r: bytes = rec) -> bytes:
                if nm != want:
                    raise NoKey(nm)
                return r

            assert [x.result for x in verify_message(data, fetch)] == ["pass"], (n, value)


def test_fold_signature_is_dkimpys_fold_when_that_is_valid() -> None:
    from milterd_plugins.dkim.keys import fold_signature

    fields = [
        (b"v", b"1"),
        (b"a", b"rsa-sha256"),
        (b"d", b"example.com"),
        (b"h", b"from : to : subject : date : message-id : mime-version : content-type"),
        (b"bh", b"A" * 44),
        (b"b", b"B" * 344),
    ]
    joined = b"; ".join(b"=".join(f) for f in fields)
    assert fold_signature(fields, 14) == dkim.fold(joined, namelen=14)
    assert fold_signature(fields, 14, end=b"\r\n") == dkim.fold(joined + b"\r\n", namelen=14)


def test_removing_the_b_placeholder_cuts_what_dkimpys_regex_cuts() -> None:
    """fast_sign cuts the placeholder after the last b= instead of dkimpy's RE_BTAG (8 us
    a signature): for every fold layout (domain, selector and h= lengths move the folds
    across the b= tag, the bh= value, inside the placeholder) the cut equals the regex."""
    from milterd_plugins.dkim.keys import _PLACEHOLDER, fold_signature, remove_b_placeholder

    names = [b"from", b"to", b"cc", b"subject", b"date", b"reply-to", b"message-id", b"b"]
    checked = 0
    for dlen in range(1, 60, 3):
        for slen in range(1, 20, 4):
            for n in range(1, 9):
                for bh in (b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=", b"Xb="):
                    fields = [
                        (b"v", b"1"),
                        (b"a", b"rsa-sha256"),
                        (b"d", b"d" * dlen + b".example"),
                        (b"s", b"s" * slen),
                        (b"h", b" : ".join(names[:n])),
                        (b"bh", bh),
                        (b"b", _PLACEHOLDER),
                    ]
                    for namelen in (14, 20):
                        value = fold_signature(fields, namelen)
                        assert remove_b_placeholder(value) == dkim.RE_BTAG.sub(b"\\1", value)
                        checked += 1
    assert checked > 3000
    # anything but the placeholder after the last b= goes through the regex
    odds = (b"v=1; b=123", b"v=1; b=", b"v=1;b=" + _PLACEHOLDER + b"\r\n", b"b=" + _PLACEHOLDER)
    for odd in odds:
        assert remove_b_placeholder(odd) == dkim.RE_BTAG.sub(b"\\1", odd)


_WSP = st.sampled_from([b"", b" ", b"\t", b"\r\n ", b"\r\n\t", b"\n ", b"  "])
_TAG_VALUE = st.one_of(
    st.binary(max_size=12).map(lambda b: bytes(c for c in b if 32 < c < 127 and c != 59)),
    st.sampled_from([b"b=", b"b =", b" b=", b"x b\r\n =y", b"B=", b"bh=", b"b", b"=b="]),
)


@st.composite
def _signature_values(draw: st.DrawFn) -> bytes:
    """Tag lists like a DKIM-Signature's, with white space and folds anywhere, b= tags
    in other tags' values, and a last b= tag holding the (folded) placeholder."""
    from milterd_plugins.dkim.keys import _PLACEHOLDER

    names = draw(st.lists(st.sampled_from([b"v", b"a", b"h", b"bh", b"s", b"b", b"B"]), max_size=5))
    tags = [
        draw(_WSP) + name + draw(_WSP) + b"=" + draw(_WSP) + draw(_TAG_VALUE) + draw(_WSP)
        for name in names
    ]
    ph = bytearray(_PLACEHOLDER)
    folds = st.one_of(st.just(b"\r\n "), _WSP)  # mostly as fold_signature folds
    for at, fold in draw(st.lists(st.tuples(st.integers(0, 60), folds), max_size=3)):
        ph[at:at] = fold
    last = (
        draw(_WSP)
        + draw(st.sampled_from([b"b", b"B"]))
        + draw(st.sampled_from([b"=", b" =", b"\r\n ="]))
        + bytes(ph)
        + draw(st.sampled_from([b"", b"\r\n ", b"\r\n", b";", b" "]))
    )
    return draw(st.sampled_from([b";", b"; "])).join([*tags, last])


@settings(max_examples=1000, deadline=None)
@given(_signature_values())
def test_removing_the_b_placeholder_equals_the_regex_on_any_tag_list(value: bytes) -> None:
    """Whatever the tag list, the cut gives what dkimpy's regex gives: a fold at the very
    end or a ``b <FWS>=`` elsewhere (both found by review) go through the regex."""
    from milterd_plugins.dkim.keys import remove_b_placeholder

    assert remove_b_placeholder(value) == dkim.RE_BTAG.sub(b"\\1", value)


def test_removing_the_b_placeholder_found_by_review() -> None:
    from milterd_plugins.dkim.keys import _PLACEHOLDER, remove_b_placeholder

    for value in (
        b" b=" + _PLACEHOLDER + b"\r\n ",  # the regex keeps the final fold
        b"\tb =\tb\r\n ; \tb=" + _PLACEHOLDER,  # "b =" is a b tag to the regex too
    ):
        assert remove_b_placeholder(value) == dkim.RE_BTAG.sub(b"\\1", value)


def test_revoked_key_fails(keys: dict[str, Any]) -> None:
    data = signed(keys)
    out = verify(keys, data, extra_zones={"r2026._domainkey.example.com": {"TXT": ["v=DKIM1; p="]}})
    (r,) = out.results
    assert r.result == "fail" and "revoked" in r.reason


def test_negative_expire_is_refused(keys: dict[str, Any]) -> None:
    with pytest.raises(Exception, match="expire"):
        Harness(
            sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}], expire=-60),
            plugins={"dkim": DKIMPlugin},
        )


def test_keygen_refuses_what_the_config_would_refuse(tmp_path: Path) -> None:
    """Found by a CLI review: keygen wrote a key and printed a record and a snippet for a
    domain or selector the config then refused, and exited 0."""
    for domain, selector, why in (
        ("", "s1", "invalid domain"),
        ("ex ample;org", "s1", "invalid domain"),
        ("example.org", "s;1", "invalid selector"),
    ):
        r = milterd("dkim", "keygen", "--domain", domain, "--selector", selector,
                    "--type", "ed25519", "--out", str(tmp_path / "k"))  # fmt: skip
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "k").exists()
    r = milterd("dkim", "keygen", "--domain", "Bücher.example", "--selector", "s1",
                "--type", "ed25519", "--out", str(tmp_path / "k"))  # fmt: skip
    assert r.returncode == 0 and "s1._domainkey.xn--bcher-kva.example. IN TXT" in r.stdout


def test_testkey_without_keys_says_so(tmp_path: Path) -> None:
    conf = tmp_path / "m.toml"
    conf.write_text("[plugins.authres]\n")
    r = milterd("dkim", "testkey", config=conf)
    assert r.returncode == 1 and "no keys in [plugins.dkim]" in r.stderr


def test_a_bad_plugin_section_is_one_line_naming_the_key(tmp_path: Path) -> None:
    """Plugin commands validate their section as config check does: file, section, key."""
    conf = tmp_path / "m.toml"
    conf.write_text("[plugins.dkim]\nmax_signatures = 'many'\n")
    r = milterd("dkim", "testkey", config=conf)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {conf}: [plugins.dkim] max_signatures: Input should be a valid integer, "
        "unable to parse string as an integer"
    ]


@pytest.mark.parametrize(
    ("extra", "identity", "result", "why"),
    [
        ("s=email:tlsrpt; ", None, "pass", ""),  # a list holding email: usable
        ("s=*; ", None, "pass", ""),
        ("s=tlsrpt; ", None, "permerror", "key is not for email"),
        ("h=sha1; ", None, "permerror", "key does not allow sha256"),
        ("h=sha1:sha256; ", None, "pass", ""),
        ("t=s; ", "@sub.example.com", "permerror", "key forbids an i= subdomain (t=s)"),
        ("t=s; ", "@example.com", "pass", ""),
    ],
)
def test_the_key_records_s_h_and_t_tags_are_applied(
    keys: dict[str, Any], extra: str, identity: str | None, result: str, why: str
) -> None:
    """RFC 6376 3.6.1, which dkimpy does not apply (found by a conformance review):
    s= is a list of service types (s=email:tlsrpt was a permerror), h= restricts the
    hash (h=sha1 passed an rsa-sha256 signature), t=s forbids an i= subdomain."""
    record = keys["rsa"][1].replace("v=DKIM1; ", "v=DKIM1; " + extra)
    data = signed(keys, identity=identity)
    out = verify(keys, data, extra_zones={"r2026._domainkey.example.com": {"TXT": [record]}})
    (r,) = out.results
    assert r.result == result and why in (r.reason or ""), r


def test_a_key_in_testing_mode_is_treated_as_unsigned_when_it_fails(keys: dict[str, Any]) -> None:
    """RFC 6376 3.6.1 t=y: verifiers MUST NOT treat such mail differently from unsigned
    mail, even when the signature fails. It was a fail, rejected under fail = reject."""
    record = keys["rsa"][1].replace("v=DKIM1; ", "v=DKIM1; t=y; ")
    zone = {"r2026._domainkey.example.com": {"TXT": [record]}}
    tampered = signed(keys).replace(b"Hello", b"Hullo")
    out = verify(keys, tampered, actions={"fail": "reject"}, extra_zones=zone)
    (r,) = out.results
    assert r.result == "neutral" and "key in testing mode (t=y): fail" in (r.reason or "")
    assert out.verdict == "continue" and not [s for s in out.symbols if s.name == "DKIM_INVALID"]
    out = verify(keys, signed(keys), extra_zones=zone)
    assert out.results[0].result == "pass"


def test_a_key_record_with_v_not_first_is_refused(keys: dict[str, Any]) -> None:
    record = keys["rsa"][1].replace("v=DKIM1; k=rsa; ", "k=rsa; v=DKIM1; ")
    assert record != keys["rsa"][1]
    zone = {"r2026._domainkey.example.com": {"TXT": [record]}}
    assert verify(keys, signed(keys), extra_zones=zone).results[0].result == "permerror"


# --- found by a review against issue 3 (2026-12-03) ----------------------------------------


@pytest.mark.parametrize(
    "frm",
    [
        b"a@evil.example alice@example.com",  # two addresses, no comma
        b"ceo@bank.example  alice@example.com",
        b"x <alice@example.com> y",  # text after the address
        b"alice@example.com (unclosed",
        b"@example.com",  # no local part
    ],
)
def test_a_from_that_does_not_parse_as_one_address_is_not_signed(
    keys: dict[str, Any], frm: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """Python's getaddresses read 'a@evil.example alice@example.com' as '@example.com'
    (plus an empty entry dropped as nothing): the message was signed d=example.com."""
    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    msg = MSG.replace(b"Alice <alice@example.com>", frm)
    with caplog.at_level("WARNING"), Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(msg, auth="alice")
    assert out.header("DKIM-Signature") is None
    assert "not signing" in caplog.text


def test_a_key_reached_through_a_world_writable_directory_is_refused(
    keys: dict[str, Any], tmp_path: Path
) -> None:
    """Only the target's directories were checked: a link in a world-writable directory,
    which anyone could point at another key, was accepted."""
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "link.key").symlink_to(keys["rsa"][0])
    (shared / "dirlink").symlink_to(keys["dir"])
    shared.chmod(0o777)
    for path in (shared / "link.key", shared / "dirlink" / "rsa.key"):
        with pytest.raises(Exception, match=r"shared is writable by others"):
            load_key(str(path))
    tmp_path.chmod(0o700)
    safe = tmp_path / "safe"
    safe.mkdir(mode=0o700)
    (safe / "link.key").symlink_to(keys["rsa"][0])
    assert load_key(str(safe / "link.key")).algorithm == "rsa-sha256"


def test_finalize_changes_are_signed_whatever_the_order(keys: dict[str, Any]) -> None:
    """A plugin listed after dkim that changed a header at finalize broke the signature,
    and authres listed after dkim put its field above DKIM-Signature."""

    class Late:
        actions = frozenset({"change_header"})

        @hookimpl
        def finalize(self, ctx: Context) -> None:
            ctx.add_change(ChangeHeader("Subject", "late"))

    seen: list[bytes] = []

    class Keeper:  # declares no change: keeps its place after the signer, sees its work
        actions: frozenset[str] = frozenset()

        @hookimpl
        def finalize(self, ctx: Context, message: Message) -> None:
            seen.append(message.as_bytes())

    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}], sign_daemons=["sub"])
    plugins = {"dkim": cfg["dkim"], "authres": {}, "late": {}, "keeper": {}}
    with Harness(
        {"plugins": plugins}, plugins={"dkim": DKIMPlugin, "late": Late, "keeper": Keeper}
    ) as h:
        out = h.send(MSG, client_ip=UNTRUSTED, macros={"{daemon_name}": "sub"})
    assert out.header("Subject") == "late"
    assert [n for n, _ in out.headers()][:2] == ["DKIM-Signature", "Authentication-Results"]
    assert dkimpy_verify_all(dl(out), keys) == [True]
    assert seen == [dl(out)]


def test_a_testing_key_failure_takes_no_action_but_none(keys: dict[str, Any]) -> None:
    """t=y: a failing signature counts as no signature; the neutral action applied."""
    data = signed(keys).replace(b"see you.", b"see you?")
    testing = {"r2026._domainkey.example.com": {"TXT": [keys["rsa"][1] + "; t=y"]}}
    out = verify(keys, data, actions={"neutral": "reject"}, extra_zones=testing)
    assert out.verdict == "continue"
    out = verify(keys, data, actions={"none": "quarantine"}, extra_zones=testing)
    assert out.verdict == "quarantine"


@pytest.mark.parametrize(
    "pattern", ["@example.com", ".example.com", "example..com", "*@"]
)
def test_signing_patterns_that_can_never_match_are_refused(pattern: str) -> None:
    with pytest.raises(ValueError, match="never match"):
        SigningRule(pattern=pattern, keys=["k"])


def test_signing_patterns_are_trimmed() -> None:
    assert SigningRule(pattern=" Example.COM. ", keys=["k"]).pattern == "example.com"
    rule = SigningRule(pattern="*@example.com.", keys=["k"])
    assert match_rule([rule], "alice@example.com") is rule


def test_keygen_directory_is_private_and_key_size_bounded(tmp_path: Path) -> None:
    out = tmp_path / "new" / "keys"
    r = subprocess.run(
        f"umask 000; {Path(sys.executable).parent / 'milterd'} dkim keygen --domain "
        f"example.com --selector s --type ed25519 --out {out}",
        shell=True, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert oct(out.stat().st_mode & 0o777) == "0o700"
    (key,) = out.iterdir()
    tmp_path.chmod(0o700)
    assert load_key(str(key)).algorithm == "ed25519-sha256"  # start-up would take it
    big = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "b",
                  "--bits", "100000000", "--out", str(out))  # fmt: skip
    assert big.returncode == 2 and "8192" in big.stderr


def test_finalize_order_moves_only_changers_listed_after_a_signer() -> None:
    from milterd.config import PluginSettings
    from milterd.registry import ACTIONS, LoadedPlugin, finalize_order

    def p(name: str, actions: frozenset[str], signs: bool = False,
          after: tuple[str, ...] = ()) -> LoadedPlugin:  # fmt: skip
        return LoadedPlugin(name, object(), PluginSettings(), None, actions=actions,
                            signs=signs, after=after)  # fmt: skip

    add, none = frozenset({"add_header"}), frozenset[str]()
    observer, authres = p("observer", none), p("authres", add)
    assert finalize_order([observer, authres]) == [observer, authres]  # no signer: as listed
    dkim, arc = p("dkim", add, signs=True), p("arc", add, signs=True, after=("authres",))
    late, archive = p("late", frozenset({"change_header"})), p("archive", none)
    wants_sig = p("stamp", add, after=("dkim",))
    module = p("module", frozenset(ACTIONS))  # declares nothing: may change anything
    order = finalize_order([observer, dkim, archive, authres, wants_sig, late, arc, module])
    assert [x.name for x in order] == [
        "observer", "authres", "late", "module", "dkim", "archive", "stamp", "arc"
    ]
    # 'after' one that stays keeps a plugin in place, through a chain too
    s = p("s", add, signs=True)
    b, c = p("b", add, after=("s",)), p("c", add, after=("b",))
    assert [x.name for x in finalize_order([s, b, c])] == ["s", "b", "c"]
    q = p("q", frozenset({"quarantine"}))
    c2 = p("c2", add, after=("q",))
    assert [x.name for x in finalize_order([s, q, c2])] == ["s", "q", "c2"]


@pytest.mark.parametrize(
    "frm",
    [
        "Alice <alice@example.com>,",  # a trailing comma: legitimate, signed
        "alice@example.com, ",
        '"Doe, John" <alice@example.com>',
        "alice@example.com (Doe, John)",
        '"J \\"Q\\" Doe" <alice@example.com>',
        "=?utf-8?q?Ali=C3=A7e?= <alice@example.com>",
    ],
)
def test_common_from_forms_are_still_signed(keys: dict[str, Any], frm: str) -> None:
    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}])
    msg = MSG.replace(b"Alice <alice@example.com>", frm.encode())
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(msg, auth="alice")
    assert out.header("DKIM-Signature") is not None


def test_unclosed_quote_and_strict_python_parsers_cannot_hide_an_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import email.utils

    from milterd_plugins.addresses import getaddresses

    assert getaddresses(['"CEO <ceo@example.org> a@none.example']) is None
    # leading empty elements padded the count the swallowed address left short
    assert getaddresses([",,ceo@example.org x@none.example"]) is None
    assert getaddresses(["x@none.example, a@[(], ceo@example.org, b@[)]"]) is None
    # blank fields, comments and empty groups hold no address, and are no error
    for blank in ("", " ", "(none)", "\r\n ", "undisclosed-recipients:;"):
        assert getaddresses([blank]) == [], blank
    assert getaddresses(["a@x.example,", "b@y.example"]) == [("", "a@x.example"),
                                                             ("", "b@y.example")]  # fmt: skip
    # a third review: folds inside comments and quoted strings, a group name swallowing
    # an address, a domain the parser changes, brackets outside a domain
    for hidden in (
        'Bank (\r\n <a@evil.example>") <b@bank.example>,\r\n undisclosed-recipients:;',
        '"Bank\r\n <a@evil.example>" <b@bank.example>,\r\n undisclosed-recipients:;',
    ):
        got = getaddresses([hidden])
        assert got is not None and [a for _, a in got] == ["b@bank.example"], got
    assert getaddresses(["Bank <b@bank.example> :;", "a@evil.example"]) in (
        None, [("Bank", "b@bank.example"), ("", "a@evil.example")]
    )
    for bad in ("b@bank.example x", "b@bank.example\\", "b@bank.example\x00",
                "b@bank.example a@evil.example, [x@evil.example]", "a@x.example" * 2000):
        assert getaddresses([bad]) is None, bad  # fmt: skip
    for good in ('"Doe,\r\n John" <john@example.com>',
                 "John Doe <john@example.com> (Work,\r\n Office)", "alice@example.com\r\n"):
        assert getaddresses([good]) is not None, good  # fmt: skip
    # Python 3.11.10+/3.12.6+/3.13 parse strictly by default and answer [("", "")] for a
    # field they refuse: the wrapper must not read that as one clean (empty) entry.
    lenient = email.utils.getaddresses

    def strict_by_default(fields: Any, *, strict: bool = True) -> Any:
        return lenient(fields) if not strict else [("", "")]

    monkeypatch.setattr(email.utils, "getaddresses", strict_by_default)
    monkeypatch.setattr(email.utils, "supports_strict_parsing", True, raising=False)
    from milterd_plugins import addresses

    monkeypatch.setattr(addresses, "_LENIENT", {"strict": False})
    assert getaddresses(["ceo@example.org x@none.example"]) is None
    assert getaddresses(["a@none.example (Smith, John)"]) == [("Smith, John", "a@none.example")]


def test_from_address_is_linear_in_the_fields_length() -> None:
    from milterd_plugins.dkim import from_address

    from milterd import Header

    value = " " * 32000 + "!"
    t = time.perf_counter()
    got = from_address(Message([Header("From", value, b" " + value.encode())], None))
    assert got[0] is None and time.perf_counter() - t < 0.5  # quadratic: over 1 s here
    from milterd_plugins.addresses import bare

    t = time.perf_counter()
    bare("a [" * 100000)  # DMARC reads a malformed From of any length through it
    assert time.perf_counter() - t < 0.5


def test_key_paths_resolve_as_the_kernel_does(keys: dict[str, Any], tmp_path: Path) -> None:
    """Links with '..' in them and after them: '..' applies after a link is followed.
    Reading the path as text refused keys open() reads ('no such key file')."""
    tmp_path.chmod(0o700)
    real = tmp_path / "real"
    (real / "keys").mkdir(parents=True, mode=0o700)
    (real / "ssl").mkdir(mode=0o700)
    shutil.copy(keys["rsa"][0], real / "ssl" / "k.key")
    (real / "ssl" / "k.key").chmod(0o600)
    (real / "keys" / "cur.key").symlink_to("../ssl/k.key")
    (tmp_path / "etc").mkdir(mode=0o700)
    (tmp_path / "etc" / "dkimkeys").symlink_to("../real/keys")
    for path in ("etc/dkimkeys/cur.key", "etc/dkimkeys/../ssl/k.key"):
        assert load_key(str(tmp_path / path)).algorithm == "rsa-sha256", path
    sticky = tmp_path / "stk"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "dirlink").symlink_to(real / "ssl")
    with pytest.raises(Exception, match="stk is writable by others"):
        load_key(str(sticky / "dirlink" / "k.key"))  # the link's directory, sticky or not


@pytest.mark.parametrize("name", ["loop", "key.pem/", "key.pem/x", "x" * 300])
def test_a_key_path_the_system_refuses_is_a_key_file_error(tmp_path: Path, name: str) -> None:
    from milterd_plugins.dkim.keys import KeyFileError

    tmp_path.chmod(0o700)
    write_key(tmp_path / "key.pem", ed25519.Ed25519PrivateKey.generate())
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(KeyFileError, match=str(tmp_path)):
        load_key(f"{tmp_path}/{name}")  # (a Path would drop the final "/")


def test_a_u_label_d_is_looked_up_by_idna2008_not_idna2003() -> None:
    from milterd_plugins.dkim.names import key_name

    # Python's IDNA2003 codec read d=straße.de as strasse.de: a key published there (by
    # whoever owns strasse.de) passed for a From at straße.de, xn--strae-oqa.de, whose
    # p=reject DMARC then aligned with it (a review).
    assert key_name("s", "straße.de") == "s._domainkey.xn--strae-oqa.de"
    assert key_name("s", "a\u200db.example") is None


def test_a_u_label_d_is_reported_in_a_labels(keys: dict[str, Any]) -> None:
    # header.d="bücher.example" made Authentication-Results unparseable (RFC 8601
    # values are ASCII), so ARC did not seal; the key is looked up at the A-labels.
    import authres
    from milterd_plugins.authres import AuthenticationResults

    pem = Path(keys["rsa"][0]).read_bytes()
    sig = dkim.sign(MSG, b"r2026", "bücher.example".encode(), pem,
                    include_headers=[b"from", b"to", b"subject", b"date"])  # fmt: skip
    data = sig + MSG
    assert "d=bücher.example" in data.decode()
    z = {"r2026._domainkey.xn--bcher-kva.example": {"TXT": [keys["rsa"][1]]}}
    plugins = {"dkim": DKIMPlugin, "authres": AuthenticationResults}
    with Harness({"dkim": {}, "authres": {}}, plugins=plugins, zones=z) as h:
        out = h.send(data, client_ip=UNTRUSTED)
    (r,) = [r for r in out.results if r.method == "dkim"]
    assert r.result == "pass" and r.prop("header.d") == "xn--bcher-kva.example"
    field = out.header("Authentication-Results")
    assert field is not None
    authres.AuthenticationResultsHeader.parse("Authentication-Results: " + field)


def test_a_long_signed_field_name_is_never_broken_by_the_fold(keys: dict[str, Any]) -> None:
    """Found by a review: the fast path handed a 72-character name in h= to dkimpy's fold,
    which broke it in the middle: no verifier found that field, every signature failed."""
    from milterd_plugins.dkim.keys import fold_signature

    for n in (60, 72, 80, 200):
        name = "x-" + "h" * (n - 2)
        fields = [(b"v", b"1"), (b"h", b"from : " + name.encode() + b" : subject"),
                  (b"bh", b"A" * 44), (b"b", b"B" * 344)]  # fmt: skip
        folded = fold_signature(fields, 16)
        assert name.encode() in folded.replace(b"\r\n ", b" ").split(b" "), (n, folded)
        key = load_key(str(keys["rsa"][0]))
        hb = f"From: a@example.com\r\n{name}: v\r\nSubject: s\r\n".encode()
        value = fast_sign(parse_headers(hb), b"x\r\n", key, domain="example.com",
                          selector="s", include_headers=["from", name, "subject"])  # fmt: skip
        data = b"DKIM-Signature: " + value.encode() + b"\r\n" + hb + b"\r\nx\r\n"
        rec = keys["rsa"][1].encode()
        assert dkim.verify(data, dnsfunc=lambda _n, timeout=5, r=rec: r), (n, value)


@pytest.mark.parametrize("bad", ["x-\u00e9", "", "x y", "a:b"])
def test_signed_field_names_must_be_field_names(keys: dict[str, Any], bad: str) -> None:
    """Found by a review: oversign = ["x-é"] loaded and then every message to be signed
    failed at finalize (451); "" and "x y" went into h= as they were."""
    for key in ("oversign", "headers"):
        with pytest.raises(Exception, match="not a header field name"):
            Harness(
                sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}], **{key: ["from", bad]}),
                plugins={"dkim": DKIMPlugin},
            )


def test_a_field_name_with_a_semicolon_cannot_be_signed(keys: dict[str, Any]) -> None:
    """A ';' ends a tag: "x;b=abc" in h= turned the rest into tags of their own, and no
    verifier (dkimpy included) read the signature as written."""
    for key in ("oversign", "headers"):
        with pytest.raises(Exception, match="';' cannot be listed"):
            Harness(
                sign_config(keys, [{"pattern": "*", "keys": ["rsa"]}], **{key: ["from", "x;b=a"]}),
                plugins={"dkim": DKIMPlugin},
            )


@pytest.mark.parametrize("name", ["b=x", "b==", "x-b=1"])
def test_a_field_name_holding_b_equals_is_signed_as_dkimpy_signs(
    keys: dict[str, Any], monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """Found by a review: the b= placeholder was cut after the last b= only, while dkimpy
    empties every b= after a separator, a field name "b=x" in h= included: with such a
    name oversigned every signature failed, ours and dkimpy's verifier alike."""
    monkeypatch.setattr(dkim.time, "time", lambda: 1763780000)
    hb, body = MSG.split(b"\r\n\r\n", 1)
    incl = ["from", "subject", name]
    for kname in ("rsa", "ed"):
        key = load_key(str(keys[kname][0]))
        ours = fast_sign(parse_headers(hb + b"\r\n"), body, key, domain="example.com",
                         selector="s", include_headers=incl, timestamp=1763780000)  # fmt: skip
        if kname == "rsa":
            priv = key.pkcs1_pem()
        else:
            priv = base64.b64encode(key.key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                serialization.NoEncryption()))  # fmt: skip
        theirs = dkim.sign(MSG, b"s", b"example.com", priv,
                           include_headers=[h.encode() for h in incl],
                           canonicalize=(b"relaxed", b"relaxed"),
                           signature_algorithm=key.algorithm.encode())  # fmt: skip
        assert ("DKIM-Signature: " + ours + "\r\n").encode() == theirs
    # and through the plugin, oversigned: verifies with dkimpy and with our verifier
    cfg = sign_config(keys, [{"pattern": "example.com", "keys": ["rsa"]}], oversign=["from", name])
    with Harness(cfg, plugins={"dkim": DKIMPlugin}) as h:
        out = h.send(MSG, auth="alice")
    assert name in sig_tags(out.header("DKIM-Signature") or "")["h"]
    assert dkimpy_verify_all(dl(out), keys) == [True]
    with Harness({"dkim": {}}, plugins={"dkim": DKIMPlugin}, zones=zones(keys)) as h2:
        out2 = h2.send(dl(out), client_ip=UNTRUSTED)
    assert [r.result for r in out2.results] == ["pass"]


def test_keygen_snippet_loads_with_a_dotted_selector(tmp_path: Path) -> None:
    """Found by a review: [plugins.dkim.keys.2026.01] is a nested TOML table; the snippet
    keygen printed for a selector with a dot did not load."""
    out_dir = tmp_path / 'k"ey\\s'
    r = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "2026.01",
                "--type", "ed25519", "--out", str(out_dir))  # fmt: skip
    assert r.returncode == 0, r.stderr
    snippet = "\n".join(
        x[2:] if x.startswith(";   ") else x[len("; config: "):]
        for x in r.stdout.splitlines() if x.startswith(("; config: ", ";   "))
    )  # fmt: skip
    conf = tmp_path / "milterd.toml"
    conf.write_text(
        '[plugins.dkim]\nsigning = [{pattern = "example.com", keys = ["2026.01"]}]\n' + snippet
    )
    ok = milterd("config", "check", config=conf)
    assert ok.returncode == 0, ok.stdout + ok.stderr + snippet


@pytest.mark.parametrize(
    "record",
    [
        "v=DKIM1; h=sha1; k=ed25519; p={p}",
        "v=DKIM1; s=tlsrpt; k=ed25519; p={p}",
        "k=ed25519; v=DKIM1; p={p}",
        "v=DKIM1; k=ed25519; p={p}; foo",  # not a tag list: dkimpy refuses it
        "v=DKIM1; k=ed25519; k=ed25519; p={p}",  # a duplicate tag
    ],
)
def test_testkey_fails_a_matching_key_no_verifier_uses(tmp_path: Path, record: str) -> None:
    """Found by a review: testkey compared only k= and p=, and said OK for records every
    verifier (milterd's too) refuses."""
    out_dir = tmp_path / "keys"
    r = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                "--type", "ed25519", "--out", str(out_dir))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (path,) = out_dir.iterdir()
    p = dict(t.strip().split("=", 1) for t in load_key(str(path)).public_record().split(";"))["p"]
    with ZoneServer({"s1._domainkey.example.com": {"TXT": [record.format(p=p)]}}) as dns_:
        conf = tmp_path / "milterd.toml"
        conf.write_text(
            f'[dns]\nnameservers = ["127.0.0.1:{dns_.port}"]\ntimeout = 2\n\n'
            f'[plugins.dkim]\nsigning = [{{pattern = "example.com", keys = ["a"]}}]\n'
            f'[plugins.dkim.keys.a]\nselector = "s1"\nfile = "{path}"\n'
        )
        out = milterd("dkim", "testkey", config=conf)
    assert out.returncode == 1 and "unusable" in out.stdout, out.stdout


def test_keygen_refuses_a_directory_start_up_would_refuse(tmp_path: Path) -> None:
    """Found by a review: keygen wrote into an existing 0777 directory and printed a
    snippet; start-up then refused the key (a directory others can write)."""
    ww = tmp_path / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    r = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                "--type", "ed25519", "--out", str(ww))  # fmt: skip
    assert r.returncode == 2 and "writable by others" in r.stderr, r.stderr
    assert list(ww.iterdir()) == []


def test_keygen_checks_the_directory_start_up_sees_before_creating_anything(
    tmp_path: Path,
) -> None:
    """A review of the check above: a missing --out under a world-writable parent was
    created, then refused (left behind); a link in a sticky directory to a private one
    was refused although start-up, given the resolved path keygen prints, accepts it."""
    ww = tmp_path / "ww"
    ww.mkdir()
    ww.chmod(0o777)
    r = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                "--type", "ed25519", "--out", str(ww / "a" / "b"))  # fmt: skip
    assert r.returncode == 2 and list(ww.iterdir()) == [], r.stderr
    sticky, private = tmp_path / "sticky", tmp_path / "private"
    sticky.mkdir()
    sticky.chmod(0o1777)
    private.mkdir(mode=0o700)
    (sticky / "link").symlink_to(private)
    r = milterd("dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                "--type", "ed25519", "--out", str(sticky / "link"))  # fmt: skip
    assert r.returncode == 0, r.stderr
    (key,) = private.iterdir()
    assert f'file = "{key}"' in r.stdout
    load_key(str(key))  # as start-up loads it: accepted
