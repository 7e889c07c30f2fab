"""End to end: DMARC aggregate and failure reports.

Mail from example.org goes SMTP client -> Postfix -> milterd (spf, dmarc with a history)
-> sink. Then ``milterd dmarc report --send`` builds the report for that period and hands
it to the same Postfix, which delivers it to the sink: to the rua address in the policy
domain, to the external one whose domain published its agreement record
(``example.org._report._dmarc.reports.example``), and not to the one that did not.
Failure reports go from the daemon's sender thread straight to the sink (the daemon's
``report_smtp_port``).
"""

from __future__ import annotations

import email
import email.policy
import gzip
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
import xmlschema

from tests.integration.daemon import MILTERD, Daemon
from tests.integration.mta import MTA, make_mta
from tests.support.dnsserver import ZoneServer
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

XSD = Path(__file__).resolve().parents[1] / "data" / "dmarc" / "rua.xsd"
RUA = "mailto:dmarc@example.org,mailto:agg@reports.example!1m,mailto:agg@nobody.example"
ZONE = {
    "example.org": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "_dmarc.example.org": {"TXT": [f"v=DMARC1; p=none; rua={RUA}"]},
    "example.org._report._dmarc.reports.example": {"TXT": ["v=DMARC1"]},
    "mx.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
    "fo.example": {"TXT": ["v=spf1 ~all"]},
    "_dmarc.fo.example": {
        "TXT": ["v=DMARC1; p=none; ruf=mailto:ruf@fo.example,mailto:ruf@nobody.example; fo=1"]
    },
}


@dataclass
class Rig:
    dns: ZoneServer
    daemon: Daemon
    mta: MTA
    sink: SmtpSink

    def report(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*MILTERD, "-c", str(self.daemon.config), "dmarc", "report", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    with ZoneServer(ZONE) as dns:
        extra = 'internal_networks = []\n[dns]\nnameservers = ["127.0.0.1:%d"]\ntimeout = 2\n'
        with SmtpSink() as sink:
            body = (
                "[plugins.spf]\nskip_addresses = []\n[plugins.dmarc]\n"
                'history_db = "{dir}/dmarc.sqlite"\norg_name = "mx.test"\n'
                'report_email = "dmarc-reports@mx.test"\n'
                f'failure_reports = true\nfailure_spool = "{{dir}}/failures"\n'
                f"report_smtp_port = {sink.port}\n"
            )
            d = Daemon("", socket_kind="unix", milterd_extra=extra % dns.port)
            d.write(body.format(dir=d.dir))
            with d, make_mta("postfix", sink_port=sink.port, milter=d.socket) as mta:
                yield Rig(dns, d, mta, sink)


def _reports(sink: SinkMessage) -> tuple[EmailMessage, bytes]:
    msg = email.message_from_bytes(sink.data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    (part,) = list(msg.iter_attachments())
    assert part.get_content_type() == "application/gzip"
    return msg, gzip.decompress(part.get_content())


def test_aggregate_report_is_mailed_to_verified_rua_addresses(rig: Rig) -> None:
    since = int(time.time()) - 1
    for i in range(3):
        data = (
            f"From: a@example.org\r\nTo: bob@example.net\r\nSubject: m{i}\r\n"
            f"Message-ID: <{uuid.uuid4().hex}@t>\r\n\r\nHello.\r\n"
        ).encode()
        res = send("127.0.0.1", rig.mta.smtp_port, "a@example.org", ["bob@example.net"], data)
        assert res.code == 250, res
    rig.sink.wait_for(3, timeout=30)
    until = int(time.time()) + 1
    period = ["--since", str(since), "--until", str(until)]
    rig.sink.clear()

    run = rig.report(*period, "--send", "--smtp-port", str(rig.mta.smtp_port))
    assert run.returncode == 0, run.stdout + run.stderr
    lines = sorted(run.stdout.splitlines())
    assert lines[:2] == [
        "sent example.org agg@reports.example",
        "sent example.org dmarc@example.org",
    ]
    assert lines[2].startswith("skipped example.org agg@nobody.example: ")
    assert "example.org._report._dmarc.nobody.example" in lines[2]

    got = rig.sink.wait_for(2, timeout=30)
    assert sorted(r for m in got for r in m.rcpt_tos) == [
        "agg@reports.example",
        "dmarc@example.org",
    ]
    schema = xmlschema.XMLSchema(str(XSD))
    for m in got:
        msg, xml = _reports(m)
        assert m.mail_from == "dmarc-reports@mx.test"
        assert msg["Subject"].startswith("Report Domain: example.org Submitter: mx.test ")
        schema.validate(xml.decode())
        doc = schema.to_dict(xml.decode())
        assert isinstance(doc, dict)
        assert doc["policy_published"]["domain"] == "example.org"
        assert doc["report_metadata"]["date_range"] == {"begin": since, "end": until - 1}
        (record,) = doc["record"]
        assert record["row"]["source_ip"] == "127.0.0.1"
        assert record["row"]["count"] == 3
        assert record["row"]["policy_evaluated"]["spf"] == "pass"

    # The same period again: nothing is sent twice.
    again = rig.report(*period, "--send", "--smtp-port", str(rig.mta.smtp_port))
    assert again.returncode == 0, again.stderr
    assert "skipped example.org dmarc@example.org: already sent" in again.stdout
    assert "sent " not in again.stdout
    time.sleep(1.0)
    assert len(rig.sink.messages) == 2, [m.rcpt_tos for m in rig.sink.messages]


def test_unreachable_smtp_server_fails_with_status_1(rig: Rig) -> None:
    since = int(time.time()) - 1
    # The sink held the last test's messages: without this, wait_for(1) returned at once
    # and this message could reach the sink after the next test had cleared it.
    rig.sink.clear()
    data = b"From: a@example.org\r\nTo: bob@example.net\r\nSubject: x\r\n\r\nHello.\r\n"
    send("127.0.0.1", rig.mta.smtp_port, "a@example.org", ["bob@example.net"], data)
    rig.sink.wait_for(1, timeout=30)
    until = int(time.time()) + 1
    run = rig.report("--since", str(since), "--until", str(until), "--send", "--smtp-port", "1")
    assert run.returncode == 1, run.stdout + run.stderr
    assert "failed example.org dmarc@example.org: 127.0.0.1:1: " in run.stdout


def test_failure_report_for_failing_mail_reaches_the_ruf_address(rig: Rig) -> None:
    rig.sink.clear()
    data = (
        "From: a@fo.example\r\nTo: bob@example.net\r\nSubject: forged\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@t>\r\n\r\nSecret body.\r\n"
    ).encode()
    res = send("127.0.0.1", rig.mta.smtp_port, "a@fo.example", ["bob@example.net"], data)
    assert res.code == 250, res  # softfail, not rejected; p=none delivers
    got = rig.sink.wait_for(2, timeout=40)
    reports = [m for m in got if m.rcpt_tos == ["ruf@fo.example"]]
    assert len(reports) == 1, [m.rcpt_tos for m in got]
    report = email.message_from_bytes(reports[0].data, policy=email.policy.default)
    assert isinstance(report, EmailMessage)
    assert report.get_content_type() == "multipart/report"
    assert reports[0].mail_from == "dmarc-reports@mx.test"
    feedback, original = list(report.iter_parts())[1:]
    payload = feedback.get_payload()
    assert isinstance(payload, list) and isinstance(payload[0], EmailMessage)
    fields = {k: str(v) for k, v in payload[0].items()}
    assert fields["Feedback-Type"] == "auth-failure"
    assert fields["Source-IP"] == "127.0.0.1"
    assert fields["Reported-Domain"] == "fo.example"
    assert "dmarc=fail" in fields["Authentication-Results"]
    assert fields["Delivery-Result"] == "delivered"
    headers = original.get_payload(decode=True)
    assert isinstance(headers, bytes)
    assert b"Subject: forged\r\n" in headers and b"Secret body" not in headers
    time.sleep(1.0)  # nobody.example did not agree: nothing goes there
    assert not [m for m in rig.sink.messages if "ruf@nobody.example" in m.rcpt_tos]
    assert not list((rig.daemon.dir / "failures").glob("*.report"))
