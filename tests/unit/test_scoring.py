"""The scoring plugin through the harness: result symbols, rules, GTUBE, budget, actions."""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

import pytest
from milterd_plugins.scoring import DECISION_SYMBOL, ScoringPlugin
from milterd_plugins.scoring import rules as rules_mod
from milterd_plugins.scoring.content import extract, html_to_text
from milterd_plugins.scoring.rules import GTUBE, compile_meta

from milterd import ConfigError, Context, Result, hookimpl
from milterd.testing import Harness, Outcome

PLAIN = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nHello there.\r\n"


class Auth:
    """Stands in for the SPF/DKIM/DMARC plugins: records fixed results and a symbol."""

    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_result(Result("spf", "fail", properties=(("smtp.mailfrom", "example.org"),)))
        ctx.add_result(Result("dkim", "pass", properties=(("header.d", "example.org"),)))
        ctx.add_result(Result("dkim", "pass", properties=(("header.d", "other.example"),)))
        ctx.add_result(Result("dmarc", "fail", properties=(("header.from", "example.org"),)))
        ctx.add_symbol("OTHER_PLUGIN_SYM", 0.5, "from another plugin")


def run(
    section: dict[str, Any],
    msg: bytes = PLAIN,
    *,
    auth_plugin: bool = False,
    **send: Any,
) -> Outcome:
    plugins: dict[str, object] = {}
    cfg: dict[str, Any] = {}
    if auth_plugin:
        plugins["auth"] = Auth
        cfg["auth"] = {}
    plugins["scoring"] = ScoringPlugin
    cfg["scoring"] = section
    with Harness(cfg, plugins=plugins) as h:
        return h.send(msg, **send)


def syms(out: Outcome) -> dict[str, float]:
    return {s.name: s.score for s in out.symbols if s.name != DECISION_SYMBOL}


def action(out: Outcome) -> str:
    (d,) = [s for s in out.symbols if s.name == DECISION_SYMBOL]
    return d.options[0].split("=", 1)[1]


def rule(name: str, type_: str, score: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, "score": score, **kw}


# --- results of other plugins -------------------------------------------------------------


def test_results_map_to_symbols_with_default_scores() -> None:
    out = run({}, auth_plugin=True)
    s = syms(out)
    assert s["SPF_FAIL"] == 2.0
    assert s["DKIM_PASS"] == -0.2  # two dkim=pass results count once
    assert s["DMARC_FAIL"] == 3.5
    assert s["OTHER_PLUGIN_SYM"] == 0.5
    assert out.score == pytest.approx(2.0 - 0.2 + 3.5 + 0.5)
    (spf,) = [x for x in out.symbols if x.name == "SPF_FAIL"]
    assert spf.options == ("example.org",)


def test_result_scores_and_names_are_configurable() -> None:
    out = run(
        {
            "results": {"spf=fail": 7.0, "dkim=pass": -1.5},
            "result_names": {"spf=fail": "R_SPF_FAIL"},
            "result_defaults": False,
        },
        auth_plugin=True,
    )
    s = syms(out)
    assert s["R_SPF_FAIL"] == 7.0 and s["DKIM_PASS"] == -1.5
    assert "SPF_FAIL" not in s and "DMARC_FAIL" not in s  # defaults off


def test_with_the_real_spf_plugin() -> None:
    section = {"results": {"spf-helo=none": 0.3}}
    cfg = {"spf": {"Mail_From_reject": "False", "HELO_reject": "False"}, "scoring": section}
    zones = {"example.org": {"TXT": ["v=spf1 -all"]}}
    with Harness(cfg, plugins={"scoring": ScoringPlugin}, zones=zones) as h:
        out = h.send(PLAIN, sender="a@example.org", helo="nohelo.example.org")
    assert out.verdict == "continue"
    s = syms(out)
    assert s["SPF_FAIL"] == 2.0  # MAIL FROM
    assert s["SPF_HELO_NONE"] == 0.3  # the HELO check has its own method name
    assert "SPF_NONE" not in s


def test_bad_result_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="method=result"):
        run({"results": {"spffail": 1.0}})


# --- rules ---------------------------------------------------------------------------------


def test_header_rules_one_header_and_all_headers_decoded() -> None:
    msg = (
        b"From: a@example.org\r\nSubject: =?utf-8?b?"
        + base64.b64encode("Gratis Geld für Sie".encode())
        + b"?=\r\nX-Mailer: BulkBlaster 3\r\n\r\nbody\r\n"
    )
    out = run(
        {
            "rules": [
                rule("SUBJ_GELD", "header", 2, header="Subject", pattern=r"geld f\u00fcr"),
                rule("ANY_BULK", "header", 1, pattern=r"^X-Mailer: bulkblaster"),
                rule("SUBJ_BULK", "header", 1, header="Subject", pattern="bulk"),
            ]
        },
        msg,
    )
    s = syms(out)
    assert s["SUBJ_GELD"] == 2 and s["ANY_BULK"] == 1
    assert "SUBJ_BULK" not in s


def test_body_rules_see_decoded_text_and_html_reduced_to_text() -> None:
    b64 = base64.b64encode(b"Cheap watches, click now").decode()
    msg = (
        "From: a@example.org\r\nSubject: x\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/alternative; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: base64\r\n\r\n{b64}\r\n"
        "--b1\r\nContent-Type: text/html\r\n\r\n"
        "<html><style>.x{color:red}</style><p>Best <b>price</b>&nbsp;ever</p></html>\r\n"
        "--b1--\r\n"
    ).encode()
    out = run(
        {
            "rules": [
                rule("CHEAP", "body", 1, pattern=r"cheap watches"),
                rule("PRICE", "body", 1, pattern=r"best price\s+ever"),
                rule("STYLE", "body", 1, pattern=r"color:red"),  # inside <style>: not text
                rule("RAW_B64", "raw", 1, pattern=re_escape(b64[:12])),
                rule("RAW_CHEAP", "raw", 1, pattern="cheap watches"),  # only base64 in raw
            ]
        },
        msg,
    )
    s = syms(out)
    assert set(s) >= {"CHEAP", "PRICE", "RAW_B64"}
    assert "STYLE" not in s and "RAW_CHEAP" not in s


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def test_uri_rules_match_domain_and_subdomains_only() -> None:
    msg = (
        b"Subject: x\r\nContent-Type: text/html\r\n\r\n"
        b'<a href="https://Login.Bad-Bank.example/x?y=1">here</a> and www.shop.example:8080/z'
        b" and http://notbad-bank.example/\r\n"
    )
    out = run(
        {
            "rules": [
                rule("URI_BANK", "uri", 3, domains=["bad-bank.example"]),
                rule("URI_SHOP", "uri", 1, domains=["shop.example"]),
                rule("URI_NONE", "uri", 1, domains=["example.net"]),
                rule("URI_RE", "uri", 1, pattern=r"^notbad-"),
            ]
        },
        msg,
    )
    s = syms(out)
    assert s["URI_BANK"] == 3 and s["URI_SHOP"] == 1 and s["URI_RE"] == 1
    assert "URI_NONE" not in s
    (bank,) = [x for x in out.symbols if x.name == "URI_BANK"]
    assert bank.options == ("login.bad-bank.example",)


def test_envelope_rules_and_client_cidr() -> None:
    section = {
        "rules": [
            rule("FROM_SPAMMER", "sender", 1, pattern=r"@spammer\.example$"),
            rule("TO_SALES", "recipient", 1, pattern=r"^sales@"),
            rule("HELO_DYN", "helo", 1, pattern=r"dyn\.isp\.example$"),
            rule("CLIENT_NET", "client", 2, networks=["198.51.100.0/24", "2001:db8::/32"]),
        ]
    }
    out = run(
        section,
        sender="x@spammer.example",
        recipients=["sales@example.com", "b@example.com"],
        helo="host-1.dyn.isp.example",
        client_ip="198.51.100.77",
    )
    assert set(syms(out)) == {"FROM_SPAMMER", "TO_SALES", "HELO_DYN", "CLIENT_NET"}
    out6 = run(section, client_ip="2001:db8:1::5")
    assert set(syms(out6)) == {"CLIENT_NET"}
    none = run(section, client_ip="192.0.2.9")
    assert syms(none) == {}


def _attach(name: str, ctype: str = "application/octet-stream") -> bytes:
    return (
        "From: a@example.org\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="bb"\r\n\r\n'
        "--bb\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n"
        f'--bb\r\nContent-Type: {ctype}; name="{name}"\r\n'
        f'Content-Disposition: attachment; filename="{name}"\r\n'
        "Content-Transfer-Encoding: base64\r\n\r\nAAAA\r\n--bb--\r\n"
    ).encode()


def test_mime_builtin_checks() -> None:
    exe = syms(run({}, _attach("setup.exe")))
    assert exe["MIME_EXE_ATTACHMENT"] == 4.0 and "MIME_DOUBLE_EXTENSION" not in exe
    double = syms(run({}, _attach("invoice.pdf.scr")))
    assert double["MIME_DOUBLE_EXTENSION"] == 3.0 and "MIME_EXE_ATTACHMENT" in double
    arc = syms(run({}, _attach("docs.zip", "application/zip")))
    assert arc == {"MIME_ARCHIVE_ATTACHMENT": 0.5}
    clean = syms(run({}, _attach("report.pdf", "application/pdf")))
    assert clean == {}
    off = syms(run({"mime": {"enabled": False}}, _attach("setup.exe")))
    assert off == {}


def test_attachment_and_content_type_rules() -> None:
    section = {
        "rules": [
            rule("ATT_INVOICE", "attachment", 1, pattern=r"^invoice"),
            rule("CT_PDF", "content_type", 1, pattern=r"^application/pdf$"),
        ]
    }
    s = syms(run(section, _attach("Invoice-2024.pdf", "application/pdf")))
    assert s == {"ATT_INVOICE": 1, "CT_PDF": 1}


def test_size_rule() -> None:
    section = {
        "rules": [rule("BIG", "size", 1, min_size=1000), rule("TINY", "size", 1, max_size=200)]
    }
    assert set(syms(run(section))) == {"TINY"}
    big = PLAIN + b"x" * 2000 + b"\r\n"
    assert set(syms(run(section, big))) == {"BIG"}


def test_meta_rules_and_or_not_over_all_symbols() -> None:
    section = {
        "rules": [
            rule("A", "body", 1, pattern="hello"),
            rule("B", "body", 1, pattern="absent-word"),
            rule("M_AND", "meta", 5, expression="A && SPF_FAIL"),
            rule("M_NOT", "meta", 1, expression="A and not B"),
            rule("M_OR", "meta", 1, expression="(B || OTHER_PLUGIN_SYM) && !M_NOPE"),
            rule("M_NOPE", "meta", 1, expression="B or (A and not A)"),
            rule("M_CHAIN", "meta", 1, expression="M_AND && M_NOT"),
        ]
    }
    s = syms(run(section, auth_plugin=True))
    assert {"A", "M_AND", "M_NOT", "M_OR", "M_CHAIN"} <= set(s)
    assert "B" not in s and "M_NOPE" not in s
    without = syms(run(section))  # no SPF_FAIL, no OTHER_PLUGIN_SYM
    assert "M_AND" not in without and "M_OR" not in without and "M_CHAIN" not in without


def test_meta_parser() -> None:
    pred, refs = compile_meta("X", "A && (B || !C) and not D")
    assert refs == {"A", "B", "C", "D"}
    assert pred({"A", "B"}) and pred({"A"}) and not pred({"A", "C"}) and not pred({"A", "D"})
    for bad in ("A &&", "(A", "A B", "&& A", "A || )"):
        with pytest.raises(ValueError):
            compile_meta("X", bad)


@pytest.mark.parametrize(
    ("rules", "needle"),
    [
        ([rule("X", "body", pattern="(unclosed")], "bad pattern"),
        ([rule("X", "meta", expression="Y"), rule("Y", "meta", expression="X")], "cycle"),
        ([rule("X", "body")], "needs 'pattern'"),
        ([rule("X", "client", networks=["300.1.1.1/8"])], "does not appear"),
        ([rule("X", "body", pattern="a"), rule("X", "body", pattern="b")], "twice"),
        # a score past what one symbol may carry would fail the plugin on every message
        ([rule("X", "body", 2e6, pattern="a")], "less than or equal to 1000000"),
    ],
)
def test_broken_rules_refuse_the_config(rules: list[dict[str, Any]], needle: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=needle):
        run({"rules": rules})


def test_scores_and_weights_are_bounded_in_the_config() -> None:
    with pytest.raises(ConfigError, match=r"results\.spf=fail: Input should be greater"):
        run({"results": {"spf=fail": -3e6}})
    with pytest.raises(ConfigError, match=r"spamd\.weight: Input should be less"):
        run({"spamd": {"weight": 1e4}})
    with pytest.raises(ConfigError, match=r"bayes\.spam_score: Input should be less"):
        run({"bayes": {"spam_score": 1e7}})
    with pytest.raises(ConfigError, match=r"gtube: Input should be less"):
        run({"gtube": 1e7})
    assert run({"gtube": "off"}).errors == []


def test_rules_compiled_once_at_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    section = {"rules": [rule(f"R{i}", "body", pattern=f"word{i}") for i in range(20)]}
    calls = []
    real = rules_mod.regex.compile

    def counting(*a: Any, **k: Any) -> Any:
        calls.append(a[0])
        return real(*a, **k)

    monkeypatch.setattr(rules_mod.regex, "compile", counting)
    with Harness({"scoring": section}, plugins={"scoring": ScoringPlugin}) as h:
        at_start = len(calls)
        for _ in range(3):
            h.send(PLAIN + b"word3\r\n")
        assert at_start == 20 and len(calls) == 20


def test_gtube_rejects_with_configured_reply() -> None:
    msg = b"Subject: test\r\n\r\n" + GTUBE.encode() + b"\r\n"
    out = run({"reject_text": "Go away, spammer", "reject_code": "554", "reject_xcode": "5.7.0"},
              msg)  # fmt: skip
    assert out.verdict == "reject" and syms(out)["GTUBE"] == 1000
    v = out.decision.verdict
    assert (v.code, v.xcode, v.text) == ("554", "5.7.0", "Go away, spammer")  # type: ignore[union-attr]
    assert "GTUBE" not in syms(run({"gtube": None}, msg))
    assert run({}, PLAIN).verdict == "continue"


# --- the scan budget -----------------------------------------------------------------------


def test_scan_bytes_budget_gives_scan_incomplete() -> None:
    body = b"x" * 5000 + b" needle-late\r\n"
    section = {"rules": [rule("LATE", "body", 5, pattern="needle-late"),
                         rule("EARLY", "header", 1, header="Subject", pattern="hello")],
               "scan_bytes": 2048, "scan_incomplete": 0.5}  # fmt: skip
    out = run(section, PLAIN + body)
    s = syms(out)
    assert s["SCAN_INCOMPLETE"] == 0.5 and s["EARLY"] == 1 and "LATE" not in s
    full = syms(run({**section, "scan_bytes": 100_000}, PLAIN + body))
    assert "LATE" in full and "SCAN_INCOMPLETE" not in full


def test_scan_time_budget_stops_a_catastrophic_regex() -> None:
    section = {
        "rules": [
            rule("FIRST", "body", 1, pattern="xxx"),
            rule("EVIL", "body", 1, pattern="(x+x+)+y"),
            rule("AFTER", "body", 1, pattern="xxx"),
        ],
        "scan_time": 0.3,
    }
    t0 = time.monotonic()
    out = run(section, PLAIN + b"x" * 5000 + b"\r\n")
    elapsed = time.monotonic() - t0
    s = syms(out)
    assert "SCAN_INCOMPLETE" in s and "FIRST" in s and "AFTER" not in s
    assert out.verdict == "continue" and not out.errors
    assert elapsed < 2.0


# --- actions -------------------------------------------------------------------------------


def scored(score: float) -> dict[str, Any]:
    return {"rules": [rule("SCORE", "body", score, pattern="hello")]}


def test_thresholds_pick_one_action() -> None:
    acts = {"reject": 20.0, "quarantine": 15.0, "rewrite_subject": 10.0, "add_header": 5.0}
    res = {}
    for score in (1, 6, 11, 16, 21):
        out = run({**scored(score), "actions": acts})
        res[score] = (action(out), out.verdict, out.header("Subject"), out.header("X-Spam"))
    assert res[1] == ("no_action", "continue", "hello", None)
    assert res[6] == ("add_header", "continue", "hello", "Yes")
    assert res[11] == ("rewrite_subject", "continue", "***SPAM*** hello", "Yes")
    assert res[16][:2] == ("quarantine", "quarantine") and res[16][3] == "Yes"
    assert res[21][:3] == ("reject", "reject", None)


def test_subject_template_and_missing_subject() -> None:
    section = {**scored(9), "subject_template": "[SPAM {score}] {subject}"}
    assert run(section).header("Subject") == "[SPAM 9.0] hello"
    out = run(section, b"From: a@example.org\r\n\r\nhello\r\n")
    assert out.header("Subject") == "[SPAM 9.0]"


def test_per_recipient_domain_overrides() -> None:
    section = {
        "rules": [rule("SCORE", "body", 6, pattern="hello"),
                  rule("OPTIN", "body", 10, pattern="hello", enabled=False)],
        "actions": {"reject": 15.0, "add_header": 5.0, "rewrite_subject": None},
        "domains": {
            "strict.example": {"actions": {"reject": 5.0}},
            "lax.example": {"disabled_rules": ["SCORE"]},
            "optin.example": {"enabled_rules": ["OPTIN"]},
        },
    }  # fmt: skip
    assert action(run(section, recipients=["a@example.com"])) == "add_header"
    assert run(section, recipients=["a@strict.example"]).verdict == "reject"
    lax = run(section, recipients=["a@lax.example"])
    assert action(lax) == "no_action" and "SCORE" not in syms(lax)
    optin = run(section, recipients=["a@optin.example"])
    assert syms(optin) == {"SCORE": 6, "OPTIN": 10} and optin.verdict == "reject"
    # Mixed recipient domains: the most lenient settings of them apply.
    mixed = run(section, recipients=["a@strict.example", "b@example.com"])
    assert mixed.verdict == "continue" and action(mixed) == "add_header"
    # A bare <postmaster> (RFC 5321) is judged by the global settings, not another's.
    bare = run(section, recipients=["postmaster", "a@strict.example"])
    assert bare.verdict == "continue" and action(bare) == "add_header"


def test_mixed_domains_get_the_most_lenient_of_their_own_actions() -> None:
    """Found by a review: thresholds were merged action by action, so two domains that
    each turned off a different marking action left only greylist, a 451 neither domain
    would give; now each domain's own action is found and the most lenient one wins."""
    section = {
        "rules": [rule("SCORE", "body", 3, pattern="hello")],
        "actions": {"reject": 15.0, "add_header": 2.0, "rewrite_subject": 2.5, "greylist": 1.0},
        "domains": {
            "a.example": {"actions": {"add_header": None}},
            "b.example": {"actions": {"rewrite_subject": None}},
        },
    }
    assert action(run(section, recipients=["x@a.example"])) == "rewrite_subject"
    assert action(run(section, recipients=["x@b.example"])) == "add_header"
    both = run(section, recipients=["x@a.example", "y@b.example"])
    assert both.verdict == "continue" and action(both) == "add_header"


def test_a_pending_expire_shorter_than_the_delay_is_a_config_error() -> None:
    from milterd_plugins.scoring.config import GreylistConfig

    with pytest.raises(ValueError, match=r"pending_expire \(.*\) must be longer than delay"):
        GreylistConfig(delay=3600, pending_expire=1800)
    GreylistConfig(delay=300, pending_expire=86400)


def test_trusted_clients_are_not_scored_unless_asked() -> None:
    msg = b"Subject: t\r\n\r\n" + GTUBE.encode() + b"\r\n"
    out = run({}, msg, auth="alice")
    assert out.verdict == "continue" and syms(out) == {}
    assert run({"scan_trusted": True}, msg, auth="alice").verdict == "reject"


def test_symbols_and_total_on_the_summary_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    out = run(scored(3))
    assert len(out.notes) == 1
    assert out.notes[0].startswith("scoring: score=3.00 action=no_action symbols=[SCORE(3)] scan=")
    lines = [r.getMessage() for r in caplog.records if "action=" in r.getMessage()]
    assert len(lines) == 1, lines  # the summary line, no second line of the plugin's own
    assert "notes=[scoring: score=3.00 action=no_action symbols=[SCORE(3)] scan=" in lines[0]


def test_greylist_tempfails_first_attempt_then_passes(tmp_path: Any) -> None:
    section = {
        **scored(3),
        "actions": {"greylist": 2.0},
        "greylist": {"path": str(tmp_path / "grey.sqlite"), "delay": 0.6},
    }
    with Harness({"scoring": section}, plugins={"scoring": ScoringPlugin}) as h:
        first = h.send(PLAIN, client_ip="203.0.113.5")
        again = h.send(PLAIN, client_ip="203.0.113.9")  # same /24, too early
        other = h.send(PLAIN, client_ip="203.0.113.5", recipients=["new@example.com"])
        time.sleep(0.7)
        retry = h.send(PLAIN, client_ip="203.0.113.5")
        later = h.send(PLAIN, client_ip="203.0.113.5")
        low = h.send(b"Subject: x\r\n\r\nnothing\r\n", recipients=["z@example.com"])
    assert first.verdict == "tempfail" and again.verdict == "tempfail"
    assert other.verdict == "tempfail"
    v = first.decision.verdict
    assert (v.code, v.xcode) == ("451", "4.7.1")  # type: ignore[union-attr]
    assert retry.verdict == "continue" and later.verdict == "continue"
    assert low.verdict == "continue"  # under the threshold: never greylisted


# --- content extraction --------------------------------------------------------------------


def test_html_to_text() -> None:
    assert html_to_text("<p>a&amp;b</p><script>x()</script><br>c").split() == ["a&b", "c"]


def test_extract_truncates_and_reports() -> None:
    c = extract(PLAIN + b"y" * 100, 60)
    assert c.truncated
    assert not extract(PLAIN, 10_000).truncated


# --- the literal prefilter -----------------------------------------------------------------


def test_required_literal() -> None:
    from milterd_plugins.scoring.rules import required_literal

    assert required_literal(r"\bcheap\s+(?:deal|item)s?12\b", True) == ("cheap", True)
    assert required_literal(r"cheap.{0,20}nowwow", False) == ("nowwow", False)
    assert required_literal(r"(?i)Viagra", False) == ("viagra", True)
    assert required_literal(r"a?bc(d|e)", True) is None  # no run of 3
    assert required_literal(r"(?:abc)?xy", True) is None  # optional group: not required
    assert required_literal(r"\p{Lu}+abc", True) is None  # regex-only syntax


@pytest.mark.parametrize(
    ("pattern", "case_sensitive", "text", "hit"),
    [
        (r"\bcheap\s+pills\b", False, "Buy CHEAP   Pills now", True),
        (r"\bcheap\s+pills\b", True, "Buy CHEAP pills now", False),
        (r"stra(ss|ß)e", False, "HAUPTSTRAẞE 5", True),
        (r"kelvin", False, "\u212aELVIN scale", True),  # Kelvin sign folds to k
        (r"sale", False, "\u017fALE", True),  # long s folds to s
        (r"(?x) free \s money", False, "FREE MONEY", True),
        (r"abc|xyz", False, "only xyz here", True),
    ],
)
def test_prefilter_never_hides_a_match(
    pattern: str, case_sensitive: bool, text: str, hit: bool
) -> None:
    msg = f"Subject: x\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{text}\r\n".encode()
    r = rule("R", "body", 1, pattern=pattern, case_sensitive=case_sensitive)
    assert ("R" in syms(run({"rules": [r]}, msg))) is hit


def test_prefilter_randomised_against_plain_search() -> None:
    import random

    import regex  # type: ignore[import-untyped]
    from milterd_plugins.scoring.rules import fold, required_literal

    rng = random.Random(7)
    alphabet = "abcsSkK\u212a\u017f\u00df\u1e9e \u0130i\u0131I"
    pieces = ["abc", "ss", "k", "\u00df", "s+", "(?:ab)?", "[kK]", ".", "\\s*", "sk", "i"]
    misses = 0
    for _ in range(20000):
        pattern = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for ic in (True, False):
            lit = required_literal(pattern, ic)
            if lit is None:
                continue
            flags = regex.V0 | (regex.IGNORECASE if ic else 0)
            if regex.search(pattern, text, flags) is not None:
                hay = fold(text) if lit[1] else text
                misses += lit[0] not in hay
    assert misses == 0


def test_actions_and_gtube_turn_off_with_false_or_off() -> None:
    msg = b"Subject: test\r\n\r\n" + GTUBE.encode() + b"\r\n"
    toml = """
[milterd]
authserv_id = "mx.test"
[plugins.scoring]
gtube = "off"
[plugins.scoring.actions]
reject = false
add_header = "off"
[plugins.scoring.domains."x.example"]
actions = { rewrite_subject = false }
"""
    with Harness(toml, plugins={"scoring": ScoringPlugin}) as h:
        assert "GTUBE" not in syms(h.send(msg))
        assert action(h.send(PLAIN + b"x" * 10)) == "no_action"
    on = {"rules": [rule("BIG", "body", 100, pattern="hello")], "actions": {"reject": False}}
    assert action(run(on)) == "rewrite_subject"
    off = {**on, "domains": {"x.example": {"actions": {"rewrite_subject": "off"}}}}
    assert action(run(off, recipients=["a@x.example"])) == "add_header"


def test_milterd_check_shows_every_symbol_and_the_total(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from milterd.cli import main as milterd_main

    # check sets up the daemon's logging (no propagation): not for the rest of this run.
    monkeypatch.setattr("milterd.logs.setup_logging", lambda *args: None)

    conf = tmp_path / "m.toml"
    conf.write_text(
        '[milterd]\nauthserv_id = "mx.test"\n[plugins.scoring]\n'
        '[[plugins.scoring.rules]]\nname = "HELLO"\ntype = "body"\npattern = "hello"\n'
        'score = 5.5\ndescription = "greets"\n'
        '[[plugins.scoring.rules]]\nname = "SUBJ"\ntype = "header"\nheader = "Subject"\n'
        'pattern = "hello"\nscore = 1.25\n[plugins.tagging]\n'
    )
    eml = tmp_path / "m.eml"
    eml.write_bytes(PLAIN)
    rc = milterd_main(["-c", str(conf), "check", str(eml), "--from", "a@example.org",
                       "--rcpt", "b@example.com", "--client-ip", "192.0.2.1"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0
    assert "score: 6.75" in out
    assert "HELLO +5.5 greets" in out and "SUBJ +1.25" in out
    assert "MILTERD_SCORING +0 action add_header" in out
    assert "note: scoring: score=6.75 action=add_header symbols=[HELLO(5.5) SUBJ(1.25)]" in out


def _nested(depth: int) -> bytes:
    head = b"From: a@example.org\r\nMIME-Version: 1.0\r\n"
    head += b"Content-Type: multipart/mixed; boundary=b0\r\n\r\n"
    opening = b"".join(
        b"--b%d\r\nContent-Type: multipart/mixed; boundary=b%d\r\n\r\n" % (i, i + 1)
        for i in range(depth)
    )
    leaf = b"--b%d\r\nContent-Type: text/plain\r\n\r\ninnermost words\r\n" % depth
    closing = b"".join(b"--b%d--\r\n" % i for i in range(depth, -1, -1))
    return head + opening + leaf + closing


@pytest.mark.parametrize(("depth", "complete"), [(5, True), (80, False), (1500, False)])
def test_deeply_nested_mime_is_scored_not_failed(depth: int, complete: bool) -> None:
    # 1,500 levels made the email parser raise RecursionError: the plugin failed and the
    # message was deferred. Now nesting is followed MAX_DEPTH deep (iteratively); what is
    # deeper, or what the parser cannot follow, gives SCAN_INCOMPLETE.
    content = extract(_nested(depth), 10_000_000)
    assert content.too_deep is not complete
    assert ("innermost words" in content.text) is (complete or depth > 1000)
    with Harness({"scoring": {}}, plugins={"scoring": ScoringPlugin}) as h:
        out = h.send(_nested(depth))
    assert out.errors == [] and out.verdict == "continue"
    assert ("SCAN_INCOMPLETE" in {s.name for s in out.symbols}) is not complete
