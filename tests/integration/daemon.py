"""Start and stop a real ``milterd run`` for integration tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MILTERD = [sys.executable, "-m", "milterd.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Daemon:
    """``milterd -c CONFIG run`` in a subprocess, with its log captured to a file."""

    def __init__(
        self,
        body: str,
        socket_kind: str = "unix",
        workers: int = 1,
        milterd_extra: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        # /var/tmp, not /tmp: Postfix's smtpd (user postfix) must reach the unix socket.
        self.dir = Path(tempfile.mkdtemp(prefix="milterd-it-", dir="/var/tmp"))
        self.dir.chmod(0o755)
        if socket_kind == "unix":
            self.socket = f"unix:{self.dir}/milterd.sock"
            self.postfix_socket = f"unix:{self.dir}/milterd.sock"
        else:
            port = free_port()
            self.socket = f"inet:{port}@127.0.0.1"
            self.postfix_socket = f"inet:127.0.0.1:{port}"
        self.config = self.dir / "milterd.toml"
        self.header = (
            f'[milterd]\nsocket = "{self.socket}"\nsocket_mode = "0666"\nworkers = {workers}\n'
            f'authserv_id = "mx.test"\nlog_level = "info"\n{milterd_extra}\n'
        )
        self.write(body)
        self.log = self.dir / "milterd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, body: str) -> None:
        self.config.write_text(self.header + body)

    def start(self, timeout: float = 20.0) -> Daemon:
        logf = open(self.log, "wb")  # noqa: SIM115 - handed to the child, closed by stop()
        self.proc = subprocess.Popen(
            [*MILTERD, "-c", str(self.config), "run"],
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=self.env,
        )
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"milterd exited {self.proc.returncode}:\n{self.log_text()}")
            if "ready" in self.log_text() and self._connectable():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"milterd did not start in {timeout}s:\n{self.log_text()}")

    def _connectable(self) -> bool:
        try:
            if self.socket.startswith("unix:"):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(self.socket[5:])
            else:
                port, _, host = self.socket[5:].partition("@")
                socket.create_connection((host, int(port)), 1).close()
            return True
        except OSError:
            return False

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait_log(self, needle: str, timeout: float = 10.0, after: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_text()[after:]
            if needle in text:
                return text
            time.sleep(0.05)
        raise AssertionError(f"{needle!r} not logged within {timeout}s:\n{self.log_text()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def worker_pids(self) -> list[int]:
        out = subprocess.run(
            ["pgrep", "-P", str(self.pid)], check=False, capture_output=True, text=True
        )
        return [int(p) for p in out.stdout.split()]

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM, wait; SIGKILL the whole group if it hangs. Returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        # No worker may outlive the supervisor.
        subprocess.run(["pkill", "-KILL", "-f", str(self.config)], check=False)
        return self.proc.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
