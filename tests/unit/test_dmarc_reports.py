"""Mailing DMARC aggregate reports (``milterd dmarc report --send``): rua parsing, the
RFC 7489 7.1 check of external destinations, the report message, and sending over SMTP
to a sink on loopback (once per period and address)."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import fcntl
import gzip
import socket
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import xmlschema
from milterd_plugins.dmarc import DMARCConfig, Store, _psl
from milterd_plugins.dmarc.reports import (
    Destination,
    Report,
    authorize,
    build_reports,
    catch_up,
    notice_message,
    parse_rua,
    period,
    report_message,
    send_reports,
)

from milterd.testing import FakeResolver
from tests.support.clock import away_from_midnight
from tests.support.sink import SmtpSink

XSD = Path(__file__).resolve().parents[1] / "data" / "dmarc" / "rua.xsd"
PSL = _psl()


def test_parse_rua() -> None:
    got = parse_rua(
        "mailto:a@example.org, mailto:b@reports.example!10m ,https://x.example/r,"
        "mailto:c@example.org!500, mailto:d@example.org!5x, mailto:nodomain,"
        "MAILTO:A@example.org, mailto:e%2Ef@example.org!1k, mailto:g@B%C3%BCcher.example"
    )
    assert got == [
        Destination("a@example.org"),
        Destination("b@reports.example", 10 * 1024 * 1024),
        Destination("c@example.org", 500),
        Destination("e.f@example.org", 1024),
        Destination("g@xn--bcher-kva.example"),
    ]
    assert parse_rua("") == []
    assert parse_rua("mailto:") == []
    # Anyone can publish a record: nothing but a plain local@domain reaches SMTP.
    for bad in [
        "mailto:e%2Cf@example.org",  # "," in the local part
        "mailto:a%40b@example.org",  # "@"
        "mailto:v%25third@example.org",  # "%" hack
        "mailto:r%C3%A9@example.org",  # non-ASCII local part
        "mailto:a%0Bb@example.org",
        "mailto:a%00@example.org",
        "mailto:a:b@example.org",
        "mailto:x@b..example",
        "mailto:x@" + "l" * 64 + ".example",
        "mailto:x@example",  # no dot
        "mailto:" + "l" * 65 + "@example.org",
    ]:
        assert parse_rua(bad) == [], bad


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
    assert period("20261101", None, now) == (day - 31 * 86400, day - 30 * 86400)
    assert period(None, "2026-12-02", now) == (day - 86400, day)  # a day up to --until
    assert period("100", "200", now) == (100, 200)
    assert catch_up(3, now) == [(day - 2 * 86400, day - 86400), (day - 86400, day),
                                (day, day + 86400)]  # fmt: skip
    with pytest.raises(ValueError):
        period("200", "100", now)
    with pytest.raises(ValueError):
        period("yesterday", None, now)
    with pytest.raises(ValueError):
        period("99999999999999999999", None, now)


def _report(rua: str = "mailto:d@example.org", xml: bytes = b"<feedback/>\n") -> Report:
    return Report("example.org", 1000, 86399, "abc123", rua, xml, "mx.test")  # receiver


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
    row = _row(rua)
    store.add(row)
    store.add(row | {"source_ip": "192.0.2.8"})
    return store


def _row(rua: str) -> dict[str, Any]:
    return {
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
            ("t@example.org", "skipped"),  # 600 bytes: less than the report and the notice
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
        # An overlapping period is not reported again; the next day is another report.
        overlapping = send_reports(build_reports(store, conf, 0, 86401), conf, store, dns,
                                   PSL, "127.0.0.1", sink.port)  # fmt: skip
        assert {o.why for o in overlapping if o.address == "d@example.org"} == {"already sent"}
        store.add(_row(rua) | {"ts": 86400 + 5000})
        later = send_reports(build_reports(store, conf, 86400, 2 * 86400), conf, store, dns,
                             PSL, "127.0.0.1", sink.port, dry_run=True)  # fmt: skip
        assert {o.status for o in later if o.address == "d@example.org"} == {"would send"}
        time.sleep(0.2)
        assert len(sink.messages) == 4
    store.close()


def _fields(text: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in text.splitlines() if line)


def test_report_over_the_size_limit_gets_a_notice_once(tmp_path: Path) -> None:
    """RFC 7489 7.2.1: a report larger than a URI's limit is not sent there; the address
    gets a short error report (7.2.2) instead, after the same 7.1 check, once a period."""
    conf = DMARCConfig.model_validate({"org_name": "mx.test", "report_email": "dmarc@mx.test"})
    rua = (
        "mailto:d@example.org,mailto:t@example.org!2k,mailto:x@reports.example!2k,"
        "mailto:n@none.example!2k,mailto:s@example.org!1k"
    )
    store = Store(str(tmp_path / "history.sqlite"))
    for i in range(1, 200):  # distinct rows: a report that is more than 2k gzip'd
        store.add(_row(rua) | {"source_ip": f"198.51.100.{i}", "envelope_from": f"s{i}.example"})
    dns = FakeResolver({"example.org._report._dmarc.reports.example": {"TXT": ["v=DMARC1"]}})
    (report,) = build_reports(store, conf, 0, 86400)
    with SmtpSink() as sink:
        out = {o.address: o for o in send_reports([report], conf, store, dns, PSL, "127.0.0.1",
                                                  sink.port)}  # fmt: skip
        assert {a: o.status for a, o in out.items()} == {
            "d@example.org": "sent",  # no limit: the report
            "t@example.org": "sent",  # the notice
            "x@reports.example": "sent",  # the notice, after the 7.1 check
            "n@none.example": "skipped",  # not authorized: no notice either
            "s@example.org": "skipped",  # 1k: not even room for the notice
        }
        assert out["d@example.org"].why == ""
        why = out["t@example.org"].why
        assert why.startswith("report too large (") and why.endswith(" > limit 2048), notice sent")
        size = int(why.split("(")[1].split()[0])
        assert size > 2048
        assert "does not accept reports" in out["n@none.example"].why
        assert "too little even for the" in out["s@example.org"].why
        got = {m.rcpt_tos[0]: m for m in sink.wait_for(3)}
        assert sorted(got) == ["d@example.org", "t@example.org", "x@reports.example"]
        notice = email.message_from_bytes(got["t@example.org"].data, policy=email.policy.default)
        assert isinstance(notice, EmailMessage)
        assert len(got["t@example.org"].data) <= 2048
        assert notice["Auto-Submitted"] == "auto-generated" and notice["To"] == "t@example.org"
        assert not notice["Subject"].startswith("Report Domain:")  # not a report to parse
        parts = list(notice.iter_parts())  # no XML: two text parts, fields first (7.2.2)
        assert [p.get_content_type() for p in parts] == ["text/plain", "text/plain"]
        first, human = parts
        fields = _fields(first.get_content())
        assert set(fields) == {"Report-Date", "Report-Domain", "Report-ID", "Report-Size",
                               "Submitter", "Submitting-URI"}  # fmt: skip
        assert email.utils.parsedate_to_datetime(fields["Report-Date"]).tzinfo is not None
        assert fields["Report-Domain"] == "example.org"
        assert fields["Report-ID"] == f"<{report.report_id}@mx.test>"
        assert fields["Report-Size"] == str(size)
        assert fields["Submitter"] == "mx.test"
        assert fields["Submitting-URI"] == "mailto:t@example.org!2k"
        assert "not sent" in human.get_content()
        full = email.message_from_bytes(got["d@example.org"].data, policy=email.policy.default)
        assert isinstance(full, EmailMessage)
        (attached,) = list(full.iter_attachments())
        assert gzip.decompress(attached.get_content()) == report.xml

        # Remembered like a report: the next run sends no second notice.
        assert str(store.handled("example.org", 0, 86399, "t@example.org")).startswith(
            "notice: report too large"
        )
        again = send_reports(build_reports(store, conf, 0, 86400), conf, store, dns, PSL,
                             "127.0.0.1", sink.port)  # fmt: skip
        assert {(o.address, o.why) for o in again} >= {
            ("t@example.org", "already sent"), ("x@reports.example", "already sent")
        }  # fmt: skip
        assert not [o for o in again if o.status == "sent"]
        dry = send_reports([report], conf, store, dns, PSL, "127.0.0.1", sink.port,
                           force=True, dry_run=True)  # fmt: skip
        (o,) = [o for o in dry if o.address == "t@example.org"]
        assert o.status == "would send" and o.why.endswith("notice instead")
        time.sleep(0.2)
        assert len(sink.messages) == 3
    store.close()


def test_notice_message_fields() -> None:
    conf = DMARCConfig.model_validate({"org_name": "mx.test", "report_email": "dmarc@mx.test"})
    msg = notice_message(_report(), conf, Destination("t@example.org", 10 << 20), 123456)
    raw = msg.as_bytes()
    assert b"Submitting-URI: mailto:t@example.org!10m\r\n" in raw
    assert b"Report-Size: 123456\r\n" in raw and b"Report-ID: <abc123@mx.test>\r\n" in raw
    assert raw.count(b"MIME-Version") == 1 and max(map(len, raw.split(b"\r\n"))) <= 78
    assert b"application/gzip" not in raw


def test_an_address_its_authorization_record_put_in_place_is_sent_once(tmp_path: Path) -> None:
    """7.1: a record's own rua on the same host replaces the address; that address got the
    same period again on every run, as only the published one was looked up."""
    conf = DMARCConfig.model_validate({})
    store = _store_with_rows(tmp_path, "mailto:r@moved.example")
    dns = FakeResolver({"example.org._report._dmarc.moved.example": {
        "TXT": ["v=DMARC1; rua=mailto:other@moved.example"]}})  # fmt: skip
    with SmtpSink() as sink:
        runs = [send_reports(build_reports(store, conf, 0, 86400), conf, store, dns, PSL,
                             "127.0.0.1", sink.port) for _ in range(2)]  # fmt: skip
        assert [(o.address, o.status) for o in runs[0]] == [("other@moved.example", "sent")]
        assert [(o.address, o.why) for o in runs[1]] == [("other@moved.example", "already sent")]
        sink.wait_for(1)
        time.sleep(0.2)
        assert len(sink.messages) == 1
    store.close()


def test_a_substituted_address_also_published_is_said_already_sent_once(tmp_path: Path) -> None:
    conf = DMARCConfig.model_validate({})
    store = _store_with_rows(tmp_path, "mailto:r@moved.example,mailto:other@moved.example")
    dns = FakeResolver({"example.org._report._dmarc.moved.example": {
        "TXT": ["v=DMARC1; rua=mailto:other@moved.example"]}})  # fmt: skip
    with SmtpSink() as sink:
        runs = [send_reports(build_reports(store, conf, 0, 86400), conf, store, dns, PSL,
                             "127.0.0.1", sink.port) for _ in range(2)]  # fmt: skip
        assert [(o.address, o.why) for o in runs[1]] == [("other@moved.example", "already sent")]
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
    assert store.handled("example.org", 0, 86399, "d@example.org") is None
    with SmtpSink() as sink:
        out = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", sink.port)
        assert ("d@example.org", "sent") in {(o.address, o.status) for o in out}
        assert store.handled("example.org", 0, 86399, "D@example.org") == "sent"
        # A permanent refusal (5xx) is remembered as handled, not failed for ever.
        sink.rcpt_responses["d@example.org"] = "550 5.1.1 no such user"
        out = send_reports(reports, conf, store, dns, PSL, "127.0.0.1", sink.port, force=True)
        (o,) = [o for o in out if o.address == "d@example.org"]
        assert o.status == "skipped" and o.why.startswith("refused: 550")
    store.close()


def test_no_mailto_rua_is_skipped(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, "")
    conf = DMARCConfig.model_validate({})
    out = send_reports(build_reports(store, conf, 0, 86400), conf, store, FakeResolver(), PSL,
                       "127.0.0.1", 1)  # fmt: skip
    assert [(o.status, o.why) for o in out] == [("skipped", "no usable mailto: rua in the policy")]
    # Remembered: the next run (catching up the same day) says nothing about it.
    again = send_reports(build_reports(store, conf, 0, 86400), conf, store, FakeResolver(), PSL,
                         "127.0.0.1", 1)  # fmt: skip
    assert again == []
    store.close()


def test_pruning_forgets_sent_reports_with_their_rows(tmp_path: Path) -> None:
    store = _store_with_rows(tmp_path, "mailto:d@example.org")
    store.mark("example.org", 0, 86399, "d@example.org", "id1", "sent")
    store.mark("example.org", 86400, 2 * 86400 - 1, "d@example.org", "id2", "sent")
    assert store.prune(86400) == 2
    assert store.handled("example.org", 0, 86399, "d@example.org") is None
    assert store.handled("example.org", 86400, 2 * 86400 - 1, "d@example.org") == "sent"
    # Overlapping periods count: a two-day report after the daily ones is not sent.
    assert store.handled("example.org", 0, 3 * 86400, "d@example.org") == "sent"
    assert store.handled("example.org", 2 * 86400, 3 * 86400, "d@example.org") is None
    store.close()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(config), "dmarc", "report", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_send_without_a_period_catches_up_the_last_days_once(tmp_path: Path) -> None:
    away_from_midnight()  # the CLI reads the date again: today must stay today
    db = tmp_path / "history.sqlite"
    store = Store(str(db))
    midnight = int(time.time()) // 86400 * 86400
    for days_ago in (1, 2, 3, 9):  # the 9th day back is outside --days 7
        store.add(_row("mailto:d@example.org") | {"ts": midnight - days_ago * 86400 + 60})
    store.add(_row("mailto:d@example.org") | {"ts": int(time.time())})  # today: not complete
    store.close()
    config = tmp_path / "milterd.toml"
    config.write_text(
        f'[plugins.dmarc]\nhistory_db = "{db}"\nreport_email = "dmarc@mx.test"\n'
        '[dns]\nnameservers = ["127.0.0.1:9"]\ntimeout = 1\n'
    )
    with SmtpSink() as sink:
        run = _cli(config, "--send", "--smtp-port", str(sink.port))
        assert run.returncode == 0, run.stdout + run.stderr
        assert run.stdout.splitlines() == ["sent example.org d@example.org"] * 3
        got = sink.wait_for(3)
        subjects = sorted(m.header("Subject")[0] for m in got)
        assert all(s.startswith("Report Domain: example.org Submitter: mx.test ") for s in subjects)
        again = _cli(config, "--send", "--smtp-port", str(sink.port))
        assert again.returncode == 0 and again.stdout == "", again.stdout + again.stderr
        assert "3 report(s) already sent earlier" in again.stderr
        # Another run holding the lock: this one sends nothing and says why.
        with open(f"{db}.report-lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            locked = _cli(config, "--send", "--force", "--smtp-port", str(sink.port))
        assert locked.returncode == 1 and "holds the lock" in locked.stderr
        time.sleep(0.2)
        assert len(sink.messages) == 3


def test_command_errors_are_one_line_not_tracebacks(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[plugins.dmarc]\nhistory_days = 1\n")
    Store(str(tmp_path / "h.db")).close()
    for config, args in [
        (bad, ["--since", "2026-11-01"]),
        (tmp_path / "none.toml", ["--db", str(tmp_path / "no" / "such" / "dir" / "x.db")]),
        (tmp_path / "none.toml", ["--db", str(tmp_path / "h.db"), "--since", "tomorrow"]),
        (tmp_path / "none.toml", ["--db", str(tmp_path / "h.db"), "--since", "9" * 20]),
        (tmp_path / "none.toml", ["--db", str(tmp_path / "h.db"), "--send"]),  # no config
    ]:
        run = _cli(config, *args)
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and run.stderr.startswith("milterd"), run.stderr
    assert not (tmp_path / "no").exists()


def test_report_command_line_mistakes_are_usage_errors(tmp_path: Path) -> None:
    """Found by a CLI review: a -c file that does not exist was silently ignored (the
    report went out under the default org_name), --dry-run without --send wrote the
    files, and a port of 99999 connected to 34463."""
    db = tmp_path / "history.sqlite"
    Store(str(db)).close()
    r = _cli(tmp_path / "missing.toml", "--db", str(db), "-o", str(tmp_path))
    assert r.returncode == 2 and "cannot read" in r.stderr
    config = tmp_path / "m.toml"
    config.write_text("")
    r = _cli(config, "--db", str(db), "--dry-run", "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "--dry-run goes with --send" in r.stderr
    assert not (tmp_path / "out").exists()
    r = _cli(config, "--db", str(db), "--send", "--smtp-port", "99999")
    assert r.returncode == 2 and "not a port number" in r.stderr


def test_sender_bytes_and_controls_cannot_break_the_history_or_any_report(tmp_path: Path) -> None:
    """Found by a security review. A HELO or MAIL FROM with a byte that is not UTF-8 (a
    lone surrogate once decoded) failed the history insert, so dmarc failed at eom (451,
    or with on_error = continue a spoofed p=reject From delivered), or it was recorded
    and then every domain's report of the period failed; control characters (HELO, a
    forged DKIM d=/s=) made the domain's XML unparseable for its receiver."""
    from milterd_plugins.authres import AuthenticationResults
    from milterd_plugins.dkim import DKIMPlugin
    from milterd_plugins.dmarc import DMARCPlugin
    from milterd_plugins.spf import SPFPlugin

    from milterd.testing import Harness

    db = tmp_path / "history.sqlite"
    zones = {
        "_dmarc.victim.example": {"TXT": ["v=DMARC1; p=reject; rua=mailto:r@victim.example"]},
        "_dmarc.other.example": {"TXT": ["v=DMARC1; p=none; rua=mailto:r@other.example"]},
    }
    bad = b"\xff".decode("utf-8", "surrogateescape")
    cfg = {"spf": {}, "dkim": {}, "authres": {}, "dmarc": {"history_db": str(db)}}
    plugins = {"spf": SPFPlugin, "dkim": DKIMPlugin, "dmarc": DMARCPlugin,
               "authres": AuthenticationResults}  # fmt: skip
    forged = (b"DKIM-Signature: v=1; a=rsa-sha256; d=victim.example\x01; s=s\x02el; h=from;"
              b" bh=AAAA; b=AAAA\r\n")  # fmt: skip
    since = int(time.time()) - 1
    with Harness(cfg, plugins=plugins, zones=zones) as h:
        for helo, sender, extra in (
            (f"mx{bad}.good.example", "", b""),
            ("mx.good.example", f"a@{bad}good.example", b""),
            ("mx\x0b.good.example", "x@good.example", forged),
        ):
            out = h.send(extra + b"From: a@victim.example\r\nSubject: t\r\n\r\nb\r\n",
                         helo=helo, sender=sender, client_ip="192.0.2.5")  # fmt: skip
            assert out.errors == [] and out.verdict == "reject", out.errors  # dmarc decided
        out = h.send(b"From: a@other.example\r\nSubject: t\r\n\r\nb\r\n",
                     helo="mx.good.example", client_ip="192.0.2.6")  # fmt: skip
        assert out.errors == []
    store = Store(str(db))
    reports = build_reports(store, DMARCConfig(), since, int(time.time()) + 1)
    store.close()
    assert sorted(r.domain for r in reports) == ["other.example", "victim.example"]
    for r in reports:
        root = ET.fromstring(r.xml)  # well-formed
        assert root.tag == "feedback"
    victim = next(r for r in reports if r.domain == "victim.example").xml.decode()
    assert "mx\ufffd.good.example" in victim and "victim.example\ufffd" in victim


def test_one_domains_unbuildable_rows_cost_no_other_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = Store(str(tmp_path / "h.sqlite"))
    store.add(_row("mailto:r@example.org"))
    store.add(_row("mailto:r@bad.example") | {"policy_domain": "bad.example", "dkim": "{not json"})
    reports = build_reports(store, DMARCConfig(), 0, 86400)
    store.close()
    assert [r.domain for r in reports] == ["example.org"]
    assert "bad.example: report not built: JSONDecodeError" in capsys.readouterr().err


def test_at_most_five_destinations_of_a_rua() -> None:
    # Each external one costs an authorization lookup (10 s when DNS is silent): a rua of
    # thousands made one report run take hours (a review).
    rua = ",".join(f"mailto:r{i}@h{i}.example" for i in range(2400))
    assert [d.address for d in parse_rua(rua)] == [f"r{i}@h{i}.example" for i in range(5)]
