"""End to end: SMTP client -> a private Postfix on loopback -> milterd -> sink.

Every test runs with milterd on a unix socket and on TCP.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.integration.daemon import Daemon
from tests.support.postfix import PrivatePostfix, ipv6_loopback_available
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import SendResult, send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MESSAGE = (
    b"From: Alice <alice@example.org>\r\n"
    b"To: Bob <bob@example.net>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Hello Bob.\r\n"
)


@dataclass
class Rig:
    daemon: Daemon
    postfix: PrivatePostfix
    sink: SmtpSink

    def send(
        self,
        rcpts: list[str] | None = None,
        data: bytes = MESSAGE,
        host: str = "127.0.0.1",
        sender: str = "alice@example.org",
    ) -> SendResult:
        return send(host, self.postfix.smtp_port, sender, rcpts or ["bob@example.net"], data)

    def delivered(self, count: int = 1, timeout: float = 15) -> list[SinkMessage]:
        return self.sink.wait_for(count, timeout)


@pytest.fixture(params=["unix", "inet"])
def socket_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def rig(body: str, socket_kind: str, ipv6: bool = False, **postfix: object) -> Iterator[Rig]:
    with (
        Daemon(body, socket_kind=socket_kind) as d,
        SmtpSink() as sink,
        PrivatePostfix(
            relay_port=sink.port,
            milters=d.postfix_socket,
            ipv6=ipv6,
            **postfix,  # type: ignore[arg-type]
        ) as pf,
    ):
        yield Rig(d, pf, sink)


def header_names(data: bytes) -> list[str]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [
        line.split(b":", 1)[0].decode()
        for line in head.split(b"\r\n")
        if line[:1] not in (b" ", b"\t")
    ]


def test_example_plugin_header_arrives_in_place(socket_kind: str) -> None:
    body = '[plugins.authres]\ntrusted = true\n[plugins.example_header]\ngreeting = "hi, example"\n'
    for r in rig(body, socket_kind):
        res = r.send()
        assert res.ok, res
        (msg,) = r.delivered()
    names = header_names(msg.data)
    # Authentication-Results on top (above Postfix's Received), the example header last.
    assert names[0] == "Authentication-Results" and names[1] == "Received"
    assert names[-1] == "X-Milterd-Example"
    assert b"\r\nX-Milterd-Example: hi, example\r\n\r\nHello Bob.\r\n" in msg.data
    assert msg.header("Authentication-Results") == ["mx.test; none"]


def test_reject_at_rcpt_refuses_one_recipient_and_delivers_the_others(socket_kind: str) -> None:
    for r in rig("[plugins.t_reject_rcpt]\n[plugins.t_mark]\n", socket_kind):
        res = r.send(["ok1@example.net", "reject-me@example.net", "ok2@example.net"])
        (msg,) = r.delivered()
    assert res.ok and list(res.refused) == ["reject-me@example.net"]
    assert res.refused["reject-me@example.net"][0] == 550
    assert sorted(msg.rcpt_tos) == ["ok1@example.net", "ok2@example.net"]
    assert msg.header("X-Test-Mark")


@pytest.mark.parametrize("policy", ["continue", "tempfail"])
def test_plugin_raising_in_every_hook(socket_kind: str, policy: str) -> None:
    for r in rig(f'[plugins.t_raise]\non_error = "{policy}"\n[plugins.t_mark]\n', socket_kind):
        pid, workers = r.daemon.pid, r.daemon.worker_pids()
        res = r.send()
        if policy == "continue":
            assert res.ok, res
            (msg,) = r.delivered()
            assert msg.header("X-Test-Mark")
        else:
            assert res.tempfail and res.code == 451, res
            assert r.sink.messages == []
        assert r.daemon.proc is not None and r.daemon.proc.poll() is None
        assert (r.daemon.pid, r.daemon.worker_pids()) == (pid, workers)


def test_plugin_sleeping_past_its_timeout(socket_kind: str) -> None:
    body = '[plugins.t_sleep]\nseconds = 60\ntimeout = 2\non_error = "tempfail"\n[plugins.t_mark]\n'
    for r in rig(body, socket_kind, milter_command_timeout=30, milter_content_timeout=30):
        res = r.send()
        assert res.tempfail and res.code == 451, res
        log = r.postfix.log_text()
    assert r.sink.messages == []
    assert not re.search(r"milter.*time(d )?out|timeout.*milter", log, re.IGNORECASE), log


def test_sighup_with_a_broken_config_keeps_the_old_one(socket_kind: str) -> None:
    for r in rig('[plugins.t_mark]\nvalue = "old"\n', socket_kind):
        r.daemon.write('[plugins.t_mark]\nvalue = "new"\nnot_a_key = true\n')
        mark = len(r.daemon.log_text())
        r.daemon.signal(signal.SIGHUP)
        r.daemon.wait_log("reload refused", after=mark)
        assert r.send().ok
        (msg,) = r.delivered()
    assert msg.header("X-Test-Mark")[0].startswith("old ")


ODD = [
    b"Subject: caf\xc3\xa9 8-bit\r\nFrom: \xe2\x98\x83 <a@example.org>\r\n\r\n"
    b"8-bit body \xc3\xa4\r\n",
    b"Subject: invalid \xff\xfe utf-8\r\nX-Bad: \xc0\xaf\r\n\r\nbody \xff\r\n",
    b"Subject: nul\r\nX-Nul: a\x00b\r\n\r\nbody with \x00 NUL\r\n",
    b"".join(b"X-Filler-%d: %s\r\n" % (i, b"x" * 990) for i in range(1050)) + b"\r\nbig header\r\n",
]


def test_odd_input_gets_a_verdict_never_an_exception(socket_kind: str) -> None:
    body = "[plugins.authres]\n[plugins.t_mark]\n"
    ipv6 = ipv6_loopback_available()
    for r in rig(body, socket_kind, ipv6=ipv6, extra_main_cf={"message_size_limit": 20_000_000}):
        results = [r.send(data=m) for m in ODD]
        if ipv6:
            results.append(r.send(host="::1"))
        delivered = r.delivered(count=sum(1 for x in results if x.ok))
        log = r.daemon.log_text()
        assert r.daemon.proc is not None and r.daemon.proc.poll() is None
    # 8-bit, invalid UTF-8 and NUL are delivered; the 1 MB header block exceeds the default
    # max_header_bytes (1 MiB) and gets the documented 552; the IPv6 client is delivered.
    assert [x.ok for x in results[:3]] == [True, True, True], results
    assert results[3].code == 552 and "5.3.4" in results[3].text, results[3]
    assert all(x.ok for x in results[4:]), results
    assert "Traceback" not in log and "internal error" not in log
    assert len(log.splitlines()) >= len(results)
    assert all(m.header("X-Test-Mark") for m in delivered)
    if ipv6:
        assert "client=localhost[::1]" in log or "[::1]" in log
