"""Clock helpers for tests that read the UTC date more than once."""

from __future__ import annotations

import time


def away_from_midnight(margin: float = 30.0) -> None:
    """Return at once, unless the next UTC midnight is less than ``margin`` seconds away:
    then sleep until just past it. For a test that reads the date more than once, or in
    two processes (a CLI it runs), and would see two different days across midnight."""
    left = 86400 - time.time() % 86400
    if left < margin:
        time.sleep(left + 0.5)
