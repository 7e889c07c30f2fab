"""Test-only plugin for the SPF/DMARC integration tests: puts a DKIM result on the ledger
from an ``X-Test-DKIM: <result> d=<domain>`` header, standing in for the ``dkim`` plugin
so that DMARC can be exercised in a real daemon without real signatures."""

from __future__ import annotations

from milterd import Context, Message, Result, hookimpl


class FakeDKIMResult:
    actions: frozenset[str] = frozenset()
    reads_body = False

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        for value in message.get_all("X-Test-DKIM"):
            word, _, tag = value.strip().partition(" ")
            domain = tag.strip().removeprefix("d=")
            ctx.add_result(Result("dkim", word, properties=(("header.d", domain),)))
