"""Mailing DMARC aggregate reports (``milterd dmarc report --send``): rua parsing, the
RFC 7489 7.1 check of external destinations, the report message, and sending over SMTP
to a sink on loopback (once per period and address)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import gzip
import socket
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
import xmlschema
from milterd_plugins.dmarc import DMARCConfig, Store, _psl
from milterd_plugins.dmarc.reports import (
    Destination,
    Report,
    authorize,
    build_reports,
    parse_rua,
    period,
    report_message,
    send_reports,
)

from milterd.testing import FakeResolver
from tests.support.sink import SmtpSink

XSD = Path(__file__).resolve().parents[1] / "data" / "dmarc" / "rua.xsd"
PSL = _psl()


def test_parse_rua() -> None:
    got = parse_rua(
        "mailto:a@example.org, mailto:b@reports.example!10m ,https://x.example/r,"
        "mailto:c@example.org!500, mailto:d@example.org!5x, mailto:nodomain,"
        "MAILTO:A@example.org, mailto:e%2Cf@example.org!1k"
    )
    assert got == [
        Destination("a@example.org"),
        Destination("b@reports.example", 10 * 1024 * 1024),
        Destination("c@example.org", 500),
        Destination("e,f@example.org", 1024),
    ]
    assert parse_rua("") == []
    assert parse_rua("mailto:") == []


def test_authorize_external_destinations() -> None:
    dns = FakeResolver(
        {
            "example.org._report._dmarc.reports.example": {"TXT": ["v=DMARC1"]},
            "example.org._report._dmarc.junk.example": {"TXT": ["not dmarc"]},
            "example.org._report._dmarc.slow.example": {"TXT": "TIMEOUT"},
            "example.org._report._dmarc.moved.example": {
                "TXT": ["v=DMARC1; rua=mailto:other@moved.example"]
            },
            "example.org._report._dmarc.away.example": {
                "TXT": ["v=DMARC1; rua=mailto:x@elsewhere.example"]
            },
        }
    )
    dests = [
        Destination("d@example.org"),
        Destination("d@sub.example.org"),  # same organizational domain: no lookup
        Destination("r@reports.example"),
        Destination("r@junk.example"),
        Destination("r@none.example"),
        Destination("r@slow.example"),
        Destination("r@moved.example"),
        Destination("r@away.example"),
    ]
    allowed, refused, deferred = authorize(dns, PSL, "example.org", dests)
    assert [d.address for d in allowed] == [
        "d@example.org",
        "d@sub.example.org",
        "r@reports.example",
        "other@moved.example",
    ]
    assert [d.address for d, _ in refused] == ["r@junk.example", "r@none.example", "r@away.example"]
    assert "no v=DMARC1 record at example.org._report._dmarc.none.example" in refused[1][1]
    assert [d.address for d, _ in deferred] == ["r@slow.example"]
    assert not any("example.org._report._dmarc.example.org" in q for q, _ in dns.queries)
    assert not any(".sub.example.org" in q for q, _ in dns.queries)


def test_period_defaults_to_the_previous_utc_day() -> None:
    now = dt.datetime(2026, 12, 3, 2, 30, tzinfo=dt.UTC).timestamp()
    day = int(dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp())
    assert period(None, None, now) == (day, day + 86400)
    assert period("2026-11-01", None, now) == (day - 31 * 86400, day - 30 * 86400)
    assert period("100", "200", now) == (100, 200)
    with pytest.raises(ValueError):
        period("200", "100", now)
    with pytest.raises(ValueError):
        period("yesterday", None, now)


def _report(rua: str = "mailto:d@example.org", xml: bytes = b"<feedback/>\n") -> Report:
    return Report("example.org", 1000, 86399, "abc123", rua, xml, "mx.test")


def test_report_message_follows_rfc7489_7_2_1_1() -> None:
    conf = DMARCConfig.model_validate({"org_name": "mx.test", "report_email": "dmarc@mx.test"})
    msg = report_message(_report(), conf, ["d@example.org"])
    parsed = email.message_from_bytes(msg.as_bytes(), policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    assert (
        parsed["Subject"]
        == "Report Domain: example.org Submitter: mx.test Report-ID: <abc123@mx.test>"
    )
    assert parsed["From"].addresses[0].addr_spec == "dmarc@mx.test"
    assert parsed["Auto-Submitted"] == "auto-generated"
    (part,) = list(parsed.iter_attachments())
    assert part.get_content_type() == "application/gzip"
    assert part.get_filename() == "mx.test!example.org!1000!86399.xml.gz"
    assert gzip.decompress(part.get_content()) == b"<feedback/>\n"
    assert b"\r\n" in msg.as_bytes() and b"\r\r" not in msg.as_bytes()


def _store_with_rows(tmp_path: Path, rua: str) -> Store:
    store = Store(str(tmp_path / "history.sqlite"))
    row = {
        "ts": 5000,
        "source_ip": "192.0.2.7",
        "result": "pass",
        "header_from": "example.org",
        "envelope_from": "example.org",
        "envelope_to": "example.net",
        "policy_domain": "example.org",
        "disposition": "none",
        "dkim_aligned": "pass",
        "spf_aligned": "fail",
        "reasons": "[]",
        "adkim": "r",
        "aspf": "r",
        "p": "reject",
        "sp": "reject",
        "pct": 100,
        "fo": "0",
        "rua": rua,
        "dkim": '[["example.org", "s1", "pass"]]',
        "spf": '[["example.org", "mfrom", "fail"]]',
    }
    store.add(row)
    store.add(row | {"source_ip": "192.0.2.8"})
    return store


def test_send_reports_once_per_period_and_address(tmp_path: Path) -> None:
    conf = DMARCConfig.model_validate({"org_name": "mx.test", "report_email": "dmarc@mx.test"})
    rua = (
        "mailto:d@example.org,mailto:r@reports.example,mailto:x@none.example,"
        "mailto:t@example.org!600"
    )
    store = _store_with_rows(tmp_path, rua)
    dns = FakeResolver({"example.org._report._dmarc.reports.example": {"TXT": ["v=DMARC1;"]}})
    reports = build_reports(store, conf, 0, 86400)
    assert len(reports) == 1
    with SmtpSink() as sink:
        first = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", sink.port)
        got = {(o.address, o.status) for o in first}
        assert got == {
            ("d@example.org", "sent"),
            ("r@reports.example", "sent"),
            ("x@none.example", "skipped"),
            ("t@example.org", "skipped"),  # 600 bytes is less than the report
        }
        msgs = sink.wait_for(2)
        assert sorted(m.rcpt_tos[0] for m in msgs) == ["d@example.org", "r@reports.example"]
        assert {m.mail_from for m in msgs} == {"dmarc@mx.test"}
        parsed = email.message_from_bytes(msgs[0].data, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        (part,) = list(parsed.iter_attachments())
        xml = gzip.decompress(part.get_content())
        schema = xmlschema.XMLSchema(str(XSD))
        schema.validate(xml.decode())
        doc = schema.to_dict(xml.decode())
        assert isinstance(doc, dict)
        assert sorted(r["row"]["source_ip"] for r in doc["record"]) == ["192.0.2.7", "192.0.2.8"]

        again = send_reports(build_reports(store, conf, 0, 86400), conf, store, dns, PSL,
                             "127.0.0.1", sink.port)  # fmt: skip
        assert {(o.address, o.why) for o in again if o.status == "skipped"} >= {
            ("d@example.org", "already sent"),
            ("r@reports.example", "already sent"),
        }
        assert not [o for o in again if o.status == "sent"]
        forced = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", sink.port, force=True)
        assert len([o for o in forced if o.status == "sent"]) == 2
        sink.wait_for(4)
        # Another period is another report.
        later = send_reports(build_reports(store, conf, 0, 86401), conf, store, dns, PSL,
                             "127.0.0.1", sink.port, dry_run=True)  # fmt: skip
        assert {o.status for o in later if o.address == "d@example.org"} == {"would send"}
        time.sleep(0.2)
        assert len(sink.messages) == 4
    store.close()


def test_smtp_or_dns_failure_is_failed_and_not_remembered(tmp_path: Path) -> None:
    conf = DMARCConfig.model_validate({})
    store = _store_with_rows(tmp_path, "mailto:d@example.org,mailto:r@slow.example")
    dns = FakeResolver({"example.org._report._dmarc.slow.example": {"TXT": "TIMEOUT"}})
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reports = build_reports(store, conf, 0, 86400)
    out = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", port)
    assert {(o.address, o.status) for o in out} == {
        ("d@example.org", "failed"),
        ("r@slow.example", "failed"),
    }
    assert not store.was_sent("example.org", 0, 86399, "d@example.org")
    with SmtpSink() as sink:
        out = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", sink.port)
        assert ("d@example.org", "sent") in {(o.address, o.status) for o in out}
        assert store.was_sent("example.org", 0, 86399, "D@example.org")
    store.close()


def test_no_mailto_rua_is_skipped(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, "")
    conf = DMARCConfig.model_validate({})
    out = send_reports(build_reports(store, conf, 0, 86400), conf, store, FakeResolver(), PSL,
                       "127.0.0.1", 1)  # fmt: skip
    assert [(o.status, o.why) for o in out] == [("skipped", "no mailto: rua in the policy")]
    store.close()


def test_pruning_forgets_sent_reports_with_their_rows(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, "mailto:d@example.org")
    store.mark_sent("example.org", 0, 86399, "d@example.org", "id1")
    store.mark_sent("example.org", 86400, 2 * 86400 - 1, "d@example.org", "id2")
    assert store.prune(86400) == 2
    assert not store.was_sent("example.org", 0, 86399, "d@example.org")
    assert store.was_sent("example.org", 86400, 2 * 86400 - 1, "d@example.org")
    store.close()
