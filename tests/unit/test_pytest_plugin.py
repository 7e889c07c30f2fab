"""The opt-in pytest plugin that plugin authors enable in their own suites."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

from milterd.testing import Harness

TEST = """
from milterd import AddHeader, Context, hookimpl

class Greeter:
    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        answer = ctx.resolver.lookup("greeting.example", "TXT")
        ctx.add_change(AddHeader("X-Greeting", answer[0]))

def test_with_fixtures(milterd_harness, fake_resolver):
    fake_resolver.zones["greeting.example"] = {"TXT": ["hello"]}
    h = milterd_harness(plugins={"greeter": Greeter}, resolver=fake_resolver)
    out = h.send(b"Subject: x\\r\\n\\r\\nbody\\r\\n")
    assert out.header("X-Greeting") == "hello"
    assert fake_resolver.queries == [("greeting.example", "TXT")]
"""


FAILING = """
from milterd import AddHeader, Context, hookimpl

class Counter:
    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        hits = ctx.message_state["hits"]  # the author's bug
        ctx.add_change(AddHeader("X-Hits", str(hits)))

def test_counter(milterd_harness):
    h = milterd_harness({"counter": {}}, plugins={"counter": Counter}, raise_errors=True)
    h.send(b"Subject: x\\r\\n\\r\\nbody\\r\\n")
"""


def run(tmp_path: Path, *extra: str, test: str = TEST) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_author.py").write_text(test)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )


def test_fixtures_work_when_the_plugin_is_enabled(tmp_path: Path) -> None:
    res = run(tmp_path, "-p", "milterd.testing.pytest_plugin")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout


def test_fixtures_are_opt_in(tmp_path: Path) -> None:
    res = run(tmp_path)
    assert res.returncode != 0 and "fixture 'milterd_harness' not found" in res.stdout


def test_raise_errors_shows_the_plugins_own_traceback(tmp_path: Path) -> None:
    res = run(tmp_path, "-p", "milterd.testing.pytest_plugin", test=FAILING)
    assert res.returncode == 1 and "1 failed" in res.stdout, res.stdout + res.stderr
    out = res.stdout
    # The plugin's line, its exception, then the harness's report caused by it.
    assert 'hits = ctx.message_state["hits"]' in out and "KeyError: 'hits'" in out
    assert "The above exception was the direct cause of the following exception" in out
    assert "PluginFailed: plugin 'counter' failed at eom: exception: KeyError: 'hits'" in out


def test_the_readme_documents_the_factory_with_harness_arguments() -> None:
    """The factory takes Harness's arguments: the README's signature must list them all."""
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    found = re.search(r"`milterd_harness\((.*?)\)` is a factory", readme)
    assert found, "README: milterd_harness's signature"
    params = inspect.signature(Harness).parameters.values()
    expected = ", ".join(
        ("*, " if p.kind is p.KEYWORD_ONLY and i == 1 else "") + f"{p.name}={p.default!r}"
        for i, p in enumerate(params)
    )
    assert found.group(1) == expected


DRY = """
from milterd import AddHeader, Context, hookimpl

class Saver:
    actions = frozenset({"add_header"})

    @hookimpl
    def eom(self, ctx: Context) -> None:
        ctx.add_change(AddHeader("X-Dry-Run", str(ctx.dry_run)))

def test_dry(milterd_harness):
    h = milterd_harness(plugins={"saver": Saver}, dry_run=True)
    assert h.send(b"Subject: x\\r\\n\\r\\nbody\\r\\n").header("X-Dry-Run") == "True"
"""


def test_the_factory_takes_every_harness_argument(tmp_path: Path) -> None:
    """dry_run= was documented for the factory but refused by it (TypeError)."""
    res = run(tmp_path, "-p", "milterd.testing.pytest_plugin", test=DRY)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout
