"""The pipeline: one configuration generation (:class:`Runtime`) and the per-connection
engine (:class:`Session`) that turns milter events into guarded plugin calls.

The bridge (libmilter) and the test harness drive the same :class:`Session`: what
``milterd check`` prints is what the daemon does.

Isolation: every plugin call is guarded. An exception, a wrong return value or an overrun
deadline never leaves the guard: the plugin's ``on_error`` policy is applied (continue,
tempfail or reject), its contributions from that call are dropped, and the failure is
logged with plugin, stage and queue id, and counted. With ``isolation = "thread"`` (the
default) the call runs on a helper thread and the connection thread stops waiting at the
deadline, so even a plugin stuck in a C call or a sleep cannot hold the MTA past it; with
``"inline"`` the call runs on the connection thread (no hop, about 100 µs cheaper) and an
overrun is only detected when the call returns.
"""

from __future__ import annotations

import concurrent.futures as cf
import ipaddress
import logging
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from milterd import events as ev
from milterd import hookspecs
from milterd.actions import (
    Accept,
    Discard,
    Quarantine,
    Reject,
    Result,
    Symbol,
    TempFail,
    Verdict,
)
from milterd.config import Config, ConfigError
from milterd.context import (
    ConnectionInfo,
    Context,
    Entry,
    Ledger,
    MessageInfo,
    Note,
    Recipient,
    Services,
)
from milterd.dns import Resolver, StubResolver
from milterd.logs import LazyFields
from milterd.merge import Decision, merge, render
from milterd.metrics import METRICS
from milterd.registry import (
    LoadedPlugin,
    contained,
    exception_text,
    finalize_order,
    load_plugins,
)
from milterd.spool import Message, Spool

__all__ = ["Negotiation", "Runtime", "Session"]

log = logging.getLogger("milterd")
#: Where :meth:`Runtime.start` runs: see its docstring.
StartPhase = Literal["prefork", "worker", "all"]
CORE = "milterd"  # the name the core uses on the ledger (limits, errors)

# Stages the core itself needs for the envelope and the log: requested without reply when
# no plugin hooks them.
_ENVELOPE = ("connect", "helo", "envfrom", "envrcpt")
_CONTENT = ("data", "header", "eoh", "body")
#: Macros the core reads, per stage.
CORE_MACROS: dict[str, tuple[str, ...]] = {
    "connect": ("j", "{daemon_name}", "{client_addr}"),
    "envfrom": ("i", "{auth_authen}", "{auth_type}"),
    "envrcpt": ("i",),
    # Postfix makes the queue file (and the id) after the first accepted RCPT: with one
    # recipient DATA is the first stage that can carry it.
    "data": ("i",),
    "eom": ("i",),
}

HELPER_THREADS = 256
_executor: cf.ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_stuck = 0  # helper threads held by calls that ran past their deadline and still run
_stuck_lock = threading.Lock()
# Every started generation of this process, oldest first, for stop_all() at exit.
_started: list[weakref.ref[Runtime]] = []
_started_lock = threading.Lock()


def executor() -> cf.ThreadPoolExecutor:
    """The helper threads for ``isolation = "thread"`` calls, created on first use (so a
    forked worker makes its own)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            # Generous: a plugin stuck past its deadline keeps its thread until it returns.
            _executor = cf.ThreadPoolExecutor(
                max_workers=HELPER_THREADS, thread_name_prefix="plugin"
            )
        return _executor


def _submit(fn: Callable[..., Any], kwargs: dict[str, Any]) -> cf.Future[Any] | None:
    """Start ``fn`` on a helper thread, or return None when every helper thread is held
    by a call still running past its deadline (a hung disk, a stuck C call). Such a call
    fails at once: queued behind stuck ones it would never run, and the queue (each item
    holding its message) would grow with every message until memory ran out. Threads
    that are merely busy do not count: a call then waits in the queue as usual."""
    if _stuck >= HELPER_THREADS:
        return None
    return executor().submit(fn, **kwargs)


def _abandon(fut: cf.Future[Any]) -> None:
    """The caller stopped waiting for ``fut``: drop it if it has not started, else count
    its thread as stuck until it returns."""
    global _stuck
    if fut.cancel():
        return
    with _stuck_lock:
        _stuck += 1

    def returned(_: cf.Future[Any]) -> None:
        global _stuck
        with _stuck_lock:
            _stuck -= 1

    fut.add_done_callback(returned)


@dataclass(frozen=True, slots=True)
class Negotiation:
    """What to ask of the MTA, derived from the enabled plugins.

    ``skip``: stages not to send at all. ``noreply``: stages sent without waiting for a
    reply. ``actions``: the change kinds some plugin declared. ``macros``: per stage, the
    macro names the core and the plugins read. ``leading_space``: header values with their
    leading white space (exact bytes, needed to verify ``simple`` DKIM canonicalization).
    """

    skip: frozenset[str]
    noreply: frozenset[str]
    actions: frozenset[str]
    macros: Mapping[str, tuple[str, ...]]
    needs_headers: bool
    needs_body: bool
    leading_space: bool = True


@dataclass(slots=True)
class _Failure:
    kind: str  # metrics.FAILURE_KINDS: "exception", "timeout", "bad-return"
    detail: str


class Runtime:
    """One configuration generation: validated config, plugin objects, call plans.

    A reload builds a new Runtime; connections keep the one they started with, and the old
    one is shut down when its last connection closes.
    """

    def __init__(
        self,
        config: Config,
        sources: Mapping[str, object] | None = None,
        resolver: Resolver | None = None,
        dry_run: bool = False,
    ) -> None:
        """``dry_run``: plugins compute everything but change no persistent state
        (``services.dry_run``, ``ctx.dry_run``); ``milterd check`` runs dry, the daemon
        never does."""
        self.config = config
        self.dry_run = dry_run
        self.settings = config.milterd
        self.pm, self.plugins = load_plugins(config, sources)
        self.resolver: Resolver = resolver or StubResolver(config.dns)
        self.networks = self.settings.networks()
        self.plan: dict[str, list[tuple[LoadedPlugin, Any]]] = {
            stage: [(p, p.impls[stage]) for p in self.plugins if stage in p.impls]
            for stage in hookspecs.STAGES
        }
        order = {p.name: i for i, p in enumerate(finalize_order(self.plugins))}
        self.plan["finalize"].sort(key=lambda pi: order[pi[0].name])
        self.negotiation = self._negotiate()
        # Looked up once: logging.getLogger and metric .labels() take locks on every call.
        self.loggers = {p.name: log.getChild(p.name) for p in self.plugins}
        self._timers: dict[tuple[str, str], Any] = {}
        self._connections = 0
        self._retired = False
        self._lock = threading.Lock()
        self._stopping = False  # a stop() began (under _started_lock)
        self._exiting = False  # stop_all() runs: release() starts no shutdown (under _lock)
        self._stopped = threading.Event()  # ... and its plugins' shutdown returned
        self.started = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, phase: StartPhase = "all") -> None:
        """Start this generation. Raises ConfigError (naming the plugin) to refuse it.

        ``"prefork"`` (the supervisor, before the workers fork): ``startup`` of the plugins
        declaring ``prefork = True``. ``"worker"`` (each worker, after the fork, on a
        Runtime whose prefork phase ran in the parent): ``startup`` of the other plugins,
        then every plugin's ``worker_start``. ``"all"`` (one process: harness, ``milterd
        check``, a worker's reload): both, in that order.
        """
        services = Services(self.resolver, self.settings, log, self.dry_run)
        args: dict[str, object] = {"services": services}
        if phase in ("prefork", "all"):
            self.check_settings()
            self._call_lifecycle("startup", [p for p in self.plugins if p.prefork], args)
        if phase in ("worker", "all"):
            done: list[LoadedPlugin] = [p for p in self.plugins if p.prefork]
            try:
                self._call_lifecycle(
                    "startup", [p for p in self.plugins if not p.prefork], args, done
                )
                self._call_lifecycle("worker_start", self.plugins, args)
            except BaseException:  # pytest's skip() in a test plugin's start-up too
                # Unwind what this process opened so far (a refused reload must not leak
                # connections or threads): shutdown for every plugin started here.
                self._shutdown(done)
                raise
            self.started = True
            with _started_lock:
                _started.append(weakref.ref(self))
            try:
                self._ready(args)
            except BaseException:  # pytest's skip() in worker_ready: nobody else stops it
                self.stop()
                raise
            METRICS.declare(
                [(p.name, [st for st in p.impls if st in hookspecs.STAGES]) for p in self.plugins]
            )

    def check_settings(self) -> None:
        """``spool_dir`` must take a file for this process (the daemon's user, after the
        privilege drop), found at start rather than at the first large message. (The
        accounts are checked by ``config check`` and ``run`` only: ``milterd check`` and
        the harness may use a file written for another host.) Raises ConfigError."""
        d = self.settings.spool_dir
        if d is None:
            return
        try:
            tempfile.TemporaryFile(dir=d).close()
        except OSError as e:
            raise ConfigError(
                f"[milterd] spool_dir {d}: cannot create a file there: {e.strerror or e} "
                f"(it must be a directory writable by the daemon's user)"
            ) from None

    def check_startup(self, worker: bool = False) -> None:
        """After the prefork phase: the ``startup`` of the other plugins, then their
        ``shutdown``, to find what every worker would refuse before any worker gets the
        configuration. Raises ConfigError. Meant for a throwaway process or a one-off
        check. ``worker``: every plugin's ``worker_start`` too (it opens connections and
        starts threads: a throwaway process only, as the supervisor's check child), and
        then every plugin's ``shutdown``."""
        self.check_settings()
        services = Services(self.resolver, self.settings, log, self.dry_run)
        done: list[LoadedPlugin] = [p for p in self.plugins if p.prefork] if worker else []
        args: dict[str, object] = {"services": services}
        try:
            self._call_lifecycle("startup", [p for p in self.plugins if not p.prefork], args, done)
            if worker:
                self._call_lifecycle("worker_start", self.plugins, args)
        finally:
            self._shutdown(done)

    def _call_lifecycle(
        self,
        hook: str,
        plugins: list[LoadedPlugin],
        args: dict[str, object],
        done: list[LoadedPlugin] | None = None,
    ) -> None:
        for p in plugins:
            impl = p.impls.get(hook)
            if impl is None:
                if done is not None:
                    done.append(p)
                continue
            given = self._lifecycle_args(p, args)
            try:
                impl.function(**{a: given[a] for a in impl.argnames})
            except BaseException as e:
                if not contained(e):
                    raise
                from milterd.config import ConfigError

                raise ConfigError(
                    f"plugin {p.name!r}: {hook} failed: {exception_text(e)}"
                ) from e
            if done is not None:
                done.append(p)

    def _ready(self, args: dict[str, object]) -> None:
        """``worker_ready`` of every plugin: errors are logged, the generation stands."""
        for p in self.plugins:
            impl = p.impls.get("worker_ready")
            if impl is None:
                continue
            given = self._lifecycle_args(p, args)
            try:
                impl.function(**{a: given[a] for a in impl.argnames})
            except BaseException as e:
                if not contained(e):
                    raise
                log.exception("plugin %s: worker_ready failed", p.name)

    def _lifecycle_args(self, p: LoadedPlugin, args: dict[str, object]) -> dict[str, object]:
        """What a lifecycle hook of ``p`` may take: ``args``, its config, and the services
        with the plugin's own logger (as ``ctx.log``)."""
        given = {**args, "config": p.config}
        services = args.get("services")
        if isinstance(services, Services):
            given["services"] = replace(services, logger=self.loggers[p.name])
        return given

    def stop(self, wait: float = 0.0) -> None:
        """Call every plugin's ``shutdown`` (errors logged, never raised), once. A call
        that finds another thread's stop under way waits up to ``wait`` seconds for it
        (a worker's exit must not cut a shutdown a closing session began)."""
        with _started_lock:
            if not self.started:
                stopping = self._stopping
            else:
                self.started, self._stopping, stopping = False, True, False
                wait = -1.0  # this call stops it
        if wait >= 0:
            if stopping and wait > 0:
                self._stopped.wait(wait)
            return
        try:
            self._shutdown(self.plugins)
        finally:
            self._stopped.set()
            with _started_lock:  # (listed until now: stop_all waits for a stop under way)
                _started[:] = [r for r in _started if r() not in (None, self)]

    @property
    def connections(self) -> int:
        """Sessions holding this generation now."""
        with self._lock:
            return self._connections

    @staticmethod
    def _shutdown(plugins: list[LoadedPlugin]) -> None:
        for p in plugins:
            impl = p.impls.get("shutdown")
            if impl is not None:
                try:
                    impl.function()
                except BaseException as e:
                    if not contained(e):
                        raise
                    log.exception("plugin %s: shutdown failed", p.name)

    def acquire(self) -> None:
        with self._lock:
            self._connections += 1

    def release(self) -> None:
        with self._lock:
            self._connections -= 1
            # (At a worker's exit stop_all decides: a shutdown begun here would be cut.)
            done = self._retired and self._connections == 0 and not self._exiting
        if done:
            self.stop()

    def retire(self) -> None:
        """This generation was replaced: shut it down once its last connection closes."""
        with self._lock:
            self._retired = True
            done = self._connections == 0
        if done:
            self.stop()

    # --- negotiation --------------------------------------------------------------------

    def _negotiate(self) -> Negotiation:
        hooked = {s for s, plan in self.plan.items() if plan}
        readers = [
            p
            for stage in ("eom", "finalize", "outcome")
            for p, impl in self.plan[stage]
            if "message" in impl.argnames
        ]
        needs_body = "body" in hooked or any(p.reads_body for p in readers)
        needs_headers = "header" in hooked or bool(readers)
        skip = set()
        for stage in _CONTENT:
            if stage in hooked:
                continue
            if stage == "header" and needs_headers:
                continue
            if stage == "body" and needs_body:
                continue
            skip.add(stage)
        if self.settings.max_recipients:
            hooked.add("envrcpt")  # the core answers RCPT itself (452 past the limit)
        noreply = {s for s in (*_ENVELOPE, *_CONTENT) if s not in hooked and s not in skip}
        actions = (
            frozenset().union(*(p.actions for p in self.plugins)) if self.plugins else frozenset()
        )
        macros: dict[str, tuple[str, ...]] = {}
        for stage in ("connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom"):
            names = list(CORE_MACROS.get(stage, ()))
            for p in self.plugins:
                names += [m for m in p.macros.get(stage, ()) if m not in names]
            if names:
                macros[stage] = tuple(names)
        return Negotiation(
            skip=frozenset(skip),
            noreply=frozenset(noreply),
            actions=actions,
            macros=macros,
            needs_headers=needs_headers,
            needs_body=needs_body,
        )

    # --- the guarded call ---------------------------------------------------------------

    def call(
        self,
        p: LoadedPlugin,
        impl: Any,
        stage: str,
        ctx: Context,
        args: dict[str, Any],
        budget: float,
        progress: Callable[[], None] | None,
        ledger: Ledger | None,
    ) -> Verdict | None:
        """Call one plugin hook under its guard. Returns the verdict to use (the plugin's,
        or its ``on_error`` policy's), never raises."""
        timeout = min(p.settings.timeout, budget)
        # What the call records lands on the ledger its ctx records onto (``ledger`` is
        # where its time and failure go: None at outcome, where a note may still land).
        book = ctx._ledger
        mark = len(book.entries) if book is not None else 0
        kwargs = {a: args[a] for a in impl.argnames}
        t0 = time.perf_counter()
        failure: _Failure | None = None
        rv: Any = None
        if p.isolation_for(stage) == "inline":
            try:
                rv = impl.function(**kwargs)
            except BaseException as e:
                if not contained(e):
                    raise
                failure = _Failure("exception", exception_text(e))
                log.debug("plugin %s failed at %s", p.name, stage, exc_info=True)
            if failure is None and time.perf_counter() - t0 > timeout:
                failure = _Failure(
                    "timeout",
                    f"returned after {time.perf_counter() - t0:.3f}s, "
                    f"past its {timeout:g}s deadline",
                )
        elif (fut := _submit(impl.function, kwargs)) is None:
            failure = _Failure(
                "timeout", f"not started: all {HELPER_THREADS} helper threads still busy"
            )
        else:
            end = t0 + timeout
            interval = self.settings.progress_interval
            while True:
                left = end - time.perf_counter()
                try:
                    rv = fut.result(timeout=min(left, interval) if progress else left)
                    break
                except cf.TimeoutError:
                    if time.perf_counter() >= end:
                        _abandon(fut)
                        failure = _Failure("timeout", f"no answer within {timeout:g}s")
                        METRICS.abandoned.labels(p.name).inc()
                        break
                    if progress is not None:
                        progress()
                except BaseException as e:
                    if not contained(e):
                        raise
                    failure = _Failure("exception", exception_text(e))
                    log.debug("plugin %s failed at %s", p.name, stage, exc_info=True)
                    break
        elapsed = time.perf_counter() - t0
        if ledger is not None:
            ledger.timings[p.name] = ledger.timings.get(p.name, 0.0) + elapsed
        timer = self._timers.get((p.name, stage))
        if timer is None:
            timer = self._timers[(p.name, stage)] = METRICS.plugin_seconds.labels(p.name, stage)
        timer.observe(elapsed)
        if failure is None and rv is not None and not isinstance(rv, Verdict):
            failure = _Failure("bad-return", f"returned {type(rv).__name__}, not a Verdict or None")
        if failure is None:
            return rv  # type: ignore[no-any-return]
        # The call is over for us: anything it records from now on is refused, and what it
        # recorded during the call is dropped, so a failed call contributes nothing.
        with ctx._gate:
            ctx._live = False
            if book is not None:
                book.entries[mark:] = [e for e in book.entries[mark:] if e.plugin != p.name]
        if ledger is not None:
            ledger.errors.append((p.name, stage, f"{failure.kind}: {failure.detail}"))
        METRICS.plugin_errors.labels(p.name, stage, failure.kind).inc()
        qid = ctx.message.queue_id if ctx.message is not None else ""
        # At outcome the verdict is already decided: nothing to apply.
        policy = p.settings.on_error if stage != "outcome" else "continue (outcome)"
        log.error(
            "plugin %s failed at %s (queue id %s): %s: %s; on_error=%s",
            p.name,
            stage,
            qid or "-",
            failure.kind,
            failure.detail,
            policy,
        )
        if policy == "tempfail":
            return TempFail(
                "451",
                "4.3.0",
                "Temporary filter failure, try again later",
                reason=f"{p.name} {failure.kind}",
            )
        if policy == "reject":
            return Reject(
                "550",
                "5.3.0",
                "Message refused by filter policy",
                reason=f"{p.name} {failure.kind}",
            )
        return None


@dataclass(slots=True)
class _MessageState:
    info: MessageInfo
    ledger: Ledger = field(default_factory=Ledger)
    spool: Spool | None = None
    accepted: set[str] = field(default_factory=set)  # plugins that said Accept
    plugin_state: dict[str, dict[str, Any]] = field(default_factory=dict)
    over: bool = False  # an early verdict ended it
    rcpt_verdicts: list[tuple[str, str, Verdict]] = field(default_factory=list)


def _labelled(r: Result) -> str:
    """``spf=fail(smtp.mailfrom=example.org)``: which identity a result is about (an SPF
    HELO and MAIL FROM result, or two signatures, are otherwise alike in the log)."""
    if not r.properties:
        return f"{r.method}={r.result}"
    key, value = r.properties[0]
    return f"{r.method}={r.result}({key}={value[:64]})"


class Session:
    """One MTA connection: turns its events into guarded plugin calls, in order.

    Every ``on_*`` method returns None (continue) or the Verdict to answer the MTA with at
    that stage; :meth:`on_eom` returns the merged :class:`Decision`. None of them raise.
    """

    _serial = 0
    _serial_lock = threading.Lock()

    def __init__(
        self,
        runtime: Runtime,
        progress: Callable[[], None] | None = None,
        capture: bool = False,
        acquired: bool = False,
    ) -> None:
        """``capture``: keep the last message as it would be delivered in ``delivered``
        (the harness and ``milterd check --output``; the daemon never does).
        ``acquired``: the caller already counted this connection on ``runtime``
        (:meth:`Runtime.acquire`, done where the runtime was chosen, so that a reload
        between the two cannot stop it first)."""
        self.rt = runtime
        self.progress = progress
        self.capture = capture
        self.delivered: bytes | None = None
        with Session._serial_lock:
            Session._serial += 1
            serial = Session._serial
        self.conn = ConnectionInfo(id=serial)
        self.msg: _MessageState | None = None
        self.conn_state: dict[str, dict[str, Any]] = {p.name: {} for p in runtime.plugins}
        self.conn_accepted: set[str] = set()
        # A Discard at CONNECT or HELO, (plugin, stage, verdict): the MTAs take DISCARD
        # only for a message (Postfix ignores it there, with a warning), so every message
        # of the session is discarded at its MAIL FROM instead.
        self.conn_discard: tuple[str, str, Verdict] | None = None
        self._decider = ""  # the plugin whose verdict _run returned last
        # Macros the MTA sent for the current transaction (MAIL to EOM): dropped from
        # ctx.connection.macros at the next MAIL, so that none of them (the queue id
        # above all) stands in for the next message's until the MTA sends that.
        self.txn_macros: set[str] = set()
        self.closed = False
        self.last_ledger = Ledger()  # the ledger of the last message that ended
        if not acquired:
            runtime.acquire()
        METRICS.connections.inc()

    # --- plumbing -----------------------------------------------------------------------

    def _ctx(self, p: LoadedPlugin, stage: str, deadline: float) -> Context:
        m = self.msg
        return Context(
            p.name,
            stage,
            p.config,
            self.rt.loggers[p.name],
            self.conn,
            m.info if m is not None else None,
            m.ledger if m is not None else None,
            self.rt.resolver,
            self.conn_state[p.name],
            m.plugin_state.setdefault(p.name, {}) if m is not None else None,
            deadline,
            p.actions,
            self.rt.dry_run,
        )

    def _run(
        self, stage: str, args: dict[str, Any], budget: float, all_plugins: bool = False
    ) -> Verdict | None:
        """Call every plugin hooking ``stage``. Returns the strongest verdict, stopping at
        the first that ends the stage unless ``all_plugins``. At ``abort`` and ``close``
        every plugin is called whatever the others did (a failure, a verdict, a
        timeout), while the stage's budget lasts: they are for releasing what a plugin
        holds."""
        m = self.msg
        accepted = m.accepted if m is not None else self.conn_accepted
        strongest: Verdict | None = None
        end = time.monotonic() + budget
        progress = self.progress if stage in ("eom", "finalize") else None
        releasing = stage in ("abort", "close")
        all_plugins = all_plugins or releasing
        for p, impl in self.rt.plan[stage]:
            # Accept means "done with this message (or connection)"; abort and close are
            # for releasing what the plugin holds, so they are always called.
            if p.name in accepted and not releasing:
                continue
            left = end - time.monotonic()
            if left <= 0:
                log.error(
                    "stage %s out of time before plugin %s (queue id %s)",
                    stage,
                    p.name,
                    m.info.queue_id if m else "-",
                )
                late = TempFail(
                    "451",
                    "4.3.0",
                    "Temporary filter failure, try again later",
                    reason=f"{stage} deadline",
                )
                if m is not None and stage not in ("envrcpt", "abort", "close"):
                    # On the ledger, so that end of message (which merges the ledger)
                    # tempfails instead of delivering what plugins never saw.
                    m.ledger.entries.append(Entry(CORE, stage, late))
                return late
            ctx = self._ctx(p, stage, time.monotonic() + min(left, p.settings.timeout))
            args["ctx"] = ctx
            v = self.rt.call(
                p, impl, stage, ctx, args, left, progress, m.ledger if m is not None else None
            )
            if v is None:
                continue
            # At RCPT a verdict concerns that recipient only, but for Discard (the MTAs
            # discard the whole message) and Quarantine (only a message can be held).
            if m is not None and (stage != "envrcpt" or isinstance(v, Discard | Quarantine)):
                m.ledger.entries.append(Entry(p.name, stage, v))
            if isinstance(v, Accept) and stage != "envrcpt":  # at RCPT: this recipient only
                accepted.add(p.name)
            if strongest is None or v.severity > strongest.severity:
                strongest = v
                self._decider = p.name
            if v.ends_stage and not all_plugins:
                break
        return strongest

    @staticmethod
    def _for_mta(v: Verdict | None) -> Verdict | None:
        """Only verdicts that end something go to the MTA before end of message."""
        return v if v is not None and v.ends_stage else None

    # --- connection stages ----------------------------------------------------------------

    def on_connect(
        self, hostname: str, client: ev.Client, macros: dict[str, str]
    ) -> Verdict | None:
        self.conn.client = client
        self.conn.macros.update(macros)
        self.conn.internal = trusted_network(client.address, self.rt.networks)
        return self._session_verdict(
            self._run(
                "connect", {"event": ev.Connect(client, macros)}, self.rt.settings.command_timeout
            ),
            "connect",
        )

    def on_helo(self, name: str, macros: dict[str, str]) -> Verdict | None:
        self.conn.helo = name
        self.conn.macros.update(macros)
        return self._session_verdict(
            self._run("helo", {"event": ev.Helo(name, macros)}, self.rt.settings.command_timeout),
            "helo",
        )

    def _session_verdict(self, v: Verdict | None, stage: str) -> Verdict | None:
        """What the MTA gets at CONNECT or HELO. A Discard is kept for every message of
        the session (see ``conn_discard``) and not sent."""
        if isinstance(v, Discard):
            if self.conn_discard is None:
                self.conn_discard = (self._decider, stage, v)
            return None
        return self._for_mta(v)

    def on_envfrom(
        self, sender: str, params: dict[str, str | None], macros: dict[str, str]
    ) -> Verdict | None:
        self._end_message("abort")  # a new MAIL FROM without EOM/abort: drop the old one
        # Postfix sends the queue id (i) at MAIL only when the queue file already exists
        # (otherwise from RCPT on): the previous message's must not stand in for it. The
        # session-wide ones the MTAs send at every MAIL ({auth_authen}) come back here.
        for name in self.txn_macros:
            self.conn.macros.pop(name, None)
        self.txn_macros = set(macros)
        self.conn.macros.update(macros)
        self.delivered = None  # (capture) the previous message's copy is not this one's
        info = MessageInfo(
            sender=sender,
            sender_params=params,
            queue_id=macros.get("i", ""),
        )
        self.msg = _MessageState(info)
        if self.rt.negotiation.needs_body or self.capture:
            self.msg.spool = Spool(self.rt.settings.spool_memory, self.rt.settings.spool_dir)
        if self.conn_discard is not None:  # decided at CONNECT/HELO: no plugin sees it
            who, stage, discard = self.conn_discard
            self.msg.ledger.entries.append(Entry(who, stage, discard))
            return self._early(discard, "envfrom")
        v = self._run(
            "envfrom",
            {"event": ev.EnvFrom(sender, params, macros)},
            self.rt.settings.command_timeout,
        )
        return self._early(v, "envfrom")

    def on_envrcpt(
        self, recipient: str, params: dict[str, str | None], macros: dict[str, str]
    ) -> Verdict | None:
        m = self.msg
        if m is None:
            return None
        self.conn.macros.update(macros)
        self.txn_macros.update(macros)
        if not m.info.queue_id and macros.get("i"):
            m.info.queue_id = macros["i"]
        if m.over:  # decided at a stage without reply (MAIL): end of message answers
            return None
        limit = self.rt.settings.max_recipients
        if limit and len(m.info.recipients) >= limit:
            v: Verdict | None = TempFail(
                "452", "4.5.3", "Too many recipients", reason="max_recipients"
            )
            m.rcpt_verdicts.append((CORE, recipient, v))  # type: ignore[arg-type]
            return v
        recorded = len(m.ledger.entries)
        v = self._run(
            "envrcpt",
            {"event": ev.EnvRcpt(recipient, params, macros)},
            self.rt.settings.command_timeout,
        )
        if isinstance(v, Discard):  # SMFIS_DISCARD at RCPT: the MTAs drop the message
            m.info.recipients.append(Recipient(recipient, params))
            return self._early(v, "envrcpt")
        if v is not None and v.ends_stage:
            m.rcpt_verdicts.append(("", recipient, v))
            del m.ledger.entries[recorded:]  # what was recorded for a recipient refused
            return v
        m.info.recipients.append(Recipient(recipient, params))
        return None

    def on_data(self, macros: dict[str, str]) -> Verdict | None:
        if self.msg is None or self.msg.over:
            return None
        self.conn.macros.update(macros)
        self.txn_macros.update(macros)
        if not self.msg.info.queue_id and macros.get("i"):
            self.msg.info.queue_id = macros["i"]
        return self._early(
            self._run("data", {"event": ev.Data(macros)}, self.rt.settings.command_timeout), "data"
        )

    def on_header(self, name: str, raw: bytes) -> Verdict | None:
        m = self.msg
        if m is None or m.over:
            return None
        info = m.info
        value = raw.decode("utf-8", "surrogateescape")
        if value[:1] == " ":
            value = value[1:]
        header = ev.Header(name, value, raw)
        info.headers.append(header)
        if not self.rt.negotiation.needs_headers:
            # The daemon never gets here (the MTA was told to skip the header fields);
            # the harness feeds them anyway: kept for its `delivered` copy only, not
            # counted against the limits (as on_body does with the body).
            return None
        info.header_bytes += len(name) + len(raw) + 3
        s = self.rt.settings
        if len(info.headers) > s.max_headers or info.header_bytes > s.max_header_bytes:
            which = "max_headers" if len(info.headers) > s.max_headers else "max_header_bytes"
            v = Reject("552", "5.3.4", "Message header too large", reason=which)
            m.ledger.entries.append(Entry(CORE, "header", v))
            return self._early(v, "header")
        if not self.rt.plan["header"]:
            return None
        return self._early(self._run("header", {"event": header}, s.command_timeout), "header")

    def on_eoh(self, macros: dict[str, str]) -> Verdict | None:
        if self.msg is None or self.msg.over:
            return None
        self.conn.macros.update(macros)
        self.txn_macros.update(macros)
        if not self.msg.info.queue_id and macros.get("i"):
            self.msg.info.queue_id = macros["i"]
        return self._early(
            self._run("eoh", {"event": ev.Eoh(macros)}, self.rt.settings.command_timeout), "eoh"
        )

    def on_body(self, chunk: bytes) -> Verdict | None:
        m = self.msg
        if m is None or m.over:
            return None
        if not self.rt.negotiation.needs_body:
            # The daemon never gets here (the MTA was told to skip the body); the harness
            # feeds it anyway: kept for its `delivered` copy only, not counted or seen.
            if m.spool is not None:
                m.spool.write(chunk)
            return None
        m.info.body_size += len(chunk)
        if m.info.body_size + m.info.header_bytes > self.rt.settings.max_message_size:
            v = Reject("552", "5.3.4", "Message too big", reason="max_message_size")
            m.ledger.entries.append(Entry(CORE, "body", v))
            return self._early(v, "body")
        if m.spool is not None:
            try:
                m.spool.write(chunk)
            except OSError as e:  # spool_dir gone, full or not writable: 451, not a hang
                log.error("spool write failed (queue id %s): %s", m.info.queue_id or "-", e)
                failed = TempFail("451", "4.3.0", "Temporary filter failure, try again later",
                                  reason="spool write failed")  # fmt: skip
                m.ledger.entries.append(Entry(CORE, "body", failed))
                return self._early(failed, "body")
        if not self.rt.plan["body"]:
            return None
        return self._early(
            self._run("body", {"event": ev.Body(chunk)}, self.rt.settings.command_timeout), "body"
        )

    def _early(self, v: Verdict | None, stage: str) -> Verdict | None:
        """A verdict before end of message: if it ends the message, log it and end it.

        At a stage negotiated without reply (only the core's limits can decide there) the
        MTA is not waiting for an answer: the message stops being processed and the verdict,
        already on the ledger, is given at end of message instead.
        """
        v = self._for_mta(v)
        if v is not None and self.msg is not None:
            self.msg.over = True
            if stage in self.rt.negotiation.noreply:
                return None
            decision = merge(self.msg.ledger.entries)
            self._summary(decision, stage)
            # The message ends here: every plugin hears so (abort), as when the MTA abandons
            # it, so that per-message resources are released. The MTA's own abort that
            # follows finds no message and calls nobody twice.
            self._end_message("abort")
        return v

    # --- end of message -----------------------------------------------------------------

    def on_eom(self, macros: dict[str, str]) -> Decision:
        """Run eom for every plugin, merge, run finalize on the message as delivered, merge
        again. Returns the Decision the bridge applies."""
        m = self.msg
        if m is None:
            return Decision(None)
        self.conn.macros.update(macros)
        self.txn_macros.update(macros)
        if not m.info.queue_id and macros.get("i"):
            m.info.queue_id = macros["i"]
        # The body plugins see: none unless negotiated, as in the daemon, where the MTA
        # does not send it then (the harness's capture keeps a copy for `delivered`).
        spool = m.spool if self.rt.negotiation.needs_body else None
        message = Message(m.info.headers, spool)
        budget = self.rt.settings.eom_timeout
        end = time.monotonic() + budget
        if not m.over:  # over: a limit already decided, see _early
            self._run(
                "eom", {"event": ev.Eom(macros), "message": message}, budget, all_plugins=True
            )
        else:  # the plugins saw the message end there: abort in place of eom
            self._abort(m)
        headers = m.info.headers if self.rt.negotiation.needs_headers else None
        decision = merge(m.ledger.entries, headers)
        if decision.delivers and self.rt.plan["finalize"]:
            for p, impl in self.rt.plan["finalize"]:
                if p.name in m.accepted:  # Accept: done with this message
                    continue
                left = end - time.monotonic()
                if left <= 0:  # a signer or the archive not run: not delivered without them
                    log.error("stage finalize out of time before plugin %s (queue id %s)",
                              p.name, m.info.queue_id or "-")  # fmt: skip
                    m.ledger.entries.append(Entry(CORE, "finalize", TempFail(
                        "451", "4.3.0", "Temporary filter failure, try again later",
                        reason="finalize deadline")))  # fmt: skip
                    decision = merge(m.ledger.entries, headers)
                    break
                delivered_headers, body = render(m.info.headers, decision.ops)
                delivered = Message(delivered_headers, spool, body)
                ctx = self._ctx(p, "finalize", time.monotonic() + min(left, p.settings.timeout))
                ctx.verdict = decision.verdict
                v = self.rt.call(
                    p,
                    impl,
                    "finalize",
                    ctx,
                    {"ctx": ctx, "message": delivered},
                    left,
                    self.progress,
                    m.ledger,
                )
                if v is not None:
                    m.ledger.entries.append(Entry(p.name, "finalize", v))
                decision = merge(m.ledger.entries, headers)
                if not decision.delivers:
                    break
        if self.capture or self.rt.plan["outcome"]:
            delivered_headers, body = render(m.info.headers, decision.ops)
            final = Message(delivered_headers, spool, body) if decision.delivers else message
            if self.capture:
                self.delivered = (
                    Message(delivered_headers, m.spool, body).as_bytes()
                    if decision.delivers
                    else None
                )
            if not m.over:  # over: the plugins had abort, which ends a message for them
                self._observe(decision, final)
        self._summary(decision, "eom")
        self._end_message(None)
        return decision

    def _observe(self, decision: Decision, message: Message) -> None:
        """The ``outcome`` stage: observers only; failures are logged, never applied."""
        budget = self.rt.settings.eom_timeout
        for p, impl in self.rt.plan["outcome"]:
            ctx = self._ctx(p, "outcome", time.monotonic() + p.settings.timeout)
            ctx.verdict = decision.verdict
            args = {"ctx": ctx, "verdict": decision.verdict, "message": message}
            self.rt.call(p, impl, "outcome", ctx, args, budget, self.progress, None)

    def on_abort(self) -> None:
        self._end_message("abort")

    def drop(self) -> None:
        """End a session no plugin saw (refused before CONNECT): no ``close`` hook."""
        if not self.closed:
            self.closed = True
            METRICS.connections.dec()
            self.rt.release()

    def on_close(self) -> None:
        if self.closed:
            return
        self._end_message("abort")
        self._run("close", {"event": ev.Close()}, self.rt.settings.command_timeout)
        self.closed = True
        METRICS.connections.dec()
        self.rt.release()

    def _abort(self, m: _MessageState) -> None:
        """Every plugin's ``abort``. What it returns (or its ``on_error`` verdict) is
        ignored, as the hookspec says: the message's verdict is already decided."""
        mark = len(m.ledger.entries)
        self._run("abort", {"event": ev.Abort()}, self.rt.settings.command_timeout)
        del m.ledger.entries[mark:]

    def core_failure(self, stage: str) -> None:
        """A core error at ``stage`` of the current message that could not be answered
        there (sent without reply): the message ends now for the plugins, and end of
        message answers 451 for it, with the usual summary line."""
        m = self.msg
        if m is None or m.over:
            return
        m.ledger.entries.append(Entry(CORE, stage, TempFail(
            "451", "4.3.0", "Temporary filter failure, try again later",
            reason=f"core error at {stage}")))  # fmt: skip
        m.over = True

    def _end_message(self, event: str | None) -> None:
        m = self.msg
        if m is None:
            return
        if event == "abort":
            self._abort(m)
        if m.spool is not None:
            m.spool.close()
        self.last_ledger = m.ledger
        self.msg = None

    # --- observability ------------------------------------------------------------------

    def _summary(self, decision: Decision, stage: str) -> None:
        m = self.msg
        if m is None:
            return
        METRICS.message(decision.word)
        if decision.plugin and decision.word != "continue":
            METRICS.decided(decision.plugin, decision.word)
        results: list[Result] = []
        notes: list[str] = []
        scores: list[float] = []
        for e in m.ledger.entries:  # one pass for what Ledger's properties each scan for
            v = e.value
            if isinstance(v, Result):
                results.append(v)
                METRICS.result(v.method, v.result)
            elif isinstance(v, Symbol):
                scores.append(v.score)
            elif isinstance(v, Note):
                notes.append(f"{e.plugin}: {v.text}")
        if not log.isEnabledFor(logging.INFO):
            return
        score = round(sum(scores), 3)  # exactly Ledger.score (sum() is not a += loop)
        info = m.info
        labelled = [_labelled(r) for r in results]
        timings = dict(m.ledger.timings)  # as now: abort hooks may add to it after the line
        errors = [f"{p}@{s}: {d}" for p, s, d in m.ledger.errors]
        reasons = "; ".join(
            f"{p}: {v.word}" + (f" ({v.reason})" if v.reason else "") for p, v in decision.reasons
        )
        client = self.conn.client
        helo = self.conn.helo
        rejected = ", ".join(f"{r}={v.word}" for _, r, v in m.rcpt_verdicts)

        def fields() -> dict[str, object]:
            return {
                "queue_id": info.queue_id,
                "client": client.ip if client else "",
                "client_name": client.hostname if client else "",
                "helo": helo,
                "sender": info.sender,
                "recipients": [r.address for r in info.recipients],
                "verdict": decision.word,
                "decided_by": decision.plugin,
                "stage": stage,
                "score": score,
                "results": labelled,
                "plugin_ms": {k: round(v * 1000, 2) for k, v in timings.items()},
                "errors": errors,
                "conflicts": decision.conflicts,
                "size": info.body_size + info.header_bytes,
                "notes": notes,
            }

        log.info(
            "%s: client=%s[%s] from=<%s> to=%s%s verdict=%s%s score=%g results=[%s]%s time=[%s]%s",
            info.queue_id or "NOQUEUE",
            client.hostname if client else "",
            client.ip if client else "",
            info.sender,
            ",".join(f"<{r.address}>" for r in info.recipients),
            f" refused=[{rejected}]" if rejected else "",
            decision.word,
            f" ({reasons})" if reasons else "",
            score,
            ", ".join(labelled),
            f" notes=[{'; '.join(notes)}]" if notes else "",
            " ".join(f"{k}={v * 1000:.1f}ms" for k, v in timings.items()),
            f" errors={errors}" if errors else "",
            # the JSON format's keys, built only if a formatter reads them (text never does)
            extra={"summary": LazyFields(fields)},
        )


def trusted_network(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> bool:
    return addr is not None and any(addr in n for n in networks if n.version == addr.version)


def stop_all(wait: float = 8.0) -> list[Runtime]:
    """A worker's exit: shut down every generation this process started that no session
    holds, oldest first, waiting (up to ``wait`` seconds for waits) for a shutdown
    another thread began (the last session of a generation closing just now). Returns
    the generations left alone: a session the drain cut may still be running their
    hooks, and shutting their plugins down under it would let it run on closed stores
    (the exit ends it, and the MTA applies its default action, as before)."""
    deadline = time.monotonic() + wait
    with _started_lock:
        live = [rt for r in _started if (rt := r()) is not None]
    for rt in live:  # from now on a session closing starts no shutdown the exit would cut
        with rt._lock:
            rt._exiting = True
    busy = []
    for rt in live:
        if rt.connections and not rt._stopping:
            busy.append(rt)
        else:
            rt.stop(wait=max(0.0, deadline - time.monotonic()))
    left = []
    for rt in busy:  # a session that closed meanwhile: its generation is idle now
        if rt.connections:
            left.append(rt)
        else:
            rt.stop(wait=max(0.0, deadline - time.monotonic()))
    return left
