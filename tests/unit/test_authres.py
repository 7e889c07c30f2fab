"""The ``authres`` plugin: one header on top, round trip through the authres parser,
forged headers claiming our authserv-id removed wherever they stand."""

from __future__ import annotations

import re
import time

import authres
import pytest
from milterd_plugins.authres import AuthenticationResults, authserv_id_of, build_header

from milterd import Context, Result, hookimpl
from milterd.testing import Harness

RESULTS = [
    Result("spf", "pass", properties=(("smtp.mailfrom", "example.org"),)),
    Result(
        "spf",
        "fail",
        reason='quoted "reason"; with ; semicolons',
        properties=(("smtp.helo", "mail.example.org"),),
    ),
    Result(
        "dkim",
        "pass",
        properties=(
            ("header.d", "example.org"),
            ("header.i", "@example.org"),
            ("header.s", "sel"),
            ("header.b", "abcdefgh"),
        ),
    ),
    Result("arc", "pass", properties=(("header.oldest-pass", "0"),)),
    Result(
        "dmarc", "fail", properties=(("header.from", "example.org"), ("policy.dmarc", "reject"))
    ),
    Result("x-thirdparty", "pass", properties=(("header.x", "y"),)),
]


class Record:
    @hookimpl
    def eom(self, ctx: Context) -> None:
        for r in RESULTS:
            ctx.add_result(r)


def test_header_round_trips_through_the_authres_parser() -> None:
    with Harness(plugins={"record": Record, "authres": AuthenticationResults}) as h:
        out = h.send(b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n")
    (name, value), *_ = out.headers()
    assert name == "Authentication-Results"
    assert [n for n, _ in out.headers()].count("Authentication-Results") == 1
    parsed = authres.AuthenticationResultsHeader.parse(f"{name}: {value}")
    assert parsed.authserv_id == "mx.test.example"
    # the parser keeps quoted-pair escapes (\") as they are on the wire: undo them
    got = [
        (
            r.method,
            r.result,
            re.sub(r"\\(.)", r"\1", r.reason or ""),
            tuple((f"{p.type}.{p.name}", p.value) for p in r.properties),
        )
        for r in parsed.results
    ]
    assert got == [(r.method, r.result, r.reason, r.properties) for r in RESULTS]


def test_none_when_no_results() -> None:
    with Harness(plugins={"authres": AuthenticationResults}) as h:
        out = h.send(b"Subject: x\r\n\r\nbody\r\n")
    assert out.header("Authentication-Results") == "mx.test.example; none"


FORGED = (
    b"Authentication-Results: other.example; spf=pass smtp.mailfrom=a.example\r\n"
    b"Authentication-Results: mx.test.example; dkim=pass header.d=forged.example\r\n"
    b"Received: from x by y\r\n"
    b"ARC-Authentication-Results: i=1; (comment) MX.Test.Example; dmarc=pass\r\n"
    b"Authentication-Results: (sneaky) mx.test.example (1); spf=pass\r\n"
    b"Authentication-Results: mx.test.example.evil; spf=pass\r\n"
    b"ARC-Authentication-Results: i=1; lists.example; spf=pass\r\n"
    b"Authentication-Results:\r\n mx.test.example;\r\n\tdmarc=pass\r\n"
    b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
)


def test_every_forged_header_is_removed_and_the_others_stay_in_order() -> None:
    with Harness(plugins={"authres": AuthenticationResults}) as h:
        out = h.send(FORGED)
    names_values = out.headers()
    assert names_values[0] == ("Authentication-Results", "mx.test.example; none")
    assert names_values[1:] == [
        ("Authentication-Results", "other.example; spf=pass smtp.mailfrom=a.example"),
        ("Received", "from x by y"),
        # sealed into its ARC set: deleting it would break the chain (our own, looped back)
        ("ARC-Authentication-Results", "i=1; (comment) MX.Test.Example; dmarc=pass"),
        ("Authentication-Results", "mx.test.example.evil; spf=pass"),
        ("ARC-Authentication-Results", "i=1; lists.example; spf=pass"),
        ("From", "a@example.org"),
        ("Subject", "x"),
    ]


def test_remove_forged_false_keeps_them() -> None:
    with Harness(
        {"authres": {"remove_forged": False}}, plugins={"authres": AuthenticationResults}
    ) as h:
        out = h.send(FORGED)
    assert [n for n, _ in out.headers()].count("Authentication-Results") == 6


@pytest.mark.parametrize(
    ("name", "value", "want"),
    [
        ("Authentication-Results", " mx.example; none", "mx.example"),
        ("Authentication-Results", "(c (nested)) MX.example 1; spf=pass", "mx.example"),
        ("ARC-Authentication-Results", "i=3; mx.example; spf=pass", "mx.example"),
        ("Authentication-Results", "", ""),
        # an unclosed comment runs to the end (the authres parser refuses the field)
        ("Authentication-Results", "(((", ""),
        # nested deeper than the 5 levels once stripped: authres and dkimpy read it as ours
        ("Authentication-Results", "((((((x)))))) MX.example; dkim=pass", "mx.example"),
        ("Authentication-Results", "(x\\)) mx.example; spf=pass", "mx.example"),
        ("Authentication-Results", 'mx.example (a "(" b); spf=pass', "mx.example"),
        # RFC 8601: the authserv-id may be a quoted-string; a forger will use one.
        ("Authentication-Results", '"MX.example"; dkim=pass', "mx.example"),
        ("Authentication-Results", '(x) "mx.example" ; spf=pass', "mx.example"),
        ("Authentication-Results", '"unterminated; spf=pass', ""),
    ],
)
def test_authserv_id_of(name: str, value: str, want: str) -> None:
    assert authserv_id_of(name, value) == want


def test_authserv_id_of_any_nesting_depth_in_linear_time() -> None:
    deep = "(" * 50_000 + "x" + ")" * 50_000
    t = time.perf_counter()
    assert authserv_id_of("Authentication-Results", f"{deep} mx.example; spf=pass") == "mx.example"
    assert time.perf_counter() - t < 1.0


def test_deeply_nested_comment_does_not_hide_a_forgery() -> None:
    forged = (
        b"Authentication-Results: ((((((x)))))) mx.test.example;"
        b" dkim=pass header.d=bank.example\r\n"
        b"From: a@bank.example\r\nSubject: x\r\n\r\nbody\r\n"
    )
    with Harness(plugins={"authres": AuthenticationResults}) as h:
        out = h.send(forged)
    assert out.headers()[0] == ("Authentication-Results", "mx.test.example; none")
    assert [n for n, _ in out.headers()].count("Authentication-Results") == 1


def test_build_header_quotes_values_that_need_it() -> None:
    text = build_header(
        "mx.example", [Result("dmarc", "none", properties=(("header.from", "a b.example"),))]
    )
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + text)
    assert parsed.results[0].properties[0].value == "a b.example"


def test_build_header_replaces_what_a_header_cannot_carry() -> None:
    # Values come from the message (a signature's i= tag, a HELO name): NUL, CR, LF and
    # bytes that were not UTF-8 (surrogate escapes) become "?", the reason too.
    text = build_header(
        "mx.example",
        [
            Result(
                "dkim",
                "permerror",
                reason="bad\x00tag",
                properties=(("header.i", "\x00@example.org"), ("header.d", "ex\r\nample\udce9")),
            )
        ],
    )
    assert not re.search(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]", text)
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + text)
    props = {p.type + "." + p.name: p.value for p in parsed.results[0].properties}
    assert props == {"header.i": "?@example.org", "header.d": "ex??ample?"}
    assert parsed.results[0].reason == "bad?tag"


def test_signature_tag_with_nul_gives_a_result_not_a_tempfail() -> None:
    # Found by tests/unit/test_robustness.py: the NUL reached Authentication-Results, the
    # core refused the header and authres's on_error tempfailed the message.
    msg = (
        b"DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=s1;"
        b" i=\x00@example.org; h=from; bh=AAAA; b=AAAA\r\n"
        b"From: a@example.org\r\nSubject: hi\r\n\r\nx\r\n"
    )
    with Harness({"plugins": {"dkim": {}, "authres": {}}}) as h:
        out = h.send(msg)
    assert out.errors == [] and out.verdict == "continue"
    assert "header.i=?@example.org" in (out.header("Authentication-Results") or "")


def test_empty_property_is_left_out_instead_of_crashing() -> None:
    # An empty HELO name gave smtp.helo="": authres's QuotableValue crashed on it, authres
    # failed and the message was tempfailed (found by test_robustness_daemon.py).
    text = build_header(
        "mx.example",
        [Result("spf", "none", properties=(("smtp.helo", ""), ("smtp.mailfrom", "a@b.example")))],
    )
    assert text == "mx.example; spf=none smtp.mailfrom=a@b.example"


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("a@b.example", "a@b.example"),  # an address goes as it is
        ("@b.example", "@b.example"),
        ("x y@z.example", '"x y@z.example"'),  # white space: quoted
        ("postmaster@[192.0.2.1]", '"postmaster@[192.0.2.1]"'),
        ("2001:db8::1", '"2001:db8::1"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("example.org", "example.org"),
    ],
)
def test_property_values_are_quoted_where_rfc8601_needs_it(value: str, rendered: str) -> None:
    result = Result("spf", "pass", properties=(("smtp.mailfrom", value),))
    text = build_header("mx.example", [result])
    assert text == f"mx.example; spf=pass smtp.mailfrom={rendered}"
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + text)
    if "\\" not in rendered:  # the authres parser keeps quoted-pairs escaped
        assert parsed.results[0].properties[0].value == value


def test_reason_with_an_address_is_quoted() -> None:
    # authres leaves anything with "@" unquoted, but a reason is a token or a quoted-string
    text = build_header("mx.example", [Result("dkim", "fail", reason="key for a@b not found")])
    assert text == 'mx.example; dkim=fail reason="key for a@b not found"'
    parsed = authres.AuthenticationResultsHeader.parse("Authentication-Results: " + text)
    assert parsed.results[0].reason == "key for a@b not found"


class LongForged:
    @hookimpl
    def eom(self, ctx: Context) -> None:
        props = (("header.d", "d" * 2000 + ".example"), ("header.s", "s" * 900))
        ctx.add_result(Result("dkim", "fail", reason="x" * 2000, properties=props))


def test_forged_huge_values_are_capped_and_the_header_folded() -> None:
    """A forged signature's d= and s= can be any length: the header stays a valid field
    (no line over 998 octets; the MTA would break one mid-token, or refuse it)."""
    with Harness(plugins={"long": LongForged, "authres": AuthenticationResults}) as h:
        out = h.send(b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n")
    assert out.delivered is not None
    raw = out.delivered.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    (name, value), *_ = out.headers()
    parsed = authres.AuthenticationResultsHeader.parse(f"{name}: {value}")
    (r,) = parsed.results
    assert r.result == "fail" and len(r.properties[0].value) == 256


def test_an_address_like_value_that_is_no_address_is_quoted() -> None:
    """RFC 8601 pvalue: a value (token or quoted-string) or [local-part] "@" domain-name.
    "x@a=b" is neither (found by a conformance review); real addresses stay bare."""
    from milterd_plugins.authres import _PValue

    assert _PValue("x@a=b").quote_if_needed() == '"x@a=b"'
    assert _PValue("x@a/b?c").quote_if_needed() == '"x@a/b?c"'
    assert _PValue("x@a..b").quote_if_needed() == '"x@a..b"'
    for bare in ("user@example.com", "@example.com", "a.b+c=d/e@sub.example.org",
                 "ü@bücher.example"):  # fmt: skip
        assert _PValue(bare).quote_if_needed() == bare


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("jöe@example.com", "@example.com"),  # a non-ASCII local part is left out
        ("joe@bücher.example", "joe@xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("\u2603.example", "xn--n3h.example"),  # IDNA2008 refuses it: Punycode, as browsers
        ("jöe@\u2603.example", "@xn--n3h.example"),
        ("rsä", '"rs?"'),  # no domain: the letter becomes "?"
        ("a\u200db.example", "xn--ab-m1t.example"),
    ],
)
def test_non_ascii_values_are_written_so_that_authres_parses_them(
    value: str, rendered: str
) -> None:
    """Found by a review: authres (and with it dkimpy's ARC sealing) refuses any non-ASCII
    character in the field; a signature's i=jöe@example.com or a HELO of ☃.example meant
    no ARC seal for that message."""
    result = Result("dkim", "pass", properties=(("header.i", value),))
    text = build_header("mx.example", [result])
    assert text == f"mx.example; dkim=pass header.i={rendered}"
    authres.AuthenticationResultsHeader.parse("Authentication-Results: " + text)
