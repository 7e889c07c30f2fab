"""External scanners as score sources: SpamAssassin's spamd (SPAMC/1.5 protocol over TCP)
and rspamd (HTTP ``/checkv2``). Their rules become symbols.

Each call is bounded by its own timeout and by the hook's deadline; a scanner that is down,
slow or answers nonsense gives a zero-score ``..._UNAVAILABLE`` symbol, never a failure of
the message.
"""

from __future__ import annotations

import http.client
import json
import math
import re
import socket
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ScanResult", "Scanned", "parse_spamd", "rspamd_check", "spamd_check"]

_REPORT_LINE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s+([A-Z0-9_]+)\s+(.*?)\s*$")
_SPAM_HEADER = re.compile(
    r"^Spam:\s*(\w+)\s*;\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)", re.I | re.M
)


@dataclass(slots=True)
class Scanned:
    """What one scanner said: total, required, and (rule, score, description, options)."""

    score: float
    required: float | None
    rules: list[tuple[str, float, str, tuple[str, ...]]] = field(default_factory=list)
    action: str = ""


ScanResult = Scanned


def parse_spamd(reply: bytes) -> Scanned:
    """Parse a spamd ``REPORT`` reply (status line, headers, report text)."""
    text = reply.decode("utf-8", "replace").replace("\r\n", "\n")
    status, _, rest = text.partition("\n")
    if not status.startswith("SPAMD/") or " 0 " not in status + " ":
        raise ValueError(f"spamd: {status.strip()[:80]!r}")
    head, _, body = rest.partition("\n\n")
    m = _SPAM_HEADER.search(head)
    if not m:
        raise ValueError("spamd: no Spam: header in the reply")
    out = Scanned(_score(m.group(2)), _score(m.group(3)))
    in_table = False
    for line in body.split("\n"):
        if line.startswith("---- "):
            in_table = True
            continue
        if not in_table:
            continue
        rm = _REPORT_LINE.match(line)
        if rm:
            out.rules.append((rm.group(2), _score(rm.group(1)), rm.group(3), ()))
    return out


def spamd_check(
    host: str, port: int, raw: bytes, timeout: float, user: str | None = None
) -> Scanned:
    """Ask spamd for a ``REPORT`` on ``raw``; raises OSError/ValueError/TimeoutError."""
    deadline = time.monotonic() + timeout
    req = [b"REPORT SPAMC/1.5", b"Content-length: %d" % len(raw)]
    if user:
        req.append(b"User: " + user.encode("ascii", "replace"))
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"\r\n".join(req) + b"\r\n\r\n" + raw)
        s.shutdown(socket.SHUT_WR)
        chunks: list[bytes] = []
        size = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("spamd: timed out")
            s.settimeout(left)
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
            size += len(b)
            if size > 4 << 20:
                raise ValueError("spamd: reply too large")
    return parse_spamd(b"".join(chunks))


def rspamd_check(
    url: str,
    raw: bytes,
    timeout: float,
    headers: list[tuple[str, str]],
) -> Scanned:
    """POST ``raw`` to rspamd's ``/checkv2``; raises OSError/ValueError/TimeoutError."""
    u = urllib.parse.urlsplit(url)
    if u.scheme != "http" or not u.hostname:
        raise ValueError(f"rspamd: unsupported URL {url!r}")
    conn = http.client.HTTPConnection(u.hostname, u.port or 11333, timeout=timeout)
    try:
        conn.putrequest("POST", (u.path.rstrip("/") or "") + "/checkv2")
        conn.putheader("Content-Length", str(len(raw)))
        for k, v in headers:
            if v and "\r" not in v and "\n" not in v:
                conn.putheader(k, v)
        conn.endheaders(raw)
        resp = conn.getresponse()
        body = resp.read(4 << 20)
        if resp.status != 200:
            raise ValueError(f"rspamd: HTTP {resp.status}")
    finally:
        conn.close()
    data: Any = json.loads(body)
    if not isinstance(data, dict) or "score" not in data:
        raise ValueError("rspamd: unexpected reply")
    out = Scanned(_score(data["score"]), _float(data.get("required_score")),
                  action=str(data.get("action", "")))  # fmt: skip
    symbols = data.get("symbols") or {}
    for name, sym in symbols.items():
        if not isinstance(sym, dict):
            continue
        opts = tuple(str(o) for o in (sym.get("options") or ())[:5])
        out.rules.append((str(name), _score(sym.get("score", 0.0)),
                          str(sym.get("description", "")), opts))  # fmt: skip
    if data.get("is_skipped") or data.get("messages", {}).get("smtp_message"):
        # A pre-result (GTUBE, settings): the total is not the sum of the symbols.
        rest = out.score - sum(r[1] for r in out.rules)
        if abs(rest) > 1e-6:
            out.rules.append(("PRERESULT", rest, f"rspamd pre-result: {out.action}", ()))
    return out


#: A scanner's score (a rule's or the total) beyond this size is nonsense, not a verdict:
#: SpamAssassin's and rspamd's own scores stay within a few hundred. (Larger ones, and
#: inf or nan, once turned into an infinite total that made tagging fail.)
MAX_SCANNER_SCORE = 1e6


def _score(v: Any) -> float:
    """A score from a scanner's reply; ValueError (the reply is nonsense) when it is not
    a finite number within MAX_SCANNER_SCORE."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"scanner: score {str(v)[:40]!r} is not a number") from None
    if not math.isfinite(x) or abs(x) > MAX_SCANNER_SCORE:
        raise ValueError(f"scanner: score {str(v)[:40]!r} out of range")
    return x


def _float(v: Any) -> float | None:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) and abs(x) <= MAX_SCANNER_SCORE else None
