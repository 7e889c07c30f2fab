"""Suite-wide settings. Under ``make test`` (MILTERD_STRICT=1) a skipped test is a failure:
a missing real component (Postfix, SASL tools, IPv6 loopback) must be installed, not
silently left out."""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

STRICT = os.environ.get("MILTERD_STRICT") == "1"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"skipped under MILTERD_STRICT=1 (make test): {reason}"
