"""A stand-in for libmilter's per-connection context (``ctx``), for driving milterd's
bridge callbacks (milterd/bridge.py) in process: private data, macros (none unless given),
and the calls the bridge makes, recorded."""

from __future__ import annotations


class FakeMilterCtx:
    def __init__(self, macros: dict[str, str] | None = None) -> None:
        self.conn: object = None
        self.macros = macros or {}
        self.replies: list[tuple[str, ...]] = []

    def getpriv(self) -> object:
        return self.conn

    def setpriv(self, c: object) -> None:
        self.conn = c

    def getsymval(self, name: str) -> str | None:
        return self.macros.get(name)

    def setsymlist(self, *args: object) -> None:
        return None

    def setreply(self, *args: str) -> None:
        self.replies.append(args)

    def progress(self) -> None:
        return None
