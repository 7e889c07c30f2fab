#!/usr/bin/env python3
"""The baseline: a bare pymilter milter that does what milterd + example_header does.

  bare_milter.py SOCKET [--name NAME] [--no-nodelay] [--socket-mode 0666]

SOCKET: unix:/path | inet:PORT@127.0.0.1. Accepts every message and adds one header at
end of message (``X-Milterd-Example: hello from milterd``, the example plugin's default),
so the MTA gets the same bytes from both. It negotiates only what it uses: the eom
callback (every other step is @nocallback in ``Milter.Base``, so the MTA leaves it out)
and the ADDHDRS action.

Set up the way ``Milter.runmilter`` does it, with pymilter's low-level ``milter`` API
(setconn, register, opensocket, main), plus one thing runmilter cannot do: on TCP, set
TCP_NODELAY on libmilter's listening socket (accepted sockets inherit it). libmilter
writes the header change and the final reply as two small packets; with Nagle's
algorithm on, the second waits for the MTA's delayed ACK, ~40 ms a message. milterd sets
TCP_NODELAY, so the baseline must too for a fair TCP comparison (``--no-nodelay`` shows
the stall). libmilter's own signal thread ends ``main()`` on SIGTERM/SIGINT/SIGHUP.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

import Milter
import milter

HEADER_NAME = "X-Milterd-Example"
HEADER_VALUE = "hello from milterd"
ACTIONS = int(Milter.ADDHDRS)


class BareMilter(Milter.Base):  # type: ignore[misc]  # pymilter has no type information
    """One instance per MTA connection (created by the negotiate callback)."""

    def negotiate(self, opts: list[int]) -> int:
        # Base.negotiate sets the P_NO* bits for every @nocallback step (all but eom) and
        # leaves the actions as the MTA offered them: ask for ADDHDRS only.
        rc = int(super().negotiate(opts))
        opts[0] = opts[0] & ACTIONS
        self._actions = opts[0]
        return rc

    def eom(self) -> int:
        self.addheader(HEADER_NAME, HEADER_VALUE)
        return int(Milter.ACCEPT)


class BareMilterDataReply(BareMilter):
    """Variant (``--reply-data``), not the baseline: an experiment. Also asks for DATA,
    with a reply. Postfix leaves Nagle on for its milter sockets; its smtpd sends the
    envelope macros (sent even for steps negotiated away; no reply expected) and hands
    the socket to cleanup, which sends EOM. On TCP that EOM write waits for the milter's
    delayed ACK of the envelope data, ~40 ms. DATA is the last step smtpd sends: a reply
    to it carries the ACK, and the stall is gone."""

    def data(self) -> int:
        return int(Milter.CONTINUE)


def _data(ctx: Any) -> int:
    m: BareMilterDataReply = ctx.getpriv()
    return m.data()


class BareMilterEnvelope(BareMilter):
    """Variant (``--envelope``), not the baseline: an experiment. Also takes CONNECT, HELO,
    MAIL and RCPT without replying (@noreply), the envelope steps milterd's core asks for,
    so the callback count per message matches milterd's and only the Python work differs."""

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def hello(self, hostname: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, sender: str, *params: str) -> int:
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, to: str, *params: str) -> int:
        return int(Milter.CONTINUE)


class BareDKIMSigner(BareMilterEnvelope):
    """Variant (``--dkim KEYFILE``): the least a pymilter DKIM signer does, as a floor for
    bench/dkim_bench.py. The callbacks milterd's dkim plugin gets (envelope, header and
    body without reply, end of message with one), the same signing code (``fast_sign``)
    and the same signed-header selection (the plugin's defaults), and nothing else: no
    core, no trusted-sender check, no logging or metrics; every message is signed. Values
    are rebuilt as dkimpy's ``[name, value]`` pairs with CRLF folds."""

    key: Any = None
    domain = ""
    selector = ""
    order: tuple[tuple[str, bool], ...] = ()

    def __init__(self) -> None:
        self.fields: list[list[bytes]] = []
        self.chunks: list[bytes] = []

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, sender: str, *params: str) -> int:
        self.fields, self.chunks = [], []
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: bytes) -> int:
        v = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        self.fields.append([name.encode("ascii", "surrogateescape"), b" " + v + b"\r\n"])
        return int(Milter.CONTINUE)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def body(self, chunk: bytes) -> int:
        self.chunks.append(chunk)
        return int(Milter.CONTINUE)

    def eom(self) -> int:
        from milterd_plugins.dkim import signed_names
        from milterd_plugins.dkim.keys import fast_sign

        value = fast_sign(
            self.fields, b"".join(self.chunks), self.key, domain=self.domain,
            selector=self.selector, include_headers=signed_names(self.order, self.fields),
        )  # fmt: skip
        self.addheader("DKIM-Signature", value.replace("\r\n", "\n"), 0)
        return int(Milter.ACCEPT)


def _header(ctx: Any, name: str, value: bytes) -> int:
    return int(ctx.getpriv().header(name, value))


def _body(ctx: Any, chunk: bytes) -> int:
    return int(ctx.getpriv().body(chunk))


def _helo(ctx: Any, hostname: str) -> int:
    return int(ctx.getpriv().hello(hostname))


def _envfrom(ctx: Any, *args: bytes) -> int:
    return int(ctx.getpriv().envfrom_bytes(*args))


def _envrcpt(ctx: Any, *args: bytes) -> int:
    return int(ctx.getpriv().envrcpt_bytes(*args))


def _eom(ctx: Any) -> int:
    m: BareMilter = ctx.getpriv()
    return m.eom()


def _abort(ctx: Any) -> int:
    return int(Milter.CONTINUE)


def set_nodelay_on_listener() -> int:
    """TCP_NODELAY on every listening TCP socket of this process (libmilter's, found in
    /proc/self/fd after opensocket). Returns how many were set."""
    n = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=int(name))
        except OSError:  # not a socket (or the listdir fd, already closed)
            continue
        try:
            if (
                s.type == socket.SOCK_STREAM
                and s.family in (socket.AF_INET, socket.AF_INET6)
                and s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                n += 1
        except OSError:
            pass
        finally:
            s.detach()  # the fd stays libmilter's
    return n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("socket", help="unix:/path or inet:PORT@127.0.0.1")
    ap.add_argument("--name", default="bare-milter")
    ap.add_argument("--timeout", type=int, default=600, help="libmilter I/O timeout, seconds")
    ap.add_argument("--socket-mode", default="0666", help="unix socket mode (Postfix connects)")
    ap.add_argument("--no-nodelay", action="store_true", help="leave Nagle on (TCP)")
    ap.add_argument("--reply-data", action="store_true", help="experiment: also DATA, replied")
    ap.add_argument(
        "--envelope", action="store_true", help="experiment: also CONNECT..RCPT, no reply"
    )
    ap.add_argument("--dkim", metavar="KEYFILE", help="variant: sign (see BareDKIMSigner)")
    ap.add_argument("--dkim-domain", default="example.com")
    ap.add_argument("--dkim-selector", default="bench")
    a = ap.parse_args()

    Milter.factory = BareMilterDataReply if a.reply_data else BareMilter
    if a.envelope:
        Milter.factory = BareMilterEnvelope
    if a.dkim:
        from milterd_plugins.dkim import DEFAULT_HEADERS, DEFAULT_OVERSIGN, sign_order
        from milterd_plugins.dkim.keys import load_key

        BareDKIMSigner.key = load_key(a.dkim)
        BareDKIMSigner.domain, BareDKIMSigner.selector = a.dkim_domain, a.dkim_selector
        BareDKIMSigner.order = sign_order(DEFAULT_HEADERS, DEFAULT_OVERSIGN)
        Milter.factory = BareDKIMSigner
        milter.set_header_callback(_header)
        milter.set_body_callback(_body)
    if a.envelope or a.dkim:
        milter.set_connect_callback(Milter.connect_callback)
        milter.set_helo_callback(_helo)
        milter.set_envfrom_callback(_envfrom)
        milter.set_envrcpt_callback(_envrcpt)
    milter.set_flags(ACTIONS)  # registration flags; negotiate() narrows per connection too
    milter.set_eom_callback(_eom)
    milter.set_abort_callback(_abort)
    milter.set_close_callback(Milter.close_callback)
    milter.setconn(a.socket)
    milter.settimeout(a.timeout)
    if a.reply_data:
        milter.register(a.name, negotiate=Milter.negotiate_callback, data=_data)
    else:
        milter.register(a.name, negotiate=Milter.negotiate_callback)
    milter.opensocket(True)  # True: remove a stale unix socket first
    nodelay = 0
    if a.socket.startswith(("unix:", "local:")):
        os.chmod(a.socket.split(":", 1)[1], int(a.socket_mode, 8))
    elif not a.no_nodelay:
        nodelay = set_nodelay_on_listener()
        if not nodelay:
            print("bare_milter: no listening TCP socket found for TCP_NODELAY", file=sys.stderr)
            return 1
    print(f"bare_milter: {a.name} on {a.socket} (TCP_NODELAY on {nodelay} socket(s))", flush=True)
    milter.main()
    return 0


if __name__ == "__main__":
    sys.exit(main())
