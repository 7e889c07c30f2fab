"""What the metrics count (the process's default registry; the daemon aggregates workers)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from milterd import Context, Reject, Result, hookimpl
from milterd.testing import Harness


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_decisions_results_and_zero_series() -> None:
    class Gate:
        @hookimpl
        def eom(self, ctx: Context) -> Reject | None:
            ctx.add_result(Result("spf", "fail", properties=(("smtp.mailfrom", "x.example"),)))
            subject = ctx.message.headers[0].value if ctx.message else ""
            return Reject() if subject == "bad" else None

    before_rejects = value("milterd_decisions_total", plugin="gate", verdict="reject") or 0.0
    before_fails = value("milterd_results_total", method="spf", result="fail") or 0.0
    with Harness(plugins={"gate": Gate}) as h:
        # declared at start, before anything failed: alerts on rate() see 0, not no data
        assert value("milterd_plugin_errors_total", plugin="gate", stage="eom",
                     kind="timeout") is not None  # fmt: skip
        assert value("milterd_messages_total", verdict="discard") is not None
        h.send(b"Subject: bad\r\n\r\nx\r\n")
        h.send(b"Subject: good\r\n\r\nx\r\n")
    assert value("milterd_decisions_total", plugin="gate", verdict="reject") == before_rejects + 1
    assert value("milterd_results_total", method="spf", result="fail") == before_fails + 2
