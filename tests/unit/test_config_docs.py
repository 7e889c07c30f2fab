"""Every configuration key is documented where an administrator looks for it: the core's
in README's configuration reference, each built-in plugin's in its docs page."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from pydantic import BaseModel

from milterd.config import DnsSettings, PluginSettings, Settings

ROOT = Path(__file__).resolve().parents[2]
BUILTINS = ["authres", "spf", "dkim", "arc", "dmarc", "scoring", "tagging", "archive"]


def documented(text: str) -> set[str]:
    """The names in the first column of every ``| key | ...`` table of ``text``."""
    names: set[str] = set()
    in_table = False
    for line in text.splitlines():
        if line.startswith("| key |"):
            in_table = True
        elif not line.startswith("|"):
            in_table = False
        elif in_table:
            names |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return names


def keys(model: type[BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model.model_fields.items()}


@pytest.mark.parametrize("model", [Settings, DnsSettings, PluginSettings])
def test_core_keys_are_in_the_readme(model: type[BaseModel]) -> None:
    missing = keys(model) - documented((ROOT / "README.md").read_text())
    assert not missing, f"{model.__name__}: not in README's configuration reference: {missing}"


@pytest.mark.parametrize("name", BUILTINS)
def test_plugin_keys_are_in_its_docs_page(name: str) -> None:
    (ep,) = [ep for ep in entry_points(group="milterd.plugins") if ep.name == name]
    model = ep.load()().config_schema()
    page = ROOT / "docs" / "plugins" / f"{name}.md"
    missing = keys(model) - documented(page.read_text())
    assert not missing, f"{name}: not in {page.relative_to(ROOT)}: {missing}"
