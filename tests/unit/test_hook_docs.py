"""Every hook has a docstring contract, a test that implements it, and a README entry."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from milterd import hookspecs

ROOT = Path(__file__).resolve().parents[2]
HOOKS = [*hookspecs.STAGES, *hookspecs.LIFECYCLE]


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_contract(name: str) -> None:
    doc = inspect.getdoc(getattr(hookspecs, name)) or ""
    assert len(doc.splitlines()[0]) > 10, f"{name}: no one-line summary"
    for part in ("Returns", "Changes", "Negotiation", "Since"):
        assert re.search(rf"\b{part}\b", doc), f"{name}: docstring lacks '{part}'"


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_implemented_by_some_test(name: str) -> None:
    sources = [p.read_text() for p in (ROOT / "tests").rglob("*.py")]
    assert any(re.search(rf"^\s+def {name}\(self", s, re.MULTILINE) for s in sources), (
        f"no test implements the {name} hook"
    )


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_in_the_readme_reference(name: str) -> None:
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"^\|\s*`{name}", readme, re.MULTILINE), f"README hook table lacks {name}"
