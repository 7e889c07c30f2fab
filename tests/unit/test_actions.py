"""Header changes plugins record are checked and normalized once, where they are made, so
that the MTA and the core's model of the delivered message (which signatures cover) get
the same field."""

from __future__ import annotations

import pytest

from milterd import AddHeader, ChangeHeader, InsertHeader
from milterd.actions import fold


@pytest.mark.parametrize(
    "value",
    [
        "a\r\nX-Injected: 1",  # a new field
        "a\nb",
        "a\rb",
        "a\r\n\r\nbody",  # the end of the header block
    ],
)
def test_a_line_break_must_be_a_fold(value: str) -> None:
    for make in (
        lambda: AddHeader("X-Test", value),
        lambda: ChangeHeader("Subject", value),
        lambda: InsertHeader("X-Test", value),
    ):
        with pytest.raises(ValueError, match="line break not followed by white space"):
            make()


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


def test_a_line_that_cannot_be_folded_under_998_octets_is_refused() -> None:
    assert fold("x" * 2000) == "x" * 2000
    with pytest.raises(ValueError, match="over 998 octets"):
        AddHeader("X-Long", "x" * 2000)
    AddHeader("X-Long", "x" * 900)  # long, but legal
