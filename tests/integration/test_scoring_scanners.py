"""External scanners as score sources, against the real daemons from Debian packages:
SpamAssassin's spamd (``spamassassin``) and rspamd (``rspamd``), both on loopback.

Nothing leaves the machine: spamd runs with ``--local`` (no network tests); rspamd's
resolver points at a dead loopback port and its DNS-based modules are switched off.
One spamd and one rspamd serve the whole module; every test runs through Postfix and
through sendmail (:func:`tests.integration.mta.make_mta`, one MTA and one milterd each).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.integration.mta import KINDS, MTA, make_mta
from tests.support.postfix import free_port
from tests.support.rspamd import Rspamd, stop
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import SendResult, send

_REPORT = re.compile(r"\*\s+(-?\d+\.\d)\s+([A-Z][A-Z0-9_]*)")

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} not listening:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def spamd_port() -> Iterator[int]:
    exe = shutil.which("spamd") or "/usr/sbin/spamd"
    assert os.path.exists(exe), "Debian package spamassassin is required"
    port = free_port()
    d = Path(tempfile.mkdtemp(prefix="milterd-spamd-", dir="/var/tmp"))
    log = d / "spamd.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            [exe, "--local", "--listen", f"127.0.0.1:{port}", "--allowed-ips", "127.0.0.1",
             "--max-children", "2", "--pidfile", str(d / "spamd.pid"), "-s", "stderr",
             "-u", "nobody"],
            stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_port(port, proc, 60, log)
        yield port
    finally:
        stop(proc)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def rspamd_port() -> Iterator[int]:
    with Rspamd() as r:
        yield r.port


@dataclass
class Rig:
    daemon: Daemon
    mta: MTA
    sink: SmtpSink

    def send(self, data: bytes, rcpts: list[str] | None = None) -> SendResult:
        return send("127.0.0.1", self.mta.smtp_port, "alice@sender.example",
                    rcpts or ["bob@example.net"], data)  # fmt: skip

    def delivered(self, marker: str, timeout: float = 20) -> SinkMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in list(self.sink.messages):
                if marker.encode() in m.data:
                    return m
            time.sleep(0.05)
        raise AssertionError(f"{marker} not delivered:\n{self.mta.log_tail()}")


@pytest.fixture(scope="module", params=KINDS)
def rig(request: pytest.FixtureRequest, spamd_port: int, rspamd_port: int) -> Iterator[Rig]:
    body = f"""
[plugins.scoring]
gtube = 0
result_defaults = false
[plugins.scoring.mime]
enabled = false
[plugins.scoring.actions]
reject = 500.0
rewrite_subject = 20.0
add_header = 5.0
[plugins.scoring.spamd]
enabled = true
port = {spamd_port}
timeout = 20
[plugins.scoring.rspamd]
enabled = true
url = "http://127.0.0.1:{rspamd_port}"
timeout = 20
[plugins.tagging]
report = true
"""
    with (
        Daemon(
            body, socket_kind="inet", milterd_extra='internal_networks = ["10.255.255.0/24"]'
        ) as d,  # fmt: skip
        SmtpSink() as sink,
        # sendmail: the documented E:5m; milterd's progress every 5 s keeps R:10s happy
        # while the scanners work.
        make_mta(
            request.param,
            sink_port=sink.port,
            milter=d.socket,
            postfix_options={"milter_content_timeout": 60},
        ) as mta,
    ):
        yield Rig(d, mta, sink)


def report(m: SinkMessage) -> dict[str, float]:
    """Symbol -> score from X-Spam-Report (``* SCORE NAME description`` per folded line)."""
    (value,) = m.header("X-Spam-Report")
    return {name: float(score) for score, name in _REPORT.findall(value)}


def message(marker: str, body: str) -> bytes:  # a complete, well-formed message
    return (
        f"From: Alice <alice@sender.example>\r\nTo: bob@example.net\r\nSubject: {marker}\r\n"
        f"Date: Sun, 22 Nov 2026 04:00:00 +0000\r\nMessage-ID: <{marker}@sender.example>\r\n"
        f"\r\n{body}\r\n"
    ).encode()


def test_gtube_scored_by_spamd_and_rspamd(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    res = rig.send(message(mk, GTUBE))
    assert res.rejected and res.code == 550, res  # 1000 (spamd) + 15 (rspamd) >= 500
    time.sleep(0.2)
    log = rig.daemon.log_text()
    line = next(ln for ln in log.splitlines() if "action=reject" in ln and "SA_GTUBE" in ln)
    assert "SA_GTUBE(1000)" in line and "RSPAMD_PRERESULT(" in line


def test_spamd_and_rspamd_rules_become_symbols(rig: Rig) -> None:
    mk = uuid.uuid4().hex
    # No To, Date or Message-ID: both scanners have rules for that.
    data = (
        f"From: Alice <alice@sender.example>\r\nSubject: {mk}\r\n"
        "\r\nHello Bob,\r\nthe minutes of the meeting are below.\r\n"
    ).encode()
    assert rig.send(data).ok
    m = rig.delivered(mk)
    rep = report(m)
    assert rep.get("SA_MISSING_HEADERS", 0) > 0 and rep.get("SA_MISSING_DATE", 0) > 0, rep
    assert rep.get("RSPAMD_MISSING_TO", 0) > 0 and rep.get("RSPAMD_MISSING_DATE", 0) > 0, rep
    assert "SPAMD_UNAVAILABLE" not in rep and "RSPAMD_UNAVAILABLE" not in rep
    assert all(v != 0 for k, v in rep.items() if k.startswith("RSPAMD_"))  # keep_zero off
    # The total in X-Spam-Score is every symbol's score, scanners' included.
    (score,) = m.header("X-Spam-Score")
    assert float(score) == pytest.approx(sum(rep.values()), abs=0.11)
