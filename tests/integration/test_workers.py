"""Several worker processes under one supervisor, under load (issue 8's guarantees)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon, free_port
from tests.support.milterclient import BOTTOM, MilterClient, Transcript

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

HEADERS: list[tuple[str, str | bytes]] = [("From", "a@example.org"), ("Subject", "load")]


def one(d: Daemon) -> str:
    """One message over a new connection: its outcome as a word."""
    try:
        with MilterClient(d.socket, timeout=20) as c:
            c.negotiate()
            t = Transcript()
            r = c.connect(t)
            if r is not None and r.verdict == "replycode":
                return "refused:" + r.text[:3]
            c.message("a@example.org", ["b@example.com"], HEADERS, b"x\r\n", t=t)
            if t.final is None:
                return "none"
            if t.final.verdict == "accept":
                marks = [m for m in t.mods if m[0] == "insheader" and m[1][0] == BOTTOM]
                return "accept:" + (str(marks[0][1][2]).split()[0] if marks else "-")
            return t.final.verdict + ":" + t.final.text[:3]
    except (ConnectionError, OSError) as e:
        return "error:" + type(e).__name__


@dataclass
class Load:
    """Threads sending messages back to back until stopped."""

    d: Daemon
    threads: int = 8
    outcomes: list[tuple[float, str]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._threads = [
            threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)
        ]

    def _run(self) -> None:
        while not self.stop.is_set():
            outcome = one(self.d)
            self.outcomes.append((time.monotonic(), outcome))
            if outcome.startswith(("error", "refused")):
                time.sleep(0.05)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def words(self, since: float = 0.0) -> Counter[str]:
        return Counter(o for t, o in self.outcomes if t >= since)


@pytest.mark.parametrize("workers", [1, 2])
def test_metrics_from_all_workers_in_one_endpoint_and_the_log_names_the_worker(
    workers: int,
) -> None:
    """One worker too: the supervisor serving /metrics is another process (it once served
    only its own, empty, registry then)."""
    port = free_port()
    extra = f'metrics_listen = "127.0.0.1:{port}"\nlog_format = "json"'
    with Daemon("[plugins.t_mark]\n", workers=workers, milterd_extra=extra) as d:
        with Load(d, threads=6) as load:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and len(load.outcomes) < 200:
                time.sleep(0.05)
        sent = Counter(o.split(":")[0] for _, o in load.outcomes)
        assert sent == Counter({"accept": sent["accept"]}) and sent["accept"] >= 200
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        lines = [json.loads(x) for x in d.log_text().splitlines() if x.startswith("{")]
    total = sum(
        float(v)
        for v in re.findall(
            r'^milterd_messages_total\{verdict="continue"\} (\S+)$', text, re.MULTILINE
        )
    )
    assert total == sent["accept"], text
    calls = re.findall(
        r'^milterd_plugin_seconds_count\{plugin="t_mark",stage="eom"\} (\S+)$', text, re.MULTILINE
    )
    assert sum(float(c) for c in calls) == sent["accept"]
    assert re.search(r"^milterd_connections_open \d", text, re.MULTILINE)
    summaries = [x for x in lines if "verdict" in x]
    assert len(summaries) == sent["accept"]
    assert {x["worker"] for x in summaries} <= {str(i) for i in range(workers)}
    assert all(x["queue_id"] == "TESTQ1" and x["plugin_ms"].keys() == {"t_mark"} for x in summaries)


def test_kill_9_of_one_worker_under_load() -> None:
    with Daemon("[plugins.t_mark]\n", workers=2) as d, Load(d) as load:
        time.sleep(1.0)
        victim, survivor = d.worker_pids()
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        d.wait_log("died: killed by signal 9")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            pids = d.worker_pids()
            if len(pids) == 2 and victim not in pids:
                break
            time.sleep(0.05)
        back_at = time.monotonic()
        time.sleep(1.0)
    pids = d.worker_pids() if d.proc and d.proc.poll() is None else []
    words = load.words()
    assert back_at - killed_at < 5.0
    assert survivor in pids or not pids  # the other worker was never restarted
    # Connections on the killed worker fail (the MTA applies its default action); every other
    # message is accepted; nothing gets a wrong answer.
    assert set(words) <= {
        "accept:marked",
        "error:ConnectionResetError",
        "error:ConnectionError",
        "error:BrokenPipeError",
        "error:TimeoutError",
    }, words
    assert words["accept:marked"] > 100
    after = load.words(since=back_at)
    assert after["accept:marked"] > 20 and set(after) == {"accept:marked"}, after


def test_sigterm_under_load_answers_every_message_and_leaves_no_process() -> None:
    d = Daemon("[plugins.t_mark]\n", workers=2).start()
    workers = d.worker_pids()
    with Load(d) as load:
        time.sleep(1.0)
        d.signal(signal.SIGTERM)
        assert d.proc is not None and d.proc.wait(30) == 0
        time.sleep(0.3)
    words = load.words()
    # Sessions open at SIGTERM finish with accept; new ones are refused with 451 while
    # draining, then the socket is gone: never a hang, never a wrong answer. A connection
    # still waiting in the listen queue (or refused mid-negotiation) when the listener
    # closes is dropped: the client sees a reset or, writing its next command first, a
    # broken pipe; no message was taken, the MTA retries.
    assert words["accept:marked"] > 50
    assert set(words) <= {
        "accept:marked",
        "refused:451",
        "error:FileNotFoundError",
        "error:ConnectionRefusedError",
        "error:ConnectionResetError",
        "error:BrokenPipeError",
        "error:ConnectionError",
    }, words
    for pid in workers:  # gone, or a zombie waiting for a PID 1 that does not reap here
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_sighup_under_load_good_and_bad() -> None:
    with Daemon('[plugins.t_mark]\nvalue = "one"\n', workers=2) as d, Load(d) as load:
        time.sleep(0.5)
        d.write('[plugins.t_mark]\nvalue = "two"\nnope = 1\n')
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused")
        time.sleep(0.5)
        d.write('[plugins.t_mark]\nvalue = "three"\n')
        d.signal(signal.SIGHUP)
        d.wait_log("worker 1: reloaded")
        d.wait_log("worker 0: reloaded")
        switched = time.monotonic()
        time.sleep(1.0)
    words = load.words()
    assert set(words) <= {"accept:one", "accept:three"}, words
    assert words["accept:one"] > 10 and "accept:two" not in words
    assert set(load.words(since=switched + 0.2)) == {"accept:three"}


def test_a_config_whose_workers_cannot_start_does_not_restart_forever() -> None:
    """Found before any worker forks (the check child), with exit status 2, which systemd
    does not restart (it used to take six worker deaths and exit 1)."""
    d = Daemon("[plugins.t_mark]\nfail_startup = true\n", workers=1)
    with pytest.raises(RuntimeError, match="milterd exited 2"):
        d.start(timeout=30)
    log = d.log_text()
    assert "t_mark told to fail at startup" in log
    assert "started worker 0" not in log


def test_a_config_whose_worker_start_fails_exits_2_before_any_worker_forks() -> None:
    """The check child runs worker_start too (it ran startup only, so this took twelve
    worker deaths and exit status 1, which systemd restarts; a review)."""
    d = Daemon("[plugins.t_mark]\nfail_worker_start = true\n", workers=1)
    with pytest.raises(RuntimeError, match="milterd exited 2"):
        d.start(timeout=30)
    log = d.log_text()
    assert "t_mark told to fail at worker_start" in log
    assert "started worker 0" not in log


def test_a_reload_every_worker_refuses_is_not_what_a_restarted_worker_gets() -> None:
    """Issue 8: a bad config is refused by all and the old one kept. One whose worker_start
    fails passed the supervisor's check, which kept it: the workers refused it and went on
    with the old one, but the next restarted worker was forked with it, failed, and after
    six such deaths the daemon gave up (a review)."""
    with Daemon('[plugins.t_mark]\nvalue = "one"\n', workers=2) as d:
        d.write('[plugins.t_mark]\nvalue = "two"\nfail_worker_start = true\n')
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused")
        assert "validated and sent" not in d.log_text()
        mark = len(d.log_text())
        os.kill(d.worker_pids()[0], signal.SIGKILL)
        d.wait_log("died: killed by signal 9", after=mark)
        d.wait_log("started worker", after=mark)
        time.sleep(1.0)  # the restarted worker would fail its start (and be restarted) here
        assert Counter(one(d) for _ in range(6)) == {"accept:one": 6}
        assert d.proc is not None and d.proc.poll() is None
        assert "giving up" not in d.log_text()


def test_a_plugin_file_in_the_check_child_is_not_written_by_the_supervisors_handler(
    tmp_path: Path,
) -> None:
    """The check child closed the wake pipe but kept the supervisor's SIGCHLD handler,
    which writes to it: a plugin file that got the pipe's descriptor received an "x" when
    a subprocess of the plugin ended (a review)."""
    tmp_path.chmod(0o777)
    with Daemon(f'[plugins.t_mark]\nvalue = "one"\nfiles_dir = "{tmp_path}"\n') as d:
        assert one(d) == "accept:one"
        assert "changed behind" not in d.log_text()


def test_no_ctypes_is_no_reason_to_refuse_a_config(tmp_path: Path) -> None:
    """The check child asks the kernel to kill it with the supervisor through ctypes; a
    Python built without it must still start (it exited 2: a review)."""
    (tmp_path / "_ctypes.py").write_text('raise ImportError("built without _ctypes")\n')
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    with Daemon('[plugins.t_mark]\nvalue = "one"\n', env={"PYTHONPATH": pythonpath}) as d:
        assert one(d) == "accept:one"


def test_one_worker_that_keeps_dying_stops_the_daemon_whatever_the_others_do() -> None:
    """The restart limit is per worker: with four workers, one crashing worker was
    restarted twenty times a minute before the supervisor gave up (a review)."""
    with Daemon('[plugins.t_mark]\nvalue = "one"\n', workers=4) as d:
        for _ in range(6):
            mark = len(d.log_text())
            line = re.findall(r"started worker 0 \(pid (\d+)\)", d.log_text())[-1]
            os.kill(int(line), signal.SIGKILL)
            d.wait_log("worker 0 (pid", after=mark)
            deadline = time.monotonic() + 10
            while "started worker 0" not in d.log_text()[mark:] and "giving up" not in (
                d.log_text()[mark:]
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
        d.wait_log("worker 0 died 6 times in a minute; giving up")
        assert d.proc is not None and d.proc.wait(timeout=30) == 1


def _running(pid: int) -> bool:
    """Alive and not a zombie (PID 1 may not reap orphans here)."""
    try:
        return "zombie" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_kill_9_of_the_supervisor_during_a_reload_stops_the_workers() -> None:
    """The reload's check child inherited the write ends of the workers' control pipes,
    so after kill -9 of the supervisor the workers saw no EOF and kept serving until the
    check ended (a review). It also inherited the /metrics socket, as the workers did."""
    port = free_port()
    d = Daemon(
        '[plugins.t_mark]\nvalue = "one"\n',
        workers=2,
        milterd_extra=f'metrics_listen = "127.0.0.1:{port}"',
    )
    with d:
        workers = d.worker_pids()
        assert len(workers) == 2
        for pid in workers:  # only the supervisor listens for /metrics
            assert str(port) not in _listening_ports_of(pid), pid
        d.write('[plugins.t_mark]\nvalue = "two"\nstartup_seconds = 20\n')
        d.signal(signal.SIGHUP)
        time.sleep(1.0)  # the check child is in its 20 s start-up now
        check = [p for p in d.worker_pids() if p not in workers]
        assert len(check) == 1
        assert str(port) not in _listening_ports_of(check[0])
        try:
            os.kill(d.pid, signal.SIGKILL)
            deadline = time.monotonic() + 8
            while any(_running(p) for p in [*workers, *check]) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(_running(p) for p in workers)
            # the check child too: it holds libmilter's listening socket (a restarted
            # daemon refuses a unix socket another process listens on)
            assert not _running(check[0])
        finally:
            for pid in [*workers, *check]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _listening_ports_of(pid: int) -> set[str]:
    """The TCP ports (decimal) of the listening sockets process ``pid`` holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(str(int(cols[1].rsplit(":", 1)[1], 16)))
    return ports


def test_every_worker_killed_at_once_is_no_crashing_config() -> None:
    """The restart limit is per worker: six healthy workers killed together (an OOM kill,
    an admin's pkill) made the supervisor give up with exit status 1 (a review)."""
    with Daemon('[plugins.t_mark]\nvalue = "one"\n', workers=6) as d:
        mark = len(d.log_text())
        for pid in d.worker_pids():
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while d.log_text()[mark:].count("started worker") < 6:
            assert time.monotonic() < deadline, d.log_text()[mark:]
            time.sleep(0.1)
        time.sleep(0.5)
        assert "giving up" not in d.log_text()
        assert one(d) == "accept:one"


def test_two_workers_write_the_archive_and_the_greylist_store_concurrently() -> None:
    """Every message is greylisted (a catch-all rule over the greylist threshold) and the
    tempfailed copy archived: both SQLite stores and the archive files are written by two
    worker processes at once. Afterwards both must be intact and complete."""
    import sqlite3
    import subprocess
    import sys
    import tempfile

    store = Path(tempfile.mkdtemp(prefix="milterd-shared-", dir="/var/tmp"))
    body = (
        "[plugins.scoring]\n"
        "[plugins.scoring.actions]\ngreylist = 0.5\nreject = false\n"
        "rewrite_subject = false\nadd_header = false\n"
        f'[plugins.scoring.greylist]\npath = "{store}/greylist.sqlite"\ndelay = 300\n'
        '[[plugins.scoring.rules]]\nname = "EVERYTHING"\ntype = "body"\n'
        "pattern = '.'\nscore = 1.0\n"
        f'[plugins.archive]\npath = "{store}/archive"\nverdicts = ["tempfail"]\n'
    )
    counter = iter(range(1_000_000))
    lock = threading.Lock()
    outcomes: list[str] = []

    def sender() -> None:
        while True:
            with lock:
                n = next(counter)
            if n >= 400:
                return
            try:
                with MilterClient(d.socket, timeout=20) as c:
                    c.negotiate()
                    t = Transcript()
                    c.connect(t)
                    c.message(f"s{n}@example.org", [f"r{n}@example.com"], HEADERS, b"x\r\n", t=t)
                outcomes.append(t.final.text[:3] if t.final else "none")
            except OSError as e:
                outcomes.append(type(e).__name__)

    with Daemon(body, workers=2) as d:
        threads = [threading.Thread(target=sender) for _ in range(12)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(60)
        log = d.log_text()
    assert Counter(outcomes) == Counter({"451": 400}), Counter(outcomes)
    assert {x for x in re.findall(r"milterd\[\d+/w(\d)\]", log)} >= {"0", "1"}  # both worked
    db = sqlite3.connect(store / "greylist.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT count(*) FROM triplets").fetchone() == (400,)
    verify = subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(d.config), "archive", "verify"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert verify.returncode == 0, verify.stdout + verify.stderr
    search = subprocess.run(
        [sys.executable, "-m", "milterd.cli", "-c", str(d.config), "archive", "search", "--json"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    senders = {json.loads(line)["sender"] for line in search.stdout.splitlines() if line.strip()}
    assert senders == {f"s{n}@example.org" for n in range(400)}


def _lifecycle_lines(
    path: Path, expected: int, timeout: float = 10.0
) -> list[tuple[str, str, int]]:
    """The (plugin, hook, pid) lines once there are at least ``expected`` of them."""
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= 3 * expected:
            break
        time.sleep(0.05)
    it = iter(lines)
    return [(a, b, int(c)) for a, b, c in zip(it, it, it, strict=True)]


def test_prefork_startup_runs_once_before_the_fork_and_worker_start_in_each_worker(
    tmp_path: Path,
) -> None:
    record = tmp_path / "lifecycle.txt"
    body = f'[plugins.t_prefork]\npath = "{record}"\n[plugins.t_lifecycle]\npath = "{record}"\n'
    with Daemon(body, workers=2) as d:
        sup = d.pid
        workers = set(d.worker_pids())
        assert len(workers) == 2
        # prefork startup once (supervisor); in a throwaway check child the other
        # plugins' startup and every worker_start (what every worker would refuse is
        # refused before any forks); per worker: the other startup, both worker_starts
        got = _lifecycle_lines(record, 1 + 3 + 2 * 3)
        assert got.count(("prefork", "startup", sup)) == 1
        assert [x for x in got if x[2] == sup] == [("prefork", "startup", sup)]
        checks = [x for x in got if x[2] not in workers | {sup}]
        assert [x[:2] for x in checks] == [
            ("worker", "startup"),
            ("prefork", "worker_start"),
            ("worker", "worker_start"),
        ], got
        for w in workers:
            assert sorted(x[:2] for x in got if x[2] == w) == [
                ("prefork", "worker_start"),
                ("worker", "startup"),
                ("worker", "worker_start"),
            ]
        assert len(got) == 10, got

        # A restarted worker inherits the supervisor's generation: no prefork startup again.
        victim = sorted(workers)[0]
        os.kill(victim, signal.SIGKILL)
        d.wait_log("died: killed by signal 9")
        got = _lifecycle_lines(record, 13)
        new = {x[2] for x in got[10:]}
        assert len(new) == 1 and new.isdisjoint(workers | {sup}), got
        assert sorted(x[:2] for x in got[10:]) == [
            ("prefork", "worker_start"),
            ("worker", "startup"),
            ("worker", "worker_start"),
        ]

        # SIGHUP: the supervisor starts the new generation's prefork part (refusing a bad
        # one once); each worker then builds and starts its own.
        mark = len(d.log_text())
        d.signal(signal.SIGHUP)
        d.wait_log("reloaded", after=mark)
        got = _lifecycle_lines(record, 13 + 1 + 3 + 2 * 4)
        hup = got[13:]
        assert ("prefork", "startup", sup) in hup
        assert len([x for x in hup if x[:2] == ("prefork", "startup")]) == 3, hup


def _allowed(pid: int) -> set[frozenset[int]]:
    """The distinct CPU sets the threads of ``pid`` may run on."""
    out: set[frozenset[int]] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out.add(frozenset(os.sched_getaffinity(int(task.name))))
        except OSError:  # the thread ended meanwhile
            continue
    return out


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_cpu_affinity_auto_binds_each_worker_and_its_threads_to_its_own_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    with Daemon("[plugins.t_mark]\n", workers=2) as d:  # the default: cpu_affinity = "auto"
        with Load(d, threads=4) as load:  # libmilter starts a thread per connection
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and len(load.outcomes) < 50:
                time.sleep(0.05)
            per_worker = [_allowed(pid) for pid in d.worker_pids()]
            supervisor = os.sched_getaffinity(d.pid)
        log = d.log_text()
    assert len(load.outcomes) >= 50
    assert sorted(per_worker, key=sorted) == [{frozenset({cpus[0]})}, {frozenset({cpus[1]})}]
    assert supervisor == set(cpus)  # the supervisor stays unbound
    assert sorted(re.findall(r"worker (\d) bound to CPU (\d+)", log)) == [
        ("0", str(cpus[0])),
        ("1", str(cpus[1])),
    ]


def test_cpu_affinity_none_leaves_workers_unbound() -> None:
    cpus = frozenset(os.sched_getaffinity(0))
    with Daemon("[plugins.t_mark]\n", workers=2, milterd_extra='cpu_affinity = "none"') as d:
        assert one(d).startswith("accept")
        per_worker = [_allowed(pid) for pid in d.worker_pids()]
        log = d.log_text()
    assert per_worker == [{cpus}, {cpus}]
    assert "bound to CPU" not in log


def test_the_supervisor_counts_reloads_and_worker_restarts() -> None:
    """Alerts on a refused reload or a crashing worker: the series exist at 0 from the
    start, and count what happened."""
    port = free_port()

    def scrape() -> dict[str, float]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        found = re.findall(
            r'^(milterd_(?:reloads|worker_exits)_total\{\w+="\w+"\}) (\S+)$',
            text.decode(), re.MULTILINE,
        )  # fmt: skip
        return {k: float(v) for k, v in found}

    extra = f'metrics_listen = "127.0.0.1:{port}"'
    with Daemon("[plugins.t_mark]\n", workers=1, milterd_extra=extra) as d:
        assert scrape() == {
            'milterd_reloads_total{result="accepted"}': 0.0,
            'milterd_reloads_total{result="refused"}': 0.0,
            'milterd_worker_exits_total{how="died"}': 0.0,
            'milterd_worker_exits_total{how="stopped"}': 0.0,
        }
        d.signal(signal.SIGHUP)
        d.wait_log("validated and sent to 1 worker(s)")
        d.write("[plugins.t_mark]\nbogus = 1\n")
        d.signal(signal.SIGHUP)
        d.wait_log("reload refused")
        (victim,) = d.worker_pids()
        os.kill(victim, signal.SIGKILL)
        d.wait_log("died: killed by signal 9")
        deadline = time.monotonic() + 10  # counted just after that line is logged
        while (counts := scrape())['milterd_worker_exits_total{how="died"}'] == 0:
            assert time.monotonic() < deadline, counts
            time.sleep(0.05)
    assert counts['milterd_reloads_total{result="accepted"}'] == 1
    assert counts['milterd_reloads_total{result="refused"}'] == 1
    assert counts['milterd_worker_exits_total{how="died"}'] == 1
