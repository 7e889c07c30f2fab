"""Reading an MTA's log file in tests: shared by PrivatePostfix and PrivateSendmail."""

from __future__ import annotations

import re
import time
from pathlib import Path


class MailLog:
    """Mixin for a test MTA that logs to ``self.maillog``; ``log_name`` names it in errors."""

    maillog: Path
    log_name = "maillog"

    def log_text(self) -> str:
        """Return the whole log ('' if nothing was logged yet)."""
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the log."""
        return "\n".join(self.log_text().splitlines()[-lines:])

    def log_mark(self) -> int:
        """Return the current log length; pass it as ``since`` to :meth:`wait_log`."""
        try:
            return self.maillog.stat().st_size
        except FileNotFoundError:
            return 0

    def wait_log(
        self, pattern: str | re.Pattern[str], timeout: float = 10.0, *, since: int = 0
    ) -> re.Match[str]:
        """Wait until a log line (at byte offset >= ``since``) matches ``pattern``.

        :returns: the match (searched per line, ``re.search`` semantics).
        :raises TimeoutError: with the log tail in the message.
        """
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            try:
                with self.maillog.open("rb") as f:
                    f.seek(since)
                    text = f.read().decode(errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no {self.log_name} line matching {rx.pattern!r} within {timeout}s\n"
                    f"--- {self.log_name} tail ---\n{self.log_tail()}"
                )
            time.sleep(0.05)
