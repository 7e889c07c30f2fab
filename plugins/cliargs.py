"""Argument types the built-ins' commands share (argparse ``type=`` callables)."""

from __future__ import annotations

import argparse

__all__ = ["port_number"]


def port_number(text: str) -> int:
    """A TCP port, 1-65535; anything else is a usage error naming the value."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 0 < n < 65536:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return n
