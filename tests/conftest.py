"""Suite-wide settings. Under ``make test`` (MILTERD_STRICT=1) a skipped test is a failure:
a missing real component (Postfix, SASL tools, IPv6 loopback) must be installed, not
silently left out."""

from __future__ import annotations

import os
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

STRICT = os.environ.get("MILTERD_STRICT") == "1"

# The test plugins (entry points t_*) are found through the directory's own dist-info, on
# the path of this process and of every daemon and tool the tests start. They are not
# installed into the virtual environment, so the daemon `make run` starts and its
# `milterd plugins` list never see them.
TESTPLUGINS = str(Path(__file__).parent / "testplugins")
if TESTPLUGINS not in sys.path:
    sys.path.insert(0, TESTPLUGINS)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (TESTPLUGINS, os.environ.get("PYTHONPATH", "")) if p
    )

# Every test talks to loopback only: an HTTP proxy from the environment (a CI runner's)
# would carry urllib's requests to 127.0.0.1 off the machine. Gone for this process and
# everything it starts.
for _var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
    os.environ.pop(_var, None)


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
