"""Header changes plugins record are checked and normalized once, where they are made, so
that the MTA and the core's model of the delivered message (which signatures cover) get
the same field."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from milterd import AddHeader, ChangeHeader, InsertHeader, Reject, TempFail
from milterd.actions import _BREAK, _lines, fold


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("a\r\nX-Injected: 1", "a\r\n X-Injected: 1"),  # stays inside this field
        ("a\nb", "a\r\n b"),
        ("a\rb", "a\r\n b"),
        ("a\r\n\r\nbody", "a\r\n \r\n body"),  # no blank line: the header block goes on
    ],
)
def test_a_line_break_that_is_not_a_fold_becomes_one(value: str, want: str) -> None:
    """Values often quote what a sender wrote: refusing them would defer the message for
    ever, passing them on would let the sender add fields."""
    assert AddHeader("X-Test", value).value == want
    assert ChangeHeader("Subject", value).value == want
    assert InsertHeader("X-Test", value).value == want


def test_folds_and_trailing_breaks() -> None:
    assert AddHeader("X-Test", "a\r\n\tb").value == "a\r\n\tb"
    assert AddHeader("X-Test", "a\n b").value == "a\n b"
    assert AddHeader("X-Test", "a\r\n").value == "a"


def test_undecodable_bytes_become_windows_1252_text() -> None:
    # An 8-bit Subject arrives as surrogate escapes; pymilter only takes UTF-8 text.
    subject = b"[SPAM] caf\xe9 \x80 \xff".decode("utf-8", "surrogateescape")
    value = ChangeHeader("Subject", subject).value
    assert value == "[SPAM] caf\u00e9 \u20ac \u00ff"
    value.encode("utf-8")  # what pymilter does: must not raise


def test_long_lines_are_folded_at_white_space() -> None:
    words = " ".join(f"word{i}" for i in range(60))
    value = AddHeader("X-Long", words).value
    lines = value.split("\r\n")
    assert len(lines) > 1 and all(len(line) <= 78 for line in lines)
    assert len("X-Long: " + lines[0]) <= 78
    assert value.replace("\r\n", "") == words  # unfolding gives the value back
    sig = "v=1; a=rsa-sha256; " + " ".join("h=x" for _ in range(40))
    assert AddHeader("DKIM-Signature", sig).value == sig  # signatures are never refolded


def test_a_run_too_long_to_fold_is_broken_as_mtas_do() -> None:
    assert fold("x" * 2000) == "x" * 2000  # fold() itself only breaks at white space
    value = AddHeader("X-Long", "x" * 2000).value
    assert value.replace("\r\n ", "") == "x" * 2000
    assert max(len(line.encode()) for line in value.split("\r\n")) <= 998 - len("X-Long: ")
    wide = AddHeader("X-Long", "\u00e9" * 1000).value  # 2000 octets
    assert max(len(line.encode()) for line in wide.split("\r\n")) <= 990
    assert AddHeader("X-Long", "x" * 900).value == "x" * 900  # long, but legal: kept


def test_wrong_argument_types_say_what_is_expected() -> None:
    # An int where the wire needs text would otherwise fail deep inside a regex or join.
    with pytest.raises(TypeError, match=r"reply code must be a str such as '550', got 550"):
        Reject(550)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"reply text must be a str such as 'Go away'"):
        TempFail("451", "4.7.1", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"name and value must be str, got str 'X-A' and int 3"):
        AddHeader("X-A", 3)  # type: ignore[arg-type]


@given(
    st.lists(st.sampled_from(["a", " ", "\t", "\r", "\n", "\r\n", "é"]), max_size=30).map("".join)
)
def test_line_split_fast_path_matches_the_regex(value: str) -> None:
    """_lines (no regex for CRLF-only or CR-free values) splits exactly as _BREAK does."""
    assert _lines(value) == _BREAK.split(value)


def test_a_reply_text_is_cut_to_what_libmilter_sends() -> None:
    """Found by a review: a 1,200-character text showed in the harness, while libmilter
    refused it and the client got the MTA's generic "550 5.7.1 Command rejected"."""
    from milterd.actions import MAX_REPLY_TEXT

    for text in ("x" * 1200, "%" * 600, "\u00e9" * 700, "a%\u00e9" * 300):
        for v in (Reject(text=text), TempFail(text=text)):
            sent = v.text.replace("%", "%%").encode()
            assert len(sent) <= MAX_REPLY_TEXT and v.text.endswith("...")
            assert text.startswith(v.text[:-3])
    assert Reject(text="x" * 980).text == "x" * 980
    assert Reject(text="50% off").text == "50% off"
