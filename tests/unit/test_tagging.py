"""The tagging plugin: X-Spam-* headers, subject tag, templates, forged header removal."""

from __future__ import annotations

from typing import Any

import pytest
from milterd_plugins.scoring import ScoringPlugin
from milterd_plugins.tagging import Tagging

from milterd import ConfigError, Context, hookimpl
from milterd.testing import Harness, Outcome, split_message

MSG = (
    b"From: a@example.org\r\nX-Spam-Flag: NO\r\nSubject: hello\r\n"
    b"X-Spam-Status: No, score=-100\r\nx-spam-level: \r\nX-Spammy-Thing: keep?\r\n"
    b"X-Other: stays\r\n\r\nhello world\r\n"
)


def scoring(score: float, **extra: Any) -> dict[str, Any]:
    return {
        "rules": [
            {"name": "HELLO", "type": "body", "score": score, "pattern": "hello",
             "description": "says hello"},
            {"name": "WORLD", "type": "body", "score": 0.5, "pattern": "world"},
        ],
        "actions": {"reject": None, "rewrite_subject": 12.0, "add_header": 5.0},
        **extra,
    }  # fmt: skip


def send(tagging: dict[str, Any], score: float = 6.0, msg: bytes = MSG, **kw: Any) -> Outcome:
    cfg = {"scoring": scoring(score), "tagging": tagging}
    with Harness(cfg, plugins={"scoring": ScoringPlugin, "tagging": Tagging}) as h:
        return h.send(msg, **kw)


def names(out: Outcome) -> list[str]:
    return [n for n, _ in out.headers()]


def test_spam_gets_every_header_and_forged_ones_are_gone() -> None:
    out = send({"report": True})
    h = dict(out.headers())
    assert h["X-Spam-Flag"] == "YES"
    assert h["X-Spam-Score"] == "6.5"
    assert h["X-Spam-Level"] == "******"
    assert h["X-Spam-Status"] == "Yes, score=6.5 required=5.0 tests=HELLO,WORLD"
    report = h["X-Spam-Report"]
    assert "*   6.0 HELLO says hello [hello]" in report and "*   0.5 WORLD" in report
    raw = dict(split_message(out.delivered or b"")[0])["X-Spam-Report"]
    assert b"\n\t" in raw  # folded, by a bare LF as an MTA sends it (out.headers() unfolds)
    # Every incoming X-Spam* field is gone (any case), others untouched, ours once each.
    assert names(out).count("X-Spam-Flag") == 1 and names(out).count("X-Spam-Status") == 1
    assert "x-spam-level" not in names(out) and "X-Spammy-Thing" not in names(out)
    assert "X-Other" in names(out) and "No, score=-100" not in out.delivered.decode()  # type: ignore[union-attr]


def test_ham_is_stamped_no_and_flag_only_on_spam() -> None:
    out = send({}, score=1.0)
    h = dict(out.headers())
    assert h["X-Spam-Flag"] == "NO"
    assert h["X-Spam-Status"] == "No, score=1.5 required=5.0 tests=HELLO,WORLD"
    assert h["X-Spam-Level"] == "*"
    quiet = send({"tag_ham": False}, score=1.0)
    assert not [n for n in names(quiet) if n.lower().startswith("x-spam")]


def test_each_routine_switches_off() -> None:
    out = send({"flag": False, "score": False, "level": False, "status": False})
    assert [n for n in names(out) if n.startswith("X-Spam-")] == []
    assert dict(out.headers())["X-Spam"] == "Yes"  # scoring's add_header action


def test_subject_tag_when_spam_only_and_not_twice() -> None:
    assert dict(send({"subject_tag": "[SPAM] "}).headers())["Subject"] == "[SPAM] hello"
    assert dict(send({"subject_tag": "[SPAM] "}, score=1).headers())["Subject"] == "hello"
    # scoring rewrote the subject itself: tagging leaves it alone
    out = send({"subject_tag": "[SPAM] "}, score=13)
    assert dict(out.headers())["Subject"] == "***SPAM*** hello"


def test_custom_headers_with_conditions() -> None:
    tagging = {
        "headers": [
            {"name": "X-Verdict", "value": "{action} {score}/{required} [{symbols}]"},
            {"name": "X-Only-Spam", "value": "{flag}", "when": "spam"},
            {"name": "X-Only-Ham", "value": "{flag}", "when": "ham"},
            {"name": "X-Greeting", "value": "yes", "if_symbols": ["HELLO"]},
            {"name": "X-No-World", "value": "yes", "unless_symbols": ["WORLD"]},
            {"name": "X-High", "value": "high", "min_score": 10},
        ]
    }
    h = dict(send(tagging).headers())
    assert h["X-Verdict"] == "add_header 6.5/5.0 [HELLO,WORLD]"
    assert h["X-Only-Spam"] == "YES" and "X-Only-Ham" not in h
    assert h["X-Greeting"] == "yes" and "X-No-World" not in h and "X-High" not in h
    h2 = dict(send(tagging, score=1).headers())
    assert h2["X-Only-Ham"] == "NO" and "X-Only-Spam" not in h2


def test_bad_template_refuses_the_config() -> None:
    with pytest.raises((ConfigError, ValueError), match="nope"):
        send({"headers": [{"name": "X-A", "value": "{nope}"}]})


def test_trusted_mail_keeps_its_headers_and_is_not_tagged() -> None:
    cfg = {"scoring": scoring(6.0, scan_trusted=True), "tagging": {}}
    with Harness(cfg, plugins={"scoring": ScoringPlugin, "tagging": Tagging}) as h:
        out = h.send(MSG, auth="alice")
    assert dict(out.headers())["X-Spam-Flag"] == "NO"  # the sender's own header stays
    assert names(out).count("X-Spam-Flag") == 1


class Scorer:
    """A third-party scorer, without the scoring plugin: tagging uses required_score."""

    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_symbol("THIRD_PARTY", 4.0, "someone else's score")


def test_without_scoring_uses_its_own_required_score() -> None:
    cfg = {"third": {}, "tagging": {"required_score": 3.0}}
    with Harness(cfg, plugins={"third": Scorer, "tagging": Tagging}) as h:
        out = h.send(MSG)
    h2 = dict(out.headers())
    assert h2["X-Spam-Flag"] == "YES"
    assert h2["X-Spam-Status"] == "Yes, score=4.0 required=3.0 tests=THIRD_PARTY"


def test_tagging_must_run_after_scoring() -> None:
    cfg = {"tagging": {"order": 1}, "scoring": {"order": 2}}
    with (
        pytest.raises(ConfigError, match="scoring"),
        Harness(cfg, plugins={"scoring": ScoringPlugin, "tagging": Tagging}),
    ):
        pass


def test_long_tests_list_is_folded_after_commas() -> None:
    # 55 symbols made tests=... one word over 998 octets: the core refused the header and
    # the message was deferred. It is folded after commas now, as SpamAssassin does.
    rules = [{"name": f"LONGISH_RULE_NAME_{i:03d}", "type": "body", "pattern": "hello",
              "score": 0.1} for i in range(60)]  # fmt: skip
    headers = [{"name": "X-Syms", "value": "{symbols}"}]
    cfg = {"scoring": {"rules": rules}, "tagging": {"headers": headers}}
    with Harness(cfg, plugins={"scoring": ScoringPlugin, "tagging": Tagging}) as h:
        out = h.send(MSG)
    assert out.verdict == "continue" and out.errors == []
    raw = out.delivered.decode()  # type: ignore[union-attr]
    assert max(len(line) for line in raw.split("\r\n")) <= 78
    status = dict(out.headers())["X-Spam-Status"]
    assert ",\r\n\tLONGISH_RULE_NAME_" in status or ",\tLONGISH_RULE_NAME_" in status
    names = status.split("tests=", 1)[1].replace("\r\n", "").replace("\t", "").split(",")
    assert names == sorted(str(r["name"]) for r in rules)


class Controls:
    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_symbol("RSPAMD_MIME_BAD", 1.0, "bad\nattachment\x07", ("evil\r\n.exe", "a\u2028b"))


def test_report_replaces_control_characters() -> None:
    cfg = {"p": {}, "scoring": {}, "tagging": {"report": True}}
    with Harness(cfg, plugins={"p": Controls, "scoring": ScoringPlugin, "tagging": Tagging}) as h:
        out = h.send(MSG)
    assert out.verdict == "continue" and out.errors == []
    report = dict(out.headers())["X-Spam-Report"]
    assert "RSPAMD_MIME_BAD bad attachment [evil .exe, a b]" in report
