"""``milterd dkim import-opendkim``: opendkim.conf files (tests/data/opendkim) converted, the
fragment loaded by milterd, and mail from every SigningTable entry signed with the d=/s= OpenDKIM
would have used (each signature checked with dkimpy's verifier)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from milterd_plugins.dkim import DKIMPlugin
from milterd_plugins.dkim.keys import public_txt
from milterd_plugins.dkim.migrate import (
    MigrateError,
    Spec,
    convert_file,
    glob_covers,
    glob_disjoint,
    refile_patterns,
)

from milterd.config import Config, loads
from milterd.testing import Harness
from tests.support.keys import write_key

DATA = Path(__file__).resolve().parent.parent / "data" / "opendkim"
RSA_KEYS = ("mail.private", "example.com.mail", "example.com.ceo", "example.org.mail", "relay",
            "rsa", "boss", "sub")  # fmt: skip
MSG = (
    "From: Someone <{addr}>\r\nTo: bob@example.net\r\nSubject: hi\r\n"
    "Date: Sun, 22 Nov 2026 03:00:00 +0000\r\nMessage-ID: <1@x.test>\r\n\r\nHello.\r\n"
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    d = tmp_path_factory.mktemp("odkeys")
    d.chmod(0o700)
    pubs: dict[str, str] = {}
    for name in RSA_KEYS:
        k: Any = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        write_key(d / name, k)
        pubs[name] = public_txt(k)
    k = ed25519.Ed25519PrivateKey.generate()
    write_key(d / "ed", k)
    pubs["ed"] = public_txt(k)
    return d, pubs


@pytest.fixture
def conf(tmp_path: Path, keys: tuple[Path, dict[str, str]]) -> Path:
    """tests/data/opendkim copied with @DIR@ and @KEYDIR@ filled in."""
    out = tmp_path / "etc"
    out.mkdir()
    for f in DATA.iterdir():
        text = f.read_text().replace("@DIR@", str(out)).replace("@KEYDIR@", str(keys[0]))
        (out / f.name).write_text(text)
    return out


def load(path: Path) -> tuple[Config, str, Any]:
    res = convert_file(path)
    return loads(res.toml, "<fragment>"), res.toml, res


def sig_tags(value: str) -> dict[str, str]:
    return {
        k.strip(): "".join(v.split())
        for k, _, v in (p.partition("=") for p in value.split(";"))
        if k.strip()
    }


def signatures(
    cfg: Config, addr: str, dns: dict[str, str], client_ip: str = "127.0.0.1"
) -> list[tuple[str, str]]:
    """(d, s) of every signature on a message From ``addr``; each verified by dkimpy."""
    with Harness(cfg, plugins={"dkim": DKIMPlugin}, raise_errors=True) as h:
        out = h.send(MSG.format(addr=addr).encode(), client_ip=client_ip)
    sigs = [sig_tags(v) for n, v in out.headers() if n.lower() == "dkim-signature"]
    data = bytes(out.delivered or b"")
    table = {k + ".": v.encode() for k, v in dns.items()}
    for i in range(len(sigs)):
        assert dkim.DKIM(data).verify(i, dnsfunc=lambda n, timeout=5: table.get(n.decode()))
    return sorted((s["d"], s["s"]) for s in sigs)


# --- conversion cases -----------------------------------------------------------------------


def test_single_key_form(conf: Path, keys: tuple[Path, dict[str, str]]) -> None:
    cfg, text, res = load(conf / "single.conf")
    dk = cfg.plugin_options("dkim")
    assert dk["keys"] == {"mail": {"selector": "mail", "file": str(keys[0] / "mail.private")}}
    assert [(r["pattern"], r["keys"]) for r in dk["signing"]] == [
        ("example.com", ["mail"]),
        ("example.org", ["mail"]),
    ]
    assert dk["canonicalization"] == "relaxed/simple"
    assert dk["oversign"] == ["from"]  # OpenDKIM oversigns nothing else
    assert "resent-sender" in dk["headers"] and "list-unsubscribe-post" not in dk["headers"]
    assert cfg.milterd.internal_networks == ["127.0.0.1/32"]  # OpenDKIM's default
    assert not res.warnings
    for name in ("Socket", "UserID", "PidFile", "Syslog", "UMask", "TrustAnchorFile"):
        assert any(f": {name}: " in n for n in res.notes), name
        assert f": {name}: " in text  # also a comment in the fragment
    dns = {"mail._domainkey.example.com": keys[1]["mail.private"],
           "mail._domainkey.example.org": keys[1]["mail.private"]}  # fmt: skip
    assert signatures(cfg, "alice@example.com", dns) == [("example.com", "mail")]
    assert signatures(cfg, "bob@Example.ORG", dns) == [("example.org", "mail")]
    assert signatures(cfg, "x@sub.example.com", dns) == []  # SubDomains not set
    assert signatures(cfg, "alice@example.com", dns, client_ip="192.0.2.1") == []
    # internal_networks is milterd-wide: the comment says what else trusts these clients
    said = " ".join(" ".join(x[2:].split()) for x in text.splitlines() if x.startswith("# "))
    assert "only decided sign vs verify" not in said
    for what in ("spf and dmarc do not check their mail", "scoring does not score it",
                 "authres adds no Authentication-Results"):  # fmt: skip
        assert what in said, what


def test_subdomains_sign_as_the_listed_domain(conf: Path, keys: Any) -> None:
    p = conf / "single.conf"
    p.write_text(p.read_text().replace("Domain\t\t\texample.com, example.org",
                                       "Domain csl:example.com\nSubDomains yes"))  # fmt: skip
    cfg, _, _ = load(p)
    dns = {"mail._domainkey.example.com": keys[1]["mail.private"]}
    assert signatures(cfg, "a@deep.sub.example.com", dns) == [("example.com", "mail")]
    assert signatures(cfg, "a@example.com", dns) == [("example.com", "mail")]
    assert signatures(cfg, "a@example.org", dns) == []


def test_subdomains_nested_domains_exact_first_then_longest_parent(conf: Path, keys: Any) -> None:
    """OpenDKIM (mlfi_eoh) tries the From domain itself in Domain, then with SubDomains its
    parents, longest first: a listed subdomain signs as itself, and its subdomains as it."""
    p = conf / "single.conf"
    domains = "Domain example.com, lists.example.com\nSubDomains yes"
    p.write_text(p.read_text().replace("Domain\t\t\texample.com, example.org", domains))
    cfg, _, res = load(p)
    assert [(r["pattern"], r.get("domain")) for r in cfg.plugin_options("dkim")["signing"]] == [
        ("example.com", None), ("lists.example.com", None),
        ("*.lists.example.com", "lists.example.com"), ("*.example.com", "example.com"),
    ]  # fmt: skip
    assert not res.warnings
    pub = keys[1]["mail.private"]
    dns = {"mail._domainkey.example.com": pub, "mail._domainkey.lists.example.com": pub}
    assert signatures(cfg, "x@lists.example.com", dns) == [("lists.example.com", "mail")]
    assert signatures(cfg, "y@a.lists.example.com", dns) == [("lists.example.com", "mail")]
    assert signatures(cfg, "z@b.example.com", dns) == [("example.com", "mail")]
    assert signatures(cfg, "w@example.com", dns) == [("example.com", "mail")]


def test_domain_star_signs_every_domain(conf: Path, keys: Any) -> None:
    """Domain "*": OpenDKIM's back-compatible "any domain" (d= the From domain), tried after
    the exact domains and before the SubDomains parents."""
    p = conf / "single.conf"
    p.write_text(p.read_text().replace("Domain\t\t\texample.com, example.org",
                                       "Domain *, example.com\nSubDomains yes"))  # fmt: skip
    cfg, _, _ = load(p)
    assert [r["pattern"] for r in cfg.plugin_options("dkim")["signing"]] == [
        "example.com", "*", "*.example.com",
    ]  # fmt: skip
    pub = keys[1]["mail.private"]
    dns = {"mail._domainkey.other.test": pub, "mail._domainkey.a.example.com": pub}
    assert signatures(cfg, "x@other.test", dns) == [("other.test", "mail")]
    assert signatures(cfg, "x@a.example.com", dns) == [("a.example.com", "mail")]


def test_keytable_and_refile_signing_table(conf: Path, keys: Any) -> None:
    cfg, text, res = load(conf / "tables.conf")
    dk = cfg.plugin_options("dkim")
    assert [r["pattern"] for r in dk["signing"]] == [
        "ceo@example.com", "*@example.com", "*@example.org", "*.example.org", "*",
    ]  # fmt: skip
    assert dk["keys"]["relay"] == {"selector": "relay", "file": str(keys[0] / "relay")}
    assert dk["keys"]["ceo._domainkey.example.com"]["domain"] == "example.com"
    assert '[plugins.dkim.keys."ceo._domainkey.example.com"]' in text
    pub = keys[1]
    dns = {
        "ceo2026._domainkey.example.com": pub["example.com.ceo"],
        "mail._domainkey.example.com": pub["example.com.mail"],
        "mail._domainkey.example.org": pub["example.org.mail"],
        "relay._domainkey.other.test": pub["relay"],
    }
    expect = {  # one address for every SigningTable line, first match wins
        "ceo@example.com": [("example.com", "ceo2026")],
        "alice@example.com": [("example.com", "mail")],
        "alice@example.org": [("example.org", "mail")],
        "alice@lists.example.org": [("example.org", "mail")],
        "alice@other.test": [("other.test", "relay")],
    }
    for addr, want in expect.items():
        assert signatures(cfg, addr, dns, client_ip="10.3.0.1") == want, addr
    # InternalHosts: 10.0.0.0/8 but not 10.1.2.0/24; names reported, not converted
    assert signatures(cfg, "alice@example.com", dns, client_ip="10.1.2.5") == []
    nets = cfg.milterd.internal_networks
    assert "192.0.2.7/32" in nets and "::1/128" in nets and "10.1.2.0/24" not in nets
    assert any("mail.example.com" in w and ".example.net" in w for w in res.warnings)
    # Entries OpenDKIM never matched (it looks up ADDR and NET/BITS with NET masked) stay out.
    assert not any(n.startswith(("198.51.100.", "172.16.")) for n in nets)
    assert signatures(cfg, "alice@example.com", dns, client_ip="198.51.100.9") == []
    assert signatures(cfg, "alice@example.com", dns, client_ip="172.16.0.1") == []
    (bits,) = [w for w in res.warnings if "198.51.100.5/24" in w]
    assert "trusted.hosts:" in bits and "never matched" in bits
    assert "write 198.51.100.0/24 if the network was meant" in bits
    assert any("172.16.0.0/255.240.0.0" in w and "never matched" in w for w in res.warnings)
    assert "198.51.100.5/24" in text  # a WARNING comment in the fragment too
    assert dk["sign_daemons"] == ["ORIGINATING"]
    assert dk["expire"] == 604800 and dk["min_rsa_bits"] == 2048
    assert dk["headers"] == ["from", "to", "subject", "date", "message-id"]  # Received dropped
    assert dk["oversign"] == ["from", "subject", "reply-to"]
    assert dk["insecure_keys"] is False
    assert dk["actions"] == {"fail": "reject", "permerror": "quarantine", "temperror": "tempfail"}
    assert any("ExternalIgnoreList" in n and "log" in n for n in res.notes)
    assert any("AutoRestartRate" in n for n in res.notes)


def test_multiple_signatures_with_an_exact_key_table(conf: Path, keys: Any) -> None:
    cfg, _, res = load(conf / "multi.conf")
    dk = cfg.plugin_options("dkim")
    assert dk["sign"] is True and dk["verify"] is False
    assert dk["sign_daemons"] == ["ORIGINATING", "submission"]
    pub = keys[1]
    dns = {
        "rsa2026._domainkey.example.com": pub["rsa"],
        "ed2026._domainkey.example.com": pub["ed"],
        "boss._domainkey.example.com": pub["boss"],
        "sub._domainkey.sub.example.com": pub["sub"],
        "relay._domainkey.relay.example.net": pub["relay"],
    }
    relay = ("relay.example.net", "relay")
    expect = {  # every matching lookup adds its signature
        "boss@example.com": [("example.com", "boss"), ("example.com", "ed2026"),
                             ("example.com", "rsa2026"), relay],
        "alice@example.com": [("example.com", "rsa2026"), relay],
        "boss@sub.example.com": [("example.com", "ed2026"), ("sub.example.com", "sub"), relay],
        "alice@sub.example.com": [("sub.example.com", "sub"), relay],
        "boss@other.test": [("example.com", "ed2026"), relay],
        "alice@other.test": [relay],
    }  # fmt: skip
    for addr, want in expect.items():
        assert signatures(cfg, addr, dns, client_ip="192.0.2.5") == sorted(want), addr
    assert not res.warnings


def test_first_match_follows_opendkims_lookup_order_not_file_order(conf: Path) -> None:
    (conf / "multi.conf").write_text(
        (conf / "multi.conf").read_text().replace("MultipleSignatures      yes", "")
    )
    cfg, _, _ = load(conf / "multi.conf")
    rules = [(r["pattern"], r["keys"]) for r in cfg.plugin_options("dkim")["signing"]]
    assert rules == [
        ("boss@example.com", ["boss"]),
        ("example.com", ["rsa"]),
        ("*.example.com", ["sub"]),
        ("boss@*", ["ed"]),
        ("*", ["relay"]),
    ]


def test_verify_only_actions_and_core_keys(conf: Path, keys: Any) -> None:
    cfg, text, res = load(conf / "verify.conf")
    dk = cfg.plugin_options("dkim")
    assert dk["sign"] is False and dk["verify"] is True
    # On-Default reject, then overrides: NoSignature accept, BadSignature discard (no
    # equivalent: accepted, warned)
    assert dk["actions"] == {"permerror": "reject", "temperror": "reject"}
    assert any("discard" in w for w in res.warnings)
    assert cfg.plugin_settings("dkim").on_error == "continue"  # On-InternalError accept
    assert "min_rsa_bits" not in dk  # 512 cannot be converted
    assert any("MinimumKeyBits" in n and "1024" in n for n in res.notes)
    assert dk["max_signatures"] == 5
    assert cfg.milterd.authserv_id == "mx.example.net"
    assert cfg.dns.nameservers == ["192.0.2.53", "192.0.2.54"] and cfg.dns.timeout == 4
    assert any("PeerList" in n for n in res.notes)  # from the Include'd file
    assert any("FrobnicateHeaders" in n and "unknown" in n for n in res.notes)
    assert "# [plugins.authres]" in text
    # the actions work: a key lookup that times out is refused
    signed = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.com; s=x; c=relaxed/relaxed;" \
        b" h=from; bh=AAAA; b=AAAA\r\n" + MSG.format(addr="a@example.com").encode()  # fmt: skip
    with Harness(cfg, plugins={"dkim": DKIMPlugin},
                 zones={"x._domainkey.example.com": {"TXT": "TIMEOUT"}}) as h:  # fmt: skip
        assert h.send(signed).verdict == "reject"
        assert h.send(MSG.format(addr="a@example.com").encode()).verdict == "continue"


def test_default_on_dnserror_is_tempfail(conf: Path) -> None:
    (conf / "x.conf").write_text("Mode v\n")
    cfg, text, _ = load(conf / "x.conf")
    assert cfg.plugin_options("dkim")["actions"] == {"temperror": "tempfail"}
    assert cfg.plugin_options("dkim")["canonicalization"] == "simple/simple"
    assert "On-SignatureError reject" in text  # OpenDKIM's default, no equivalent


def test_key_file_warnings(conf: Path, keys: Any) -> None:
    loose = keys[0] / "relay"
    loose.chmod(0o640)
    try:
        (conf / "key.table").write_text(
            (conf / "key.table").read_text().replace("example.org.mail", "missing")
        )
        _, _, res = load(conf / "tables.conf")
    finally:
        loose.chmod(0o600)
    assert any("missing does not exist" in w for w in res.warnings)
    assert any("mode 0640" in w and "chmod 600" in w for w in res.warnings)


@pytest.mark.parametrize(
    ("table", "warning"),
    [
        ("user+tag?@example.com key\n", "regular-expression"),
        ("example.com key\n", "never matched"),
        ("*@example.com key:boss@example.com\n", "i=@d"),
        ("*@example.com nokey\n", "fall through"),
    ],
)
def test_refile_entries_that_cannot_be_converted_are_said(
    conf: Path, table: str, warning: str
) -> None:
    (conf / "k").write_text(f"key example.com:s:{conf}/nokeyfile\n")
    (conf / "s").write_text(table)
    (conf / "c.conf").write_text(f"KeyTable {conf}/k\nSigningTable refile:{conf}/s\n")
    res = convert_file(conf / "c.conf")
    assert any(warning in w for w in res.warnings), res.warnings
    assert f"WARNING {conf}/s:1" in res.toml
    loads(res.toml)


def test_refile_patterns_match_what_opendkim_matched() -> None:
    assert refile_patterns("*@example.com") == ["*@example.com"]
    assert refile_patterns("*.example.com") == ["*.example.com"]
    assert refile_patterns("example.com") is None
    assert refile_patterns("a*example.*") == ["a*@*example.*", "a*example.*@*"]
    assert glob_covers("*", "ceo@example.com") and glob_covers("*.example.org", "*@a.example.org")
    assert not glob_covers("*@example.com", "*.example.com")
    assert glob_disjoint("*@example.com", "*@example.org")
    assert not glob_disjoint("*@example.com", "ceo@*")
    assert Spec.parse("u@.Example.com") == Spec("u", "sub", "example.com")
    assert Spec.parse("example.com") & Spec.parse(".com") == Spec(None, "exact", "example.com")
    assert Spec.parse("a@*") & Spec.parse("b@*") is None


def test_multiple_signatures_refile_dual_signing(conf: Path, keys: Any) -> None:
    (conf / "s").write_text("*@example.com rsa\n*@example.com ed\n*.example.com rsa\n")
    text = (conf / "multi.conf").read_text().replace(f"file:{conf}/multi.signing",
                                                     f"refile:{conf}/s")  # fmt: skip
    (conf / "m.conf").write_text(text)
    cfg, _, res = load(conf / "m.conf")
    rules = [(r["pattern"], r["keys"]) for r in cfg.plugin_options("dkim")["signing"]]
    assert rules == [("*@example.com", ["rsa", "ed"]), ("*.example.com", ["rsa"])]
    assert not res.warnings
    dns = {"rsa2026._domainkey.example.com": keys[1]["rsa"],
           "ed2026._domainkey.example.com": keys[1]["ed"]}  # fmt: skip
    assert signatures(cfg, "a@example.com", dns, client_ip="192.0.2.5") == [
        ("example.com", "ed2026"), ("example.com", "rsa2026")]  # fmt: skip


# --- errors and the command line ------------------------------------------------------------


@pytest.mark.parametrize(
    ("conf_text", "extra", "message"),
    [
        ("SubDomains maybe\n", None, "c.conf:1: SubDomains: 'maybe' is not a Boolean"),
        ("Syslog yes\nMode\n", None, "c.conf:2: Mode: missing value"),
        ("KeyTable {d}/none\nSigningTable {d}/s\n", None, "c.conf:1: KeyTable {d}/none: cannot"),
        ("KeyTable {d}/k\nSigningTable {d}/s\n", ("k", "# keys\nbad example.com:s\n"),
         "/k:2: KeyTable entry 'bad'"),
        ("SignatureTTL soon\n", None, "c.conf:1: SignatureTTL: 'soon' is not an integer"),
        ("On-BadSignature explode\n", None, "c.conf:1: On-BadSignature: 'explode'"),
    ],
)  # fmt: skip
def test_malformed_files_name_file_and_line(
    tmp_path: Path, conf_text: str, extra: tuple[str, str] | None, message: str
) -> None:
    (tmp_path / "s").write_text("* k\n")
    if extra:
        (tmp_path / extra[0]).write_text(extra[1])
    (tmp_path / "c.conf").write_text(conf_text.format(d=tmp_path))
    with pytest.raises(MigrateError, match="^" + ".*" + message.format(d=tmp_path).replace(
            "(", r"\(").replace("?", r"\?")):  # fmt: skip
        convert_file(tmp_path / "c.conf")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterd.cli", "dkim", "import-opendkim", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_command_line_end_to_end(conf: Path, tmp_path: Path) -> None:
    r = cli(str(conf / "tables.conf"))
    assert r.returncode == 0, r.stderr
    cfg = loads(r.stdout)
    assert cfg.plugin_options("dkim")["signing"][0]["pattern"] == "ceo@example.com"
    assert f"note: {conf}/tables.conf:4: Socket: handled elsewhere in milterd" in r.stderr
    assert "warning: " in r.stderr and "mail.example.com" in r.stderr
    assert "converted:" not in r.stdout.split("# Not converted")[1]  # only what was not
    missing = cli(str(tmp_path / "nope.conf"))
    assert missing.returncode == 2
    assert missing.stderr.strip().endswith("nope.conf: cannot read: No such file or directory")
    assert len(missing.stderr.strip().splitlines()) == 1 and missing.stdout == ""
    (tmp_path / "bad.conf").write_text("Mode sv\nMinimumKeyBits lots\n")
    bad = cli(str(tmp_path / "bad.conf"))
    assert bad.returncode == 2 and f"{tmp_path}/bad.conf:2: MinimumKeyBits" in bad.stderr


def test_a_delta_list_keeps_only_field_names(conf: Path) -> None:
    """A review: "*,+X Bad" and "*,+" gave 'x bad' and '' in headers/oversign, which the
    dkim config refuses (not a header field name); a plain list dropped them already."""
    text = (conf / "single.conf").read_text().replace(
        "OversignHeaders\t\tFrom", "OversignHeaders\t\t*,+\nSignHeaders\t\t*,+X Bad,+X-Ok"
    )
    (conf / "delta.conf").write_text(text)
    cfg, _, _ = load(conf / "delta.conf")  # loads: the dkim config accepts it
    dk = cfg.plugin_options("dkim")
    assert "x-ok" in dk["headers"] and "x bad" not in dk["headers"] and "" not in dk["oversign"]
    with Harness(cfg, plugins={"dkim": DKIMPlugin}):  # the plugin's own validation too
        pass
