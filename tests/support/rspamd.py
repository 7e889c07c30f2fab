"""rspamd (Debian's ``rspamd``) for tests: a private instance on loopback, its own
directories, nothing reaching the network.

The resolver points at ``nameserver`` (the test DNS server, :class:`ZoneServer`) or, by
default, at a dead loopback port; the modules in ``disabled`` (by default every module that
asks DNS or remote services, :data:`RSPAMD_OFF`) are switched off. Configuration files and
keys the modules need are written into the instance's directory before it starts::

    with Rspamd(disabled=[...], nameserver=f"127.0.0.1:{zs.port}") as r:
        ...                                   # or, before start:
    r = Rspamd(...); r.local("arc.conf", "..."); r.file("keys/arc.key", pem); r.start()

:meth:`Rspamd.check` posts a message to ``/checkv2`` and returns rspamd's JSON reply.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.postfix import free_port

__all__ = ["RSPAMD_OFF", "Rspamd", "stop"]

#: Modules switched off by default: all that ask DNS, remote services or Redis.
RSPAMD_OFF = (
    "rbl",
    "asn",
    "spf",
    "dkim",
    "dmarc",
    "fuzzy_check",
    "phishing",
    "hfilter",
    "mx_check",
    "url_redirector",
    "dkim_signing",
    "arc",
    "emails",
    "surbl",
    "whitelist",
    "reputation",
    "neural",
    "ratelimit",
    "replies",
    "history_redis",
)

USER = "_rspamd"
# Loopback only: never through an http_proxy from the environment.
_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL
    it if it is still there 15 s later."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


class Rspamd:
    """A private rspamd: normal worker on ``127.0.0.1:port``, controller on ``ctl``, no
    proxy or fuzzy workers, console logging to :attr:`log`, run as ``_rspamd``.

    ``tlds``: a public-suffix list of these names only (``url_tld``), instead of Debian's
    full one, whose matcher rspamd compiles with Hyperscan at every start: about 15 s,
    since the cache directory is new each time; a few names take well under a second.
    The list is what rspamd's URL extraction and eSLD lookups (``use_esld``) go by."""

    def __init__(
        self,
        *,
        disabled: Iterable[str] = RSPAMD_OFF,
        nameserver: str | None = None,
        tlds: Iterable[str] | None = None,
    ) -> None:
        exe = shutil.which("rspamd")
        assert exe, "Debian package rspamd is required"
        self.exe = exe
        self.port, self.ctl = free_port(), free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="milterd-rspamd-", dir="/var/tmp"))
        self.local_dir = self.dir / "local"
        (self.local_dir / "override.d").mkdir(parents=True)
        (self.local_dir / "local.d").mkdir()
        for sub in ("db", "run", "log"):
            (self.dir / sub).mkdir()
        self.log = self.dir / "rspamd.out"
        self.proc: subprocess.Popen[bytes] | None = None
        options = ""
        if tlds is not None:
            tld_file = self.file("tld.dat", "".join(f"{t}\n" for t in tlds).encode(), 0o644)
            options = f'url_tld = "{tld_file}";\n'
        if nameserver is None:
            nameserver = f"127.0.0.1:{free_port(udp=True)}"  # nobody answers there
        self.override(
            "options.inc",
            f'dns {{ nameserver = ["{nameserver}"]; timeout = 0.3s; retransmits = 0; }}\n'
            + options,
        )
        self.override("worker-normal.inc", f'bind_socket = "127.0.0.1:{self.port}";\ncount = 1;\n')
        self.override("worker-controller.inc", f'bind_socket = "127.0.0.1:{self.ctl}";\n')
        self.override("worker-proxy.inc", "enabled = false;\n")
        self.override("worker-fuzzy.inc", "enabled = false;\n")
        self.override("logging.inc", 'type = "console";\nlevel = "notice";\n')
        for module in disabled:
            self.override(f"{module}.conf", "enabled = false;\n")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def override(self, name: str, text: str) -> Path:
        """Write ``override.d/<name>`` (replaces the section's settings)."""
        path = self.local_dir / "override.d" / name
        path.write_text(text)
        return path

    def local(self, name: str, text: str) -> Path:
        """Write ``local.d/<name>`` (merged into the section's settings)."""
        path = self.local_dir / "local.d" / name
        path.write_text(text)
        return path

    def file(self, relpath: str, data: bytes, mode: int = 0o600) -> Path:
        """Write a file (a key) under the instance's directory, for rspamd to read."""
        path = self.dir / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        return path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def start(self, timeout: float = 60) -> None:
        pw = pwd.getpwnam(USER)
        for p in [self.dir, *self.dir.rglob("*")]:
            os.chown(p, pw.pw_uid, pw.pw_gid)
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(
                [self.exe, "-f", "-u", USER, "-g", USER, "-c", "/etc/rspamd/rspamd.conf",
                 f"--var=LOCAL_CONFDIR={self.local_dir}", f"--var=DBDIR={self.dir / 'db'}",
                 f"--var=RUNDIR={self.dir / 'run'}", f"--var=LOGDIR={self.dir / 'log'}"],
                stdout=logf, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            try:
                with _LOCAL.open(f"{self.url}/ping", timeout=1) as r:
                    if r.read().strip() == b"pong":
                        return
            except OSError:
                pass
            assert time.monotonic() < deadline, self.log_text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop rspamd (if started) and remove its directory."""
        try:
            if self.proc is not None:
                stop(self.proc)
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def check(
        self, message: bytes, headers: Mapping[str, str] | None = None, timeout: float = 20
    ) -> dict[str, Any]:
        """POST ``message`` to ``/checkv2`` with these request headers (``IP``, ``Helo``,
        ``From``, ``Rcpt``, ``User``...); rspamd's JSON reply."""
        req = urllib.request.Request(
            f"{self.url}/checkv2", data=message, headers=dict(headers or {}), method="POST"
        )
        with _LOCAL.open(req, timeout=timeout) as r:
            reply: dict[str, Any] = json.loads(r.read())
        return reply
