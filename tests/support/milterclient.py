"""A small synchronous MTA-side milter client (protocol version 6), for exact protocol
control in tests: it honours the filter's negotiation (skipped steps are not sent, no-reply
steps are not waited for) and returns the filter's replies and modifications as values.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from dataclasses import dataclass, field

# libmilter mfdef.h
P = {
    "NOCONNECT": 0x1,
    "NOHELO": 0x2,
    "NOMAIL": 0x4,
    "NORCPT": 0x8,
    "NOBODY": 0x10,
    "NOHDRS": 0x20,
    "NOEOH": 0x40,
    "NR_HDR": 0x80,
    "NOUNKNOWN": 0x100,
    "NODATA": 0x200,
    "SKIP": 0x400,
    "RCPT_REJ": 0x800,
    "NR_CONN": 0x1000,
    "NR_HELO": 0x2000,
    "NR_MAIL": 0x4000,
    "NR_RCPT": 0x8000,
    "NR_DATA": 0x10000,
    "NR_UNKN": 0x20000,
    "NR_EOH": 0x40000,
    "NR_BODY": 0x80000,
    "HDR_LEADSPC": 0x100000,
}
ALL_PROTO = 0x1FFFFF
ALL_ACTIONS = 0x1FF
FINAL = {
    b"a": "accept",
    b"c": "continue",
    b"r": "reject",
    b"t": "tempfail",
    b"d": "discard",
    b"y": "replycode",
    b"s": "skip",
}


def _z(*parts: str | bytes) -> bytes:
    return b"".join((p.encode() if isinstance(p, str) else p) + b"\0" for p in parts)


@dataclass
class Reply:
    verdict: str  # accept, continue, reject, tempfail, discard, replycode, skip, noreply
    text: str = ""  # for replycode: "550 5.7.1 ..."


@dataclass
class Transcript:
    replies: dict[str, list[Reply]] = field(default_factory=dict)
    mods: list[tuple[str, tuple[object, ...]]] = field(default_factory=list)
    final: Reply | None = None
    progress: int = 0
    aborted: bool = False  # abandoned with ABORT (message(abort_after=...))


class MilterClient:
    """One milter connection. Use as a context manager."""

    def __init__(self, where: str, timeout: float = 30.0) -> None:
        if where.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(where[5:])
        else:  # inet:PORT@HOST
            port, _, host = where[5:].partition("@")
            self.sock = socket.create_connection((host.strip("[]"), int(port)), timeout)
        self.actions = 0
        self.proto = 0

    def __enter__(self) -> MilterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send(b"Q")
        self.sock.close()

    # --- wire ------------------------------------------------------------------------------

    def _send(self, cmd: bytes, data: bytes = b"") -> None:
        self.sock.sendall(struct.pack("!I", len(data) + 1) + cmd + data)

    def _recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("filter closed the connection")
            out += chunk
        return out

    def _recv(self) -> tuple[bytes, bytes]:
        (n,) = struct.unpack("!I", self._recv_exact(4))
        data = self._recv_exact(n)
        return data[:1], data[1:]

    def negotiate(self, actions: int = ALL_ACTIONS, proto: int = ALL_PROTO) -> tuple[int, int]:
        self._send(b"O", struct.pack("!III", 6, actions, proto))
        cmd, data = self._recv()
        assert cmd == b"O", cmd
        _, self.actions, self.proto = struct.unpack("!III", data[:12])
        return self.actions, self.proto

    def _reply(self, t: Transcript) -> Reply:
        while True:
            cmd, data = self._recv()
            if cmd == b"p":
                t.progress += 1
                continue
            if cmd in FINAL:
                text = data.rstrip(b"\0").decode("utf-8", "replace") if cmd == b"y" else ""
                return Reply(FINAL[cmd], text)
            t.mods.append(_decode_mod(cmd, data))

    def step(
        self,
        t: Transcript,
        name: str,
        cmd: bytes,
        data: bytes,
        skip: str,
        nr: str,
        macros: dict[str, str] | None = None,
        macro_stage: bytes = b"",
    ) -> Reply | None:
        """Send one stage unless negotiated away; wait for its reply unless no-reply."""
        if self.proto & P[skip]:
            return None
        if macros:
            self._send(b"D", macro_stage + _z(*[x for kv in macros.items() for x in kv]))
        self._send(cmd, data)
        if self.proto & P[nr]:
            t.replies.setdefault(name, []).append(Reply("noreply"))
            return None
        r = self._reply(t)
        t.replies.setdefault(name, []).append(r)
        return r

    # --- a whole message ----------------------------------------------------------------

    def connect(
        self,
        t: Transcript,
        hostname: str = "client.example",
        ip: str = "192.0.2.1",
        port: int = 40000,
        macros: dict[str, str] | None = None,
    ) -> Reply | None:
        family = b"6" if ":" in ip else b"4"
        data = _z(hostname) + family + struct.pack("!H", port) + _z(ip)
        m = {"j": "mx.test", "{daemon_name}": "smtpd", "{client_addr}": ip, **(macros or {})}
        return self.step(t, "connect", b"C", data, "NOCONNECT", "NR_CONN", m, b"C")

    def message(
        self,
        sender: str,
        rcpts: list[str],
        headers: list[tuple[str, str | bytes]],
        body: bytes,
        queue_id: str = "TESTQ1",
        helo: str = "client.example",
        auth: str | None = None,
        t: Transcript | None = None,
        abort_after: str | None = None,
        queue_id_at_mail: bool = True,
    ) -> Transcript:
        """HELO .. EOM for one message; stops at the first final (non-continue) reply.
        ``abort_after`` ("mail", "rcpt", "header", "eoh", "body"): abandon the message
        after that stage (its first header for "header") with ABORT, as an MTA does on
        RSET or a lost client; the connection stays usable for the next message.
        ``queue_id_at_mail``: send macro ``i`` at MAIL already (sendmail) or only from
        RCPT on (Postfix, which makes its queue file at the first valid RCPT)."""
        t = t or Transcript()

        def abort(stage: str) -> bool:
            if abort_after == stage:
                self._send(b"A")
                t.aborted = True
                return True
            return False

        def final(r: Reply | None) -> bool:
            if r is not None and r.verdict not in ("continue", "noreply"):
                t.final = r
                return True
            return False

        if final(self.step(t, "helo", b"H", _z(helo), "NOHELO", "NR_HELO")):
            return t
        mail_macros = {
            **({"i": queue_id} if queue_id_at_mail else {}),
            **({"{auth_authen}": auth, "{auth_type}": "PLAIN"} if auth else {}),
        }
        if final(
            self.step(t, "mail", b"M", _z(f"<{sender}>"), "NOMAIL", "NR_MAIL", mail_macros, b"M")
        ):
            return t
        if abort("mail"):
            return t
        accepted = 0
        for r in rcpts:
            rep = self.step(
                t, "rcpt", b"R", _z(f"<{r}>"), "NORCPT", "NR_RCPT", {"i": queue_id}, b"R"
            )
            if rep is None or rep.verdict in ("continue", "noreply"):
                accepted += 1
        if not accepted:
            self._send(b"A")
            return t
        if abort("rcpt"):
            return t
        if final(self.step(t, "data", b"T", b"", "NODATA", "NR_DATA")):
            return t
        lead = b" " if self.proto & P["HDR_LEADSPC"] else b""
        for name, value in headers:
            v = value if isinstance(value, bytes) else value.encode()
            if final(self.step(t, "header", b"L", _z(name, lead + v), "NOHDRS", "NR_HDR")):
                return t
            if abort("header"):
                return t
        if final(self.step(t, "eoh", b"N", b"", "NOEOH", "NR_EOH")):
            return t
        if abort("eoh"):
            return t
        if not self.proto & P["NOBODY"]:
            # As Postfix and sendmail do: no BODY command at all for an empty body
            # (one without data makes the connection drop before milterd sees it).
            for i in range(0, len(body), 65535):
                chunk = self.step(t, "body", b"B", body[i : i + 65535], "NOBODY", "NR_BODY")
                if chunk is not None and chunk.verdict == "skip":
                    break
                if final(chunk):
                    return t
        if abort("body"):
            return t
        self._send(b"D", b"E" + _z("i", queue_id))
        self._send(b"E")
        t.final = self._reply(t)
        return t


#: The index milterd inserts an added field at: past the last one, i.e. the bottom
#: (milterd.bridge.BOTTOM; smfi_addheader misplaces fields on sendmail).
BOTTOM = 0x7FFFFFFF


def _decode_mod(cmd: bytes, data: bytes) -> tuple[str, tuple[object, ...]]:
    if cmd == b"h":
        name, value = data.rstrip(b"\0").split(b"\0", 1)
        return ("addheader", (name.decode(), value.decode("utf-8", "surrogateescape")))
    if cmd in (b"i", b"m"):
        (index,) = struct.unpack("!I", data[:4])
        name, value = (
            data[4:].rstrip(b"\0").split(b"\0", 1)
            if b"\0" in data[4:].rstrip(b"\0")
            else (data[4:].rstrip(b"\0"), b"")
        )
        kind = "insheader" if cmd == b"i" else "chgheader"
        return (kind, (index, name.decode(), value.decode("utf-8", "surrogateescape")))
    if cmd in (b"+", b"-", b"e", b"q", b"2"):
        kinds = {
            b"+": "addrcpt",
            b"-": "delrcpt",
            b"e": "chgfrom",
            b"q": "quarantine",
            b"2": "addrcpt_par",
        }
        return (kinds[cmd], tuple(p.decode() for p in data.rstrip(b"\0").split(b"\0")))
    if cmd == b"b":
        return ("replbody", (data,))
    return ("unknown:" + cmd.decode(errors="replace"), (data,))
