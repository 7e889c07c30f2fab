"""The merge: verdict severity, header index arithmetic, conflicts. Pure functions only."""

from __future__ import annotations

from milterd.actions import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteHeader,
    DeleteRecipient,
    Discard,
    InsertHeader,
    Quarantine,
    Reject,
    ReplaceBody,
    TempFail,
)
from milterd.context import Entry
from milterd.events import Header
from milterd.merge import merge, render
from milterd.spool import header_line


def hdrs(*pairs: tuple[str, str]) -> list[Header]:
    return [Header(n, v, b" " + v.encode()) for n, v in pairs]


def e(plugin: str, value: object, stage: str = "eom") -> Entry:
    return Entry(plugin, stage, value)  # type: ignore[arg-type]


def names(headers: list[Header]) -> list[str]:
    return [f"{h.name}: {h.value}" for h in headers]


def test_severity_order_discard_reject_tempfail_quarantine_accept() -> None:
    ladder = [Accept(), Quarantine(reason="q"), TempFail(), Reject(), Discard()]
    for i, strongest in enumerate(ladder):
        entries = [e(f"p{j}", v) for j, v in enumerate(ladder[: i + 1])]
        entries.reverse()  # order in the pipeline must not matter for severity
        assert merge(entries).verdict == strongest


def test_every_reason_is_kept_and_the_first_of_equals_decides() -> None:
    d = merge(
        [
            e("a", Reject("550", "5.7.1", "first", reason="ra")),
            e("b", Reject("554", "5.7.0", "second", reason="rb")),
            e("c", Quarantine(reason="rc")),
        ]
    )
    assert d.plugin == "a" and d.verdict is not None and d.verdict.reason == "ra"
    assert [(p, v.reason) for p, v in d.reasons] == [("a", "ra"), ("b", "rb"), ("c", "rc")]


def test_nothing_is_applied_when_the_message_is_not_delivered() -> None:
    d = merge([e("a", AddHeader("X-A", "1")), e("b", TempFail())])
    assert d.word == "tempfail" and d.ops == []


def test_quarantine_applies_changes_and_the_quarantine() -> None:
    d = merge([e("a", AddHeader("X-A", "1")), e("b", Quarantine(reason="spam"))])
    assert [o.kind for o in d.ops] == ["addheader", "quarantine"]
    assert d.ops[-1].value == "b: spam"


def test_deletions_run_from_the_highest_occurrence_down() -> None:
    h = hdrs(
        ("Received", "r1"), ("X-Spam", "1"), ("Received", "r2"), ("X-Spam", "2"), ("X-Spam", "3")
    )
    d = merge(
        [
            e("a", DeleteHeader("X-Spam", 1)),
            e("a", DeleteHeader("X-Spam", 3)),
            e("b", DeleteHeader("x-spam", 2)),
        ],
        h,
    )
    assert [(o.name.lower(), o.index) for o in d.ops] == [
        ("x-spam", 3),
        ("x-spam", 2),
        ("x-spam", 1),
    ]
    out, _ = render(h, d.ops)
    assert names(out) == ["Received: r1", "Received: r2"]


def test_insert_positions_account_for_deleted_fields_and_earlier_inserts() -> None:
    h = hdrs(("A", "1"), ("B", "2"), ("C", "3"), ("D", "4"))
    d = merge(
        [
            e("x", DeleteHeader("A")),
            e("x", DeleteHeader("B")),
            e("y", InsertHeader("New", "before C", 2)),
            e("z", InsertHeader("Top", "t", 0)),
            e("w", InsertHeader("Also", "before D", 3)),
        ],
        h,
    )
    out, _ = render(h, d.ops)
    assert names(out) == ["Top: t", "New: before C", "C: 3", "Also: before D", "D: 4"]


def test_authentication_headers_go_on_top_later_ones_above() -> None:
    h = hdrs(("Received", "r"), ("From", "a@example.org"))
    d = merge(
        [
            e("authres", AddHeader("Authentication-Results", "mx; spf=pass")),
            e("tag", AddHeader("X-Tag", "t")),
            e("dkim", AddHeader("DKIM-Signature", "v=1"), stage="finalize"),
            e("arc", AddHeader("ARC-Seal", "i=1"), stage="finalize"),
        ],
        h,
    )
    out, _ = render(h, d.ops)
    assert names(out) == [
        "ARC-Seal: i=1",
        "DKIM-Signature: v=1",
        "Authentication-Results: mx; spf=pass",
        "Received: r",
        "From: a@example.org",
        "X-Tag: t",
    ]


def test_deletion_beats_change_and_later_change_wins() -> None:
    h = hdrs(("Subject", "s"), ("X-A", "a"))
    d = merge(
        [
            e("p", DeleteHeader("Subject")),
            e("q", ChangeHeader("Subject", "new")),
            e("r", ChangeHeader("X-A", "r")),
            e("s", ChangeHeader("X-A", "s")),
        ],
        h,
    )
    out, _ = render(h, d.ops)
    assert names(out) == ["X-A: s"]
    assert any("lost to p's deletion" in c for c in d.conflicts)
    assert any("s overrides r" in c for c in d.conflicts)


def test_edits_of_missing_fields_are_dropped_and_reported() -> None:
    d = merge([e("p", DeleteHeader("X-None", 2))], hdrs(("X-None", "only one")))
    assert d.ops == [] and "no field X-None #2" in d.conflicts[0]


def test_envelope_changes_deletions_before_additions_and_last_sender_wins() -> None:
    d = merge(
        [
            e("a", AddRecipient("new@example.com")),
            e("a", DeleteRecipient("old@example.com")),
            e("b", AddRecipient("NEW@example.com")),
            e("b", ChangeSender("x@example.org")),
            e("c", ChangeSender("y@example.org")),
            e("c", ReplaceBody(b"1")),
            e("d", ReplaceBody(b"2")),
        ]
    )
    assert [(o.kind, o.address or o.body) for o in d.ops] == [
        ("delrcpt", "old@example.com"),
        ("addrcpt", "new@example.com"),
        ("chgfrom", "y@example.org"),
        ("replbody", b"2"),
    ]
    assert len(d.conflicts) == 2


def test_render_replaces_the_body() -> None:
    d = merge([e("a", ReplaceBody(b"new\r\n"))])
    _, body = render([], d.ops)
    assert body == b"new\r\n"


def test_a_value_starting_with_white_space_is_rendered_as_the_mta_writes_it() -> None:
    """The bridge sends such a value as it is and the MTA writes ``Name:<TAB>v``: the model
    (what finalize signs) must say the same, or a simple-canonicalized signature breaks."""
    d = merge(
        [Entry("p", "eom", AddHeader("X-Tab", "\tv")), Entry("p", "eom", AddHeader("X-Sp", "w"))]
    )
    headers, _ = render([], d.ops)
    assert [header_line(h) for h in headers] == [b"X-Tab:\tv\r\n", b"X-Sp: w\r\n"]
