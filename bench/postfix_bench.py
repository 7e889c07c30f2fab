#!/usr/bin/env python3
"""End to end through Postfix: smtp-source -> private Postfix (+ the milter under test)
-> smtp-sink, all on 127.0.0.1.

  postfix_bench.py [TARGET ...]      (default: every target of PF_TARGETS)

Prints one JSON line per verification and per measured run. Knobs (environment):
RUNS (3), COUNT (2000 messages a run), SESSIONS (20), WARMUP (200 messages before each
run), PF_PORT (2725), SINK_PORT (2726), MILTER_PORT (8925..8927), PF_QUEUE (Postfix queue
directory; default on disk under BENCH_WORK), RUN_TIMEOUT (300 s a run), REUSE (0: a new
SMTP connection per message, as inbound mail mostly comes; 1: each session sends all its
messages over one connection, ``smtp-source -d``, as an application or a relay submitting
outbound mail does, so Postfix's smtpd and the milter connection serve many messages).

A run: write main.cf with ``smtpd_milters`` = the target's socket, start Postfix, start
smtp-sink, send WARMUP messages and wait for them, then time COUNT messages from
smtp-source's start until smtp-sink has received all of them (e2e msgs/s; "accept" is
until smtp-source is done, i.e. all queued by Postfix, the milter included), then stop
Postfix and the sink. Postfix's log must show every message ``status=sent`` and no
milter warning. Targets take turns within each round (order rotated every round), so
slow drift of the machine spreads over all of them. Before the runs, each target is
verified once: 3 messages dumped by smtp-sink must carry the milter's header exactly
once (and none without a milter).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from benchlib import (
    HEADER_NAME,
    HEADER_VALUE,
    RETRIES,
    WORK,
    Milter,
    Target,
    busy_pct,
    disturbed,
    env_float,
    env_int,
    env_str,
    idle_check,
    log,
    machine_busy,
    milters,
    port_free,
    retry_disturbed,
    targets_from_env,
    tcp_listening,
    tree_cpu,
    wait_for,
    wait_quiet,
)
from make_msg import write_message

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
POSTSUPER = shutil.which("postsuper") or "/usr/sbin/postsuper"
DEFAULT_TARGETS = (
    "none bare-unix bare-tcp milterd-w1-unix milterd-w1-tcp milterd-w2-unix bare-tcp-replydata"
)
SENDER = "sender@example.com"
RECIPIENT = "rcpt@dest.example.net"

MASTER_CF = """\
# written by bench/postfix_bench.py: a private instance, chroot off, loopback only
# service             type  private unpriv chroot wakeup maxproc command
127.0.0.1:{port}      inet  n       -      n      -      -       smtpd
pickup                unix  n       -      n      60     1       pickup
cleanup               unix  n       -      n      -      0       cleanup
qmgr                  unix  n       -      n      300    1       qmgr
rewrite               unix  -       -      n      -      -       trivial-rewrite
bounce                unix  -       -      n      -      0       bounce
defer                 unix  -       -      n      -      0       bounce
trace                 unix  -       -      n      -      0       bounce
verify                unix  -       -      n      -      1       verify
flush                 unix  n       -      n      1000?  0       flush
proxymap              unix  -       -      n      -      -       proxymap
smtp                  unix  -       -      n      -      -       smtp
relay                 unix  -       -      n      -      -       smtp
showq                 unix  n       -      n      -      -       showq
error                 unix  -       -      n      -      -       error
retry                 unix  -       -      n      -      -       error
discard               unix  -       -      n      -      -       discard
anvil                 unix  -       -      n      -      1       anvil
scache                unix  -       -      n      -      1       scache
# no syslog here: without postlogd (maillog_file) "postfix start" fails silently
postlog               unix-dgram n  -      n      -      1       postlogd
"""


class Postfix:
    """A private Postfix instance (``postfix -c DIR``) listening on 127.0.0.1:PORT and
    relaying everything to [127.0.0.1]:SINK_PORT."""

    def __init__(self, port: int, sink_port: int) -> None:
        self.port = port
        self.sink_port = sink_port
        base = WORK / "postfix"
        self.conf = base / "etc"
        self.queue = Path(env_str("PF_QUEUE", str(base / "queue")))
        self.data = base / "data"
        self.logfile = base / "postfix.log"

    def configure(self, milter: str) -> None:
        for d in (self.conf, self.queue, self.data):
            d.mkdir(parents=True, exist_ok=True)
        shutil.chown(self.data, "postfix")
        (self.conf / "master.cf").write_text(MASTER_CF.format(port=self.port))
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "maillog_file": str(self.logfile),
            "maillog_file_prefixes": str(WORK),
            "myhostname": "mx.bench.example",
            "mydomain": "bench.example",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mydestination": "",
            "relay_domains": "",
            "local_recipient_maps": "",
            "alias_maps": "",
            "alias_database": "",
            "local_transport": "error:local delivery disabled",
            "relayhost": f"[127.0.0.1]:{self.sink_port}",
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "lmtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "smtpd_recipient_restrictions": "",
            "smtputf8_enable": "no",
            "biff": "no",
            "default_process_limit": "100",
            "smtp_destination_concurrency_limit": "20",
            "smtpd_milters": milter,
            "non_smtpd_milters": "",
            "milter_protocol": "6",
            "milter_default_action": "tempfail",
        }
        text = "# written by bench/postfix_bench.py\n" + "".join(
            f"{k} = {v}\n" for k, v in settings.items()
        )
        (self.conf / "main.cf").write_text(text)
        # Sanity: postconf must read back what we wrote.
        got = subprocess.run(
            [POSTCONF, "-c", str(self.conf), "-h", "smtpd_milters"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        if got != milter:
            raise RuntimeError(f"postconf reads smtpd_milters={got!r}, wrote {milter!r}")

    def master_pid(self) -> int | None:
        try:
            return int((self.queue / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def running(self) -> bool:
        pid = self.master_pid()
        if pid is None:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True

    def start(self) -> int:
        if self.running():
            raise RuntimeError("a Postfix instance is already running in " + str(self.queue))
        if not port_free(self.port):
            raise RuntimeError(f"port {self.port} is in use (set PF_PORT)")
        r = subprocess.run(
            [POSTFIX, "-c", str(self.conf), "start"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode != 0:
            raise RuntimeError(f"postfix start failed ({r.returncode}): {r.stderr.strip()}")
        wait_for(lambda: tcp_listening(self.port), 20, f"Postfix on 127.0.0.1:{self.port}")
        pid = self.master_pid()
        if pid is None:
            raise RuntimeError("Postfix started but wrote no master.pid")
        return pid

    def stop(self) -> None:
        pid = self.master_pid()
        if pid is None or not self.running():
            return
        subprocess.run(
            [POSTFIX, "-c", str(self.conf), "stop"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        with contextlib.suppress(RuntimeError):
            wait_for(lambda: not self.running(), 15, "Postfix master to exit")
        if self.running():  # only the master we started, by its PID
            log(f"Postfix master {pid} did not stop; killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def queued(self) -> int:
        n = 0
        for d in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _, _, files in os.walk(self.queue / d):
                n += len(files)
        return n

    def flush(self) -> None:
        """Delete every queued message (left over from a failed run)."""
        if self.queued():
            subprocess.run(
                [POSTSUPER, "-c", str(self.conf), "-d", "ALL"],
                capture_output=True,
                timeout=60,
                check=False,
            )

    def log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except OSError:
            return 0

    def log_since(self, offset: int) -> str:
        try:
            with open(self.logfile, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""


class Sink:
    """smtp-sink on 127.0.0.1:PORT, counting received messages from its ``-c`` output."""

    def __init__(self, port: int, dump: Path | None = None) -> None:
        argv = [SMTP_SINK, "-u", "postfix", "-c"]
        if dump is not None:
            dump.mkdir(parents=True, exist_ok=True)
            shutil.chown(dump, "postfix")
            argv += ["-d", str(dump) + "/"]
        if not port_free(port):
            raise RuntimeError(f"port {port} is in use (set SINK_PORT)")
        self.popen = subprocess.Popen(
            [*argv, f"127.0.0.1:{port}", "256"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.received = 0
        self._target = 0
        self._reached = threading.Event()
        self.t_reached = 0.0
        self._lock = threading.Lock()
        threading.Thread(target=self._count, daemon=True, name="sink-counter").start()
        wait_for(lambda: tcp_listening(port), 10, f"smtp-sink on 127.0.0.1:{port}")

    def _count(self) -> None:
        assert self.popen.stdout is not None
        stream = self.popen.stdout
        assert isinstance(stream, io.BufferedReader)
        tail = b""
        pat = re.compile(rb"mesg=(\d+)")
        while chunk := stream.read1(65536):
            tail = (tail + chunk)[-128:]
            found = pat.findall(tail)
            if found:
                with self._lock:
                    self.received = int(found[-1])
                    target = self._target
                    if target and self.received >= target and not self._reached.is_set():
                        self.t_reached = time.monotonic()
                        self._reached.set()

    def wait_for(self, n: int, timeout: float) -> bool:
        """Wait until ``n`` messages were received in all; t_reached is when."""
        with self._lock:
            self._target = n
            self._reached.clear()
            if self.received >= n:
                self.t_reached = time.monotonic()
                self._reached.set()
        return self._reached.wait(timeout)

    def cpu(self) -> float:
        return tree_cpu(self.popen.pid)

    def stop(self) -> str:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(5)
        err = self.popen.stderr.read() if self.popen.stderr else b""
        return err.decode(errors="replace")[-300:]


REUSE = env_int("REUSE", 0)


def smtp_source(
    port: int, count: int, sessions: int, msg: Path, timeout: float
) -> tuple[int, float]:
    """Run smtp-source (a new SMTP connection per message; with REUSE=1 one per session);
    (exit status, its CPU s). Killed (by PID) after ``timeout`` seconds."""
    p = subprocess.Popen(
        [SMTP_SOURCE, *(["-d"] if REUSE else []), "-s", str(sessions), "-m", str(count),
         "-f", SENDER, "-t", RECIPIENT, "-F", str(msg), f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip

    lock = threading.Lock()
    reaped = False

    def kill() -> None:  # on timeout; never after the PID was reaped (it could be reused)
        with lock:
            if not reaped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        # Blocking wait: no polling loop stealing CPU. wait4 (not Popen.wait) for rusage.
        _, status, ru = os.wait4(p.pid, 0)
    finally:
        with lock:
            reaped = True
        timer.cancel()
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, ru.ru_utime + ru.ru_stime


def _check_log(text: str) -> tuple[int, list[str]]:
    """(status=sent count, problems) in a slice of Postfix's log."""
    problems = []
    for bad in ("status=deferred", "status=bounced", "milter-reject", "fatal:", "panic:"):
        n = text.count(bad)
        if n:
            problems.append(f"{n} x {bad}")
    warnings = [ln for ln in text.splitlines() if "warning:" in ln and "milter" in ln.lower()]
    if warnings:
        problems.append(f"{len(warnings)} milter warnings, first: {warnings[0][-200:]}")
    return text.count("status=sent"), problems


class PostfixBench:
    def __init__(self) -> None:
        self.runs = env_int("RUNS", 3)
        self.count = env_int("COUNT", 2000)
        self.sessions = env_int("SESSIONS", 20)
        self.warmup = env_int("WARMUP", 200)
        self.timeout = env_float("RUN_TIMEOUT", 300.0)
        self.pf = Postfix(env_int("PF_PORT", 2725), env_int("SINK_PORT", 2726))
        self.msg = write_message(WORK / "msg.eml")

    def _milter_spec(self, m: Milter | None) -> str:
        return m.endpoint.postfix_spec if m is not None else ""

    def verify(self, t: Target, m: Milter | None, n: int = 3) -> dict[str, object]:
        """Send ``n`` messages with smtp-sink dumping them; the milter's header must be in
        each exactly once (none without a milter), and the body intact."""
        dump = WORK / "dump" / t.name
        shutil.rmtree(dump, ignore_errors=True)
        self.pf.flush()
        self.pf.configure(self._milter_spec(m))
        problems: list[str] = []
        self.pf.start()
        sink = Sink(self.pf.sink_port, dump)
        try:
            off = self.pf.log_size()
            rc, _ = smtp_source(self.pf.port, n, 1, self.msg, 60)
            if rc:
                problems.append(f"smtp-source exit {rc}")
            if not sink.wait_for(n, 60):
                problems.append(f"smtp-sink got {sink.received}/{n}")
        finally:
            self.pf.stop()
            sink.stop()
        _, log_problems = _check_log(self.pf.log_since(off))
        problems += log_problems
        files = sorted(dump.iterdir()) if dump.exists() else []
        want = 0 if m is None else 1
        line = f"{HEADER_NAME}: {HEADER_VALUE}"
        body = self.msg.read_bytes().partition(b"\n\n")[2]
        for f in files:
            data = f.read_bytes().replace(b"\r\n", b"\n")
            k = data.decode(errors="replace").splitlines().count(line)
            if k != want:
                problems.append(f"{f.name}: {k} x '{line}', expected {want}")
            if not data.rstrip(b"\n").endswith(body.rstrip(b"\n")):  # the dump adds 2 LF
                problems.append(f"{f.name}: body differs from what was sent")
        if len(files) != n:
            problems.append(f"{len(files)} messages dumped, expected {n}")
        shutil.rmtree(dump, ignore_errors=True)
        return {
            "section": "postfix",
            "kind": "verify",
            "target": t.name,
            "messages": len(files),
            "header": line if want else None,
            "ok": not problems,
            "problems": problems,
        }

    def run_once(self, t: Target, m: Milter | None, rnd: int) -> dict[str, object]:
        pf = self.pf
        pf.flush()
        pf.configure(self._milter_spec(m))
        errors: list[str] = []
        master = pf.start()
        sink = Sink(pf.sink_port)
        try:
            if self.warmup:
                smtp_source(pf.port, self.warmup, self.sessions, self.msg, self.timeout)
                if not sink.wait_for(self.warmup, self.timeout):
                    raise RuntimeError(f"warm-up: smtp-sink got {sink.received}/{self.warmup}")
            with contextlib.suppress(RuntimeError):
                wait_for(lambda: pf.queued() == 0, 10, "queue empty after warm-up")
            base = sink.received
            off = pf.log_size()
            cpu0 = (tree_cpu(master), tree_cpu(m.pid) if m else 0.0, sink.cpu())
            busy0 = machine_busy()
            t0 = time.monotonic()
            rc, src_cpu = smtp_source(pf.port, self.count, self.sessions, self.msg, self.timeout)
            t_acc = time.monotonic() - t0
            left = max(1.0, self.timeout - t_acc)
            if sink.wait_for(base + self.count, left):
                t_done = sink.t_reached - t0
            else:
                t_done = time.monotonic() - t0
                errors.append(f"smtp-sink got {sink.received - base}/{self.count} in time")
            busy = busy_pct(busy0, machine_busy())
            cpu1 = (tree_cpu(master), tree_cpu(m.pid) if m else 0.0, sink.cpu())
            if rc:
                errors.append(f"smtp-source exit status {rc}")
        finally:
            pf.stop()
            sink_err = sink.stop()
        sent, problems = _check_log(pf.log_since(off))
        errors += problems
        if sent != self.count:
            errors.append(f"Postfix log: {sent} status=sent, expected {self.count}")
        if sink_err.strip():
            errors.append("smtp-sink: " + sink_err.strip())
        n = self.count
        cpu = {
            "postfix": cpu1[0] - cpu0[0],
            "milter": cpu1[1] - cpu0[1],
            "smtp-source": src_cpu,
            "smtp-sink": cpu1[2] - cpu0[2],
        }
        return {
            "section": "postfix",
            "kind": "run",
            "target": t.name,
            "round": rnd,
            "socket": self._milter_spec(m) or None,
            "count": n,
            "sessions": self.sessions,
            "accept_s": round(t_acc, 3),
            "e2e_s": round(t_done, 3),
            "accept_rate": round(n / t_acc, 1),
            "e2e_rate": round(n / t_done, 1),
            "cpu_ms_per_msg": {k: round(1000 * v / n, 3) for k, v in cpu.items()},
            "machine_busy_pct": busy,
            # busy % not explained by the processes above: other load on the machine
            # (and this script, the kernel); large values mean a disturbed run
            "other_busy_pct": round(busy - 100 * sum(cpu.values()) / max(t_done, 1e-9), 1),
            "sent_in_log": sent,
            "errors": errors,
        }

    def run(self, targets: list[Target], emit: Callable[[dict[str, object]], None]) -> None:
        log(
            f"postfix section: {len(targets)} targets x {self.runs} runs x {self.count} "
            f"messages, {self.sessions} sessions"
        )
        emit({"section": "postfix", "kind": "idle", "busy_pct": idle_check()})
        try:
            with milters(targets) as running:
                ok: list[Target] = []
                for t in targets:
                    v = self.verify(t, running.get(t.name))
                    emit(v)
                    if v["ok"]:
                        ok.append(t)
                    else:
                        log(f"{t.name}: verification FAILED, not measured: {v['problems']}")
                for rnd in range(self.runs):
                    order = ok[rnd % len(ok) :] + ok[: rnd % len(ok)] if ok else []
                    for t in order:
                        for attempt in range(1 + RETRIES):
                            quiet = wait_quiet()
                            try:
                                res = self.run_once(t, running.get(t.name), rnd)
                            except Exception as e:  # recorded; the other runs go on
                                res = {"section": "postfix", "kind": "run", "target": t.name,
                                       "round": rnd, "e2e_rate": None, "accept_rate": None,
                                       "errors": [f"{type(e).__name__}: {e}"]}  # fmt: skip
                            other = res.get("other_busy_pct")
                            assert other is None or isinstance(other, float | int)
                            res.update(attempt=attempt, busy_before_pct=quiet,
                                       disturbed=disturbed(other))  # fmt: skip
                            log(
                                f"postfix round {rnd + 1}/{self.runs} {t.name}: "
                                f"{res['e2e_rate']} msgs/s e2e, {res['accept_rate']} accept"
                                + (f" ERRORS {res['errors']}" if res["errors"] else "")
                                + (f" DISTURBED (other load {other} %)" if res["disturbed"] else "")
                            )
                            emit(res)
                            if not retry_disturbed(res):
                                break
        finally:
            self.pf.stop()


def main() -> int:
    names = sys.argv[1:]
    if any(a.startswith("-") for a in names):
        print(__doc__)
        return 2
    if names:
        os.environ["PF_TARGETS"] = " ".join(names)
    targets = targets_from_env("PF_TARGETS", DEFAULT_TARGETS)
    failed = False

    def emit(d: dict[str, object]) -> None:
        nonlocal failed
        failed = failed or bool(d.get("errors")) or d.get("ok") is False
        print(json.dumps(d), flush=True)

    PostfixBench().run(targets, emit)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
