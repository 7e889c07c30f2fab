"""The real daemon on a socket, driven over the milter protocol (no MTA)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.daemon import MILTERD, Daemon
from tests.support.dnsserver import ZoneServer
from tests.support.milterclient import BOTTOM, MilterClient, P, Transcript

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HEADERS: list[tuple[str, str | bytes]] = [("From", "a@example.org"), ("Subject", "hi")]
BODY = b"Hello\r\n"


def send(
    d: Daemon,
    rcpts: list[str] | None = None,
    headers: list[tuple[str, str | bytes]] | None = None,
    ip: str = "192.0.2.1",
    body: bytes = BODY,
) -> Transcript:
    with MilterClient(d.socket) as c:
        c.negotiate()
        t = Transcript()
        c.connect(t, ip=ip)
        return c.message("a@example.org", rcpts or ["b@example.com"], headers or HEADERS, body, t=t)


@pytest.fixture(params=["unix", "inet"])
def marked(request: pytest.FixtureRequest) -> Iterator[Daemon]:
    with Daemon('[plugins.t_mark]\nvalue = "first"\n', socket_kind=request.param) as d:
        yield d


def test_negotiates_only_what_the_plugins_use_and_adds_the_header(marked: Daemon) -> None:
    with MilterClient(marked.socket) as c:
        actions, proto = c.negotiate()
        t = Transcript()
        c.connect(t, ip="192.0.2.9")
        c.message("a@example.org", ["b@example.com"], HEADERS, BODY, queue_id="QX1", t=t)
    skipped = ["NOHDRS", "NOBODY", "NOEOH", "NR_CONN", "NR_HELO", "NR_MAIL", "NR_RCPT"]
    if marked.socket.startswith("unix:"):  # on TCP, DATA is answered (see bridge)
        skipped.append("NODATA")
    for flag in skipped:
        assert proto & P[flag], flag
    assert actions & 0x01 and not actions & 0x10  # ADDHDRS, not CHGHDRS
    assert t.final is not None and t.final.verdict == "accept"
    assert t.mods == [("insheader", (BOTTOM, "X-Test-Mark", " first qid=QX1 client=192.0.2.9"))]


def test_reject_at_rcpt_for_one_recipient_only() -> None:
    with Daemon("[plugins.t_reject_rcpt]\n[plugins.t_mark]\n") as d:
        t = send(d, ["ok@example.com", "reject-me@example.com", "fine@example.com"])
    rcpt = t.replies["rcpt"]
    assert [r.verdict for r in rcpt] == ["continue", "replycode", "continue"]
    assert rcpt[1].text.startswith("550 5.1.1 Recipient refused")
    assert t.final is not None and t.final.verdict == "accept"
    assert "refused=[reject-me@example.com=reject]" in d.wait_log("refused=")


@pytest.mark.parametrize(
    ("policy", "verdict", "exc"),
    [
        ("continue", "accept", "RuntimeError"),
        ("tempfail", "replycode", "RuntimeError"),
        # sys.exit() in a hook ended libmilter's thread: no reply until the MTA's timeout
        ("continue", "accept", "SystemExit"),
        # pymilter answered it with its own 451, whatever on_error said
        ("continue", "accept", "KeyboardInterrupt"),
    ],
)
def test_a_plugin_raising_everywhere_never_takes_the_daemon_down(
    policy: str, verdict: str, exc: str
) -> None:
    body = f'[plugins.t_raise]\non_error = "{policy}"\nexception = "{exc}"\n[plugins.t_mark]\n'
    with Daemon(body) as d:
        workers = d.worker_pids()
        for _ in range(3):
            t = send(d)
            assert t.final is not None and t.final.verdict == verdict
            if policy == "tempfail":
                assert t.final.text.startswith("451 4.3.0")
        assert d.proc is not None and d.proc.poll() is None
        assert d.worker_pids() == workers
        log = d.log_text()
    assert f"plugin t_raise failed at connect (queue id -): exception: {exc}" in log
    if policy == "continue":  # with tempfail the session already ended at connect
        assert "plugin t_raise failed at envfrom (queue id TESTQ1)" in log
    assert "untrapped" not in log and "internal error" not in log


def test_a_hanging_plugin_gets_its_policy_within_its_timeout_with_progress() -> None:
    body = (
        '[plugins.t_sleep]\nseconds = 30\ntimeout = 1.0\non_error = "tempfail"\n[plugins.t_mark]\n'
    )
    with Daemon(body, milterd_extra="progress_interval = 0.3") as d:
        t0 = time.monotonic()
        t = send(d)
        elapsed = time.monotonic() - t0
        t_fast = send(d)  # and the next connection is served normally (another thread)
    assert t.final is not None and t.final.verdict == "replycode" and t.final.text.startswith("451")
    assert 0.9 < elapsed < 3.0
    assert t.progress >= 2
    assert t_fast.final is not None and t_fast.final.verdict == "replycode"


def mark_of(t: Transcript) -> str:
    """The value of the X-Test-Mark field added at the bottom."""
    (value,) = [
        m[1][2] for m in t.mods if m[0] == "insheader" and m[1][:2] == (BOTTOM, "X-Test-Mark")
    ]
    return str(value)


def test_sighup_with_a_broken_config_keeps_the_old_one_and_a_good_one_applies() -> None:
    with Daemon('[plugins.t_mark]\nvalue = "first"\n') as d:
        d.write('[plugins.t_mark]\nvalue = "second"\nbogus_key = 1\n')
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused, old config kept", after=mark)
        assert "[plugins.t_mark] bogus_key: unknown key" in d.log_text()
        assert mark_of(send(d)) == " first qid=TESTQ1 client=192.0.2.1"
        # A plugin's validator raising something else than a validation error (here
        # re.error from a bad pattern) once took the supervisor and its workers down.
        d.write('[plugins.t_mark]\nvalue = "second"\n[plugins.tagging]\nremove_pattern = "(["\n')
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused, old config kept", after=mark)
        assert "[plugins.tagging]" in d.log_text()[mark:]
        assert mark_of(send(d)) == " first qid=TESTQ1 client=192.0.2.1"
        d.write('[plugins.t_mark]\nvalue = "second"\n')
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded", after=mark)
        assert mark_of(send(d)) == " second qid=TESTQ1 client=192.0.2.1"


def test_sigterm_lets_an_open_session_finish_then_exits_zero_with_no_process_left() -> None:
    d = Daemon("[plugins.t_mark]\n").start()
    workers = d.worker_pids()
    c = MilterClient(d.socket)
    c.negotiate()
    t = Transcript()
    c.connect(t)
    d.signal(signal.SIGTERM)
    d.wait_log("stopping")
    time.sleep(0.5)
    with MilterClient(d.socket) as late:  # a new session while draining: 451 at once
        late.negotiate()
        refused = late.connect(Transcript())
    assert refused is not None and refused.text.startswith("451 4.3.2")
    c.message("a@example.org", ["b@example.com"], HEADERS, BODY, t=t)  # the session goes on
    c.close()
    assert t.final is not None and t.final.verdict == "accept"
    assert d.proc is not None and d.proc.wait(20) == 0
    for pid in workers:
        assert not os.path.exists(f"/proc/{pid}")
    assert not os.path.exists(d.socket[5:])


def test_a_killed_worker_is_restarted_and_others_keep_serving() -> None:
    with Daemon("[plugins.t_mark]\n", workers=2) as d:
        before = d.worker_pids()
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        d.wait_log("died: killed by signal 9")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(d.worker_pids()) - set(before)) < 1:
            time.sleep(0.1)
        after = d.worker_pids()
        assert len(after) == 2 and before[1] in after and before[0] not in after
        for _ in range(6):
            t = send(d)
            assert t.final is not None and t.final.verdict == "accept"


def test_odd_input_gets_a_verdict_every_time() -> None:
    body = "[plugins.authres]\n[plugins.t_mark]\n"
    with Daemon(body, milterd_extra="max_header_bytes = 2000000") as d:
        cases: list[list[tuple[str, str | bytes]]] = [
            [("Subject", b"8-bit caf\xc3\xa9 and invalid \xff\xfe"), ("From", "a@example.org")],
            [("Subject", b"nul \x00 inside"), ("X-Empty", b"")],
            [(f"X-Filler-{i}", "x" * 990) for i in range(1060)],  # a 1 MB header block
            [
                ("Authentication-Results", "mx.test; spf=pass"),
                ("From", b"\xe2\x98\x83@example.org"),
            ],
        ]
        verdicts = []
        for headers in cases:
            t = send(d, headers=headers, ip="2001:db8::25")
            verdicts.append(t.final.verdict if t.final else None)
        pids = d.worker_pids()
        t = send(d, body=b"\x00\xff" * 50000)
        verdicts.append(t.final.verdict if t.final else None)
        assert d.worker_pids() == pids
        log = d.log_text()
    assert verdicts == ["accept"] * 5
    assert "Traceback" not in log and "internal error" not in log
    assert "client=[192.0.2.1]" not in log and "[2001:db8::25]" in log


def test_a_header_block_over_the_limit_is_rejected_with_552() -> None:
    with Daemon("[plugins.authres]\n", milterd_extra="max_header_bytes = 10000") as d:
        t = send(d, headers=[(f"X-F{i}", "y" * 500) for i in range(40)])
    assert t.final is not None and t.final.text.startswith("552 5.3.4")


def test_concurrent_connections_are_served_in_parallel() -> None:
    body = "[plugins.t_sleep]\nseconds = 0.5\ntimeout = 5\n[plugins.t_mark]\n"
    with Daemon(body) as d:
        results: list[str] = []

        def one() -> None:
            t = send(d)
            results.append(t.final.verdict if t.final else "none")

        threads = [threading.Thread(target=one) for _ in range(8)]
        t0 = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        elapsed = time.monotonic() - t0
    assert results == ["accept"] * 8 and elapsed < 3.0


def test_an_open_connection_finishes_on_the_config_it_started_with() -> None:
    with Daemon('[plugins.t_mark]\nvalue = "before"\n') as d:
        old = MilterClient(d.socket)
        old.negotiate()
        t_old = Transcript()
        old.connect(t_old)
        d.write('[plugins.t_mark]\nvalue = "after"\n')
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded", after=mark)
        t_new = send(d)
        old.message("a@example.org", ["b@example.com"], HEADERS, BODY, t=t_old)
        old.close()
    assert mark_of(t_old).split()[0] == "before"
    assert mark_of(t_new).split()[0] == "after"


def test_folded_header_values_reach_the_mta_with_bare_lf() -> None:
    with Daemon('[plugins.t_mark]\nvalue = "first line\\r\\n\\tsecond line"\n') as d:
        t = send(d)
    ((kind, (index, name, value)),) = t.mods
    assert name == "X-Test-Mark"
    assert (kind, index) == ("insheader", BOTTOM)  # at the bottom: see milterd.bridge
    assert str(value).startswith(" first line\n\tsecond line")
    assert "\r" not in str(value)


def test_on_tcp_data_is_answered_so_postfix_never_waits_on_a_delayed_ack() -> None:
    with Daemon("[plugins.t_mark]\n", socket_kind="inet") as d, MilterClient(d.socket) as c:
        _, proto = c.negotiate()
        t = Transcript()
        c.connect(t)
        c.message("a@example.org", ["b@example.com"], HEADERS, BODY, t=t)
    assert not proto & (P["NODATA"] | P["NR_DATA"])
    assert [r.verdict for r in t.replies["data"]] == ["continue"]
    with Daemon("[plugins.t_mark]\n", socket_kind="unix") as d, MilterClient(d.socket) as c:
        _, proto = c.negotiate()
    assert proto & P["NODATA"]  # on a unix socket there is no Nagle stall to avoid


def test_descriptors_and_threads_stay_bounded_over_many_sessions() -> None:
    # libmilter runs every milter connection on a new thread, so nothing may be kept per
    # thread or per session: the worker's open files and threads after 240 sessions
    # through every built-in that keeps a store or talks to DNS are those after 40.
    # (The DMARC history kept two descriptors per session until 361f64b.)
    zone = {
        "example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "_dmarc.example.org": {"TXT": ["v=DMARC1; p=none; rua=mailto:r@example.org"]},
    }
    with ZoneServer(zone) as dns:
        d = Daemon("", milterd_extra=f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\n')
        d.write(
            "[plugins.spf]\n[plugins.dkim]\nsign = false\n[plugins.authres]\n"
            f'[plugins.dmarc]\nhistory_db = "{d.dir}/dmarc.sqlite"\n'
            "[plugins.scoring]\n[plugins.scoring.bayes]\nenabled = true\n"
            f'path = "{d.dir}/bayes.sqlite"\n'
            f'[plugins.tagging]\n[plugins.archive]\npath = "{d.dir}/archive"\n'
        )
        with d:
            (worker,) = d.worker_pids()

            def resources() -> tuple[int, int]:
                fds = len(os.listdir(f"/proc/{worker}/fd"))
                status = Path(f"/proc/{worker}/status").read_text()
                return fds, int(status.split("Threads:")[1].split()[0])

            def sessions(n: int) -> None:
                for i in range(n):
                    t = send(d, ip=f"192.0.2.{i % 200 + 1}")
                    assert t.final is not None and t.final.verdict in ("accept", "continue"), (
                        t.final
                    )

            sessions(40)
            fds0, threads0 = resources()
            sessions(200)
            fds1, threads1 = resources()
            log = d.log_text()
    assert fds1 <= fds0 + 4, (fds0, fds1)
    assert threads1 <= threads0 + 4, (threads0, threads1)
    assert "Traceback" not in log and " failed at " not in log, log[-2000:]


def test_signals_sent_to_the_workers_themselves_do_not_take_the_daemon_down() -> None:
    """``pkill -HUP milterd`` or ``systemctl kill -s HUP`` reach every worker too: six of
    them killed at once once made the supervisor give up as if the configuration crashed.
    Workers ignore HUP, TERM and INT; the supervisor acts on them."""
    with Daemon("[plugins.t_mark]\n", workers=3) as d:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and d.log_text().count(" ready (pid ") < 3:
            time.sleep(0.05)
        before = d.worker_pids()
        assert len(before) == 3
        c = MilterClient(d.socket)  # an open session, which must not be cut
        c.negotiate()
        t = Transcript()
        c.connect(t)
        for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            for pid in before:
                os.kill(pid, sig)
        time.sleep(1.0)
        assert d.worker_pids() == before, d.log_text()[-3000:]
        assert "died" not in d.log_text() and "stopped on its own" not in d.log_text()
        c.message("a@example.org", ["b@example.com"], HEADERS, BODY, t=t)
        c.close()
        assert t.final is not None and t.final.verdict == "accept"


def test_ctrl_c_drains_open_sessions_instead_of_cutting_them() -> None:
    """A terminal's Ctrl-C goes to the foreground process group: only the supervisor is in
    it, so the workers drain instead of libmilter stopping them mid-session."""
    d = Daemon("[plugins.t_mark]\n").start()
    assert d.proc is not None
    c = MilterClient(d.socket)
    c.negotiate()
    t = Transcript()
    c.connect(t)
    os.killpg(os.getpgid(d.proc.pid), signal.SIGINT)
    d.wait_log("stopping")
    c.message("a@example.org", ["b@example.com"], HEADERS, BODY, t=t)
    c.close()
    assert t.final is not None and t.final.verdict == "accept"
    assert d.proc.wait(20) == 0


def _run_second(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MILTERD, "-c", str(config), "run"], capture_output=True, text=True, timeout=30,
        check=False,
    )  # fmt: skip


def test_start_up_errors_exit_2_with_one_line_and_never_take_a_live_socket(
    tmp_path: Path,
) -> None:
    """Exit status 2 is what systemd does not restart on: a socket another instance
    listens on (libmilter would unlink it, leaving that instance unreachable), an unknown
    socket group, a metrics port in use."""
    with Daemon("[plugins.t_mark]\n") as first:
        second = tmp_path / "second.toml"
        second.write_text(first.config.read_text())
        run = _run_second(second)
        assert run.returncode == 2, run.stderr
        assert "another process is listening there" in run.stderr
        assert "Traceback" not in run.stderr
        t = send(first)  # the first instance is still reachable on its socket
        assert t.final is not None and t.final.verdict == "accept"
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            sock = tmp_path / "other.sock"
            for spec, extra, needle in [
                (
                    f"unix:{sock}",
                    'socket_group = "no-such-group-here"',
                    "socket_group: no group 'no-such-group-here'",
                ),
                (f"unix:{sock}", f'metrics_listen = "127.0.0.1:{port}"', "cannot serve metrics"),
                (f"inet:{port}@127.0.0.1", "", "cannot listen: address already in use"),
            ]:
                text = first.config.read_text().replace(first.socket, spec)
                second.write_text(text.replace("[milterd]\n", f"[milterd]\n{extra}\n", 1))
                run = _run_second(second)
                assert run.returncode == 2, (extra, run.stderr)
                assert needle in run.stderr and "Traceback" not in run.stderr, run.stderr
                assert not sock.exists(), extra


def test_reload_applies_the_log_level_and_names_what_needs_a_restart() -> None:
    with Daemon("[plugins.t_mark]\n") as d:
        d.config.write_text(
            d.config.read_text()
            .replace('log_level = "info"', 'log_level = "warning"')
            .replace("workers = 1", "workers = 2")
        )
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("workers changed: it takes effect at the next restart", after=mark)
        time.sleep(0.5)
        mark = len(d.log_text())
        send(d)
        time.sleep(0.3)
        assert "verdict=" not in d.log_text()[mark:]  # the info summary line is gone


def test_a_senders_line_breaks_cannot_forge_log_lines() -> None:
    with Daemon("[plugins.t_mark]\n") as d:
        with MilterClient(d.socket) as c:
            c.negotiate()
            t = Transcript()
            c.connect(t)
            c.message("evil\r\n2026-01-01 INFO forged verdict=accept@example.org",
                      ["b@example.com"], HEADERS, BODY, t=t)  # fmt: skip
        time.sleep(0.3)
    lines = d.log_text().splitlines()
    assert not [x for x in lines if x.startswith("2026-01-01 INFO forged")]
    assert any("evil\\x0d\\x0a2026-01-01 INFO forged" in x for x in lines)


def test_a_reload_every_worker_would_refuse_is_refused_by_the_supervisor() -> None:
    """A plugin whose (per-worker) startup fails: the supervisor used to adopt the
    generation anyway, so the next restarted worker inherited it and failed until the
    supervisor gave up, taking the daemon down."""
    with Daemon('[plugins.t_mark]\nvalue = "good"\n', workers=2) as d:
        d.write('[plugins.t_mark]\nvalue = "bad"\nfail_startup = true\n')
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused, old config kept", after=mark)
        before = d.worker_pids()
        os.kill(before[0], signal.SIGKILL)
        d.wait_log("died: killed by signal 9", after=mark)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(d.worker_pids()) - set(before)) < 1:
            time.sleep(0.1)
        time.sleep(0.5)
        assert len(d.worker_pids()) == 2 and "giving up" not in d.log_text()
        for _ in range(4):
            assert mark_of(send(d)).split()[0] == "good"
        check = subprocess.run(
            [*MILTERD, "-c", str(d.config), "config", "check"],
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert check.returncode == 2 and "startup failed" in check.stderr, check.stderr


def test_a_burst_of_reloads_never_blocks_the_supervisor_and_builds_only_the_newest() -> None:
    """HUPs in a row while each generation takes 1.5 s to start, with a config bigger than
    a pipe's buffer: the supervisor once blocked writing to the pipe (no signals, no
    reaping), and the worker built every stale generation in turn before stopping."""
    pad = "# " + "x" * 98 + "\n"
    body = '[plugins.t_sleep]\nstage = "worker_start"\nseconds = 1.5\n[plugins.t_mark]\n'
    with Daemon(body + pad * 800) as d:  # ~80 KB
        mark = len(d.log_text())
        for i in range(6):
            d.write(body + f'value = "v{i}"\n' + pad * 800)
            d.signal(signal.SIGHUP)
            d.wait_log("validated and sent to 1 worker(s)", after=len(d.log_text()) - 200)
            time.sleep(0.1)
        t0 = time.monotonic()
        deadline = t0 + 15
        while time.monotonic() < deadline and mark_of(send(d)).split()[0] != "v5":
            time.sleep(0.2)
        assert mark_of(send(d)).split()[0] == "v5", d.log_text()[mark:][-2000:]
        built = d.log_text()[mark:].count("worker 0: reloaded")
        assert built <= 3, built  # the one in progress, maybe one more, the newest
        d.signal(signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(10) == 0


def test_a_config_whose_plugin_startup_fails_exits_2_at_start(tmp_path: Path) -> None:
    d = Daemon("[plugins.t_mark]\nfail_startup = true\n")
    run = _run_second(d.config)
    assert run.returncode == 2, run.stderr
    assert "t_mark told to fail at startup" in run.stderr and "Traceback" not in run.stderr


def test_systemd_hears_ready_reloading_and_stopping(tmp_path: Path) -> None:
    """Type=notify: READY=1 once the socket listens and the workers run (so that Postfix,
    ordered after milterd, finds it up), RELOADING=1 then READY=1 around a reload,
    STOPPING=1 at SIGTERM. A restart-only key changed is said at every reload, not only
    the first one after the change."""
    notify_dir = Path(tempfile.mkdtemp(dir="/var/tmp"))
    path = notify_dir / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(20)
        d = Daemon('[plugins.t_mark]\nvalue = "first"\n', env={"NOTIFY_SOCKET": str(path)})
        with d:
            ready = sock.recv(4096).decode()
            assert ready == f"READY=1\nSTATUS=listening on {d.socket} with 1 worker(s)"
            assert d._connectable()
            d.header = d.header.replace("workers = 1", "workers = 2").replace(
                "milterd.sock", "other.sock"
            )
            d.write('[plugins.t_mark]\nvalue = "second"\n')
            for _ in range(2):
                mark = len(d.log_text())
                d.signal(signal.SIGHUP)
                assert sock.recv(4096).decode().startswith("RELOADING=1\nMONOTONIC_USEC=")
                # the socket in use, not the one the file names (that takes a restart;
                # it named the new one, a review)
                assert sock.recv(4096).decode() == ready
                d.wait_log("workers changed: it takes effect at the next restart", after=mark)
                d.wait_log("socket changed: it takes effect at the next restart", after=mark)
            assert mark_of(send(d)) == " second qid=TESTQ1 client=192.0.2.1"
            d.signal(signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1")
    shutil.rmtree(notify_dir)


def test_a_config_path_that_is_not_utf8_reloads() -> None:
    """Found by a review: SIGHUP killed the supervisor (UnicodeEncodeError sending the
    path to the workers) when the config file's name was not UTF-8."""
    d = Daemon("[plugins.t_mark]\n")
    d.config = d.dir / os.fsdecode(b"milterd-\xff.toml")
    d.write("[plugins.t_mark]\n")
    with d:
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("worker 0: reloaded", after=mark)
        assert d.proc is not None and d.proc.poll() is None
        t = send(d)
        assert t.final is not None and t.final.verdict == "accept"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_worker_restarted_after_a_reload_keeps_the_cpu_affinity_the_daemon_started_with() -> None:
    """Found by a review: cpu_affinity takes a restart, but a worker restarted after a
    reload that changed it took the new value (one worker bound, the other not)."""
    with Daemon("[plugins.t_mark]\n", workers=2) as d:
        before = d.worker_pids()
        bound = {p: os.sched_getaffinity(p) for p in before}
        assert all(len(c) == 1 for c in bound.values()), bound
        text = d.config.read_text()
        d.config.write_text(text.replace("workers = 2", 'workers = 2\ncpu_affinity = "none"'))
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("cpu_affinity changed: it takes effect at the next restart", after=mark)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(d.worker_pids()) - set(before)) < 1:
            time.sleep(0.1)
        (new,) = set(d.worker_pids()) - set(before)
        assert os.sched_getaffinity(new) == bound[before[0]]


def test_a_reload_of_a_file_that_is_not_utf8_is_refused_naming_it() -> None:
    with Daemon("[plugins.t_mark]\n") as d:
        d.config.write_bytes(b"\xff\xfe" + d.config.read_bytes())
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log(f"reload refused, old config kept: {d.config}: not UTF-8", after=mark)
        t = send(d)
        assert t.final is not None and t.final.verdict == "accept"
