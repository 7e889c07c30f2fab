"""Shared helpers for milterd's benchmarks: settings, /proc accounting, process control,
the milters under test.

Everything here is local to this machine: loopback TCP or unix sockets, processes this
suite started itself (stopped by PID), files under ``WORK`` (default
/var/lib/milterd-bench; not under /tmp so Postfix's smtpd, running as ``postfix``, can
reach the unix sockets through 0755 directories).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PYTHON = os.path.abspath(sys.executable)  # the venv's python (not resolved: keep the venv)
MILTERD = str(Path(PYTHON).parent / "milterd")
HEADER_NAME = "X-Milterd-Example"  # what the example plugin adds, and the bare milter too
HEADER_VALUE = "hello from milterd"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def env_int(name: str, default: int) -> int:
    v = os.environ.get(name, "").strip()
    return int(v) if v else default


def env_float(name: str, default: float) -> float:
    v = os.environ.get(name, "").strip()
    return float(v) if v else default


def env_str(name: str, default: str) -> str:
    return os.environ.get(name, "").strip() or default


WORK = Path(env_str("BENCH_WORK", "/var/lib/milterd-bench"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---- sockets --------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A milter socket: ``family`` is "unix" (``path``) or "inet" (``host``, ``port``)."""

    family: str
    path: str = ""
    host: str = ""
    port: int = 0

    @property
    def milter_spec(self) -> str:
        """libmilter / milterd spelling: unix:/path or inet:PORT@HOST."""
        return f"unix:{self.path}" if self.family == "unix" else f"inet:{self.port}@{self.host}"

    @property
    def postfix_spec(self) -> str:
        """Postfix ``smtpd_milters`` spelling: unix:/path or inet:HOST:PORT."""
        return f"unix:{self.path}" if self.family == "unix" else f"inet:{self.host}:{self.port}"


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def parse_socket(spec: str) -> Endpoint:
    """unix:/path, local:/path, inet:PORT@HOST or inet:HOST:PORT; loopback hosts only."""
    if spec.startswith(("unix:", "local:")):
        path = spec.split(":", 1)[1]
        if not path.startswith("/"):
            raise ValueError(f"unix socket path must be absolute: {spec!r}")
        return Endpoint("unix", path=path)
    m = re.fullmatch(r"inet6?:(\d+)@\[?([^\]]+)\]?", spec)
    if m:
        port, host = int(m.group(1)), m.group(2)
    else:
        m = re.fullmatch(r"inet6?:\[?([^\]]+?)\]?:(\d+)", spec)
        if not m:
            raise ValueError(f"socket: unix:/PATH, inet:PORT@HOST or inet:HOST:PORT, not {spec!r}")
        host, port = m.group(1), int(m.group(2))
    if host not in _LOOPBACK:
        raise ValueError(f"loopback hosts only (this suite never leaves the machine): {spec!r}")
    return Endpoint("inet", host="127.0.0.1" if host == "localhost" else host, port=port)


def tcp_listening(port: int) -> bool:
    """Is something listening on TCP ``port`` (any local address)? Read from /proc/net,
    so no probe connection disturbs the server."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def unix_listening(path: str) -> bool:
    """Is a unix stream socket at ``path`` in the listening state (/proc/net/unix)?"""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except OSError:
        return False
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            parts = line.split()
            # Flags 00010000 = __SO_ACCEPTCON (listening); St 01 = unconnected.
            if len(parts) >= 8 and parts[7] == path and int(parts[3], 16) & 0x10000:
                return True
    return False


def listening(ep: Endpoint) -> bool:
    return unix_listening(ep.path) if ep.family == "unix" else tcp_listening(ep.port)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return not tcp_listening(port)


# ---- /proc accounting -----------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int]:
    """(ppid, user+system+children's user+system ticks) of one process."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2 :].split()  # fields after "(comm)"; rest[0] is field 3
    utime, stime, cutime, cstime = (int(x) for x in rest[11:15])  # fields 14-17
    return int(rest[1]), utime + stime + cutime + cstime


def _procs() -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                out[int(d)] = _stat(int(d))
    return out


def tree_pids(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        if p in procs:
            out.append(p)
            todo.extend(kids.get(p, []))
    return out


def tree_cpu(root: int) -> float:
    """CPU seconds (user+system) of ``root`` and its live descendants, each including its
    reaped children, so a process that exited meanwhile (a Postfix smtpd) still counts
    once, through its parent."""
    procs = _procs()
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    total, todo = 0, [root]
    while todo:
        p = todo.pop()
        if p in procs:
            total += procs[p][1]
            todo.extend(kids.get(p, []))
    return total / CLK_TCK


def rss_kb(pid: int) -> int:
    """VmRSS of one process in kB (0 if gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss(root: int) -> dict[int, int]:
    """{pid: VmRSS kB} of ``root`` and its descendants (milterd: supervisor + workers)."""
    return {p: rss_kb(p) for p in tree_pids(root)}


def machine_busy() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def busy_pct(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Machine busy % between two samples, out of 100 * nproc."""
    total = max(1, after[1] - before[1])
    return round(100 * (os.cpu_count() or 1) * (after[0] - before[0]) / total, 1)


def idle_check(seconds: float = 1.0) -> float:
    """Machine busy % over ``seconds`` while this suite does nothing: other load on the
    machine (shared VM, someone else's tests) shows up here and is recorded."""
    b0 = machine_busy()
    time.sleep(seconds)
    return busy_pct(b0, machine_busy())


# Other people's load on a shared machine: wait for quiet before a run, re-run a run
# whose unexplained CPU ("other load") says it was disturbed.
QUIET_MAX = env_float("QUIET_MAX", 15.0)  # busy % (of 100 x nproc) that counts as quiet
QUIET_WAIT = env_float("QUIET_WAIT", 30.0)  # seconds to wait for quiet at most
OTHER_MAX = env_float("OTHER_MAX", 40.0)  # other load % above which a run is disturbed
RETRIES = env_int("RETRIES", 2)  # extra attempts for a disturbed run
# The bare pymilter baseline bound to one CPU, as milterd's worker 0 is by its default
# (cpu_affinity = "auto"): like for like. Unbound, its threads' GIL handoffs cross CPUs
# and it costs about twice the CPU a message over the milter protocol. BARE_PIN=0: unbound.
BARE_PIN = env_int("BARE_PIN", 1)


def pin_argv(enabled: bool = True) -> list[str]:
    """``taskset`` bound to the first CPU this process may use, or nothing (not
    ``enabled``, one CPU, no taskset)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2 or not os.path.exists("/usr/bin/taskset"):
        return []
    return ["/usr/bin/taskset", "-c", str(cpus[0])]


# After this many seconds (from import) the harness stops waiting for quiet and stops
# re-running disturbed runs: the whole benchmark stays bounded in time.
_BUDGET_END = time.monotonic() + env_float("BENCH_BUDGET", 1200.0)


def over_budget() -> bool:
    return time.monotonic() > _BUDGET_END


def wait_quiet(max_wait: float = QUIET_WAIT, limit: float = QUIET_MAX) -> float:
    """Wait until the machine is quiet (busy < ``limit`` % over 0.5 s), at most
    ``max_wait`` seconds (not at all once over BENCH_BUDGET). Returns the last busy %
    seen (recorded with the run)."""
    end = time.monotonic() + (0.0 if over_budget() else max_wait)
    while True:
        b = idle_check(0.5)
        if b < limit or time.monotonic() > end:
            return b


def disturbed(other_pct: float | None) -> bool:
    return other_pct is not None and other_pct > OTHER_MAX


def retry_disturbed(row: dict[str, object]) -> bool:
    """Should a run be measured again? Disturbed, and time left in BENCH_BUDGET."""
    return bool(row.get("disturbed")) and not over_budget()


# ---- processes ------------------------------------------------------------------------


class Proc:
    """A process this suite started, stopped by its PID (and its descendants by theirs)."""

    def __init__(
        self, name: str, argv: list[str], logfile: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        logfile.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env} if env else None,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 1500) -> str:
        with contextlib.suppress(OSError):
            return self.logfile.read_bytes()[-n:].decode(errors="replace")
        return ""

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, wait up to ``timeout``; then SIGKILL it and whatever descendants it
        left behind (PIDs taken before the TERM: only processes it started)."""
        family = [p for p in tree_pids(self.pid) if p != self.pid] if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        for p in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, signal.SIGKILL)
        self._log.close()


def wait_for(cond: Callable[[], bool], timeout: float, what: str, proc: Proc | None = None) -> None:
    """Poll ``cond()`` every 50 ms until true; raise naming ``what`` after ``timeout``."""
    end = time.monotonic() + timeout
    while not cond():
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.log_tail()}")
        if time.monotonic() > end:
            raise RuntimeError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.05)


# ---- the milters under test -----------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One configuration under test. ``kind``: none (Postfix alone), bare, milterd."""

    name: str
    kind: str
    family: str = ""  # unix | inet
    workers: int = 1
    args: tuple[str, ...] = ()  # extra bare_milter.py arguments (experiments)

    @property
    def baseline(self) -> str:
        """The bare pymilter milter on the same socket family: what this is compared to."""
        return f"bare-{'unix' if self.family == 'unix' else 'tcp'}"

    def describe(self) -> str:
        if self.kind == "none":
            return "Postfix, no milter"
        sock = "unix" if self.family == "unix" else "TCP"
        if self.kind == "bare":
            extra = " (" + " ".join(self.args) + ")" if self.args else ""
            return f"bare pymilter milter, {sock}{extra}"
        return f"milterd + example_header, workers={self.workers}, {sock}"


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("none", "none"),
        Target("bare-unix", "bare", "unix"),
        Target("bare-tcp", "bare", "inet"),
        Target("milterd-w1-unix", "milterd", "unix", 1),
        Target("milterd-w1-tcp", "milterd", "inet", 1),
        Target("milterd-w2-unix", "milterd", "unix", 2),
        Target("milterd-w2-tcp", "milterd", "inet", 2),
        # Experiment, not in the default lists: the bare milter also asks for DATA with a
        # reply, which removes Postfix's ~40 ms TCP stall (see bare_milter.py).
        Target("bare-tcp-replydata", "bare", "inet", args=("--reply-data",)),
        # Experiment: the bare milter also takes CONNECT..RCPT without reply, as milterd's
        # core asks; isolates the cost of the extra callbacks from milterd's own code.
        Target("bare-unix-envelope", "bare", "unix", args=("--envelope",)),
    )
}
_TCP_OFFSET = {"bare-tcp": 0, "milterd-w1-tcp": 1, "milterd-w2-tcp": 2, "bare-tcp-replydata": 3}


def targets_from_env(var: str, default: str) -> list[Target]:
    names = env_str(var, default).replace(",", " ").split()
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        raise SystemExit(f"{var}: unknown target(s) {unknown}; known: {list(TARGETS)}")
    return [TARGETS[n] for n in names]


def endpoint_for(t: Target, instance: str = "") -> Endpoint:
    """Where target ``t`` listens. ``instance`` separates two daemons of the same target."""
    name = t.name + (f"-{instance}" if instance else "")
    if t.family == "unix":
        return Endpoint("unix", path=str(WORK / "sock" / f"{name}.sock"))
    base = env_int("MILTER_PORT", 8925)
    port = base + _TCP_OFFSET[t.name] + (10 if instance else 0)
    return Endpoint("inet", host="127.0.0.1", port=port)


def milterd_config(ep: Endpoint, workers: int) -> str:
    return (
        "# written by bench/benchlib.py\n"
        "[milterd]\n"
        f'socket = "{ep.milter_spec}"\n'
        'socket_mode = "0666"\n'
        f"workers = {workers}\n"
        'log_level = "warning"\n'
        'authserv_id = "mx.bench"\n'
        "\n"
        "[plugins.example_header]\n"
    )


class Milter:
    """A running milter under test (bare pymilter or milterd)."""

    def __init__(self, target: Target, instance: str = "") -> None:
        if target.kind not in ("bare", "milterd"):
            raise ValueError(f"{target.name}: not a milter")
        self.target = target
        self.endpoint = endpoint_for(target, instance)
        name = target.name + (f"-{instance}" if instance else "")
        (WORK / "sock").mkdir(parents=True, exist_ok=True)
        os.chmod(WORK, 0o755)
        os.chmod(WORK / "sock", 0o755)
        ep = self.endpoint
        if ep.family == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(ep.path)
        elif not port_free(ep.port):
            raise RuntimeError(f"{target.name}: TCP port {ep.port} is in use (set MILTER_PORT)")
        logfile = WORK / "logs" / f"{name}.log"
        if target.kind == "bare":
            script = str(BENCH_DIR / "bare_milter.py")
            argv = [*pin_argv(bool(BARE_PIN)), PYTHON, script, ep.milter_spec, *target.args]
        else:
            conf = WORK / f"{name}.toml"
            conf.write_text(milterd_config(ep, target.workers))
            argv = [MILTERD, "-c", str(conf), "run"]
        log(f"starting {name}: {' '.join(argv)}")
        self.proc = Proc(name, argv, logfile)
        try:
            wait_for(lambda: listening(ep), 30, f"{name} listening on {ep.milter_spec}", self.proc)
            if target.kind == "milterd":
                # The supervisor opens the socket, then forks the workers.
                wait_for(
                    lambda: len(tree_pids(self.pid)) >= 1 + target.workers,
                    30,
                    f"{name}: {target.workers} worker(s)",
                    self.proc,
                )
        except BaseException:
            self.proc.stop()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        log(f"stopping {self.proc.name} (pid {self.pid})")
        self.proc.stop()
        if self.endpoint.family == "unix":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.endpoint.path)


@contextlib.contextmanager
def milters(targets: list[Target]) -> Iterator[dict[str, Milter]]:
    """Start every milter target of ``targets`` (none is skipped); stop them all after,
    whatever happens."""
    running: dict[str, Milter] = {}
    try:
        for t in targets:
            if t.kind != "none" and t.name not in running:
                running[t.name] = Milter(t)
        yield running
    finally:
        for m in running.values():
            with contextlib.suppress(Exception):
                m.stop()


def median(xs: list[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if not n:
        return float("nan")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
