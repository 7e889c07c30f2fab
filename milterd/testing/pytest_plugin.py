"""Opt-in pytest fixtures for plugin authors: ``pytest -p milterd.testing.pytest_plugin``
or ``pytest_plugins = ["milterd.testing.pytest_plugin"]`` in a conftest.py.

``milterd_harness`` is a factory: ``milterd_harness(config=None, *, plugins=None,
zones=None, resolver=None, raise_errors=False, dry_run=False)`` takes :class:`Harness`'s
arguments, builds
one and closes it after the test. ``fake_resolver`` is an empty :class:`FakeResolver` to
fill (``fake_resolver.zones[name] = {"TXT": [...]}``); a harness uses it when given as
``resolver=fake_resolver``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from milterd.testing import FakeResolver, Harness


@pytest.fixture
def fake_resolver() -> FakeResolver:
    return FakeResolver()


@pytest.fixture
def milterd_harness() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(
        config: Any = None,
        *,
        plugins: Any = None,
        zones: Any = None,
        resolver: Any = None,
        raise_errors: bool = False,
        dry_run: bool = False,
    ) -> Harness:
        h = Harness(
            config,
            plugins=plugins,
            zones=zones,
            resolver=resolver,
            raise_errors=raise_errors,
            dry_run=dry_run,
        )
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()
