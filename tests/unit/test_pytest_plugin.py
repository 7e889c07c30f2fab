"""The opt-in pytest plugin that plugin authors enable in their own suites."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_author.py").write_text(TEST)
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
