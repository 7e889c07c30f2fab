"""The ``dmarc`` plugin through the harness: discovery, alignment, policy, overrides,
history and the aggregate report (validated against the RFC 7489 schema)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import xmlschema
from milterd_plugins.dmarc import DMARCPlugin, RecordError, parse_record

from milterd import Context, DNSTempError, Message, Result, hookimpl
from milterd.testing import Harness

XSD = Path(__file__).resolve().parents[1] / "data" / "dmarc" / "rua.xsd"

ZONES: dict[str, dict[str, Any]] = {
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; rua=mailto:d@example.org"]},
    "_dmarc.quar.example": {"TXT": ["v=DMARC1; p=quarantine"]},
    "_dmarc.none.example": {"TXT": ["v=DMARC1; p=none"]},
    "_dmarc.strict.example": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
    "_dmarc.half.example": {"TXT": ["v=DMARC1; p=reject; pct=0"]},
    "_dmarc.bad.example": {"TXT": ["v=DMARC1; p=bogus"]},
    "_dmarc.badrua.example": {"TXT": ["v=DMARC1; p=bogus; rua=mailto:x@badrua.example"]},
    "_dmarc.two.example": {"TXT": ["v=DMARC1; p=reject", "v=DMARC1; p=none"]},
    "_dmarc.slow.example": {"TXT": "TIMEOUT"},
    "_dmarc.other.example": {"TXT": ["some other record"]},
    "_dmarc.example.co.uk": {"TXT": ["v=DMARC1; p=reject"]},
    "_dmarc.np.example": {"TXT": ["v=DMARC1; p=none; sp=quarantine; np=reject"]},
    "mail.np.example": {"A": ["192.0.2.1"]},
    "mx.np.example": {"MX": ["10 mail.np.example."]},
    "txt-only.np.example": {"TXT": ["hello"]},
    "slow.np.example": {"A": "TIMEOUT"},
}


class FakeAuth:
    """Puts dkim/spf/arc results on the ledger from X-Test-* headers (as the real plugins
    would), so DMARC is tested on its own."""

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        for h in message.get_all("X-Test-DKIM"):
            word, d = h.split()
            ctx.add_result(Result("dkim", word, properties=(("header.d", d[2:]),)))
        for h in message.get_all("X-Test-SPF"):
            word, d = h.split()
            ctx.add_result(Result("spf", word, properties=(("smtp.mailfrom", d),)))
        for h in message.get_all("X-Test-HELO"):
            word, d = h.split()
            ctx.add_result(Result("spf", word, properties=(("smtp.helo", d),)))
        for h in message.get_all("X-Test-ARC"):
            ctx.add_result(Result("arc", h.strip()))


def run(
    frm: str | list[str],
    extra: list[str] = (),  # type: ignore[assignment]
    config: dict[str, Any] | None = None,
    **kw: Any,
) -> Any:
    froms = [frm] if isinstance(frm, str) else frm
    head = "".join(f"From: {f}\r\n" for f in froms) + "".join(f"{e}\r\n" for e in extra)
    msg = (head + "Subject: t\r\n\r\nbody\r\n").encode()
    cfg = {"auth": {}, "dmarc": dict(config or {})}
    with Harness(cfg, plugins={"auth": FakeAuth, "dmarc": DMARCPlugin}, zones=ZONES) as h:
        return h.send(msg, **kw)


def dmarc(out: Any) -> Result:
    (r,) = [r for r in out.results if r.method == "dmarc"]
    return r  # type: ignore[no-any-return]


def test_pass_through_dkim_only() -> None:
    out = run("a@example.org", ["X-Test-DKIM: pass d=mail.example.org"])
    assert out.verdict == "continue"
    assert dmarc(out) == Result(
        "dmarc", "pass", properties=(("header.from", "example.org"), ("policy.dmarc", "none"))
    )


def test_pass_through_spf_only() -> None:
    out = run("a@example.org", ["X-Test-SPF: pass bounces.example.org"])
    assert dmarc(out).result == "pass" and out.verdict == "continue"


def test_unaligned_passes_fail_and_p_reject_rejects() -> None:
    out = run("a@example.org", ["X-Test-SPF: pass example.net", "X-Test-DKIM: pass d=example.net"])
    assert out.verdict == "reject"
    assert (out.decision.verdict.code, out.decision.verdict.xcode) == ("550", "5.7.1")
    assert dmarc(out).result == "fail" and dmarc(out).prop("policy.dmarc") == "reject"


def test_dkim_fail_in_the_right_domain_is_not_a_pass() -> None:
    out = run("a@example.org", ["X-Test-DKIM: fail d=example.org"])
    assert dmarc(out).result == "fail"


def test_p_quarantine_quarantines_or_tags() -> None:
    out = run("a@quar.example")
    assert out.verdict == "quarantine" and dmarc(out).prop("policy.dmarc") == "quarantine"
    out = run("a@quar.example", config={"quarantine_action": "tag"})
    assert out.verdict == "continue"
    assert out.header("X-DMARC-Disposition") == "quarantine (quar.example)"


def test_subdomain_policy_from_the_organizational_domain() -> None:
    out = run("a@deep.sub.example.org")
    assert out.verdict == "quarantine"  # sp=quarantine at _dmarc.example.org
    assert dmarc(out).prop("header.from") == "deep.sub.example.org"


def test_np_applies_to_non_existent_subdomains_only() -> None:
    """RFC 9091: np for a From subdomain with NXDOMAIN or no A/AAAA/MX; sp otherwise,
    and sp when DNS cannot tell."""
    for frm, want in [
        ("a@ghost.np.example", "reject"),  # NXDOMAIN
        ("a@txt-only.np.example", "reject"),  # exists, but no A, AAAA or MX
        ("a@mail.np.example", "quarantine"),  # A
        ("a@mx.np.example", "quarantine"),  # MX
        ("a@slow.np.example", "quarantine"),  # DNS failure: not known to be absent
        ("a@np.example", "none"),  # the policy domain itself: p
    ]:
        out = run(frm)
        assert dmarc(out).prop("policy.dmarc") == want, frm
    assert parse_record("v=DMARC1; p=none; np=Reject").np == "reject"
    assert parse_record("v=DMARC1; p=none; np=bogus; rua=mailto:a@b.example").np is None
    # An extension's typo must not drop the record: p=reject still applies.
    rec = parse_record("v=DMARC1; p=reject; np=rejct")
    assert rec.np is None and rec.p == "reject"


def test_organizational_domain_uses_the_public_suffix_list() -> None:
    out = run("a@shop.example.co.uk", ["X-Test-SPF: pass example.co.uk"])
    assert dmarc(out).result == "pass"  # relaxed: same organizational domain
    out = run("a@shop.example.co.uk", ["X-Test-SPF: pass other.co.uk"])
    assert dmarc(out).result == "fail" and out.verdict == "reject"  # no sp: p applies


def test_strict_alignment() -> None:
    out = run("a@strict.example", ["X-Test-DKIM: pass d=mail.strict.example"])
    assert dmarc(out).result == "fail"
    out = run("a@strict.example", ["X-Test-DKIM: pass d=strict.example"])
    assert dmarc(out).result == "pass"


def test_no_policy_is_none() -> None:
    for frm in ("a@nothing.example", "a@other.example"):
        out = run(frm)
        assert dmarc(out).result == "none" and out.verdict == "continue"
    assert dmarc(run("a@two.example")).result == "none"  # several records: no DMARC


def test_malformed_record_is_permerror_unless_rua_saves_it() -> None:
    out = run("a@bad.example")
    assert dmarc(out).result == "permerror" and out.verdict == "continue" and not out.errors
    out = run("a@badrua.example")
    assert dmarc(out).result == "fail" and dmarc(out).prop("policy.dmarc") == "none"


def test_dns_failure_is_temperror() -> None:
    out = run("a@slow.example")
    assert dmarc(out).result == "temperror" and out.verdict == "continue"
    out = run("a@slow.example", config={"temperror_action": "tempfail"})
    assert out.verdict == "tempfail"


@pytest.mark.parametrize("froms", [[], ["undisclosed"], ["a, b"]])
def test_a_from_without_a_usable_domain_is_a_permerror(froms: list[str]) -> None:
    out = run(froms)
    assert dmarc(out).result == "permerror" and out.verdict == "continue"
    assert dmarc(out).prop("header.from") is None
    out = run(froms, config={"reject_bad_from": True})
    assert out.verdict == "reject"


@pytest.mark.parametrize(
    "froms",
    [
        ["a@example.org", "b@example.org"],  # two From fields
        ["ceo@example.org, x@none.example"],  # two addresses, the strictest failing wins
        ["x@none.example, ceo@example.org"],
        ["Bank, Inc. <ceo@example.org>"],  # an unquoted comma: "Bank" has no domain
    ],
)
def test_several_from_addresses_are_each_evaluated(froms: list[str]) -> None:
    """RFC 7489 6.6.1: each Author Domain is checked and the strictest policy among those
    that fail applies. These used to be a permerror, delivered: a spoofed p=reject domain
    next to any other address got through."""
    out = run(froms)
    assert dmarc(out).result == "fail" and dmarc(out).prop("header.from") == "example.org"
    assert out.verdict == "reject"
    out = run(froms, config={"reject_bad_from": True})  # the option still refuses them all
    assert out.verdict == "reject"
    assert "exactly one From" in out.decision.verdict.text


def test_several_from_domains_without_policies_are_none() -> None:
    out = run(["a@x.example, b@y.example"])
    assert dmarc(out).result == "none" and out.verdict == "continue"


def test_pct_zero_samples_out_to_the_next_policy() -> None:
    out = run("a@half.example")
    assert dmarc(out).prop("policy.dmarc") == "quarantine" and out.verdict == "quarantine"
    assert "sampled_out" in dmarc(out).reason


def test_never_reject_domains() -> None:
    out = run("a@example.org", config={"never_reject": ["example.org"]})
    assert out.verdict == "continue" and dmarc(out).prop("policy.dmarc") == "none"
    assert dmarc(out).result == "fail" and "local_policy" in dmarc(out).reason


def test_config_domains_in_unicode_match_and_a_bad_reject_text_is_refused() -> None:
    from milterd_plugins.dmarc import DMARCConfig

    conf = DMARCConfig.model_validate(
        {"never_reject": ["Bücher.Example."], "trusted_arc_sealers": ["lists.bücher.example"]}
    )  # compared with the From domain in its A-label form, which is what these become
    assert conf.never_reject == ["xn--bcher-kva.example"]
    assert conf.trusted_arc_sealers == ["lists.xn--bcher-kva.example"]
    with pytest.raises(ValueError, match=r"only \{domain\} may be used"):
        DMARCConfig.model_validate({"reject_text": "See {url} for {domain}"})
    assert DMARCConfig.model_validate({"reject_text": "{{x}} {domain}"}).reject_text


def test_trusted_arc_sealer_overrides_only_with_arc_pass() -> None:
    seal = "ARC-Seal: i=1; a=rsa-sha256; cv=none; d=lists.example.net; s=s; b=xyz"
    cfg = {"trusted_arc_sealers": ["lists.example.net"]}
    out = run("a@example.org", [seal, "X-Test-ARC: pass"], config=cfg)
    assert out.verdict == "continue" and "trusted_forwarder" in dmarc(out).reason
    assert run("a@example.org", [seal, "X-Test-ARC: fail"], config=cfg).verdict == "reject"
    other = seal.replace("lists.example.net", "evil.example")
    assert run("a@example.org", [other, "X-Test-ARC: pass"], config=cfg).verdict == "reject"


def test_trusted_senders_are_not_evaluated() -> None:
    assert run("a@example.org", auth="alice").results == []


@pytest.mark.parametrize(
    "text",
    [
        "p=reject",
        "v=DMARC1",
        "v=DMARC1; p",
        "v=DMARC1; p=bogus",
        "v=DMARC1; p=reject; sp=bogus",
    ],
)
def test_parse_record_errors(text: str) -> None:
    with pytest.raises(RecordError):
        parse_record(text)


def test_other_syntax_errors_fall_back_to_the_defaults() -> None:
    """RFC 7489 6.3: a syntax error after v=DMARC1 is discarded in favour of the default
    or ignored; it used to make the whole record a permerror, so a typo in one tag
    cancelled a domain's p=reject."""
    r = parse_record("v=DMARC1; p=reject; pct=150; adkim=x; aspf=relaxed; stray; foo=1; p=none")
    assert (r.p, r.pct, r.adkim, r.aspf) == ("reject", 100, "r", "r")
    for pct in ("abc", "50.5", "-1", ""):
        assert parse_record(f"v=DMARC1; p=quarantine; pct={pct}").pct == 100
    assert parse_record("v=DMARC1; p=reject; pct=0").pct == 0


def test_an_invalid_p_or_sp_with_a_rua_is_read_as_p_none() -> None:
    """RFC 7489 6.6.3 step 6.1: as if the record were v=DMARC1; p=none (the rua stays)."""
    for text in ("v=DMARC1; p=reject; sp=bogus; rua=mailto:r@example.org",
                 "v=DMARC1; p=bogus; sp=reject; rua=mailto:r@example.org"):  # fmt: skip
        r = parse_record(text)
        assert (r.p, r.sp, r.rua) == ("none", None, "mailto:r@example.org")


def test_history_and_aggregate_report_validate(tmp_path: Path) -> None:
    db = tmp_path / "dmarc.sqlite"
    cfg = {"history_db": str(db), "org_name": "mx.test", "report_email": "dmarc@mx.test"}
    since = int(time.time()) - 1
    run("a@example.org", ["X-Test-DKIM: pass d=example.org"], config=cfg, client_ip="192.0.2.7")
    run("a@example.org", ["X-Test-DKIM: pass d=example.org"], config=cfg, client_ip="192.0.2.7")
    run("a@sub.example.org", config=cfg, client_ip="2001:db8::7")
    run("a@quar.example", ["X-Test-SPF: fail quar.example"], config=cfg, client_ip="192.0.2.8")
    run("a@none.example", ["X-Test-HELO: pass mx.none.example"], config=cfg, client_ip="192.0.2.9")
    run("a@nothing.example", config=cfg)  # no policy: no row
    with sqlite3.connect(db) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert con.execute("SELECT count(*) FROM messages").fetchone()[0] == 5
    toml = tmp_path / "milterd.toml"
    toml.write_text(
        f'[plugins.dmarc]\nhistory_db = "{db}"\norg_name = "mx.test"\n'
        'report_email = "dmarc@mx.test"\n'
    )
    out_dir = tmp_path / "reports"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "milterd.cli",
            "-c",
            str(toml),
            "dmarc",
            "report",
            "--since",
            str(since),
            "--until",
            str(int(time.time()) + 1),
            "--output",
            str(out_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    files = sorted(Path(p).name for p in proc.stdout.split())
    assert [f.split("!")[1] for f in files] == ["example.org", "none.example", "quar.example"]
    schema = xmlschema.XMLSchema(str(XSD))
    for f in out_dir.iterdir():
        schema.validate(str(f))
    doc: Any = schema.to_dict(str(out_dir / next(f for f in files if "!example.org!" in f)))
    records = doc["record"]
    by_ip = {r["row"]["source_ip"]: r for r in records}
    assert by_ip["192.0.2.7"]["row"]["count"] == 2
    assert by_ip["192.0.2.7"]["row"]["policy_evaluated"]["dkim"] == "pass"
    assert by_ip["2001:db8::7"]["row"]["policy_evaluated"]["disposition"] == "quarantine"
    assert by_ip["2001:db8::7"]["identifiers"]["header_from"] == "sub.example.org"
    assert doc["policy_published"]["p"] == "reject"
    none_doc: Any = schema.to_dict(str(out_dir / files[1]))
    (spf_row,) = none_doc["record"][0]["auth_results"]["spf"]
    assert spf_row == {"domain": "mx.none.example", "scope": "helo", "result": "pass"}
    # The schema is not vacuous: a report without envelope_from does not validate.
    broken = (out_dir / files[0]).read_text().replace("<envelope_from>", "<x>", 1)
    broken = broken.replace("</envelope_from>", "</x>", 1)
    assert not schema.is_valid(broken)


@pytest.mark.parametrize(
    "frm",
    [
        "a@-bad-.example",
        "a@" + "x" * 64 + ".example",
        "a@[192.0.2.1]",
        "a@ex\u00e4mple..org",
        "a@.example.org",
    ],
)
def test_invalid_from_domains_are_permerror_never_an_exception(frm: str) -> None:
    out = run(frm)
    assert not out.errors and dmarc(out).result == "permerror" and out.verdict == "continue"


def test_internationalized_from_domain_is_looked_up_as_a_labels() -> None:
    zones = {"_dmarc.xn--exmple-cua.org": {"TXT": ["v=DMARC1; p=reject"]}}
    msg = "From: a@ex\u00e4mple.org\r\nSubject: t\r\n\r\nbody\r\n".encode()
    with Harness({"dmarc": {}}, plugins={"dmarc": DMARCPlugin}, zones=zones) as h:
        out = h.send(msg)
    assert dmarc(out).result == "fail" and dmarc(out).prop("header.from") == "xn--exmple-cua.org"
    assert out.verdict == "reject"


def test_history_store_does_not_keep_a_connection_per_thread(tmp_path: Path) -> None:
    # libmilter calls every milter connection on a new thread: the history store used to
    # open (and keep) an SQLite connection per thread, two file descriptors per SMTP
    # session for the daemon's lifetime.
    import os
    import threading

    from milterd_plugins.dmarc import SCHEMA, Store

    store = Store(str(tmp_path / "history.sqlite3"))
    cols = [
        r[1]
        for r in sqlite3.connect(tmp_path / "history.sqlite3").execute(
            "PRAGMA table_info(messages)"
        )
        if r[1] != "id"
    ]
    assert "CREATE TABLE" in SCHEMA and cols

    def one() -> None:
        store.add({c: "1" for c in cols})

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    one()
    before = fds()
    for _ in range(100):
        t = threading.Thread(target=one)
        t.start()
        t.join()
    assert fds() <= before + 2, (before, fds())
    assert len(store.rows(0, 2**31)) == 101
    store.close()


def test_history_older_than_history_days_is_pruned(tmp_path: Path) -> None:
    from milterd_plugins.dmarc import Store

    db = tmp_path / "history.sqlite3"
    store = Store(str(db))
    cols = [r[1] for r in sqlite3.connect(db).execute("PRAGMA table_info(messages)")]
    now = int(time.time())
    for ts in (now - 40 * 86400, now - 9 * 86400, now - 60):
        store.add({c: (ts if c == "ts" else "x") for c in cols if c != "id"})
    store.close()
    cfg = {"dmarc": {"history_db": str(db), "history_days": 8}}
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}):  # worker_start starts the pruner
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            left = [r[0] for r in sqlite3.connect(db).execute("SELECT ts FROM messages")]
            if len(left) == 1:
                break
            time.sleep(0.05)
    assert left == [now - 60]


def test_shutdown_waits_for_a_history_prune_under_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown closed the store while the pruner was in its DELETE: the pruner then wrote
    the history after the plugin had shut down (a dry run that followed saw the file
    change under it)."""
    from milterd_plugins.dmarc import Store

    started, events = threading.Event(), []
    real_prune, real_close = Store.prune, Store.close

    def slow_prune(self: Store, before: float) -> int:
        started.set()
        time.sleep(0.3)
        n: int = real_prune(self, before)
        events.append("pruned")
        return n

    def close(self: Store) -> None:
        if started.is_set():
            events.append("closed")
        real_close(self)

    monkeypatch.setattr(Store, "prune", slow_prune)
    monkeypatch.setattr(Store, "close", close)
    cfg = {"dmarc": {"history_db": str(tmp_path / "history.sqlite3")}}
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}):
        assert started.wait(5)
    assert events == ["pruned", "closed"]
    assert not (tmp_path / "history.sqlite3-wal").exists()  # no connection left open


def test_a_from_subdomain_too_long_for_its_dmarc_name_uses_the_organizational_domain() -> None:
    """_dmarc. plus a 247-253 octet domain is no DNS name: the lookup is NXDOMAIN (it was
    a temperror, delivered by default), so the organizational domain's policy applies."""
    long_sub = ".".join(["x" * 58] * 4) + ".example.org"
    assert 247 <= len(long_sub) <= 253
    out = run(f"ceo@{long_sub}")
    assert dmarc(out).result == "fail" and out.verdict == "quarantine"  # example.org's sp


def test_a_failure_an_aligned_temperror_may_explain_is_451_not_550() -> None:
    """Found by a conformance review: an SPF (or DKIM) DNS hiccup on the From domain's own
    identifier turned legitimate p=reject mail into a permanent 550 bounce. It is now
    451 (try again); a temperror of an unaligned identifier changes nothing."""
    out = run("a@example.org", ["X-Test-SPF: temperror example.org"])
    assert dmarc(out).result == "fail" and out.verdict == "tempfail"
    assert out.decision.verdict.code == "451"
    out = run("a@example.org", ["X-Test-DKIM: temperror d=mail.example.org"])
    assert out.verdict == "tempfail"
    out = run("a@example.org", ["X-Test-SPF: temperror other.example"])
    assert out.verdict == "reject"
    both = ["X-Test-SPF: temperror example.org", "X-Test-SPF: fail example.org"]
    out = run("a@example.org", both)
    assert out.verdict == "tempfail"


def test_slow_extra_from_domains_cannot_use_up_the_time_of_the_spoofed_one() -> None:
    """Found by a review: every Author Domain was looked up with all the time left, so
    two extra domains whose _dmarc lookups never answer made the call overrun and its
    reject was lost. Each domain now gets a share; more than five are refused."""
    import time as _time

    from milterd.testing import FakeResolver

    class Slow(FakeResolver):
        def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
            if name.startswith("_dmarc.slow"):
                _time.sleep(min(timeout or 0.0, 0.6))  # then a timeout
                raise DNSTempError(name)
            return super().lookup(name, rdtype, timeout)

    msg = (b"From: x@slow1.example, y@slow2.example, ceo@example.org\r\n"
           b"Subject: t\r\n\r\nbody\r\n")  # fmt: skip
    cfg = {"auth": {}, "dmarc": {"timeout": 1.0, "on_error": "continue"}}
    with Harness(cfg, plugins={"auth": FakeAuth, "dmarc": DMARCPlugin},
                 resolver=Slow(ZONES)) as h:  # fmt: skip
        out = h.send(msg)
    assert out.errors == [] and out.verdict == "reject"
    many = ", ".join(f"a@d{i}.example" for i in range(6)) + ", ceo@example.org"
    out = run([many])
    assert out.verdict == "reject" and "Too many From addresses" in out.decision.verdict.text


def test_among_equal_failures_one_no_dns_hiccup_explains_wins() -> None:
    """An attacker's own p=reject domain with a DKIM temperror listed first must not turn
    the spoofed domain's 550 into a 451."""
    out = run(["a@strict.example, ceo@example.org"], ["X-Test-DKIM: temperror d=strict.example"])
    assert out.verdict == "reject" and dmarc(out).prop("header.from") == "example.org"


@pytest.mark.parametrize(
    "frm",
    [
        "ceo@example.org x@none.example",  # two addresses, no comma
        "ceo@example.org  x@none.example",
        "x <x@none.example> ceo@example.org",  # text after the address
        "ceo@example.org (x@none.example",  # an unclosed comment
        ",,ceo@example.org x@none.example",  # empty elements padding the count
        "x@none.example, a@[(], ceo@example.org, b@[)]",  # a comment sign in a literal
        "x@none.example ceo @ example.org",  # white space around @
        "x@none.example, ceo@(c)example.org, b@[1.2.3.4]",  # a comment after @
    ],
)
def test_a_malformed_from_is_judged_by_every_domain_it_names(frm: str) -> None:
    """Python's parser reads 'ceo@example.org x@none.example' as '@none.example' alone:
    the sender's own domain (SPF-aligned here) passed, and p=reject example.org was never
    looked at. Now every @domain in a field that does not parse is evaluated."""
    out = run(frm, extra=["X-Test-SPF: pass none.example"])
    assert dmarc(out).result == "fail" and dmarc(out).prop("header.from") == "example.org"
    assert out.verdict == "reject"
    out = run(frm, extra=["X-Test-SPF: pass none.example"], config={"reject_bad_from": True})
    assert out.verdict == "reject" and "exactly one From" in out.decision.verdict.text


@pytest.mark.parametrize(
    "frm",
    [
        "x@none.example,",  # a trailing comma is no error
        '"Alice (ceo@example.org)" <x@none.example>',  # names in a display name are no author
    ],
)
def test_a_trailing_comma_or_an_address_in_a_display_name_is_not_malformed(frm: str) -> None:
    out = run(frm, extra=["X-Test-SPF: pass none.example"], config={"reject_bad_from": True})
    assert dmarc(out).result == "pass" and out.verdict == "continue"


def test_a_malformed_from_ignores_display_names_and_comments() -> None:
    out = run('"ceo@example.org" <x@none.example> (ceo@example.org) junk',
              extra=["X-Test-SPF: pass none.example"])  # fmt: skip
    assert dmarc(out).prop("header.from") == "none.example" and out.verdict == "continue"


# --- found by a review against issue 4 (2026-12-03) -------------------------------------------


def test_an_idna2008_from_domain_gets_its_own_policy_not_the_idna2003_mapping() -> None:
    # Python's "idna" codec (IDNA2003) maps straße.de to strasse.de: the spoof was judged
    # by strasse.de's record (none) while straße.de (xn--strae-oqa.de) publishes p=reject.
    zones = {"_dmarc.xn--strae-oqa.de": {"TXT": ["v=DMARC1; p=reject"]}}
    msg = "From: ceo@straße.de\r\nSubject: t\r\n\r\nbody\r\n".encode()
    with Harness({"dmarc": {}}, plugins={"dmarc": DMARCPlugin}, zones=zones) as h:
        out = h.send(msg, sender="x@strasse.de")
    assert dmarc(out).prop("header.from") == "xn--strae-oqa.de"
    assert dmarc(out).result == "fail" and out.verdict == "reject"


def test_a_joiner_in_the_from_domain_is_no_other_domain() -> None:
    out = run("a@a\u200db.example")
    assert not out.errors and dmarc(out).result == "permerror"


def test_spf_of_a_u_label_sender_aligns_with_the_a_label_from(tmp_path: Path) -> None:
    # SPF recorded smtp.mailfrom=bücher.example, DMARC compared it as text with
    # xn--bcher-kva.example: legitimate SMTPUTF8 mail failed DMARC and was rejected.
    from milterd_plugins.spf import SPFPlugin

    zones = {
        "xn--bcher-kva.example": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
        "_dmarc.xn--bcher-kva.example": {"TXT": ["v=DMARC1; p=reject"]},
    }
    msg = "From: a@bücher.example\r\nSubject: t\r\n\r\nbody\r\n".encode()
    plugins = {"spf": SPFPlugin, "dmarc": DMARCPlugin}
    with Harness({"spf": {}, "dmarc": {}}, plugins=plugins, zones=zones) as h:
        out = h.send(msg, sender="a@bücher.example", client_ip="192.0.2.1")
    spf = [r for r in out.results if r.method == "spf" and r.prop("smtp.mailfrom")]
    assert [r.prop("smtp.mailfrom") for r in spf] == ["xn--bcher-kva.example"]
    assert dmarc(out).result == "pass" and out.verdict == "continue"


def test_a_client_without_an_address_leaves_no_history_row(tmp_path: Path) -> None:
    # Its row had source_ip '', and the aggregate report failed the RFC 7489 schema.
    db = tmp_path / "h.sqlite"
    zones = {"_dmarc.example.org": {"TXT": ["v=DMARC1; p=none; rua=mailto:r@example.org"]}}
    msg = b"From: a@example.org\r\nSubject: t\r\n\r\nbody\r\n"
    cfg = {"dmarc": {"history_db": str(db)}}
    with Harness(cfg, plugins={"dmarc": DMARCPlugin}, zones=zones) as h:
        h.send(msg, client_ip="")
        h.send(msg, client_ip="192.0.2.1")
    rows = sqlite3.connect(db).execute("SELECT source_ip FROM messages").fetchall()
    assert rows == [("192.0.2.1",)]


def test_a_long_rua_is_cut_at_a_comma_in_the_history() -> None:
    from milterd_plugins.dmarc import MAX_RUA_STORED, _kept_rua

    head = "mailto:a@example.com," * (MAX_RUA_STORED // 21)
    rua = head[: MAX_RUA_STORED - 10] + ",mailto:dmarc@example.com"
    kept = _kept_rua(rua)
    assert len(kept) <= MAX_RUA_STORED and not kept.endswith("example.co")
    assert all(u.endswith("example.com") or not u for u in kept.split(","))


def test_config_domains_with_an_empty_label_are_refused() -> None:
    from milterd_plugins.dmarc import DMARCConfig

    with pytest.raises(ValueError, match="not a domain name"):
        DMARCConfig.model_validate({"never_reject": ["a..b"]})


def test_config_domains_that_loaded_before_still_load() -> None:
    from milterd_plugins.dmarc import DMARCConfig

    conf = DMARCConfig.model_validate({"never_reject": ["localhost", "corp", "Bücher.example"]})
    assert conf.never_reject == ["localhost", "corp", "xn--bcher-kva.example"]


def test_a_short_wait_for_one_insert_does_not_stay_on_the_pooled_connection(
    tmp_path: Path,
) -> None:
    """Found by a concurrency review: add() set PRAGMA busy_timeout to the message's time
    left (0 at worst) and handed the connection back with it; the hourly pruner then
    failed at once ("database is locked") while another worker wrote."""
    import threading

    from milterd_plugins.dmarc import POOL_BUSY_MS, Store

    path = tmp_path / "hist.sqlite"
    store = Store(str(path))
    cols = [r[1] for r in sqlite3.connect(path).execute("PRAGMA table_info(messages)")]
    row = {c: ("0" if c != "ts" else 1) for c in cols if c != "id"}
    store.add(row, timeout=0.0)
    with store.pool.conn() as db:
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == POOL_BUSY_MS
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # another worker writing for a moment
    threading.Timer(0.3, lambda: other.execute("COMMIT")).start()
    assert store.prune(time.time()) == 1  # waited for it instead of failing
    other.close()
    store.close()
