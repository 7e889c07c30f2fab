"""A private, throw-away Postfix instance for integration tests.

:class:`PrivatePostfix` writes its own ``main.cf``/``master.cf`` into a fresh directory
(``/var/tmp/milterd-pf-XXXXXXXX`` by default), starts it with ``postfix -c DIR start``, and
relays *all* mail to a sink on ``[127.0.0.1]:relay_port``.  It never touches the system
instance in ``/etc/postfix`` and listens on loopback only.

Requirements (see :func:`postfix_unavailable_reason`): root, the Debian ``postfix`` package
(it may be installed with "No configuration"), and for ``sasl_users`` the ``sasl2-bin``
package (``saslpasswd2``) plus ``libsasl2-modules`` / ``libsasl2-modules-db``.

Why the configuration looks the way it does (all verified on Debian 12 / Postfix 3.7):

* No syslog runs in the test environment, and a Postfix that cannot log is silent about
  every failure.  ``maillog_file`` + the ``postlog`` service make Postfix log to a file we
  can read (:meth:`PrivatePostfix.log_text`).  ``maillog_file_prefixes`` must allow the path.
* Every service runs with ``chroot = n``: a chrooted smtpd could not reach a milter socket
  outside the queue directory, nor read the sasldb.
* ``smtpd`` runs as user ``postfix``: unix milter sockets must live in directories that
  ``postfix`` can traverse (0755 up to the root; pytest's ``tmp_path`` is 0700, so use
  :attr:`PrivatePostfix.scratch_dir` or :func:`shared_tempdir`) and the socket must be
  connectable by ``postfix`` (mode 0666/0777).
* ``mydestination`` is empty and ``relayhost = [127.0.0.1]:PORT``: every recipient relays
  to the sink, so the test sees exactly what Postfix would deliver.
* Queue retry timers are cut to 1-2 s so deferred mail is retried quickly in tests.
* Postfix will not read a main.cf/master.cf modified within the last second; it sleeps
  until the file is older (1-2 s per command!).  Freshly written files are back-dated.
* ``local_header_rewrite_clients`` is empty, so Postfix treats test clients as remote and
  adds no Message-Id/Date headers: the sink receives one ``Received:`` header followed by
  the client's bytes, unchanged.
* Stopping: SIGTERM to the master (exactly what ``postfix stop`` does, minus its fixed
  1 s sleep), then SIGKILL to any daemon left in the master's process group.  PID 1 on
  this machine does not reap orphans, so stopped daemons linger as zombies (harmless).

Ports are allocated with :func:`free_port` so modules can run concurrently (each instance
has its own queue, pid file, data directory, and listening ports).
"""

from __future__ import annotations

import contextlib
import grp
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from tests.support.maillog import MailLog

__all__ = [
    "PostfixError",
    "PrivatePostfix",
    "free_port",
    "ipv6_loopback_available",
    "postfix_unavailable_reason",
    "shared_tempdir",
]

#: Where temporary instance directories go.  Not /tmp: systemd's PrivateTmp and pytest's
#: 0700 ``tmp_path`` directories are invisible/untraversable for the ``postfix`` user.
DEFAULT_PARENT = "/var/tmp"
MASTER_CF_DIST = Path("/usr/share/postfix/master.cf.dist")
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Debian's daemon_directory parent; used to recognise our own Postfix processes.
POSTFIX_LIBEXEC = "/usr/lib/postfix/"

# Services from master.cf.dist that we keep.  The pipe(8) services after "postlog"
# (maildrop, uucp, ...) need users and programs that do not exist here.
_KEEP_SERVICES = frozenset(
    {
        "pickup", "cleanup", "qmgr", "tlsmgr", "rewrite", "bounce", "defer", "trace",
        "verify", "flush", "proxymap", "proxywrite", "smtp", "relay", "showq", "error",
        "retry", "discard", "local", "virtual", "lmtp", "anvil", "scache", "postlog",
    }
)  # fmt: skip


class PostfixError(RuntimeError):
    """Raised when the private instance cannot be configured, started or queried."""


# --------------------------------------------------------------------------------------
# helpers usable without an instance


def ipv6_loopback_available() -> bool:
    """Return True if a TCP socket can be bound to ``[::1]`` on this machine."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _bindable(family: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int) -> bool:
    try:
        with socket.socket(family, kind) as s:
            # No SO_REUSEADDR on purpose: we want to know nobody else holds the port.
            s.bind((host, port))
    except OSError:
        return False
    return True


def free_port(*, ipv6: bool = False, udp: bool = False, attempts: int = 50) -> int:
    """Return a port that is currently free for TCP on 127.0.0.1.

    The kernel picks the number (bind to port 0), so concurrent test processes get distinct
    ports.  There is an unavoidable window between this call and the caller's own bind.

    :param ipv6: also require the port to be free for TCP on ``[::1]``.
    :param udp: also require the port to be free for UDP on 127.0.0.1 (DNS servers).
    :raises RuntimeError: if no such port is found within ``attempts`` tries.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if ipv6 and not _bindable(socket.AF_INET6, socket.SOCK_STREAM, "::1", port):
            continue
        if udp and not _bindable(socket.AF_INET, socket.SOCK_DGRAM, "127.0.0.1", port):
            continue
        return port
    raise RuntimeError("could not find a free loopback port")


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=SBIN_PATH + ":" + os.environ.get("PATH", ""))


def postfix_unavailable_reason(*, sasl: bool = False) -> str | None:
    """Return why :class:`PrivatePostfix` cannot run here, or None if it can.

    Meant for ``pytest.skip(reason)``.  With ``sasl=True`` also checks for ``saslpasswd2``.
    """
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    for tool in ("postfix", "postconf", "postqueue", "postsuper"):
        if _which(tool) is None:
            return f"{tool} not found (apt-get install postfix)"
    if not MASTER_CF_DIST.is_file():
        return f"{MASTER_CF_DIST} missing (Debian postfix package expected)"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "user 'postfix' or group 'postdrop' missing"
    if sasl and _which("saslpasswd2") is None:
        return "saslpasswd2 not found (apt-get install sasl2-bin)"
    return None


@contextlib.contextmanager
def shared_tempdir(prefix: str = "milterd-test-", parent: str = DEFAULT_PARENT) -> Iterator[Path]:
    """Yield a fresh directory that the ``postfix`` user can traverse (mode 0755).

    Use it for milter unix sockets that must outlive or be shared between Postfix
    instances.  The directory and everything in it is removed on exit.
    """
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        path.chmod(0o755)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


_LOOPBACK_HEX = {"127.0.0.1": "0100007F", "::1": "00000000000000000000000001000000"}


def _listening(host: str, port: int) -> bool:
    """True if a TCP socket is in LISTEN state on ``host:port`` (loopback only), per /proc.

    Used for the readiness check because it does not open an SMTP session: a probe
    connection would make smtpd contact the milter, which would confuse milter tests.
    """
    table = "/proc/net/tcp6" if ":" in host else "/proc/net/tcp"
    want = f"{_LOOPBACK_HEX[host]}:{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == want and fields[3] == "0A":  # 0A: TCP_LISTEN
            return True
    return False


def _fmt_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def _timeout(value: int | float | str) -> str:
    """Postfix time values: bare numbers are seconds; make the unit explicit."""
    if isinstance(value, int | float):
        return f"{int(value)}s"
    return value


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); treat it as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) Postfix daemons whose process group is ``pgid``, from /proc.

    Only processes whose executable lives under ``/usr/lib/postfix/`` count, so that a
    stale pid file (pid reused by an unrelated process group) can never make us kill a
    foreign process.
    """
    members: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after "(comm)": state ppid pgrp ...; comm may contain spaces/parens.
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[2]) != pgid or fields[0] == "Z":
            continue
        try:
            exe = os.readlink(entry / "exe")
        except OSError:
            continue
        if exe.startswith(POSTFIX_LIBEXEC):
            members.append(int(entry.name))
    return members


# --------------------------------------------------------------------------------------


class PrivatePostfix(MailLog):
    """A private Postfix instance relaying everything to ``[127.0.0.1]:relay_port``.

    Construction only creates the (empty, 0755) instance directory, so that
    :attr:`scratch_dir` can be used for milter sockets before the configuration is fixed;
    the settings are the public attributes of the same names and are read by :meth:`start`.
    Use as a context manager, or call :meth:`start` and (always) :meth:`stop`.

    :param smtp_port: port for smtpd on 127.0.0.1 (and ``[::1]`` if ``ipv6``); None picks one.
    :param relay_port: the sink port; 0 means no sink: mail is deferred (kept in the queue).
    :param milters: value of ``smtpd_milters`` (e.g. ``unix:/path`` or ``inet:127.0.0.1:9000``).
    :param non_smtpd_milters: value of ``non_smtpd_milters`` (mail from :meth:`sendmail`).
    :param milter_default_action: ``tempfail`` | ``accept`` | ``reject`` | ``quarantine``.
    :param milter_command_timeout: seconds (int) or a Postfix time string (``"5s"``).
    :param milter_content_timeout: likewise.
    :param milter_connect_timeout: likewise.
    :param milter_macros: e.g. ``{"milter_connect_macros": "j {daemon_name} v"}``.
    :param extra_main_cf: further main.cf settings; they override the defaults here.
    :param extra_master_cf: raw text appended to master.cf.
    :param sasl_users: user -> password; enables SMTP AUTH (PLAIN, LOGIN) via Cyrus sasldb.
        Users live in realm ``myhostname``; log in with the bare user name.
    :param ipv6: also listen on ``[::1]:smtp_port`` (sets ``inet_protocols = all``).
    :param base_dir: parent for the instance directory (default ``/var/tmp``); a new
        subdirectory is always created so that :meth:`stop` removes only what it made.
    :param myhostname: Postfix's hostname (also the SASL realm and the HELO to the sink).
    :param start_timeout: bound for :meth:`start` to see the listener(s), in seconds.
    :param probe_smtp: after start, also read the smtpd banner.  Off by default because
        the probe is a real SMTP session that a configured milter would see.
    :param keep_dir: do not remove the instance directory on stop (debugging); also
        enabled by the environment variable ``MILTERD_KEEP_POSTFIX=1``.
    :param fast_start: create the queue/data directories ourselves (owners and modes from
        ``/etc/postfix/postfix-files``) and skip ``postfix-script``'s integrity checks via
        its ``quick-start`` marker (start: ~0.05 s instead of ~0.2 s).  Off by default:
        ``postfix start`` then runs ``post-install create-missing`` and ``check-warn``.
    """

    log_name = "maillog"

    def __init__(
        self,
        smtp_port: int | None = None,
        relay_port: int = 0,
        *,
        milters: str = "",
        non_smtpd_milters: str = "",
        milter_default_action: str = "tempfail",
        milter_command_timeout: int | str | None = None,
        milter_content_timeout: int | str | None = None,
        milter_connect_timeout: int | str | None = None,
        milter_macros: Mapping[str, str] | None = None,
        extra_main_cf: Mapping[str, object] | None = None,
        extra_master_cf: str = "",
        sasl_users: Mapping[str, str] | None = None,
        ipv6: bool = False,
        base_dir: str | os.PathLike[str] | None = None,
        myhostname: str = "mta.test",
        start_timeout: float = 20.0,
        probe_smtp: bool = False,
        keep_dir: bool = False,
        fast_start: bool = False,
    ) -> None:
        self.ipv6 = ipv6
        self.smtp_port = smtp_port if smtp_port is not None else free_port(ipv6=ipv6)
        self.relay_port = relay_port
        self.milters = milters
        self.non_smtpd_milters = non_smtpd_milters
        self.milter_default_action = milter_default_action
        self.milter_command_timeout = milter_command_timeout
        self.milter_content_timeout = milter_content_timeout
        self.milter_connect_timeout = milter_connect_timeout
        self.milter_macros: dict[str, str] = dict(milter_macros or {})
        for key in self.milter_macros:
            if not (key.startswith("milter_") and key.endswith("_macros")):
                raise ValueError(f"not a milter macro parameter: {key!r}")
        self.extra_main_cf: dict[str, object] = dict(extra_main_cf or {})
        self.extra_master_cf = extra_master_cf
        self.sasl_users: dict[str, str] | None = dict(sasl_users) if sasl_users else None
        self.myhostname = myhostname
        self.start_timeout = start_timeout
        self.probe_smtp = probe_smtp
        self.keep_dir = keep_dir or os.environ.get("MILTERD_KEEP_POSTFIX") == "1"
        self.fast_start = fast_start

        parent = Path(base_dir) if base_dir is not None else Path(DEFAULT_PARENT)
        self.root = Path(tempfile.mkdtemp(prefix="milterd-pf-", dir=parent))
        # mkdtemp makes 0700; the postfix user must traverse into scratch/ and log/.
        self.root.chmod(0o755)
        self.config_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.log_dir = self.root / "log"
        self.maillog = self.log_dir / "maillog"
        self.scratch_dir = self.root / "scratch"
        for d in (self.config_dir, self.queue_dir, self.log_dir, self.scratch_dir):
            d.mkdir(mode=0o755)
            d.chmod(0o755)  # mkdir's mode is filtered by the umask
        self._started = False
        self._removed = False

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Self:
        self.start()  # cleans up after itself on failure
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ---------------------------------------------------------------- configuration

    @property
    def host(self) -> str:
        """The IPv4 address smtpd listens on."""
        return "127.0.0.1"

    def main_cf_settings(self) -> dict[str, str]:
        """Return the main.cf settings :meth:`start` writes (defaults + ``extra_main_cf``)."""
        s: dict[str, object] = {
            "compatibility_level": "3.6",
            # No config_directory here: `-c DIR`/MAIL_CONFIG set it, and a second
            # definition makes every postconf call warn "overriding earlier entry".
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.myhostname,
            "mydomain": "test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled in tests",
            "alias_maps": "",
            "alias_database": "",
            "biff": "no",
            # Loopback only; "loopback-only" would also be fine but is resolved via
            # interface enumeration, which is pointless here.
            "inet_interfaces": "127.0.0.1, [::1]" if self.ipv6 else "127.0.0.1",
            "inet_protocols": "all" if self.ipv6 else "ipv4",
            "mynetworks": "127.0.0.0/8 [::1]/128",
            "smtpd_relay_restrictions": (
                "permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination"
            ),
            "smtpd_recipient_restrictions": "",
            # No DNS at all: relayhost is a literal address and the machine has no network.
            "smtp_dns_support_level": "disabled",
            "smtp_host_lookup": "native",
            "smtpd_peername_lookup": "no",
            "smtp_tls_security_level": "none",
            "smtpd_tls_security_level": "none",
            "smtputf8_enable": "yes",
            "smtpd_banner": "$myhostname ESMTP",
            # Treat test clients as remote: no Message-Id/Date added, no address rewriting
            # in headers, so the sink sees the client's bytes after one Received: header.
            "local_header_rewrite_clients": "",
            # Large messages: the sink accepts 64 MB; 0 would be "unlimited".
            "message_size_limit": 104857600,
            "mailbox_size_limit": 0,
            "virtual_mailbox_limit": 0,
            # Logging to a file (no syslog here).
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.log_dir,
            # Fast retries and no artificial delays, for tests.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "in_flow_delay": "0s",
            "smtpd_error_sleep_time": "0s",
            "smtp_connect_timeout": "5s",
            "milter_default_action": self.milter_default_action,
        }
        if self.relay_port:
            s["relayhost"] = f"[127.0.0.1]:{self.relay_port}"
        else:
            s["relayhost"] = ""
            s["default_transport"] = "retry:4.3.0 no relay sink configured"
        if self.milters:
            s["smtpd_milters"] = self.milters
        if self.non_smtpd_milters:
            s["non_smtpd_milters"] = self.non_smtpd_milters
        for name in ("command", "content", "connect"):
            value = getattr(self, f"milter_{name}_timeout")
            if value is not None:
                s[f"milter_{name}_timeout"] = _timeout(value)
        s.update(self.milter_macros)
        if self.sasl_users is not None:
            s.update(
                {
                    "smtpd_sasl_auth_enable": "yes",
                    "smtpd_sasl_type": "cyrus",
                    "smtpd_sasl_path": "smtpd",  # -> $cyrus_sasl_config_path/smtpd.conf
                    "cyrus_sasl_config_path": self.config_dir / "sasl",
                    "smtpd_sasl_local_domain": "$myhostname",
                    "smtpd_sasl_security_options": "noanonymous",
                    "smtpd_tls_auth_only": "no",
                }
            )
        s.update(self.extra_main_cf)
        return {k: _fmt_value(v) for k, v in s.items()}

    def master_cf_text(self) -> str:
        """Return master.cf: master.cf.dist with chroot off and loopback smtpd listener(s)."""
        listeners = [f"127.0.0.1:{self.smtp_port}"]
        if self.ipv6:
            listeners.append(f"[::1]:{self.smtp_port}")
        out: list[str] = [f"# generated by {__name__}; based on {MASTER_CF_DIST}"]
        for addr in listeners:
            out.append(f"{addr} inet n - n - - smtpd")
        keep = False
        for line in MASTER_CF_DIST.read_text().splitlines():
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if line[0].isspace():  # continuation ("-o ..." or pipe argv)
                if keep:
                    out.append(line)
                continue
            fields = line.split()
            name, kind = fields[0], fields[1]
            keep = name in _KEEP_SERVICES and kind != "inet"
            if not keep:
                continue
            fields[4] = "n"  # chroot: off for every service (see module docstring)
            out.append(" ".join(fields))
        if self.extra_master_cf:
            out.append(self.extra_master_cf.rstrip("\n"))
        return "\n".join(out) + "\n"

    def _write_sasl(self) -> None:
        assert self.sasl_users is not None
        saslpasswd2 = _which("saslpasswd2")
        if saslpasswd2 is None:
            raise PostfixError("sasl_users needs saslpasswd2: apt-get install sasl2-bin")
        sasl_dir = self.config_dir / "sasl"
        sasl_dir.mkdir(mode=0o755, exist_ok=True)
        db = sasl_dir / "sasldb2"
        (sasl_dir / "smtpd.conf").write_text(
            "pwcheck_method: auxprop\n"
            "auxprop_plugin: sasldb\n"
            "mech_list: PLAIN LOGIN\n"
            f"sasldb_path: {db}\n"
        )
        for user, password in self.sasl_users.items():
            r = subprocess.run(
                [saslpasswd2, "-p", "-c", "-f", str(db), "-u", self.myhostname, user],
                input=password.encode(),
                capture_output=True,
                timeout=30,
                check=False,
            )
            if r.returncode != 0:
                raise PostfixError(f"saslpasswd2 failed for {user!r}: {r.stderr!r}")
        # smtpd runs as 'postfix'; saslpasswd2 creates the db 0640 root.
        db.chmod(0o644)

    def _create_queue_dirs(self) -> None:
        """Create queue and data directories as ``post-install create-missing`` would.

        Owners and modes come from the installed ``postfix-files`` so that they follow the
        package version.  Then ``queue/quick-start`` tells ``postfix-script start`` to skip
        its (slow, ~2 s) checks once.
        """
        owner = {"$mail_owner": pwd.getpwnam("postfix").pw_uid, "root": 0}
        group = {"$setgid_group": grp.getgrnam("postdrop").gr_gid, "-": 0}
        where = {"$queue_directory": self.queue_dir, "$data_directory": self.data_dir}
        files = Path(self.postconf_value("meta_directory")) / "postfix-files"
        for line in files.read_text().splitlines():
            fields = line.split(":")
            if len(fields) < 5 or fields[1] != "d":
                continue
            top, _, sub = fields[0].partition("/")
            if top not in where:
                continue
            path = where[top] / sub if sub else where[top]
            path.mkdir(exist_ok=True)
            os.chown(path, owner.get(fields[2], 0), group.get(fields[3], 0))
            path.chmod(int(fields[4], 8))
        (self.queue_dir / "quick-start").touch()

    def _backdate_config(self) -> None:
        """Set main.cf/master.cf mtimes 10 s into the past.

        Postfix refuses to read a file modified within the last second ("it may still be
        being written") and sleeps until it is older: every postconf/postfix/daemon
        start right after writing main.cf would stall ~1-2 s.
        """
        past = time.time() - 10
        for name in ("main.cf", "master.cf"):
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.config_dir / name, (past, past))

    def _write_config(self) -> None:
        lines = [f"# generated by {__name__}"]
        lines += [f"{k} = {v}" for k, v in self.main_cf_settings().items()]
        (self.config_dir / "main.cf").write_text("\n".join(lines) + "\n")
        (self.config_dir / "master.cf").write_text(self.master_cf_text())
        if self.sasl_users is not None:
            self._write_sasl()
        self._backdate_config()

    # ---------------------------------------------------------------- commands

    def _run(
        self, argv: Sequence[str], *, input_data: bytes | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        tool = _which(argv[0])
        if tool is None:
            raise PostfixError(f"{argv[0]} not found")
        env = {**os.environ, "MAIL_CONFIG": str(self.config_dir)}
        return subprocess.run(
            [tool, *argv[1:]],
            input=input_data,
            capture_output=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def _checked(
        self, argv: Sequence[str], *, input_data: bytes | None = None, timeout: float = 30
    ) -> str:
        r = self._run(argv, input_data=input_data, timeout=timeout)
        if r.returncode != 0:
            raise PostfixError(
                f"{' '.join(argv)} exited {r.returncode}\n"
                f"stdout: {r.stdout.decode(errors='replace')}\n"
                f"stderr: {r.stderr.decode(errors='replace')}\n"
                f"--- maillog tail ---\n{self.log_tail()}"
            )
        return r.stdout.decode(errors="replace")

    # ---------------------------------------------------------------- lifecycle

    @property
    def running(self) -> bool:
        """True if the master process of this instance is alive."""
        pid = self.master_pid()
        return pid is not None and _pid_alive(pid)

    def master_pid(self) -> int | None:
        """Return the master PID from ``queue/pid/master.pid``, or None."""
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def start(self) -> None:
        """Write the configuration and start the instance; return when smtpd listens.

        Idempotent.  Bounded by ``start_timeout``.  On failure the instance is stopped and
        its directory removed (as by :meth:`stop`) before the exception propagates.

        :raises PostfixError: if ``postfix start`` fails or the listener does not appear;
            the message contains the command output and the maillog.
        """
        if self._started:
            return
        if self._removed:
            raise PostfixError("instance directory already removed; create a new instance")
        try:
            self._write_config()
            if self.fast_start:
                self._create_queue_dirs()
            # Without quick-start, `postfix start` runs post-install create-missing (queue
            # and data dirs with their ownership) and the check-warn scan, then waits for
            # master's init status.
            self._started = True
            self._checked(
                ["postfix", "-c", str(self.config_dir), "start"],
                timeout=self.start_timeout + 30,
            )
            deadline = time.monotonic() + self.start_timeout
            hosts = ["127.0.0.1"] + (["::1"] if self.ipv6 else [])
            while not all(_listening(h, self.smtp_port) for h in hosts):
                if time.monotonic() > deadline:
                    raise PostfixError(
                        f"smtpd did not listen on port {self.smtp_port} within "
                        f"{self.start_timeout}s\n--- maillog ---\n{self.log_text()}"
                    )
                time.sleep(0.05)
            if self.probe_smtp:
                self._probe_banner(deadline)
        except BaseException:
            # The error message carries the maillog; do not leave daemons or files behind.
            self.stop()
            raise

    def _probe_banner(self, deadline: float) -> None:
        hosts = ["127.0.0.1"] + (["::1"] if self.ipv6 else [])
        for host in hosts:
            last: Exception | None = None
            while True:
                try:
                    with socket.create_connection((host, self.smtp_port), timeout=2) as s:
                        banner = s.makefile("rb").readline()
                        s.sendall(b"QUIT\r\n")
                    if re.match(rb"^[2-5]\d\d[ -]", banner):
                        break
                    last = PostfixError(f"bad banner {banner!r}")
                except OSError as e:
                    last = e
                if time.monotonic() > deadline:
                    raise PostfixError(
                        f"no SMTP banner on [{host}]:{self.smtp_port}: {last}\n"
                        f"--- maillog ---\n{self.log_text()}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the instance and remove its directory.  Idempotent; never raises.

        Sends SIGTERM to the master (what ``postfix stop`` does, without its fixed 1 s
        sleep) and waits up to 5 s; falls back to ``postfix -c DIR stop`` if there is no pid
        file; finally SIGKILLs the master's process group (master is a session leader and
        every daemon is in its group) so that no daemon can outlive the test.
        """
        pid = self.master_pid()
        # Never raise from here: the process-group kill below is the safety net.
        with contextlib.suppress(Exception):
            if pid is not None and _pid_alive(pid):
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while _pid_alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
            elif self._started:
                self._run(["postfix", "-c", str(self.config_dir), "stop"], timeout=20)
        if pid is not None:
            self._kill_group(pid)
        self._started = False
        if not self.keep_dir and not self._removed:
            shutil.rmtree(self.root, ignore_errors=True)
            self._removed = True

    @staticmethod
    def _kill_group(pgid: int) -> None:
        """SIGKILL every live process of process group ``pgid`` (the master's pid).

        Members are found in /proc and signalled by pid: zombies (e.g. an unreaped master)
        still count as group members for killpg(), which would make a "group empty?"
        check with killpg(pgid, 0) never succeed.
        """
        deadline = time.monotonic() + 5
        while True:
            members = _group_members(pgid)
            if not members or time.monotonic() > deadline:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)

    def reload(self) -> None:
        """``postfix reload``: daemons pick up main.cf changes as they restart."""
        self._checked(["postfix", "-c", str(self.config_dir), "reload"])

    def postconf(self, settings: Mapping[str, object], *, reload: bool = True) -> None:
        """Change main.cf settings of the running instance (``postconf -e``), then reload."""
        args = [f"{k}={_fmt_value(v)}" for k, v in settings.items()]
        self.extra_main_cf.update(settings)
        self._checked(["postconf", "-c", str(self.config_dir), "-e", *args])
        self._backdate_config()
        if reload and self._started:
            self.reload()

    def postconf_value(self, name: str) -> str:
        """Return the effective value of a main.cf parameter (``postconf -h``)."""
        return self._checked(["postconf", "-c", str(self.config_dir), "-h", name]).strip()

    # ---------------------------------------------------------------- log

    # ---------------------------------------------------------------- queue

    def queue(self) -> list[dict[str, Any]]:
        """Return the queue as ``postqueue -j`` objects (queue_name, queue_id, recipients...)."""
        out = self._checked(["postqueue", "-c", str(self.config_dir), "-j"])
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def queue_ids(self) -> list[str]:
        """Return the ids of all queued messages (any queue: incoming, active, deferred...)."""
        return [str(item["queue_id"]) for item in self.queue()]

    def held_ids(self) -> list[str]:
        """Return the ids of the messages in the ``hold`` queue (a milter's quarantine)."""
        return [str(item["queue_id"]) for item in self.queue() if item["queue_name"] == "hold"]

    def postqueue_empty(self) -> bool:
        """True if no message is queued."""
        return not self.queue()

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait until the queue is empty; :raises TimeoutError: listing what is left."""
        deadline = time.monotonic() + timeout
        while True:
            q = self.queue()
            if not q:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {q}\n{self.log_tail()}")
            time.sleep(0.1)

    def flush(self) -> None:
        """``postqueue -f``: attempt delivery of all deferred mail now."""
        self._checked(["postqueue", "-c", str(self.config_dir), "-f"])

    def clear_queue(self) -> None:
        """``postsuper -d ALL``: delete every queued message."""
        self._checked(["postsuper", "-c", str(self.config_dir), "-d", "ALL"])

    def sendmail(self, sender: str, rcpts: Sequence[str], data: bytes) -> None:
        """Submit ``data`` via this instance's sendmail(1) (pickup path, ``non_smtpd_milters``).

        ``data`` may use LF or CRLF line endings (sendmail normalises them); ``-i`` so that
        a lone dot does not end the message.
        """
        self._checked(
            ["sendmail", "-C", str(self.config_dir), "-i", "-f", sender, "--", *rcpts],
            input_data=data,
        )
