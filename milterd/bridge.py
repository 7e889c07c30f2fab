"""The bridge to libmilter: the only module that imports pymilter (``Milter``, ``milter``).

It turns each libmilter callback into a :class:`~milterd.pipeline.Session` call, negotiates
the protocol from the enabled plugins, and applies the merged :class:`Decision` once at end
of message. Nothing a plugin or the core does can raise into libmilter: every callback is
wrapped, and an unexpected core error tempfails the message (451 4.3.0) instead of
delivering it unfiltered.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import Milter
import milter

from milterd.actions import Discard, Reject, TempFail, Verdict
from milterd.config import Settings, parse_socket
from milterd.events import Client, parse_address
from milterd.merge import Decision, Op
from milterd.pipeline import Negotiation, Runtime, Session

__all__ = ["drain", "open_connections", "open_socket", "protocol_flags", "run", "set_runtime"]

log = logging.getLogger("milterd")

# libmilter's reply codes, typed (pymilter exports them untyped).
CONTINUE: int = int(Milter.CONTINUE)
NOREPLY: int = int(Milter.NOREPLY)
REJECT: int = int(Milter.REJECT)
TEMPFAIL: int = int(Milter.TEMPFAIL)
DISCARD: int = int(Milter.DISCARD)
ACCEPT: int = int(Milter.ACCEPT)
SKIP: int = int(Milter.SKIP)
Callback = Callable[..., int]

# stage -> (flag to skip it entirely, flag to send it without waiting for a reply)
STAGE_FLAGS: dict[str, tuple[int, int]] = {
    "connect": (Milter.P_NOCONNECT, Milter.P_NR_CONN),
    "helo": (Milter.P_NOHELO, Milter.P_NR_HELO),
    "envfrom": (Milter.P_NOMAIL, Milter.P_NR_MAIL),
    "envrcpt": (Milter.P_NORCPT, Milter.P_NR_RCPT),
    "data": (Milter.P_NODATA, Milter.P_NR_DATA),
    "header": (Milter.P_NOHDRS, Milter.P_NR_HDR),
    "eoh": (Milter.P_NOEOH, Milter.P_NR_EOH),
    "body": (Milter.P_NOBODY, Milter.P_NR_BODY),
}
ACTION_FLAGS: dict[str, int] = {
    "add_header": Milter.ADDHDRS,
    "change_header": Milter.CHGHDRS | Milter.ADDHDRS,
    "add_recipient": Milter.ADDRCPT | Milter.ADDRCPT_PAR,
    "delete_recipient": Milter.DELRCPT,
    "change_sender": Milter.CHGFROM,
    "replace_body": Milter.MODBODY,
    "quarantine": Milter.QUARANTINE,
}
MACRO_STAGES: dict[str, int] = {
    "connect": Milter.M_CONNECT,
    "helo": Milter.M_HELO,
    "envfrom": Milter.M_ENVFROM,
    "envrcpt": Milter.M_ENVRCPT,
    "data": Milter.M_DATA,
    "eoh": Milter.M_EOH,
    "eom": Milter.M_EOM,
}

_runtime: Runtime | None = None
_flags: tuple[int, int] = (0, 0)  # (actions, protocol) for _runtime, before the MTA's offer
# smfi_setsymlist's arguments for _runtime: (stage code, "names"), made once a generation
_symlists: tuple[tuple[int, str], ...] = ()
_runtime_lock = threading.Lock()
_open = 0  # connections being served (refused ones not counted)
_open_cond = threading.Condition()
_draining = False
_reply_data = False  # TCP socket: see protocol_flags


def set_runtime(rt: Runtime) -> Runtime | None:
    """Make ``rt`` the generation new connections get. Returns the previous one."""
    global _runtime, _flags, _symlists
    flags = protocol_flags(rt.negotiation, 0x1FFFFF, _reply_data)  # once per generation
    symlists = tuple(
        (MACRO_STAGES[stage], " ".join(names)) for stage, names in rt.negotiation.macros.items()
    )
    with _runtime_lock:
        old, _runtime, _flags, _symlists = _runtime, rt, flags, symlists
    return old


def current_runtime() -> Runtime | None:
    return _runtime


def open_connections() -> int:
    return _open


def begin_drain() -> None:
    """Stop taking new sessions: from now on a new connection is answered 451 at CONNECT.

    libmilter cannot do this itself: after smfi_stop it stops serving open sessions too
    (measured: the session in progress never gets its next reply). So the worker drains
    first, with new connections refused, and calls :func:`stop` once nothing is open.
    """
    global _draining
    _draining = True


def drain(timeout: float) -> bool:
    """Wait until no connection is open, at most ``timeout`` seconds. True if drained."""
    with _open_cond:
        return _open_cond.wait_for(lambda: _open == 0, timeout)


def protocol_flags(
    n: Negotiation, offered: int = 0x1FFFFF, reply_data: bool = False
) -> tuple[int, int]:
    """(actions, protocol) bits to answer the MTA's offer with, from a Negotiation.

    Quarantine is always requested: it is a verdict any plugin may return, not a change.
    ``reply_data`` asks for DATA with a reply even when no plugin needs it: on TCP, Postfix
    leaves Nagle on, and its end-of-message write otherwise waits ~40 ms behind our
    delayed ACK of the envelope it sent without waiting (measured in bench/RESULTS.md);
    one cheap round trip at DATA acknowledges it.
    """
    actions = Milter.QUARANTINE
    for a in n.actions:
        actions |= ACTION_FLAGS[a]
    if n.macros:
        actions |= Milter.SETSYMLIST
    proto = Milter.P_NOUNKNOWN | Milter.P_NR_UNKN
    for stage, (no, nr) in STAGE_FLAGS.items():
        if stage == "data" and reply_data:
            continue
        if stage in n.skip:
            proto |= no
        elif stage in n.noreply:
            proto |= nr
    if n.leading_space:
        proto |= Milter.P_HDR_LEADSPC
    if n.needs_body or "body" not in n.skip:
        proto |= Milter.P_SKIP
    return actions, proto & offered


def _params(args: tuple[bytes, ...]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for a in args:
        s = a.decode("utf-8", "surrogateescape")
        k, eq, v = s.partition("=")
        out[k.upper()] = v if eq else None
    return out


def _addr(b: bytes) -> str:
    s = b.decode("utf-8", "surrogateescape").strip()
    if s.startswith("<") and s.endswith(">"):
        s = s[1:-1]
    return s


class _Conn:
    """libmilter's private data for one connection."""

    __slots__ = (
        "actions", "ctx", "failed", "failed_conn", "leadspc", "macros", "proto", "refuse",
        "rt", "session",
    )  # fmt: skip

    def __init__(self, ctx: Any, rt: Runtime, refuse: bool = False, acquired: bool = False) -> None:
        self.ctx = ctx
        self.rt = rt
        self.refuse = refuse
        try:
            self.session = Session(rt, progress=ctx.progress, acquired=acquired)
        except BaseException:
            if acquired:
                rt.release()
            raise
        self.macros = rt.negotiation.macros
        self.actions = 0
        self.proto = 0
        self.leadspc = False
        # A core error at a stage sent without reply (its name): end of message tempfails
        # (for the message; failed_conn: at connect/helo, for every message of the session)
        self.failed = ""
        self.failed_conn = ""

    def symvals(self, stage: str) -> dict[str, str]:
        out = {}
        for name in self.macros.get(stage, ()):
            v = self.ctx.getsymval(name)
            if v is not None:
                out[name] = v
        return out

    def answer(self, v: Verdict | None, stage: str) -> int:
        if v is None:
            nr = STAGE_FLAGS.get(stage, (0, 0))[1]
            return NOREPLY if self.proto & nr else CONTINUE
        if isinstance(v, Reject | TempFail):
            try:
                self.ctx.setreply(v.code, v.xcode, v.text.replace("%", "%%"))
            except Exception:
                log.warning("MTA refused reply text %r", v.text)
            return REJECT if isinstance(v, Reject) else TEMPFAIL
        if isinstance(v, Discard):
            return DISCARD
        return CONTINUE

    def value(self, text: str | None) -> str | None:
        """A header value as libmilter wants it: folded with bare LF (the MTA writes the
        line ends; CRLF here becomes CR CR LF on the wire), with its leading space when
        HDR_LEADSPC was negotiated."""
        if text is None:
            return None
        text = text.replace("\r\n", "\n")
        if not self.leadspc or text[:1] in (" ", "\t"):
            return text
        return " " + text

    def apply(self, decision: Decision) -> int:
        """Apply the merged decision: one pass over the operations, then the verdict."""
        v = decision.verdict
        if not decision.delivers:
            return self.answer(v, "eom")
        op: Op | None = None
        try:
            for op in decision.ops:
                k = op.kind
                if k == "chgheader":
                    self.ctx.chgheader(op.name, op.index, self.value(op.value))
                elif k == "insheader":
                    self.ctx.addheader(op.name, self.value(op.value), op.index)
                elif k == "addheader":
                    self.ctx.addheader(op.name, self.value(op.value), BOTTOM)
                elif k == "addrcpt":
                    self.ctx.addrcpt(_bracket(op.address), " ".join(op.params) or None)
                elif k == "delrcpt":
                    self.ctx.delrcpt(_bracket(op.address))
                elif k == "chgfrom":
                    self.ctx.chgfrom(_bracket(op.address), " ".join(op.params) or None)
                elif k == "replbody":
                    body = op.body or b""
                    for i in range(0, max(len(body), 1), 65536):
                        self.ctx.replacebody(body[i : i + 65536])
                elif k == "quarantine":
                    self.ctx.quarantine(op.value or "quarantined")
        except Exception as e:
            # A change we cannot apply means the message would be delivered other than
            # decided: tempfail rather than deliver it half-filtered.
            log.error(
                "applying %s from plugin %s failed: %s; tempfailing",
                op.kind if op else "?",
                op.plugin if op else "?",
                e,
            )
            self.ctx.setreply("451", "4.3.0", "Temporary filter failure, try again later")
            return TEMPFAIL
        return ACCEPT


# AddHeader goes to the bottom as an insert past the last field (smfi_insheader with an
# index beyond the header count appends), not smfi_addheader: sendmail puts an added
# field next to an existing one of the same name (above it, repeated adds reversed), so
# the delivered order would differ from the core's model and from Postfix's.
BOTTOM = 0x7FFFFFFF


def _bracket(a: str) -> str:
    return a if a.startswith("<") else f"<{a}>"


def _guard(stage: str) -> Callable[[Callback], Callback]:
    """Wrap a callback: a core bug tempfails the message, never reaches libmilter."""

    def deco(fn: Callback) -> Callback:
        def wrapper(ctx: Any, *args: Any) -> int:
            try:
                if stage in ("eom", "envfrom"):
                    c: _Conn | None = ctx.getpriv()
                    if c is not None and stage == "envfrom":
                        c.failed = c.failed_conn  # a new message
                    elif c is not None and c.failed:
                        # The message (or the connection) had a core error at a stage sent
                        # without reply: end it for the plugins and answer 451 here, with
                        # the usual summary line. A connection-wide one fails every message.
                        failed, c.failed = c.failed, c.failed_conn
                        if c.session.msg is None:  # (it failed before the message began)
                            raise RuntimeError(f"core error at {failed} (logged above)")
                        c.session.core_failure(failed)
                return fn(ctx, *args)
            except BaseException:  # on libmilter's thread: nothing may reach pymilter
                log.exception("internal error at %s; tempfailing", stage)
                # (The connection looked up here, not before every call: header and body
                # callbacks come many times a message.)
                c = None
                with contextlib.suppress(Exception):
                    c = ctx.getpriv()
                if c is not None and c.proto & STAGE_FLAGS.get(stage, (0, 0))[1]:
                    # Sent without reply: the MTA reads none now, so end of message
                    # answers for it (a reply here would be out of step with the MTA).
                    c.failed = stage
                    if stage in ("connect", "helo"):  # the session is half set up
                        c.failed_conn = stage
                    return NOREPLY
                with contextlib.suppress(Exception):
                    ctx.setreply("451", "4.3.0", "Temporary filter failure, try again later")
                return TEMPFAIL

        wrapper.__name__ = fn.__name__
        return wrapper

    return deco


@_guard("negotiate")
def _negotiate(ctx: Any, opts: list[int]) -> int:
    global _open
    with _runtime_lock:
        rt, (actions, proto), symlists = _runtime, _flags, _symlists
        # Counted while it is still the current generation: a reload that replaces and
        # retires it after this cannot shut it down under this connection.
        if rt is not None:
            rt.acquire()
    if rt is None:
        return TEMPFAIL
    conn = _Conn(ctx, rt, refuse=_draining, acquired=True)
    if conn.refuse:
        # Refused at CONNECT (draining): it holds no generation, no plugin hears of it,
        # and the worker's exit need not wait for the MTA to hang up.
        conn.session.drop()
    ctx.setpriv(conn)
    offered_actions, offered_proto = opts[0], opts[1]
    proto &= offered_proto
    if conn.refuse:
        # Ask for CONNECT with a reply so that the refusal reaches the MTA at once.
        proto &= ~(Milter.P_NOCONNECT | Milter.P_NR_CONN)
    else:
        with _open_cond:
            _open += 1
    conn.actions = actions & offered_actions
    conn.proto = proto
    conn.leadspc = bool(proto & Milter.P_HDR_LEADSPC)
    if conn.actions & Milter.SETSYMLIST:
        for code, names in symlists:
            ctx.setsymlist(code, names)
    opts[0], opts[1], opts[2], opts[3] = conn.actions, proto, 0, 0
    return CONTINUE


def _client(hostname: str, family: int, hostaddr: Any) -> Client:
    # No PTR name: the MTA sends the address in brackets; sendmail writes IPv6 as
    # "[IPv6:0:0:0:0:0:0:0:1]". Keep one canonical form, "[::1]".
    if hostname.startswith("[") and (bracketed := parse_address(hostname)) is not None:
        hostname = f"[{bracketed}]"
    if family == socket.AF_INET and isinstance(hostaddr, tuple):
        return Client(hostname, "inet", parse_address(hostaddr[0]), int(hostaddr[1]))
    if family == socket.AF_INET6 and isinstance(hostaddr, tuple):
        return Client(hostname, "inet6", parse_address(hostaddr[0]), int(hostaddr[1]))
    if family == socket.AF_UNIX:
        return Client(hostname, "unix", None, None, str(hostaddr) if hostaddr else None)
    return Client(hostname, "unknown", parse_address(hostname) if hostname else None)


@_guard("connect")
def _connect(ctx: Any, hostname: str, family: int, hostaddr: Any) -> int:
    c: _Conn = ctx.getpriv()
    if c.refuse:
        ctx.setreply("451", "4.3.2", "Filter shutting down, try again later")
        return TEMPFAIL
    client = _client(hostname or "", family, hostaddr)
    return c.answer(c.session.on_connect(hostname, client, c.symvals("connect")), "connect")


@_guard("helo")
def _helo(ctx: Any, name: Any) -> int:
    c: _Conn = ctx.getpriv()
    text = name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)
    return c.answer(c.session.on_helo(text, c.symvals("helo")), "helo")


@_guard("envfrom")
def _envfrom(ctx: Any, sender: bytes, *params: bytes) -> int:
    c: _Conn = ctx.getpriv()
    v = c.session.on_envfrom(_addr(sender), _params(params), c.symvals("envfrom"))
    return c.answer(v, "envfrom")


@_guard("envrcpt")
def _envrcpt(ctx: Any, rcpt: bytes, *params: bytes) -> int:
    c: _Conn = ctx.getpriv()
    v = c.session.on_envrcpt(_addr(rcpt), _params(params), c.symvals("envrcpt"))
    return c.answer(v, "envrcpt")


@_guard("data")
def _data(ctx: Any) -> int:
    c: _Conn = ctx.getpriv()
    return c.answer(c.session.on_data(c.symvals("data")), "data")


@_guard("header")
def _header(ctx: Any, name: Any, value: bytes) -> int:
    c: _Conn = ctx.getpriv()
    n = name.decode("ascii", "surrogateescape") if isinstance(name, bytes) else str(name)
    raw = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
    if not c.leadspc:
        raw = b" " + raw
    return c.answer(c.session.on_header(n, raw), "header")


@_guard("eoh")
def _eoh(ctx: Any) -> int:
    c: _Conn = ctx.getpriv()
    return c.answer(c.session.on_eoh(c.symvals("eoh")), "eoh")


@_guard("body")
def _body(ctx: Any, chunk: bytes) -> int:
    c: _Conn = ctx.getpriv()
    v = c.session.on_body(chunk)
    if v is None and not c.rt.negotiation.needs_body and c.proto & Milter.P_SKIP:
        return SKIP
    return c.answer(v, "body")


@_guard("eom")
def _eom(ctx: Any) -> int:
    c: _Conn = ctx.getpriv()
    return c.apply(c.session.on_eom(c.symvals("eom")))


@_guard("abort")
def _abort(ctx: Any) -> int:
    c: _Conn | None = ctx.getpriv()
    if c is not None:
        c.session.on_abort()
    return CONTINUE


@_guard("close")
def _close(ctx: Any) -> int:
    global _open
    c: _Conn | None = ctx.getpriv()
    if c is None:
        return CONTINUE
    try:
        c.session.on_close()
    finally:
        ctx.setpriv(None)
        if not c.refuse:
            with _open_cond:
                _open -= 1
                _open_cond.notify_all()
    return CONTINUE


def _unknown(ctx: Any, cmd: Any) -> int:
    return CONTINUE


class SocketError(OSError):
    """The listening socket cannot be opened: in use, a bad address, no permission."""


def _tcp_in_use(host: str, port: int) -> bool:
    """Whether something accepts connections on ``host``:``port`` (what makes a listen
    there fail, as a rule)."""
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return False
    return True


def _in_use(path: str) -> bool:
    """Whether something answers on the unix socket ``path`` (a running instance)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except OSError:
            return False  # refused or absent: a stale file, safe to replace
        return True


def open_socket(settings: Settings) -> None:
    """Register the callbacks and open libmilter's listening socket (once, before forking
    workers: every worker accepts on this one socket). Raises SocketError (an OSError)
    when it cannot: a unix socket another process listens on is never taken over (libmilter
    would unlink it, leaving that process unreachable)."""
    milter.set_flags(0x1FF)  # upper bound; each connection negotiates its own subset
    milter.set_connect_callback(_connect)
    milter.set_helo_callback(_helo)
    milter.set_envfrom_callback(_envfrom)
    milter.set_envrcpt_callback(_envrcpt)
    milter.set_header_callback(_header)
    milter.set_eoh_callback(_eoh)
    milter.set_body_callback(_body)
    milter.set_eom_callback(_eom)
    milter.set_abort_callback(_abort)
    milter.set_close_callback(_close)
    milter.register("milterd", data=_data, unknown=_unknown, negotiate=_negotiate)
    global _listen
    family, where, port = parse_socket(settings.socket)
    _listen = (family, where, port)
    if family == "unix" and os.path.exists(where) and _in_use(where):
        raise SocketError("another process is listening there")
    milter.setconn(settings.socket)
    milter.settimeout(settings.milter_timeout)
    if family == "unix":
        os.makedirs(os.path.dirname(where), exist_ok=True)
    try:
        milter.opensocket(True)
    except milter.error as e:  # libmilter says little more than "failed": find out why
        if family in ("inet", "inet6") and _tcp_in_use(where, port):
            raise SocketError("cannot listen: address already in use") from None
        raise SocketError(f"cannot listen (libmilter: {e})") from None
    if family == "unix":
        try:
            os.chmod(where, int(settings.socket_mode, 8))
            if settings.socket_group:
                import grp

                os.chown(where, -1, grp.getgrnam(settings.socket_group).gr_gid)
        except (OSError, KeyError):  # not a member of the group, no such group: ours to remove
            with contextlib.suppress(OSError):
                os.unlink(where)
            raise
    else:
        global _reply_data
        _reply_data = True
        _nodelay()


def _nodelay() -> None:
    """Set TCP_NODELAY on libmilter's listening socket (accepted sockets inherit it).

    libmilter writes a change and its reply as separate small packets; with Nagle on, the
    MTA's delayed acknowledgement stalls every message by ~40 ms on TCP (measured).
    """
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            s = socket.socket(fileno=fd)
        except OSError:
            continue
        try:
            if (
                s.type == socket.SOCK_STREAM
                and s.family in (socket.AF_INET, socket.AF_INET6)
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        finally:
            s.detach()


_listen: tuple[str, str, int] | None = None  # (family, host or path, port) of our socket
_running = threading.Event()


def run() -> None:
    """libmilter's accept loop (smfi_main). Returns after :func:`stop`."""
    _running.set()
    try:
        milter.main()
    finally:
        _running.clear()


def stop() -> None:
    """Stop accepting connections (smfi_stop); :func:`run` then returns, promptly.

    libmilter's accept loop holds its listener lock while it waits in select(), which
    times out every 5 seconds (MI_CHK_TIME), and smfi_stop needs that lock to close the
    socket: left alone, every stop (SIGTERM, the supervisor gone) takes up to 5 s. So a
    thread wakes the loop while smfi_stop waits: it connects to our own listening socket
    and closes at once, until the loop has returned. Another worker may accept one of
    these connections instead; it ends before the milter negotiation, so no callback runs.
    """
    waker = threading.Thread(target=_wake_listener, name="wake-listener", daemon=True)
    if _listen is not None and _running.is_set():
        waker.start()
    milter.stop()


def _wake_listener() -> None:
    assert _listen is not None
    family, where, port = _listen
    if family != "unix" and where in ("", "0.0.0.0", "::"):
        where = "::1" if family == "inet6" else "127.0.0.1"
    deadline = time.monotonic() + 6.0
    while _running.is_set() and time.monotonic() < deadline:
        try:
            if family == "unix":
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.2)
                    s.connect(where)
            else:
                socket.create_connection((where, port), timeout=0.2).close()
        except OSError:
            pass  # the socket is closed or gone: the loop is ending anyway
        time.sleep(0.05)
