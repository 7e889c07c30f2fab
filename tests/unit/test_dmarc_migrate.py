"""``milterd dmarc import-opendmarc``: opendmarc.conf files (tests/data/opendmarc) converted,
loaded by milterd, and run through the harness (real spf, dkim, dmarc and authres plugins,
FakeResolver zones) to show that the converted configuration refuses what OpenDMARC refused
and lets through what it let through."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from milterd_plugins.dmarc.migrate import Converted, OpenDMARCError, convert, parse

from milterd.config import Config, loads
from milterd.testing import Harness

DATA = Path(__file__).resolve().parents[1] / "data" / "opendmarc"
PSL_DIR = DATA / "psl"

ZONES: dict[str, dict[str, Any]] = {
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; rua=mailto:d@example.org"]},
    "_dmarc.quar.example.net": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.lists.example.org": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.ruf.example.org": {"TXT": ["v=DMARC1; p=reject; ruf=mailto:forensic@ruf.example.org"]},
    "_dmarc.slow.example.org": {"TXT": "TIMEOUT"},
    "example.org": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "bounce.example.com": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "nodmarc.example.com": {"TXT": ["v=spf1 -all"]},
}


def converted(name: str, tmp_path: Path, edit: dict[str, str] | None = None) -> Converted:
    """Convert tests/data/opendmarc/NAME (copied to tmp_path with ``edit`` applied, so that
    relative names still find ignore.hosts and psl/)."""
    text = (DATA / name).read_text()
    for old, new in (edit or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    conf = tmp_path / name
    conf.write_text(text)
    for extra in ("ignore.hosts",):
        (tmp_path / extra).write_text((DATA / extra).read_text())
    if not (tmp_path / "psl").exists():
        (tmp_path / "psl").symlink_to(PSL_DIR)
    return convert(text, str(conf))


def load(result: Converted, tmp_path: Path) -> Config:
    """The fragment as milterd loads it; its state paths moved into tmp_path."""
    text = result.toml.replace("/var/lib/milterd/", f"{tmp_path}/state/")
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "dmarc-failures").mkdir(exist_ok=True)
    return loads(text)


def comments(res: Converted) -> str:
    """The fragment's comments as one line (they are wrapped at 96 columns)."""
    return " ".join(line[2:] for line in res.toml.splitlines() if line.startswith("# "))


def message(frm: str = "a@example.org", extra: str = "") -> bytes:
    return (
        f"From: {frm}\r\nTo: b@example.com\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
        f"Message-ID: <1@x>\r\nSubject: t\r\n{extra}\r\nbody\r\n"
    ).encode()


def send(config: Config, msg: bytes, **kw: Any) -> Any:
    with Harness(config, zones=ZONES) as h:
        return h.send(msg, **kw)


def dmarc(out: Any) -> Any:
    (r,) = [r for r in out.results if r.method == "dmarc"]
    return r


# --- RejectFailures, HoldQuarantinedMessages ------------------------------------------------


def test_reject_failures_true_rejects_a_failing_p_reject(tmp_path: Path) -> None:
    cfg = load(converted("enforce.conf", tmp_path), tmp_path)
    # SPF passes for bounce.example.com (not aligned with example.org), no DKIM: fail.
    out = send(cfg, message(), sender="x@bounce.example.com")
    assert out.verdict == "reject"
    assert (out.decision.verdict.code, out.decision.verdict.xcode) == ("550", "5.7.1")
    # Aligned mail passes and is delivered.
    out = send(cfg, message(), sender="x@example.org")
    assert out.verdict == "continue" and dmarc(out).result == "pass"


def test_reject_failures_false_delivers_with_authentication_results(tmp_path: Path) -> None:
    res = converted("debian.conf", tmp_path, {"/usr/share/publicsuffix": str(PSL_DIR)})
    cfg = load(res, tmp_path)
    assert cfg.plugins["dmarc"]["reject_action"] == "none"
    out = send(cfg, message(), sender="x@bounce.example.com")
    assert out.verdict == "continue"
    assert dmarc(out).result == "fail" and dmarc(out).prop("policy.dmarc") == "reject"
    assert "dmarc=fail" in (out.header("Authentication-Results") or "")
    # p=quarantine is not held either.
    out = send(cfg, message("a@quar.example.net"), sender="x@bounce.example.com")
    assert out.verdict == "continue" and dmarc(out).result == "fail"


def test_hold_quarantined_messages_with_reject_failures_holds(tmp_path: Path) -> None:
    cfg = load(converted("enforce.conf", tmp_path), tmp_path)
    out = send(cfg, message("a@quar.example.net"), sender="x@bounce.example.com")
    assert out.verdict == "quarantine"


def test_no_hold_without_hold_quarantined_messages(tmp_path: Path) -> None:
    """RejectFailures alone (1.4): p=quarantine delivered, p=reject rejected."""
    res = converted("reporting.conf", tmp_path)
    cfg = load(res, tmp_path)
    out = send(cfg, message("a@quar.example.net"), sender="x@bounce.example.com")
    assert out.verdict == "continue" and dmarc(out).prop("policy.dmarc") == "quarantine"
    assert 'quarantine_action = "none"' in res.toml
    assert "Before 1.4.0 OpenDMARC held them" in comments(res)


def test_hold_without_reject_failures_is_not_a_hold_in_1_4(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path, {"RejectFailures\t\ttrue": "RejectFailures no"})
    cfg = load(res, tmp_path)
    assert "held them only when RejectFailures was true" in comments(res)
    out = send(cfg, message("a@quar.example.net"), sender="x@bounce.example.com")
    assert out.verdict == "continue"
    out = send(cfg, message(), sender="x@bounce.example.com")
    assert out.verdict == "continue" and dmarc(out).result == "fail"


def test_reject_failures_tempfails_a_failed_policy_lookup(tmp_path: Path) -> None:
    cfg = load(converted("reporting.conf", tmp_path), tmp_path)
    out = send(cfg, message("a@slow.example.org"), sender="x@bounce.example.com")
    assert out.verdict == "tempfail"
    cfg = load(converted("debian.conf", tmp_path, {"/usr/share/publicsuffix": str(PSL_DIR)}),
               tmp_path)  # fmt: skip
    out = send(cfg, message("a@slow.example.org"), sender="x@bounce.example.com")
    assert out.verdict == "continue" and dmarc(out).result == "temperror"


# --- From checks ------------------------------------------------------------------------------


def test_reject_multi_value_from_refuses_several_from_addresses(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    out = send(cfg, message("a@example.org, b@other.example.net"), sender="x@example.org")
    assert out.verdict == "reject"
    assert "exactly one From" in out.decision.verdict.text
    # The From checks of RequiredHeaders are converted, the other counts are reported.
    assert any(n.startswith("RequiredHeaders true") and "Date" in n for n in res.not_converted)
    # Without either option, each From domain is evaluated (RFC 7489 6.6.1) and the
    # strictest failing policy applies: here example.org's.
    cfg = load(converted("reporting.conf", tmp_path), tmp_path)
    out = send(cfg, message("a@example.org, b@other.example.net"), sender="x@example.org")
    assert dmarc(out).result == "fail" and dmarc(out).prop("header.from") == "example.org"


# --- who is not evaluated ----------------------------------------------------------------------


def test_ignore_hosts_become_internal_networks(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    nets = cfg.milterd.internal_networks
    assert {"127.0.0.1/32", "::1/128", "192.0.2.128/25", "203.0.113.9/32"} <= set(nets)
    bad = {"sender": "x@bounce.example.com"}
    out = send(cfg, message(), client_ip="10.1.2.3", **bad)  # listed: not evaluated
    assert out.verdict == "continue" and not [r for r in out.results if r.method == "dmarc"]
    out = send(cfg, message(), client_ip="192.0.2.200", **bad)  # 192.0.2.128/255.255.255.128
    assert out.verdict == "continue"
    out = send(cfg, message(), client_ip="198.51.100.1", **bad)  # not listed: evaluated
    assert out.verdict == "reject"
    # A host name cannot be converted: said, not dropped silently.
    assert any("relay.example.net" in d for d in res.differs)
    assert "relay.example.net" in comments(res)


def test_ignore_hosts_exclusions_are_cut_out(tmp_path: Path) -> None:
    """!10.9.9.9 inside 10.0.0.0/8: OpenDMARC's dmarcf_checkip tries the most precise entry
    first (the "!" form before the plain one), so that client was evaluated; still is."""
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    nets = [ipaddress.ip_network(n) for n in cfg.milterd.internal_networks]
    ten = [n for n in nets if n.version == 4 and n.subnet_of(ipaddress.IPv4Network("10.0.0.0/8"))]
    assert sum(n.num_addresses for n in ten) == 2**24 - 1
    assert not any(ipaddress.ip_address("10.9.9.9") in n for n in nets)
    bad = {"sender": "x@bounce.example.com"}
    assert send(cfg, message(), client_ip="10.9.9.9", **bad).verdict == "reject"
    assert send(cfg, message(), client_ip="10.9.9.8", **bad).verdict == "continue"
    assert not any("!10.9.9.9" in d for d in res.differs)
    assert "milterd has none" not in comments(res)


def test_ignore_hosts_entries_opendmarc_never_matched_stay_out(tmp_path: Path) -> None:
    """192.0.2.5/24: OpenDMARC looked up 192.0.2.0/24 (the address masked), never that
    string, so the entry matched nothing; trusting 192.0.2.0/24 would skip mail it checked."""
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    assert not any(n.startswith("192.0.2.0/") for n in cfg.milterd.internal_networks)
    out = send(cfg, message(), client_ip="192.0.2.1", sender="x@bounce.example.com")
    assert out.verdict == "reject"  # evaluated, as by OpenDMARC
    (why,) = [d for d in res.differs if "192.0.2.5/24" in d]
    assert "ignore.hosts:8" in why and "never matched" in why
    assert "write 192.0.2.0/24 if the network was meant" in why
    assert "write 192.0.2.0/24 if the network was meant" in comments(res)


def test_ignore_hosts_bracketed_address(tmp_path: Path) -> None:
    """[203.0.113.9]: OpenDMARC compared it with the host name the MTA passes, which is
    "[203.0.113.9]" when the client has no name; converted to the address, the difference
    (also trusted when it has a name) said."""
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    assert "203.0.113.9/32" in cfg.milterd.internal_networks
    out = send(cfg, message(), client_ip="203.0.113.9", sender="x@bounce.example.com")
    assert out.verdict == "continue"
    (why,) = [d for d in res.differs if "[203.0.113.9]" in d]
    assert "host name" in why and "whatever its host name" in why


def test_an_unreadable_ignore_hosts_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(OpenDMARCError, match=r"enforce\.conf:19: IgnoreHosts: cannot read"):
        converted("enforce.conf", tmp_path, {"ignore.hosts\t": "missing.hosts\t"})


def test_ignore_hosts_unset_keeps_milterds_loopback_default(tmp_path: Path) -> None:
    res = converted("reporting.conf", tmp_path)
    assert "internal_networks =" not in res.toml
    assert load(res, tmp_path).milterd.internal_networks == ["127.0.0.0/8", "::1/128"]
    assert any("127.0.0.1" in d for d in res.differs)


def test_authenticated_clients(tmp_path: Path) -> None:
    """IgnoreAuthenticatedClients true: not evaluated, as before. False: milterd cannot
    evaluate them without also evaluating internal_networks, and says so."""
    cfg = load(converted("enforce.conf", tmp_path), tmp_path)
    out = send(cfg, message(), sender="x@bounce.example.com", auth="alice")
    assert out.verdict == "continue"
    res = converted("reporting.conf", tmp_path)
    assert load(res, tmp_path).plugins["dmarc"]["check_trusted"] is False
    assert any(d.startswith("IgnoreAuthenticatedClients false") for d in res.differs)
    assert "OpenDMARC evaluated (and could reject) authenticated clients" in comments(res)


def test_ignore_mail_from_becomes_never_reject(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    assert cfg.plugins["dmarc"]["never_reject"] == ["lists.example.org", "example.com"]
    out = send(cfg, message("a@lists.example.org"), sender="x@bounce.example.com")
    assert out.verdict == "continue" and dmarc(out).prop("policy.dmarc") == "none"
    # Not on the list: rejected.
    out = send(cfg, message(), sender="x@bounce.example.com")
    assert out.verdict == "reject"
    # example.com is an organizational domain: its subdomains are exempt too (said).
    assert "IgnoreMailFrom: subdomains of example.com are exempt too" in res.differs
    assert not any("lists.example.org are exempt" in d for d in res.differs)


# --- SPF -----------------------------------------------------------------------------------


def test_spf_self_validate_enables_spf_record_only(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path)
    cfg = load(res, tmp_path)
    assert cfg.plugins["spf"] == {"HELO_reject": "False", "Mail_From_reject": "False"}
    # SPF fail for a domain without DMARC: recorded, not refused (OpenDMARC never did).
    out = send(cfg, message("a@nodmarc.example.com"), sender="x@nodmarc.example.com")
    assert out.verdict == "continue"
    assert [r.result for r in out.results if r.method == "spf" and r.prop("smtp.mailfrom")] == [
        "fail"
    ]
    # An SPF pass aligned with the From domain makes DMARC pass.
    out = send(cfg, message(), sender="x@example.org")
    assert out.verdict == "continue" and dmarc(out).result == "pass"


def test_spf_ignore_results_without_self_validation_means_dkim_only(tmp_path: Path) -> None:
    res = converted("reporting.conf", tmp_path)
    cfg = load(res, tmp_path)
    assert "spf" not in cfg.plugins and "\n[plugins.spf]\n" not in res.toml
    # No SPF in the evaluation: even SPF-aligned mail fails (as with OpenDMARC).
    out = send(cfg, message(), sender="x@example.org")
    assert out.verdict == "reject" and dmarc(out).result == "fail"


def test_upstream_spf_results_are_replaced_by_the_spf_plugin(tmp_path: Path) -> None:
    res = converted("debian.conf", tmp_path, {"/usr/share/publicsuffix": str(PSL_DIR)})
    cfg = load(res, tmp_path)
    assert cfg.plugins["spf"]["Mail_From_reject"] == "False"
    assert "first Received-SPF field" in comments(res)


# --- identity, public suffixes, history, failure reports ---------------------------------------


def test_authserv_id(tmp_path: Path) -> None:
    cfg = load(converted("enforce.conf", tmp_path), tmp_path)
    assert cfg.milterd.authserv_id == "mx1.example.net"
    out = send(cfg, message(), sender="x@example.org")
    assert (out.header("Authentication-Results") or "").startswith("mx1.example.net;")
    res = converted("reporting.conf", tmp_path)  # HOSTNAME: milterd's default, explained
    assert "authserv_id =" not in res.toml and "gethostname()" in comments(res)


def test_public_suffix_list_directory_and_absence(tmp_path: Path) -> None:
    res = converted("enforce.conf", tmp_path)
    assert load(res, tmp_path).plugins["dmarc"]["psl_file"] == str(
        tmp_path / "psl" / "public_suffix_list.dat"
    )
    res = converted("reporting.conf", tmp_path)
    assert "psl_file" not in res.toml
    assert any(d.startswith("PublicSuffixList unset") for d in res.differs)


def test_history_file_becomes_history_db(tmp_path: Path) -> None:
    res = converted("reporting.conf", tmp_path)
    said = comments(res)
    assert "milterd dmarc report --send" in said and "milterd-dmarc-report.timer" in said
    assert "opendmarc-import" in said
    cfg = load(res, tmp_path)
    db = tmp_path / "state" / "dmarc.sqlite"
    assert cfg.plugins["dmarc"]["history_db"] == str(db)
    send(cfg, message(), sender="x@example.org")
    import sqlite3

    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT header_from, result FROM messages").fetchall() == [
            ("example.org", "fail")
        ]
    assert any(n.startswith("RecordAllMessages true") for n in res.not_converted)
    assert "writable by the user milterd runs as" in said and "StateDirectory=" in said
    res = converted("enforce.conf", tmp_path)
    assert "history_db" not in [k for k in load(res, tmp_path).plugins["dmarc"]]


def test_failure_reports(tmp_path: Path) -> None:
    res = converted("reporting.conf", tmp_path)
    cfg = load(res, tmp_path)
    dm = cfg.plugins["dmarc"]
    assert dm["failure_reports"] is True and dm["report_email"] == "dmarc-noreply@example.net"
    out = send(cfg, message("a@ruf.example.org"), sender="x@bounce.example.com")
    assert out.verdict == "reject"
    spool = tmp_path / "state" / "dmarc-failures"
    assert [p.suffix for p in spool.iterdir()] == [".report"]
    said = comments(res)
    assert "creates the directory at start-up" in said and "StateDirectory=" in said
    for name in ("FailureReportsBcc", "ReportCommand", "CopyFailuresTo", "SoftwareHeader"):
        assert any(n.startswith(name) for n in res.not_converted), name
    # FailureReportsOnNone true: milterd reports p=none failures too, no difference listed.
    assert not any("FailureReportsOnNone" in d for d in res.differs)
    res = converted("reporting.conf", tmp_path, {"FailureReportsOnNone\ttrue": "#"})
    assert any(d.startswith("FailureReportsOnNone false") for d in res.differs)


def test_process_options_are_listed_not_converted(tmp_path: Path) -> None:
    res = converted("debian.conf", tmp_path, {"/usr/share/publicsuffix": str(PSL_DIR)})
    names = sorted(n.split()[0] for n in res.not_converted)
    assert names == ["PidFile", "Socket", "Syslog", "UMask", "UserID"]
    tail = res.toml.split("no milterd equivalent")[1]
    for name in names:
        assert f"# {name} " in tail, name


# --- the file format -----------------------------------------------------------------------------


def test_parse_reads_as_opendmarc_does() -> None:
    opts, unknown = parse(
        "# comment\n  rejectfailures\tNo  # trailing\nRejectFailures Yes\n\n"
        "AuthservID mx.example.net # x\nUMask 0002\nSomethingElse 1\n",
        "f",
    )
    assert opts["RejectFailures"].on and opts["RejectFailures"].line == 3  # last one wins
    assert opts["AuthservID"].value == "mx.example.net"
    assert opts["UMask"].value == "0002"
    assert [(o.name, o.line) for o in unknown] == [("SomethingElse", 7)]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("RejectFailures maybe\n", "f:1: RejectFailures: illegal value 'maybe'"),
        ("\nHistoryFile   # gone\n", "f:2: HistoryFile: required value missing"),
        ("UMask 0o2\n", "f:1: UMask: illegal value '0o2' (an integer)"),
    ],
)
def test_malformed_values_are_errors_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(OpenDMARCError) as e:
        parse(text, "f")
    assert str(e.value).startswith(problem)


def test_an_unknown_option_is_reported_and_left_out(tmp_path: Path) -> None:
    res = convert("RejectFailures true\nRejectFailure false\n", str(tmp_path / "o.conf"))
    assert any(n.startswith("RejectFailure false (line 2): not an OpenDMARC") for n in
               res.not_converted)  # fmt: skip
    assert 'reject_action = "reject"' in res.toml


def test_every_fragment_is_valid_toml_with_comments_only_outside_keys(tmp_path: Path) -> None:
    for name in ("debian.conf", "enforce.conf", "reporting.conf"):
        res = converted(name, tmp_path, {"/usr/share/publicsuffix": str(PSL_DIR)}
                        if name == "debian.conf" else None)  # fmt: skip
        data = tomllib.loads(res.toml)
        assert set(data["plugins"]) >= {"dkim", "dmarc", "authres"}, name
        # comments are wrapped at 100 columns (a key's value, e.g. a path, may be longer)
        comments = [line for line in res.toml.splitlines() if line.startswith("#")]
        assert max(len(line) for line in comments) <= 100, name


# --- the command line ---------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterd.cli", "dmarc", "import-opendmarc", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_cli_end_to_end(tmp_path: Path) -> None:
    res = cli(str(DATA / "enforce.conf"))
    assert res.returncode == 0, res.stderr
    cfg = loads(res.stdout)
    assert cfg.milterd.authserv_id == "mx1.example.net"
    assert cfg.plugins["dmarc"]["reject_action"] == "reject"
    assert cfg.enabled_plugins() == ["spf", "dkim", "dmarc", "authres"]
    assert "option(s) not converted" in res.stderr
    assert "  Socket inet:8893@localhost (line 6): " in res.stderr
    assert "difference(s) from OpenDMARC" in res.stderr
    out = send(cfg, message(), sender="x@bounce.example.com")
    assert out.verdict == "reject"


def test_cli_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    for path, want in [
        (DATA / "badbool.conf", f"{DATA / 'badbool.conf'}:3: RejectFailures: illegal value"),
        (DATA / "novalue.conf", f"{DATA / 'novalue.conf'}:3: HistoryFile: required value"),
        (tmp_path / "nope.conf", f"{tmp_path / 'nope.conf'}: cannot read: No such file"),
        (tmp_path, f"{tmp_path}: cannot read: Is a directory"),
    ]:
        res = cli(str(path))
        assert res.returncode == 2, path
        assert res.stdout == ""
        lines = res.stderr.splitlines()
        assert len(lines) == 1, res.stderr
        assert lines[0].startswith(f"milterd dmarc import-opendmarc: {want}"), res.stderr
