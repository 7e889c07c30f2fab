"""A tiny pymilter milter for infrastructure tests: adds one header at end of message.

Run as a script (it imports nothing from this repository, so it works from any cwd)::

    python tests/support/noop_milter.py unix:/var/tmp/dir/milter.sock \\
        --header X-Noop-Milter --value yes [--log /var/tmp/dir/events.log]

or from a test through :func:`start_noop_milter`, which returns the running
:class:`subprocess.Popen` once the socket accepts connections, and :func:`stop_milter`.

With ``--log`` every callback appends one line (``connect 127.0.0.1``, ``envfrom <a@b>``,
``eom``...) so a test can assert what the milter saw.  The socket is created world
connectable (umask 0) because Postfix's smtpd runs as user ``postfix``.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main", "start_noop_milter", "stop_milter"]

SCRIPT = Path(__file__).resolve()


def start_noop_milter(
    socket_spec: str,
    *,
    header: str = "X-Noop-Milter",
    value: str = "yes",
    log: str | os.PathLike[str] | None = None,
    timeout: float = 10.0,
) -> subprocess.Popen[bytes]:
    """Start the milter in a subprocess; return when its socket accepts connections.

    :param socket_spec: ``unix:/path`` or ``inet:PORT@127.0.0.1`` (libmilter syntax).
    :raises RuntimeError: if the socket is not connectable within ``timeout`` (the
        process is killed and its output is in the message).
    """
    argv = [sys.executable, str(SCRIPT), socket_spec, "--header", header, "--value", value]
    if log is not None:
        argv += ["--log", str(log)]
    # Output to an unnamed file, not a pipe: nobody reads it while the milter runs, and a
    # full pipe would block the milter.  The child keeps its own descriptor when we close ours.
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if _connectable(socket_spec):
                return proc
            time.sleep(0.05)
        stop_milter(proc)
        out.seek(0)
        output = out.read().decode(errors="replace")
    raise RuntimeError(f"noop milter did not come up on {socket_spec}: {output}")


def _connectable(socket_spec: str) -> bool:
    kind, _, where = socket_spec.partition(":")
    try:
        if kind in ("unix", "local"):
            if not Path(where).exists():
                return False
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(where)
            return True
        port, _, host = where.partition("@")
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=1):
            return True
    except OSError:
        return False


def stop_milter(proc: subprocess.Popen[bytes], grace: float = 1.0) -> None:
    """Stop the milter: SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds.

    The grace is short on purpose: after it has served a connection, libmilter's shutdown
    on SIGTERM takes about 5 s here (it waits for its worker pool), which adds up in tests.
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    """Script entry point: parse arguments, run the milter until SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("socket", help="libmilter socket spec, e.g. unix:/path/milter.sock")
    parser.add_argument("--header", default="X-Noop-Milter")
    parser.add_argument("--value", default="yes")
    parser.add_argument("--log", default=None, help="append one line per callback here")
    args = parser.parse_args(argv)

    # Imported here so that importing this module (for start_noop_milter) does not need
    # the milter C extension.
    import Milter

    log_path: str | None = args.log

    def event(line: str) -> None:
        if log_path is not None:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(line + "\n")

    class NoopMilter(Milter.Base):  # type: ignore[misc]
        """Adds ``args.header: args.value`` at end of message, accepts everything."""

        def connect(self, hostname: str, family: int, hostaddr: object) -> int:
            addr = hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr
            event(f"connect {addr}")
            return int(Milter.CONTINUE)

        def envfrom(self, mailfrom: str, *params: str) -> int:
            event(f"envfrom {mailfrom}")
            return int(Milter.CONTINUE)

        def envrcpt(self, to: str, *params: str) -> int:
            event(f"envrcpt {to}")
            return int(Milter.CONTINUE)

        def eom(self) -> int:
            self.addheader(args.header, args.value)
            event("eom")
            return int(Milter.ACCEPT)

    # The socket must be connectable by Postfix's smtpd (user postfix).
    os.umask(0)
    Milter.factory = NoopMilter
    Milter.set_flags(Milter.ADDHDRS)
    sys.stdout.write(f"noop milter listening on {args.socket}\n")
    sys.stdout.flush()
    Milter.runmilter("noop-milter", args.socket, timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
