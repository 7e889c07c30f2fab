#!/usr/bin/env python3
"""Write the benchmark's test message: a plain-text mail of about 5 KB.

  make_msg.py [OUTFILE] [--size BYTES]

LF line ends in the file: ``smtp-source -F`` sends every line with CRLF, and
milter_load.py converts to CRLF itself. No folded headers, 7-bit ASCII.
"""

from __future__ import annotations

import argparse
from pathlib import Path

TEXT = (
    "the quick brown fox jumps over a lazy dog while five boxing wizards jump quickly "
    "and a benchmark message carries nothing but plain words of ordinary length"
)
WORDS = TEXT.split(" ")


def build_message(size: int = 5000) -> bytes:
    """A message of about ``size`` bytes on the wire (CRLF), returned with LF line ends."""
    headers = [
        "From: Bench Sender <sender@example.com>",
        "To: Bench Recipient <rcpt@dest.example.net>",
        "Subject: milterd benchmark message",
        "Date: Sat, 22 Nov 2025 10:00:00 +0000",
        "Message-ID: <milterd-bench-1@example.com>",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
    ]
    head = "".join(h + "\r\n" for h in headers) + "\r\n"
    lines: list[str] = []
    i = 0
    total = len(head)
    while total < size:
        line = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(11))
        lines.append(line)
        total += len(line) + 2
        i += 1
    return (head + "".join(line + "\r\n" for line in lines)).replace("\r\n", "\n").encode()


def write_message(path: Path, size: int = 5000) -> Path:
    data = build_message(size)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_bytes() != data:
        path.write_bytes(data)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", nargs="?", default="/var/lib/milterd-bench/msg.eml")
    ap.add_argument("--size", type=int, default=5000, help="approximate size on the wire")
    a = ap.parse_args()
    p = write_message(Path(a.out), a.size)
    crlf = len(p.read_bytes()) + p.read_bytes().count(b"\n")
    print(f"{p}: {crlf} bytes on the wire (CRLF)")


if __name__ == "__main__":
    main()
