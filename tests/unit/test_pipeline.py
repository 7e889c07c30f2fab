"""The pipeline through the harness: stages, verdicts, ledger, limits, finalize."""

from __future__ import annotations

import time
from typing import Any

import pytest

from milterd import (
    Accept,
    AddHeader,
    ChangeHeader,
    Context,
    EnvRcpt,
    Message,
    Quarantine,
    Reject,
    Result,
    TempFail,
    Verdict,
    hookimpl,
)
from milterd.testing import FakeResolver, Harness, split_message

MSG = b"From: a@example.org\r\nTo: b@example.com\r\nSubject: hello\r\n\r\nBody line\r\n"


def test_reject_at_rcpt_refuses_that_recipient_only() -> None:
    class Block:
        @hookimpl
        def envrcpt(self, event: EnvRcpt) -> Reject | None:
            return (
                Reject("550", "5.1.1", "No such user")
                if event.recipient.startswith("bad")
                else None
            )

    class Seen:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            assert ctx.message is not None
            ctx.add_result(
                Result(
                    "rcpts",
                    "pass",
                    properties=tuple(("x.rcpt", r.address) for r in ctx.message.recipients),
                )
            )

    with Harness(plugins={"block": Block, "seen": Seen}) as h:
        out = h.send(MSG, recipients=["good@example.com", "bad@example.com", "also@example.com"])
    assert out.verdict == "continue"
    assert list(out.refused) == ["bad@example.com"]
    assert out.results[0].properties == (
        ("x.rcpt", "good@example.com"),
        ("x.rcpt", "also@example.com"),
    )


def test_accept_stops_only_that_plugin_and_signing_still_runs() -> None:
    calls: list[str] = []

    class Allow:
        @hookimpl
        def envfrom(self) -> Accept:
            return Accept(reason="allow-listed")

        @hookimpl
        def eom(self) -> None:
            calls.append("allow.eom")

    class Signer:
        actions = frozenset({"add_header"})

        @hookimpl
        def finalize(self, ctx: Context) -> None:
            calls.append("signer.finalize")
            ctx.add_change(AddHeader("DKIM-Signature", "v=1; fake"))

    with Harness(plugins={"allow": Allow, "signer": Signer}) as h:
        out = h.send(MSG)
    assert calls == ["signer.finalize"]
    assert out.verdict == "accept"
    assert out.headers()[0] == ("DKIM-Signature", "v=1; fake")


def test_every_plugin_runs_at_eom_even_after_a_reject() -> None:
    seen: list[str] = []

    class No:
        @hookimpl
        def eom(self) -> Reject:
            return Reject(reason="no")

    class Archive:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            seen.append("archive")

    with Harness(plugins={"no": No, "archive": Archive}) as h:
        out = h.send(MSG)
    assert out.verdict == "reject" and seen == ["archive"] and out.delivered is None


def test_an_early_reject_ends_the_stage_and_the_message() -> None:
    later: list[str] = []

    class First:
        @hookimpl
        def envfrom(self) -> TempFail:
            return TempFail("451", "4.7.1", "greylisted")

    class Second:
        @hookimpl
        def envfrom(self) -> None:
            later.append("called")

        @hookimpl
        def eom(self) -> None:
            later.append("eom")

    with Harness(plugins={"first": First, "second": Second}) as h:
        out = h.send(MSG)
    assert out.verdict == "tempfail" and out.stage == "envfrom" and later == []


def test_later_plugins_read_earlier_results() -> None:
    class Spf:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_result(Result("spf", "fail", properties=(("smtp.mailfrom", "example.org"),)))

    class Dmarc:
        after = ("spf",)

        @hookimpl
        def eom(self, ctx: Context) -> Quarantine | None:
            spf = ctx.results_for("spf")
            return Quarantine(reason="spf failed") if spf and spf[0].result == "fail" else None

    with Harness(plugins={"spf": Spf, "dmarc": Dmarc}) as h:
        out = h.send(MSG)
    assert out.verdict == "quarantine"
    assert [o.kind for o in out.ops] == ["quarantine"]


def test_finalize_sees_the_message_as_it_will_be_delivered() -> None:
    seen: dict[str, Any] = {}

    class Subject:
        actions = frozenset({"change_header", "add_header"})

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(ChangeHeader("Subject", "[SPAM] hello"))
            ctx.add_change(AddHeader("X-Spam-Flag", "YES"))

    class Signer:
        actions = frozenset({"add_header"})

        @hookimpl
        def finalize(self, ctx: Context, message: Message) -> None:
            seen["subject"] = message.get("Subject")
            seen["flag"] = message.get("X-Spam-Flag")
            seen["body"] = message.body()
            ctx.add_change(AddHeader("DKIM-Signature", "v=1"))

    with Harness(plugins={"signer": Signer, "subject": Subject}) as h:  # signer listed first
        out = h.send(MSG)
    assert seen == {"subject": "[SPAM] hello", "flag": "YES", "body": b"Body line\r\n"}
    assert out.headers()[0] == ("DKIM-Signature", "v=1")
    assert out.header("Subject") == "[SPAM] hello"


def test_changes_need_a_declared_action_and_a_message() -> None:
    class Sneaky:
        actions = frozenset({"add_header"})

        @hookimpl
        def connect(self, ctx: Context) -> None:
            ctx.add_result(Result("x", "pass"))  # no message yet

        @hookimpl
        def eom(self, ctx: Context) -> None:
            ctx.add_change(ChangeHeader("Subject", "undeclared"))

    with Harness(
        {"plugins": {"sneaky": {"on_error": "continue"}}}, plugins={"sneaky": Sneaky}
    ) as h:
        out = h.send(MSG)
    assert out.header("Subject") == "hello"
    kinds = [(p, s, d.split(":")[0]) for p, s, d in out.errors]
    assert ("sneaky", "eom", "exception") in kinds


@pytest.mark.parametrize(
    ("limit", "value", "message", "expect"),
    [
        ("max_headers", 2, MSG, "reject"),
        ("max_header_bytes", 40, MSG, "reject"),
        ("max_message_size", 60, MSG, "reject"),
    ],
)
def test_limits_give_their_documented_verdict(
    limit: str, value: int, message: bytes, expect: str
) -> None:
    class Nop:  # takes the message: the MTA sends headers and body (the limits apply)
        @hookimpl
        def eom(self, message: Message) -> None:
            return None

    with Harness({"milterd": {limit: value}, "plugins": {"nop": {}}}, plugins={"nop": Nop}) as h:
        out = h.send(message)
    assert out.verdict == expect
    # headers and body are negotiated without reply here: the 552 comes at end of message
    assert getattr(out.early or out.decision.verdict, "code", "") == "552"


def test_too_many_recipients_tempfails_the_extra_ones() -> None:
    with Harness({"milterd": {"max_recipients": 2}, "plugins": {}}) as h:
        assert "envrcpt" not in h.runtime.negotiation.noreply  # the core answers RCPT
        out = h.send(MSG, recipients=["a@x.example", "b@x.example", "c@x.example"])
    assert list(out.refused) == ["c@x.example"]
    assert getattr(out.refused["c@x.example"], "code", "") == "452"
    assert out.verdict == "continue"


def test_header_values_keep_raw_bytes_and_decode_invalid_utf8() -> None:
    raw_seen: list[bytes] = []

    class Reader:
        reads_body = False

        @hookimpl
        def eom(self, message: Message) -> None:
            raw_seen.extend(h.raw for h in message.headers)

    msg = b"Subject: caf\xc3\xa9 \xff\xfe\r\nX-Folded: one\r\n\ttwo\r\n\r\nb\r\n"
    with Harness(plugins={"reader": Reader}) as h:
        out = h.send(msg)
    assert raw_seen == [b" caf\xc3\xa9 \xff\xfe", b" one\n\ttwo"]  # folded by LF, as MTAs send
    assert out.verdict == "continue"
    assert out.delivered is not None and out.delivered.startswith(
        b"Subject: caf\xc3\xa9 \xff\xfe\r\nX-Folded: one\r\n\ttwo\r\n\r\n"
    )


def test_body_spools_to_disk_past_the_memory_limit_and_is_read_once() -> None:
    sizes: list[int] = []

    class Reader:
        @hookimpl
        def eom(self, message: Message) -> None:
            sizes.append(sum(len(c) for c in message.body_chunks()))

    body = b"x" * 200_000 + b"\r\n"
    with Harness(
        {"milterd": {"spool_memory": 1000}, "plugins": {"reader": {}}}, plugins={"reader": Reader}
    ) as h:
        out = h.send(b"Subject: big\r\n\r\n" + body)
    assert sizes == [len(body)] and out.delivered is not None and out.delivered.endswith(body)


def test_fake_resolver_answers_nxdomain_nodata_and_timeouts() -> None:
    from milterd.dns import DNSTempError, NXDomain

    r = FakeResolver({"example.org": {"TXT": ["v=spf1 -all"]}, "slow.example": {"TXT": "TIMEOUT"}})
    assert r.lookup("EXAMPLE.org.", "txt") == ["v=spf1 -all"]
    assert r.lookup("example.org", "MX") == []
    with pytest.raises(NXDomain):
        r.lookup("nope.example", "A")
    with pytest.raises(DNSTempError):
        r.lookup("slow.example", "TXT")


def test_split_message_never_raises_on_odd_input() -> None:
    for raw in (
        b"",
        b"\r\n",
        b"no header at all",
        b"X: 1\r\n",
        b"X: \x00nul\r\n\r\n\x00",
        b"\tleading continuation\r\nA: b\r\n\r\n",
        b"A: b\nLF only\n\nbody\n",
    ):
        fields, body = split_message(raw)
        assert isinstance(fields, list) and isinstance(body, bytes)


@pytest.mark.parametrize(
    ("raw", "names", "body"),
    [
        (b"A: 1\r\nB: 2\r\n\r\nbody\r\n", ["A", "B"], b"body\r\n"),
        # white space before the colon; a last line without its line end gets one (a
        # message through SMTP always ends a line before the final ".")
        (b"A : 1\r\n x\r\n\r\nb", ["A"], b"b\r\n"),
        # the first line that is not a field ends the header block; it starts the body
        (
            b"A: 1\r\nnot a field\r\nC: 3\r\n\r\nb\r\n",
            ["A"],
            b"not a field\r\nC: 3\r\n\r\nb\r\n",
        ),
        (b"\x01X: 1\r\nY: 2\r\n\r\nb\r\n", [], b"\x01X: 1\r\nY: 2\r\n\r\nb\r\n"),  # not a name
        (b"Sp ace: 1\r\n\r\nb\r\n", [], b"Sp ace: 1\r\n\r\nb\r\n"),
        (b"no header at all", [], b"no header at all\r\n"),
        (b"A: 1\r\n\r\n", ["A"], b""),  # no body: none made up
    ],
)
def test_split_message_reads_the_header_block_as_an_mta_does(
    raw: bytes, names: list[str], body: bytes
) -> None:
    fields, got = split_message(raw)
    assert [n for n, _ in fields] == names
    assert got == body


# --- found by a review (2026-12-03) -------------------------------------------------------


class RcptChanges:
    """Records a header and a recipient at RCPT, and refuses recipients named x@...."""

    @hookimpl
    def envrcpt(self, ctx: Context, event: EnvRcpt) -> Verdict | None:
        ctx.add_change(AddHeader("X-Rcpt", event.recipient))
        if event.recipient.startswith("x@"):
            return Reject("550", "5.1.1", "no such user")
        return None


def test_changes_recorded_at_rcpt_are_applied_except_for_refused_recipients() -> None:
    with Harness(plugins={"r": RcptChanges}) as h:
        out = h.send(MSG, recipients=["a@example.com", "x@example.com", "b@example.com"])
    assert out.verdict == "continue"
    assert [v for n, v in out.headers() if n == "X-Rcpt"] == ["a@example.com", "b@example.com"]


class AcceptPostmaster:
    """Accepts mail to postmaster at once, refuses blocked recipients; counts aborts."""

    aborts = 0

    @hookimpl
    def envrcpt(self, ctx: Context, event: EnvRcpt) -> Verdict | None:
        if event.recipient.startswith("postmaster@"):
            return Accept()
        if event.recipient.endswith("@blocked.example"):
            return Reject("550", "5.7.1", "blocked")
        return None

    @hookimpl
    def eom(self, ctx: Context) -> Verdict:
        return Accept()

    @hookimpl
    def abort(self, ctx: Context) -> None:
        AcceptPostmaster.aborts += 1


def test_accept_at_rcpt_is_for_that_recipient_and_abort_is_always_called() -> None:
    with Harness(plugins={"p": AcceptPostmaster}) as h:
        out = h.send(MSG, recipients=["postmaster@example.com", "x@blocked.example"])
        assert set(out.refused) == {"x@blocked.example"}
        with h.session() as s:
            s.send(MSG)  # accepted at eom
            s.abandon(after="envrcpt")
    assert AcceptPostmaster.aborts >= 1


class Slow:
    @hookimpl
    def eom(self, ctx: Context) -> None:
        time.sleep(1.2)


class Signer:
    calls = 0

    @hookimpl
    def finalize(self, ctx: Context) -> None:
        Signer.calls += 1


def test_out_of_time_at_eom_tempfails_instead_of_delivering_unsigned() -> None:
    cfg = {"milterd": {"eom_timeout": 1}, "plugins": {
        "slow": {"isolation": "inline", "on_error": "continue", "timeout": 5},
        "sign": {}}}  # fmt: skip
    with Harness(cfg, plugins={"slow": Slow, "sign": Signer}) as h:
        out = h.send(MSG)
    assert out.verdict == "tempfail"
    assert Signer.calls == 0


def test_harness_verdict_when_every_recipient_is_refused() -> None:
    with Harness(plugins={"r": RcptChanges}) as h:
        out = h.send(MSG, recipients=["x@example.com", "x@example.net"])
    assert (out.verdict, out.stage) == ("reject", "envrcpt") and out.delivered is None


def test_a_body_no_plugin_reads_is_neither_counted_nor_limited() -> None:
    """As in the daemon, where the MTA was told to skip the body: max_message_size is
    the plugins' protection and the MTA's own limit (message_size_limit) applies."""

    class HeadersOnly:
        reads_body = False

        @hookimpl
        def eom(self, message: Message) -> None:
            return None

    cfg = {"milterd": {"max_message_size": 60}, "plugins": {"h": {}}}
    with Harness(cfg, plugins={"h": HeadersOnly}) as h:
        out = h.send(MSG)
    assert out.verdict == "continue" and (out.delivered or b"").endswith(b"Body line\r\n")


def test_the_queue_id_is_known_from_data_with_one_recipient() -> None:
    """Found by a review: Postfix has no queue id at MAIL FROM nor at the first RCPT; with
    one recipient the core read it only at end of message, so ctx.message.queue_id was
    empty in data, header and body hooks. DATA carries it (milter_data_macros = i)."""
    from milterd.config import from_dict
    from milterd.events import Client
    from milterd.pipeline import CORE_MACROS, Runtime, Session

    seen: list[str] = []

    class AtData:
        @hookimpl
        def data(self, ctx: Context) -> None:
            seen.append(ctx.message.queue_id if ctx.message else "")

    assert "i" in CORE_MACROS["data"]  # asked for during the handshake
    rt = Runtime(from_dict({"plugins": {"d": {}}}), {"d": AtData()}, FakeResolver())
    rt.start()
    s = Session(rt)
    s.on_connect("c", Client("c", "inet", None), {})
    s.on_envfrom("a@example.org", {}, {})
    s.on_envrcpt("b@example.com", {}, {})
    s.on_data({"i": "4QID"})
    assert seen == ["4QID"]
    s.on_abort()
    s.on_close()
    rt.stop()


def test_a_timed_out_call_on_a_helper_thread_leaves_nothing_behind() -> None:
    """Found by a concurrency review: the helper thread passed the "still live" check,
    the core then ended the call and dropped what it had recorded, and the thread's
    append landed after that: about 4 % of timed-out calls left a symbol on the message.
    The check and the append now happen under the lock the core ends the call with."""
    from milterd.context import ContributionRefused

    class Slow:
        @hookimpl
        def eom(self, ctx: Context) -> None:
            while True:  # records until refused
                try:
                    ctx.add_symbol("LATE", 1.0)
                except ContributionRefused:
                    return None

    cfg = {"slow": {"timeout": 0.002, "on_error": "continue", "isolation": "thread"}}
    leaked = 0
    with Harness(cfg, plugins={"slow": Slow}) as h:
        for _ in range(300):
            out = h.send(b"Subject: x\r\n\r\nbody\r\n")
            assert out.errors and "timeout" in out.errors[0][2], out.errors
            leaked += any(s.name == "LATE" for s in out.symbols)
    assert leaked == 0
