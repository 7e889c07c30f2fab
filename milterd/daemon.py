"""The daemon: a supervisor process that owns the signals, and workers that run libmilter.

Why a supervisor even for one worker: libmilter's own signal thread takes SIGHUP, SIGTERM
and SIGINT in whatever process runs its accept loop, and stops on all three, so that
process can never reload on SIGHUP. The supervisor (pure Python, no libmilter loop) handles
the signals and talks to each worker over a pipe:

* start-up: the supervisor validates the config (plugins imported and their schemas
  checked), opens libmilter's socket once, drops privileges, runs the ``startup`` of the
  plugins declaring ``prefork = True`` (key loading, rule compilation: once, shared
  copy-on-write) and forks ``workers`` processes that accept on that one socket (the
  kernel spreads connections). Each worker then runs the other plugins' ``startup`` and
  every plugin's ``worker_start`` (its own connections, sockets, threads);
* SIGHUP: the supervisor validates the new file once, prefork ``startup`` included, and
  the other plugins' ``startup`` and every ``worker_start`` in a throwaway child; if it
  is bad, it logs why and keeps the old one; if it is good, it sends its text to every
  worker, which builds a new generation (every ``startup``, then ``worker_start``) for
  new connections while open connections finish on theirs. A worker whose start fails
  keeps its old generation and logs why. A worker forked later (a restart) inherits the
  supervisor's current generation;
* SIGTERM/SIGINT: every worker stops accepting, lets open sessions finish for up to
  ``shutdown_timeout`` seconds and exits; the supervisor exits 0 when all are gone;
* a worker that dies is logged and restarted, at most 5 times a minute per worker (more
  means the configuration itself crashes: the supervisor stops with exit status 1). A worker that
  exits 0 on its own (libmilter stopped it) is restarted without counting as a crash;
* workers ignore SIGHUP, SIGTERM and SIGINT (libmilter's signal thread would stop them
  at once, cutting open sessions; libmilter's loop runs off the main thread so that they
  are discarded, see _worker_main) and run in their own process group: signals meant for
  the daemon (``pkill -HUP milterd``, ``systemctl kill``, a terminal's Ctrl-C) act through
  the supervisor;
* the supervisor's death closes the pipes, and a worker seeing EOF drains and stops the
  same way, so no worker outlives it. (No PR_SET_PDEATHSIG: its signal would reach
  libmilter, which stops at once, cutting the sessions the drain lets finish.)
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from milterd.config import Config, ConfigError, check_accounts, decode, load, loads
from milterd.logs import setup_logging

if TYPE_CHECKING:
    from milterd.pipeline import Runtime

log = logging.getLogger("milterd")
RESTARTS_PER_MINUTE = 5
# A stopping worker is killed this long after shutdown_timeout: its plugins' shutdown
# (each bounds its waits for background work to 2 s) runs after the sessions drained.
STOP_MARGIN = 10
#: [milterd] keys a reload cannot apply (the socket is open, the workers forked, ...).
RESTART_ONLY = (
    "socket", "socket_mode", "socket_group", "user", "group", "workers", "cpu_affinity",
    "metrics_listen", "milter_timeout",
)  # fmt: skip


@dataclass
class _Worker:
    index: int
    pid: int
    pipe: int  # write end, supervisor -> worker (non-blocking)
    started: float
    #: Messages not yet written whole; ``sent`` bytes of the first one are out already.
    queue: list[bytes] = field(default_factory=list)
    sent: int = 0

    def post(self, msg: bytes) -> None:
        """Queue ``msg`` and write what the pipe takes now. A reload replaces a reload
        queued but not started: a worker busy starting a generation gets only the newest,
        and the supervisor never blocks on a full pipe."""
        if msg.startswith(b"reload "):
            keep = self.queue[:1] if self.sent else []
            self.queue = keep + [m for m in self.queue[len(keep) :] if not m.startswith(b"reload ")]
        self.queue.append(msg)
        self.flush()

    def flush(self) -> None:
        while self.queue:
            head = self.queue[0]
            try:
                n = os.write(self.pipe, memoryview(head)[self.sent :])
            except BlockingIOError:
                return
            except OSError:  # the worker is gone; reap() will see it
                self.queue.clear()
                self.sent = 0
                return
            self.sent += n
            if self.sent == len(head):
                self.queue.pop(0)
                self.sent = 0


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def _read_line(fd: int) -> bytes:
    out = b""
    while not out.endswith(b"\n"):
        c = os.read(fd, 1)
        if not c:
            raise EOFError
        out += c
    return out[:-1]


_metrics_dir: str | None = None  # the metrics directory this process made (see below)


def _drop_privileges(user: str | None, group: str | None) -> None:
    if user is None and group is None:
        return
    import grp
    import pwd

    gid = grp.getgrnam(group).gr_gid if group else (pwd.getpwnam(user).pw_gid if user else None)
    uid = pwd.getpwnam(user).pw_uid if user else None
    if _metrics_dir is not None:
        # Made by root before the drop: the workers (and the supervisor, which removes it
        # at exit) write and delete their files in it as the new user.
        for p in (_metrics_dir, *(e.path for e in os.scandir(_metrics_dir))):
            os.chown(p, -1 if uid is None else uid, -1 if gid is None else gid)
    if gid is not None:
        os.setgroups([])
        os.setgid(gid)
    if uid is not None:
        os.setuid(uid)
    log.info("running as uid=%d gid=%d", os.getuid(), os.getgid())


def bind_cpu(index: int) -> int | None:
    """Bind the calling process's thread, and so every thread it starts later (libmilter's
    one per connection, the plugins'), to one CPU of those it may use: worker ``index``
    gets the ``index``-th, round robin. Returns the CPU, or None (one CPU only, or the
    kernel refused: logged, the worker runs unbound).

    Why: a worker runs Python on one CPU at a time anyway (the GIL), but its threads hand
    the GIL to each other a dozen times a message. Between threads on different CPUs every
    handoff is a cross-CPU wakeup (an interrupt to the other CPU; in a virtual machine an
    exit to the hypervisor); on one CPU it is a plain context switch. Measured in
    bench/RESULTS.md (cpu_affinity)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        cpu = cpus[index % len(cpus)]
        os.sched_setaffinity(0, {cpu})
    except (OSError, AttributeError) as e:
        log.warning("worker %d: cannot bind to a CPU (cpu_affinity = auto): %s", index, e)
        return None
    log.info("worker %d bound to CPU %d", index, cpu)
    return cpu


def _worker_main(index: int, rt: Runtime, control: int, affinity: str | None = None) -> None:
    """Body of one worker process: ``rt`` had its prefork phase in the supervisor. Never
    returns (os._exit). ``affinity``: the ``cpu_affinity`` the daemon started with (a
    restart-only setting: a worker restarted after a reload keeps it); default rt's."""
    from milterd import bridge
    from milterd.pipeline import Runtime

    os.environ["MILTERD_WORKER"] = str(index)
    t0 = time.monotonic()
    if (affinity or rt.settings.cpu_affinity) == "auto":
        bind_cpu(index)
    try:
        rt.start("worker")
    except Exception as e:
        for line in _why(e).splitlines():
            log.error("worker %d: %s", index, line)
        os._exit(3)
    bridge.set_runtime(rt)

    def drain_then_stop() -> None:
        current = bridge.current_runtime()
        timeout = (current or rt).settings.shutdown_timeout
        bridge.begin_drain()
        if bridge.open_connections():
            log.info(
                "worker %d: waiting up to %gs for %d open connection(s)",
                index,
                timeout,
                bridge.open_connections(),
            )
        if not bridge.drain(timeout):
            log.warning(
                "worker %d: %d connection(s) still open after %gs; stopping anyway",
                index,
                bridge.open_connections(),
                timeout,
            )
        bridge.stop()

    def control_loop() -> None:
        while True:
            try:
                line = _read_line(control)
            except (EOFError, OSError):
                log.warning("worker %d: supervisor gone; stopping", index)
                drain_then_stop()
                return
            if line == b"stop":
                drain_then_stop()
                return
            if line.startswith(b"reload "):
                text = _read_exact(control, int(line.split()[1])).decode()
                path = "<reload>"
                if line.count(b" ") >= 2:
                    path = os.fsdecode(line.split(maxsplit=2)[2])
                # Reloads queued behind this one (HUPs in a row while a start-up is slow):
                # only the newest is built; a stop queued behind them wins.
                stop = False
                try:
                    while select.select([control], [], [], 0)[0]:
                        nxt = _read_line(control)
                        if nxt == b"stop":
                            stop = True
                            break
                        if nxt.startswith(b"reload "):
                            text = _read_exact(control, int(nxt.split()[1])).decode()
                            if nxt.count(b" ") >= 2:
                                path = os.fsdecode(nxt.split(maxsplit=2)[2])
                except (EOFError, OSError):
                    stop = True
                if stop:
                    drain_then_stop()
                    return
                try:
                    new_rt = Runtime(loads(text, path))
                    new_rt.start()
                except Exception as e:
                    for why in _why(e).splitlines():
                        log.error("worker %d: reload refused, old config kept: %s", index, why)
                    continue
                old = bridge.set_runtime(new_rt)
                if old is not None:
                    old.retire()
                ns = new_rt.settings
                setup_logging(ns.log_level, ns.log_format)
                log.info("worker %d: reloaded %s", index, path)

    threading.Thread(target=control_loop, name="control", daemon=True).start()
    log.info(
        "worker %d ready (pid %d) in %.0f ms, plugins: %s",
        index,
        os.getpid(),
        1000 * (time.monotonic() - t0),
        ", ".join(p.name for p in rt.plugins) or "none",
    )
    # libmilter's accept loop runs on a thread of its own: smfi_main blocks SIGHUP, SIGTERM
    # and SIGINT in the thread that calls it and sigwaits for them. Were that the main
    # thread, the kernel would queue a signal sent to the worker (it never discards a
    # blocked signal) and libmilter would stop, cutting open sessions. The main thread
    # leaves them unblocked and ignored, so they are discarded on arrival.
    failed: list[BaseException] = []

    def accept_loop() -> None:
        try:
            bridge.run()
        except Exception as e:
            failed.append(e)

    loop = threading.Thread(target=accept_loop, name="libmilter")
    loop.start()
    loop.join()
    if failed:
        log.error("worker %d: libmilter main loop failed: %s", index, failed[0])
        os._exit(4)
    from milterd.pipeline import stop_all

    # Every idle generation (not only the current one: an older one whose last session
    # just closed, or a current one the drain saw finish). One still holding a session
    # the drain cut is left to the exit: its hooks may still be running.
    if stop_all():
        log.warning("worker %d: a session still open at exit; its plugins not shut down",
                    index)  # fmt: skip
    logging.shutdown()
    os._exit(0)


class Supervisor:
    """Owns the socket, the workers and the signals. :meth:`run` returns the exit status."""

    def __init__(self, path: str, config: Config) -> None:
        self.path = path
        self.config = config
        #: The settings the daemon started with: the restart-only keys stay as they were.
        self.started_with = config.milterd
        #: The current generation after its prefork phase; forked workers inherit it.
        self.runtime: Runtime | None = None
        self.workers: dict[int, _Worker] = {}
        #: Recent deaths of each worker index (monotonic times), for the restart limit.
        self.restarts: dict[int, list[float]] = {}
        self.stopping = False
        self.reload_requested = False
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        # Read after every select, which also wakes for writable pipes and timeouts: a
        # blocking read would then wait for the next signal.
        os.set_blocking(self.wake_r, False)
        #: The unix socket path this process opened (and may remove at exit), or None.
        self.opened: str | None = None
        #: The /metrics server (supervisor only): its listening socket is closed in every
        #: child, so that a worker draining after the supervisor's death holds no port
        #: that accepts and never answers.
        self.metrics_server: Any = None

    def _in_child(self) -> None:
        """In a process just forked from the supervisor: close what only the supervisor
        may hold. The workers' control pipes (a worker sees the supervisor gone when
        every write end is closed: a child holding one would keep a worker serving after
        the supervisor's death), the wake pipe and the /metrics socket."""
        for fd in (self.wake_r, self.wake_w, *(w.pipe for w in self.workers.values())):
            with contextlib.suppress(OSError):
                os.close(fd)
        if self.metrics_server is not None:
            with contextlib.suppress(OSError):
                self.metrics_server.socket.close()

    def _signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            self.reload_requested = True
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        with contextlib.suppress(OSError):
            os.write(self.wake_w, b"x")

    def spawn(self, index: int) -> None:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # worker
            try:
                os.close(w)
                # Ignored, so discarded before libmilter's signal thread could take them
                # (it stops the worker at once on each, cutting open sessions): a worker is
                # told to reload or drain over its pipe only. ``pkill -HUP milterd`` and
                # ``systemctl kill`` reach the supervisor too, which does the right thing.
                for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
                    signal.signal(sig, signal.SIG_IGN)
                # Before the wake pipe closes (the supervisor's handler writes to it).
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                self._in_child()
                os.environ.pop("NOTIFY_SOCKET", None)  # the supervisor speaks for the service
                # Out of the terminal's foreground group: a Ctrl-C meant for the daemon
                # reaches the supervisor only, which drains the workers.
                with contextlib.suppress(OSError):
                    os.setpgid(0, 0)
                assert self.runtime is not None
                _worker_main(index, self.runtime, r, self.started_with.cpu_affinity)
            finally:
                os._exit(5)
        os.close(r)
        os.set_blocking(w, False)
        self.workers[pid] = _Worker(index, pid, w, time.monotonic())
        log.info("started worker %d (pid %d)", index, pid)

    def reload(self) -> None:
        self.reload_requested = False
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        sd_notify(f"RELOADING=1\nMONOTONIC_USEC={now_usec}")
        try:
            self._reload()
        finally:
            sd_notify("READY=1\nSTATUS=" + self.status())

    def status(self) -> str:
        """The one-line state systemd shows (``systemctl status``: Status:)."""
        # started_with: a reload cannot change the socket (it takes a restart).
        return f"listening on {self.started_with.socket} with {len(self.workers)} worker(s)"

    def _reload(self) -> None:
        # Read once: the bytes validated here are the bytes every worker gets, even if the
        # file changes again meanwhile.
        try:
            with open(self.path, "rb") as f:
                text = f.read()
        except OSError as e:
            log.error("reload refused, old config kept: %s: %s", self.path, e.strerror)
            _metrics().reloads.labels("refused").inc()
            return
        try:
            new = loads(decode(text, self.path), self.path)
            from milterd.pipeline import Runtime

            rt = Runtime(new)  # plugins and their config sections
            rt.start("prefork")  # keys load, rules compile: refused here once, for all
            # The other plugins' startup too, in a throwaway child: a generation every
            # worker would refuse must not become the one restarted workers inherit.
            self._check_in_child(rt)
        except Exception as e:  # whatever a plugin raises, the running daemon stays
            for line in _why(e).splitlines():  # one line each: the log escapes line breaks
                log.error("reload refused, old config kept: %s", line)
            _metrics().reloads.labels("refused").inc()
            return
        old = self.config.milterd
        for key in RESTART_ONLY:  # against what the daemon started with: said at every reload
            if getattr(self.started_with, key) != getattr(new.milterd, key):
                log.warning("%s changed: it takes effect at the next restart, not on reload", key)
        if (old.log_level, old.log_format) != (new.milterd.log_level, new.milterd.log_format):
            setup_logging(new.milterd.log_level, new.milterd.log_format)
        # The supervisor never ran worker_start, so there is nothing to shut down in the
        # old generation here: dropping it is enough.
        self.config, self.runtime = new, rt
        msg = b"reload %d %s\n" % (len(text), os.fsencode(self.path).replace(b"\n", b"?")) + text
        for w in self.workers.values():
            w.post(msg)
        log.info("config %s validated and sent to %d worker(s)", self.path, len(self.workers))
        _metrics().reloads.labels("accepted").inc()

    def _check_in_child(self, rt: Runtime, timeout: float = 60.0) -> None:
        """Start ``rt`` as a worker would (the other plugins' ``startup``, then every
        plugin's ``worker_start``) in a forked child, which then shuts it down; raise
        ConfigError if it fails. ``MILTERD_WORKER`` is ``check`` there, so no plugin
        starts what only worker 0 runs (pruners, report senders)."""
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            status = 3
            try:
                # Its answer is for the supervisor alone, and it holds libmilter's listening
                # socket: a start-up that hangs after the supervisor's death (kill -9) must
                # not keep it open, where a restarted daemon would refuse to take it over.
                _die_with(parent)
                # Before the wake pipe closes: the supervisor's handler writes to its fd,
                # which a plugin's file may get next (a plugin's subprocess ending would
                # then write into that file).
                for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
                    signal.signal(sig, signal.SIG_DFL)
                self._in_child()
                os.environ["MILTERD_WORKER"] = "check"
                rt.check_startup(worker=True)
                status = 0
            except Exception as e:
                for line in _why(e).splitlines():
                    log.error("%s", line)
            finally:
                logging.shutdown()
                os._exit(status)
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ConfigError(f"plugin start-up did not finish in {timeout:g}s")
            time.sleep(0.02)
        if not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0):
            raise ConfigError(f"plugin start-up failed ({_status(status)}; see above)")

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            os.close(w.pipe)
            _metrics_process_dead(pid)
            if self.stopping:
                log.info("worker %d (pid %d) exited", w.index, pid)
                continue
            if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
                log.warning("worker %d (pid %d) stopped on its own; restarting it", w.index, pid)
                _metrics().worker_exits.labels("stopped").inc()
                self.spawn(w.index)
                continue
            log.error("worker %d (pid %d) died: %s", w.index, pid, _status(status))
            _metrics().worker_exits.labels("died").inc()
            now = time.monotonic()
            # Per worker index: killing every worker of a healthy daemon at once (an OOM
            # kill, an admin's pkill) is not a crashing configuration; one worker that
            # keeps dying is, however many others there are.
            deaths = [t for t in self.restarts.get(w.index, []) if now - t < 60] + [now]
            self.restarts[w.index] = deaths
            if len(deaths) > RESTARTS_PER_MINUTE:
                log.critical(
                    "worker %d died %d times in a minute; giving up", w.index, len(deaths)
                )
                self.stopping = True
                self.failed = True
                continue
            self.spawn(w.index)

    failed = False

    def run(self) -> int:
        from milterd import bridge

        settings = self.config.milterd
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, self._signal)
        try:
            check_accounts(settings, socket=True)
        except ConfigError as e:
            log.error("cannot start on %s: %s", settings.socket, e)
            return 2
        try:
            bridge.open_socket(settings)
            family, _, path = settings.socket.partition(":")
            if family in ("unix", "local"):
                self.opened = path
            _drop_privileges(settings.user, settings.group)
        except (OSError, KeyError) as e:  # in use, no permission, unknown user or group
            what = f"unknown user or group {e}" if isinstance(e, KeyError) else str(e)
            log.error("cannot start on %s: %s", settings.socket, what)
            self._unlink_socket()
            return 2
        from milterd.pipeline import Runtime

        try:
            t0 = time.monotonic()
            self.runtime = Runtime(self.config)
            self.runtime.start("prefork")
            # As at reload: a configuration every worker would refuse is an exit status 2
            # (systemd does not restart it), not six worker deaths and a status 1.
            self._check_in_child(self.runtime)
            prefork = [p.name for p in self.runtime.plugins if p.prefork]
            log.info(
                "prefork start-up (%s) took %.0f ms, once for every worker",
                ", ".join(prefork) or "no plugin",
                1000 * (time.monotonic() - t0),
            )
        except Exception as e:  # the configuration cannot start: a restart will not help
            for line in _why(e).splitlines():
                log.error("%s", line)
            self._unlink_socket()
            return 2
        if settings.metrics_listen:
            from milterd.metrics import serve_metrics

            try:
                self.metrics_server = serve_metrics(settings.metrics_listen)
                _metrics().declare_supervisor()
            except (OSError, OverflowError, ValueError) as e:  # in use, bad host or port
                log.error("cannot serve metrics on %s: %s", settings.metrics_listen, e)
                self._unlink_socket()
                return 2
        n = settings.worker_count()
        log.info("milterd listening on %s with %d worker(s)", settings.socket, n)
        for i in range(n):
            self.spawn(i)
        # Type=notify: the MTA (ordered after milterd) starts once the socket listens and
        # the workers are forked, not when the binary was merely executed.
        sd_notify("READY=1\nSTATUS=" + self.status())
        stop_sent: float | None = None
        while self.workers:
            writing = [w.pipe for w in self.workers.values() if w.queue]
            with contextlib.suppress(InterruptedError):
                select.select([self.wake_r], writing, [], 1.0)
            for w in self.workers.values():
                if w.queue:
                    w.flush()
            with contextlib.suppress(BlockingIOError, OSError):
                os.read(self.wake_r, 4096)
            self.reap()
            if self.stopping and stop_sent is None:
                log.info("stopping: %d worker(s) finish their open sessions", len(self.workers))
                sd_notify("STOPPING=1\nSTATUS=stopping: open sessions finish")
                for w in self.workers.values():
                    w.post(b"stop\n")
                stop_sent = time.monotonic()
            if (
                stop_sent is not None
                and time.monotonic() - stop_sent
                > self.config.milterd.shutdown_timeout + STOP_MARGIN
            ):
                for w in list(self.workers.values()):
                    log.warning("worker %d (pid %d) did not stop; killing it", w.index, w.pid)
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(w.pid, signal.SIGKILL)
                stop_sent = time.monotonic()
            if self.reload_requested and not self.stopping:
                self.reload()
        self._unlink_socket()
        log.info("milterd stopped")
        return 1 if self.failed else 0

    def _unlink_socket(self) -> None:
        """Remove the unix socket this process opened: never another path (a reload may
        have changed ``socket``; that takes a restart) nor one it did not open."""
        if self.opened is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.opened)
            self.opened = None


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when ``parent`` (its parent) dies
    (``PR_SET_PDEATHSIG``, Linux); exit at once if it is already gone."""
    with contextlib.suppress(Exception):  # no ctypes, no prctl: the check still runs
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1: PDEATHSIG
    if os.getppid() != parent:  # died before the prctl took effect: reparented already
        os._exit(3)


def sd_notify(state: str) -> None:
    """Tell systemd ``state`` (``READY=1``, ``RELOADING=1``, ``STOPPING=1``, ``STATUS=``)
    over ``$NOTIFY_SOCKET`` (sd_notify(3)'s protocol: one datagram); nothing without it.
    Written here rather than with a library: a dozen lines, no C dependency. Never fails
    the daemon: an error is logged at debug level."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr or addr[0] not in "/@":
        return
    if addr[0] == "@":  # an abstract socket
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode("utf-8", "replace"))
    except OSError as e:
        log.debug("sd_notify %r failed: %s", state.split("\n", 1)[0], e)


def _why(e: BaseException) -> str:
    """A ConfigError as it is (it names file, section and key); anything else with its type."""
    return str(e) if isinstance(e, ConfigError) else f"{type(e).__name__}: {e}"


def _status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit status {os.WEXITSTATUS(status)}"


def run(path: str) -> int:
    """``milterd run``: validate, then supervise. Returns the process exit status."""
    try:
        config = load(path)
    except ConfigError as e:
        print(f"milterd: {e}", file=sys.stderr)
        return 2
    setup_logging(config.milterd.log_level, config.milterd.log_format)
    if config.milterd.metrics_listen:
        # Always: even one worker is another process than the supervisor serving /metrics.
        _multiprocess_metrics()
    try:
        from milterd.pipeline import Runtime

        Runtime(config)
    except Exception as e:
        for line in _why(e).splitlines():
            log.error("%s", line)
        return 2
    return Supervisor(path, config).run()


def _multiprocess_metrics() -> None:
    """prometheus-client's multiprocess mode, one directory per daemon run: the workers
    count, the supervisor serves ``/metrics`` from their files.

    Must run before anything imports prometheus_client (it reads the variable at import).
    """
    import atexit
    import shutil
    import tempfile

    global _metrics_dir
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        path = tempfile.mkdtemp(prefix="milterd-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        _metrics_dir = path
        owner = os.getpid()

        def cleanup() -> None:
            if os.getpid() == owner:  # workers leave via os._exit; only the supervisor cleans
                shutil.rmtree(path, ignore_errors=True)

        atexit.register(cleanup)


def _metrics() -> Any:
    """The metrics, imported late: prometheus-client must not be imported before
    ``_multiprocess_metrics`` has set its directory."""
    from milterd.metrics import METRICS

    return METRICS


def _metrics_process_dead(pid: int) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
