"""A private, throw-away sendmail 8.17 instance for integration tests.

:class:`PrivateSendmail` is the sendmail twin of
:class:`tests.support.postfix.PrivatePostfix`: it writes its own ``sendmail.mc`` / ``.cf``
into a fresh directory (``/var/tmp/milterd-sm-XXXXXXXX``), runs the real Debian sendmail
daemon on loopback only and relays *all* mail to a sink on ``[127.0.0.1]:relay_port``
through one ``INPUT_MAIL_FILTER``.  Nothing outside that directory and the package cache
is written; the system's ``/etc/mail`` is never read.

The filter definition and the macro lists come **verbatim** from the project's documented
snippet ``etc/sendmail.mc.snippet`` ("documented config is tested config"); only the
``S=`` socket spec is replaced by the test's socket, plus ``F=`` / ``T=`` when a test
explicitly overrides them (``flags=`` / ``timeouts=``).  :meth:`PrivateSendmail.mc_text`
shows exactly what is used.

Where the binary comes from (:func:`ensure_sendmail`): Debian's ``sendmail-bin``
conflicts with the ``postfix`` package, so the packages are fetched with
``apt-get download`` (``apt-get update`` once if that fails) into
``/var/cache/milterd-tests/sendmail/debs`` and unpacked with ``dpkg -x`` into
``/var/cache/milterd-tests/sendmail/root`` on first use (about 2 s; later runs reuse it;
``MILTERD_SENDMAIL_CACHE`` overrides the directory).  Nothing is installed.

Pitfalls handled here (all met on Debian 12 / sendmail 8.17.1.9):

* The binary is shipped setgid ``mail``; the loader then ignores ``LD_LIBRARY_PATH``, which
  we need for the unpacked ``libwrap.so.0``: the cached copy gets ``chmod g-s``.
* An unqualified node name (``uname -n`` without a dot) makes sendmail sleep 60 s before it
  even reads the .cf.  It runs in a private UTS namespace (``unshare --uts``) whose host
  name is ``hostname`` (default ``sendmail.test``).
* sendmail logs only through syslog(3) and this machine has no ``/dev/log``.  sendmail runs
  in a private mount namespace whose ``/dev`` is a tmpfs (null, zero, full, random,
  urandom bind-mounted) with ``/dev/log`` a symlink to a datagram socket in the instance
  directory; a thread of the test process writes what arrives to ``sendmail.log``
  (:meth:`PrivateSendmail.log_text`).
* A milter socket below a world-writable sticky directory (``/var/tmp``) is "unsafe" for
  sendmail: ``DontBlameSendmail=TrustStickyBit`` (test-only; the documented socket lives in
  the root-owned ``/run/milterd``).
* The default .mc listens on every interface and adds an MSA on port 587: explicit
  loopback ``DAEMON_OPTIONS`` and ``FEATURE(no_default_msa)``.
* No DNS: ``nocanonify``, a private hosts file and service switch, the smart host as a
  literal ``[127.0.0.1]`` with the sink port in the mailer arguments, ident off.
* ``OSTYPE(debian)`` points at ``/etc/mail``; ``OSTYPE(linux)`` with the unpacked cf tree.
* SASL: sendmail reads ``Sendmail.conf`` only from fixed directories, so with ``sasl_users``
  a private copy of the Cyrus plugin directory (with a ``Sendmail.conf`` pointing at a
  sasldb in the instance directory) is bind-mounted over the system one inside the
  namespace.  Copies, not symlinks (those loop once mounted).
* The statistics file must exist (else ``poststats`` errors on every delivery); the queue
  directory must be 0700 root.
* Stopping: SIGTERM to the daemon (pid file), then SIGKILL to every process of this
  instance: the processes running the cached binary inside *this* instance's UTS
  namespace, so that a concurrent instance is never touched.

sendmail differs from Postfix where milters notice (see docs/sendmail.md): the queue id
``i`` exists from MAIL on, client addresses are ``IPv6:0:0:0:0:0:0:0:1`` in macros, and it
adds ``Date:``/``Message-Id:`` itself when the client sent none.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.support.maillog import MailLog
from tests.support.postfix import _listening, free_port

__all__ = [
    "CACHE_DIR",
    "SNIPPET",
    "PrivateSendmail",
    "SendmailError",
    "ensure_sendmail",
    "filter_line",
    "sendmail_unavailable_reason",
]

REPO = Path(__file__).resolve().parents[2]
#: The documented sendmail configuration the tests use verbatim.
SNIPPET = REPO / "etc" / "sendmail.mc.snippet"
CACHE_DIR = Path(os.environ.get("MILTERD_SENDMAIL_CACHE", "/var/cache/milterd-tests/sendmail"))
#: What is unpacked: the daemon, its cf macros, m4 to build the .cf, libwrap (linked in),
#: saslpasswd2 for ``sasl_users``.
PACKAGES = ("sendmail-bin", "sendmail-base", "sendmail-cf", "m4", "libwrap0", "sasl2-bin")
BINARY = "usr/libexec/sendmail/sendmail"
DEFAULT_PARENT = "/var/tmp"
SBIN_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"

_FILTER_RE = re.compile(r"^INPUT_MAIL_FILTER\(`([^']+)',\s*`([^']*)'\)(dnl)?\s*$", re.MULTILINE)


class SendmailError(RuntimeError):
    """Raised when the private sendmail cannot be fetched, configured or started."""


# --------------------------------------------------------------------------------------
# the binary


def sendmail_unavailable_reason() -> str | None:
    """Return why :class:`PrivateSendmail` cannot run here, or None if it can."""
    if os.geteuid() != 0:
        return "a private sendmail instance needs root"
    for tool in ("apt-get", "dpkg", "unshare", "mount"):
        if shutil.which(tool, path=SBIN_PATH) is None:
            return f"{tool} not found"
    if not SNIPPET.is_file():
        return f"{SNIPPET} missing"
    return None


def _sasl_plugin_dir() -> Path | None:
    found = sorted(Path("/usr/lib").glob("*-linux-gnu/sasl2"))
    return found[0] if found else None


def _download(debs: Path, names: list[str]) -> None:
    def attempt() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["apt-get", "download", *names],
            cwd=debs,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    r = attempt()
    if r.returncode != 0:
        # Stale package lists (404 / "Unable to locate"): refresh once.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, timeout=300, check=False)
        r = attempt()
    if r.returncode != 0:
        raise SendmailError(f"apt-get download {' '.join(names)} failed:\n{r.stdout}{r.stderr}")


def ensure_sendmail(cache: Path = CACHE_DIR) -> Path:
    """Return the unpacked tree (``root``) holding sendmail, fetching it on first use.

    Safe to call from concurrent test processes (an flock serialises the set-up).  The
    tree is complete once ``root/.complete`` exists; a half-done tree is rebuilt.
    """
    root = cache / "root"
    if (root / ".complete").exists():
        return root
    cache.mkdir(parents=True, exist_ok=True)
    cache.chmod(0o755)
    with open(cache / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists():
            return root
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        # _apt cannot write into a root-only directory; 0755 root is fine with a warning.
        debs.chmod(0o755)
        missing = [p for p in PACKAGES if not list(debs.glob(f"{p}_*.deb"))]
        if missing:
            _download(debs, missing)
        tmp = cache / "root.new"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for p in PACKAGES:
            deb = sorted(debs.glob(f"{p}_*.deb"))[-1]
            subprocess.run(["dpkg", "-x", str(deb), str(tmp)], check=True, timeout=120)
        binary = tmp / BINARY
        if not binary.is_file():
            raise SendmailError(f"{BINARY} not in the unpacked packages")
        # Shipped setgid mail: the loader would ignore LD_LIBRARY_PATH (libwrap.so.0).
        binary.chmod(binary.stat().st_mode & ~0o2000)
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        (root / ".complete").write_text(" ".join(PACKAGES) + "\n")
    return root


def filter_line(snippet: str) -> tuple[str, dict[str, str]]:
    """Return the filter name and its equates (``S``, ``F``, ``T``...) from a snippet."""
    m = _FILTER_RE.search(snippet)
    if m is None:
        raise SendmailError("no INPUT_MAIL_FILTER(`name', `S=...') line in the snippet")
    equates: dict[str, str] = {}
    for part in m.group(2).split(","):
        key, _, value = part.strip().partition("=")
        equates[key] = value
    return m.group(1), equates


# --------------------------------------------------------------------------------------


class _SyslogCatcher:
    """A datagram socket standing in for /dev/log; a thread appends messages to a file."""

    def __init__(self, sock_path: Path, log_path: Path) -> None:
        self.log_path = log_path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(sock_path))
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sendmail-syslog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with open(self.log_path, "a", buffering=1, errors="replace") as f:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                # "<PRI>Mmm dd hh:mm:ss tag[pid]: text" -> drop "<PRI>".
                text = data.decode("utf-8", "replace")
                if text.startswith("<"):
                    text = text.split(">", 1)[-1]
                f.write(text.rstrip("\n") + "\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def _relay_entry(network: str) -> str:
    """``"127.0.0.0/8"`` -> ``"127"``: a class ``R`` entry, matched by whole octets."""
    net = ipaddress.ip_network(network)
    if net.version != 4 or net.prefixlen % 8:
        raise ValueError(f"relay network {network!r}: IPv4 with an octet-aligned prefix only")
    return ".".join(str(net.network_address).split(".")[: net.prefixlen // 8])


def _ns_of(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return None


class PrivateSendmail(MailLog):
    """A private sendmail relaying everything to ``[127.0.0.1]:relay_port``.

    Same shape as :class:`~tests.support.postfix.PrivatePostfix`: construction creates the
    instance directory only; :meth:`start` writes the configuration and starts the daemon;
    :meth:`stop` (always call it, or use the context manager) kills it and removes the
    directory.

    :param smtp_port: port on 127.0.0.1 (and ``[::1]`` if ``ipv6``); None picks one.
    :param relay_port: the sink port (every recipient is relayed there).  0: no sink, mail
        stays queued.
    :param milter: the filter's socket in libmilter syntax (``unix:/path`` or
        ``inet:PORT@127.0.0.1``, i.e. milterd's own ``socket`` value); replaces ``S=``.
        Empty: no filter at all.
    :param flags: replaces the snippet's ``F=`` (``"T"``, ``"R"``, ``"4"``, ``""`` = none);
        None keeps the documented value.
    :param timeouts: replaces the snippet's ``T=`` (e.g. ``"C:30s;S:10s;R:10s;E:5m"``);
        None keeps the documented value.
    :param sasl_users: user -> password; offers AUTH PLAIN/LOGIN (Cyrus sasldb).
    :param ipv6: also listen on ``[::1]:smtp_port``.
    :param relay_networks: further client networks (IPv4 CIDR, octet-aligned prefix, e.g.
        ``"127.0.0.0/8"``) allowed to relay without AUTH, like Postfix's ``mynetworks``.
        They go to ``relay-domains`` (class ``R``), which sendmail also matches against the
        client address, by whole octets.  By default only ``localhost [127.0.0.1]`` relays.
    :param hostname: ``$j`` and the node name inside the namespace (must contain a dot).
    :param extra_mc: further m4 lines, placed before the snippet (e.g. size limits).
    :param log_level: ``LogLevel``; :param milter_log_level: ``Milter.LogLevel``.
    :param snippet: the documented snippet to use (default ``etc/sendmail.mc.snippet``).
    :param keep_dir: keep the instance directory on stop (also ``MILTERD_KEEP_SENDMAIL=1``).
    """

    log_name = "sendmail log"

    def __init__(
        self,
        smtp_port: int | None = None,
        relay_port: int = 0,
        *,
        milter: str = "",
        flags: str | None = None,
        timeouts: str | None = None,
        sasl_users: Mapping[str, str] | None = None,
        ipv6: bool = False,
        relay_networks: Sequence[str] = (),
        hostname: str = "sendmail.test",
        extra_mc: str = "",
        log_level: int = 14,
        milter_log_level: int = 14,
        snippet: Path = SNIPPET,
        base_dir: str | os.PathLike[str] | None = None,
        start_timeout: float = 30.0,
        keep_dir: bool = False,
    ) -> None:
        if "." not in hostname:
            raise ValueError("hostname must be qualified (sendmail sleeps 60 s otherwise)")
        self.ipv6 = ipv6
        self.smtp_port = smtp_port if smtp_port is not None else free_port(ipv6=ipv6)
        self.relay_port = relay_port
        self.milter = milter
        self.flags = flags
        self.timeouts = timeouts
        self.sasl_users: dict[str, str] | None = dict(sasl_users) if sasl_users else None
        self.relay_entries = [_relay_entry(n) for n in relay_networks]
        self.hostname = hostname
        self.extra_mc = extra_mc
        self.log_level = log_level
        self.milter_log_level = milter_log_level
        self.snippet = Path(snippet)
        self.start_timeout = start_timeout
        self.keep_dir = keep_dir or os.environ.get("MILTERD_KEEP_SENDMAIL") == "1"
        parent = Path(base_dir) if base_dir is not None else Path(DEFAULT_PARENT)
        self.root = Path(tempfile.mkdtemp(prefix="milterd-sm-", dir=parent))
        self.root.chmod(0o755)
        self.queue_dir = self.root / "mqueue"
        self.mc = self.root / "sendmail.mc"
        self.cf = self.root / "sendmail.cf"
        self.pid_file = self.root / "sendmail.pid"
        self.maillog = self.root / "sendmail.log"
        self.tree: Path | None = None
        self._catcher: _SyslogCatcher | None = None
        self._pid: int | None = None
        self._ns: str | None = None
        self._started = False
        self._removed = False

    # ---------------------------------------------------------------- context manager

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return "127.0.0.1"

    @property
    def milter_name(self) -> str:
        """The filter's name as sendmail logs it (``Milter (NAME): ...``)."""
        return filter_line(self.snippet.read_text())[0]

    # ---------------------------------------------------------------- configuration

    def filter_text(self) -> str:
        """The snippet with ``S=`` (and ``F=``/``T=`` if overridden) replaced."""
        text = self.snippet.read_text()
        m = _FILTER_RE.search(text)
        if m is None:
            raise SendmailError(f"{self.snippet}: no INPUT_MAIL_FILTER line")
        if not self.milter:
            return text[: m.start()] + "dnl (no filter)\n" + text[m.end() :]
        name, equates = filter_line(text)
        equates["S"] = self.milter
        if self.flags is not None:
            equates["F"] = self.flags
            if not self.flags:
                del equates["F"]
        if self.timeouts is not None:
            equates["T"] = self.timeouts
        if (self.flags, self.timeouts) == (None, None) and list(equates) == list(
            filter_line(text)[1]
        ):
            # Keep the documented line byte for byte, only the socket spec changes.
            old = filter_line(text)[1]["S"]
            line = m.group(0).replace(f"S={old}", f"S={self.milter}", 1)
        else:
            body = ", ".join(f"{k}={v}" for k, v in equates.items())
            line = f"INPUT_MAIL_FILTER(`{name}', `{body}')dnl\n"
        return text[: m.start()] + line + text[m.end() :]

    def mc_text(self) -> str:
        """The complete ``sendmail.mc`` :meth:`start` writes."""
        tree = self.tree or CACHE_DIR / "root"
        extra = self.extra_mc.rstrip("\n") + "\n" if self.extra_mc else ""
        d = self.root
        port = self.relay_port or 1  # nothing listens on port 1: mail stays queued
        v6 = (
            f"DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=::1, Family=inet6, Name=MTA-v6')dnl\n"
            if self.ipv6
            else ""
        )
        auth = (
            "define(`confAUTH_MECHANISMS', `PLAIN LOGIN')dnl\nTRUST_AUTH_MECH(`PLAIN LOGIN')dnl\n"
            if self.sasl_users
            else ""
        )
        head = f"""divert(-1)dnl
# generated by {__name__}: sendmail test instance in {d}
divert(0)dnl
VERSIONID(`milterd test instance')dnl
OSTYPE(`linux')dnl
dnl --- identity, no DNS, no interface probing
define(`confDOMAIN_NAME', `{self.hostname}')dnl
define(`confDONT_PROBE_INTERFACES', `True')dnl
define(`confBIND_OPTS', `-DNSRCH -DEFNAMES')dnl
define(`confSERVICE_SWITCH_FILE', `{d}/service.switch')dnl
define(`confHOSTS_FILE', `{d}/hosts')dnl
define(`confTO_IDENT', `0s')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
FEATURE(`accept_unqualified_senders')dnl
dnl --- every file sendmail uses lives in the instance directory
define(`QUEUE_DIR', `{self.queue_dir}')dnl
define(`STATUS_FILE', `{d}/sendmail.st')dnl
define(`confPID_FILE', `{self.pid_file}')dnl
define(`ALIAS_FILE', `{d}/aliases')dnl
define(`confCW_FILE', `-o {d}/local-host-names')dnl
define(`confCR_FILE', `-o {d}/relay-domains')dnl
define(`confDEAD_LETTER_DROP', `{d}/dead.letter')dnl
define(`confHELP_FILE', `{tree}/etc/mail/helpfile')dnl
define(`confLOG_LEVEL', `{self.log_level}')dnl
define(`confMILTER_LOG_LEVEL', `{self.milter_log_level}')dnl
dnl test-only: the milter socket lives below the sticky, world-writable /var/tmp
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
{auth}dnl --- relay everything to the sink
define(`SMART_HOST', `[127.0.0.1]')dnl
define(`RELAY_MAILER_ARGS', `TCP $h {port}')dnl
define(`ESMTP_MAILER_ARGS', `TCP $h {port}')dnl
define(`SMTP_MAILER_ARGS', `TCP $h {port}')dnl
define(`SMTP8_MAILER_ARGS', `TCP $h {port}')dnl
dnl --- listeners: loopback only, no default MSA on *:587
FEATURE(`no_default_msa')dnl
DAEMON_OPTIONS(`Port={self.smtp_port}, Addr=127.0.0.1, Name=MTA')dnl
{v6}{extra}dnl --- begin {self.snippet.name} (the documented configuration)
"""
        tail = f"""dnl --- end {self.snippet.name}
MAILER(`local')dnl
MAILER(`smtp')dnl
"""
        return head + self.filter_text() + tail

    def _write_config(self, tree: Path) -> None:
        self.tree = tree
        d = self.root
        self.queue_dir.mkdir(mode=0o700, exist_ok=True)
        self.queue_dir.chmod(0o700)
        (d / "service.switch").write_text("hosts\tfiles\naliases\tfiles\n")
        (d / "hosts").write_text(f"127.0.0.1\tlocalhost {self.hostname}\n::1\tlocalhost\n")
        (d / "aliases").write_text("postmaster: root\n")
        (d / "local-host-names").write_text(self.hostname + "\n")
        if self.relay_entries:
            (d / "relay-domains").write_text("".join(f"{e}\n" for e in self.relay_entries))
        (d / "sendmail.st").touch()
        self.mc.write_text(self.mc_text())
        r = subprocess.run(
            [str(tree / "usr/bin/m4"), str(tree / "usr/share/sendmail/cf/m4/cf.m4"), str(self.mc)],
            capture_output=True,
            timeout=30,
            check=False,
        )
        if r.returncode != 0 or b"ERROR" in r.stderr:
            raise SendmailError(f"m4 failed: {r.stderr.decode(errors='replace')}")
        self.cf.write_bytes(r.stdout)
        if self.sasl_users:
            self._write_sasl(tree)

    def _write_sasl(self, tree: Path) -> None:
        assert self.sasl_users is not None
        plugins = _sasl_plugin_dir()
        if plugins is None:
            raise SendmailError("no Cyrus SASL plugin dir (apt-get install libsasl2-modules)")
        sasl = self.root / "sasl2"
        sasl.mkdir(exist_ok=True)
        for so in plugins.glob("*.so*"):
            shutil.copy(so, sasl / so.name)  # copies: symlinks would loop once mounted
        db = self.root / "sasldb2"
        (sasl / "Sendmail.conf").write_text(
            f"pwcheck_method: auxprop\nauxprop_plugin: sasldb\nsasldb_path: {db}\n"
            "mech_list: PLAIN LOGIN\n"
        )
        saslpasswd2 = shutil.which("saslpasswd2", path=SBIN_PATH) or str(
            tree / "usr/sbin/saslpasswd2"
        )
        for user, password in self.sasl_users.items():
            r = subprocess.run(
                [saslpasswd2, "-p", "-c", "-f", str(db), "-u", self.hostname, user],
                input=password.encode(),
                capture_output=True,
                timeout=30,
                check=False,
            )
            if r.returncode != 0:
                raise SendmailError(f"saslpasswd2 failed for {user!r}: {r.stderr!r}")

    # ---------------------------------------------------------------- lifecycle

    def _env(self, tree: Path) -> dict[str, str]:
        libs = ":".join(str(p) for p in sorted(tree.glob("usr/lib/*-linux-gnu")))
        env = {
            "PATH": SBIN_PATH,
            "LD_LIBRARY_PATH": libs,
            "RES_OPTIONS": "timeout:1 attempts:1",
        }
        return env

    def start(self) -> None:
        """Fetch (first use), configure and start; return when the listeners are up.

        :raises SendmailError: with the log if sendmail does not start.
        """
        if self._started:
            return
        if self._removed:
            raise SendmailError("instance directory already removed; create a new instance")
        try:
            self.tree = ensure_sendmail()
            self._write_config(self.tree)
            self._started = True
            self._catcher = _SyslogCatcher(self.root / "syslog.sock", self.maillog)
            sasl_dir = _sasl_plugin_dir() if self.sasl_users else None
            # Inside fresh UTS+mount namespaces: a qualified host name, /dev/log -> our
            # catcher, and (SASL) our Sendmail.conf where libsasl looks for it.
            script = """
set -e
d=$1 name=$2 sasl=$3; shift 3
hostname "$name"
[ -z "$sasl" ] || mount --bind "$d/sasl2" "$sasl"
mkdir -p "$d/.hostdev" && mount --bind /dev "$d/.hostdev"
mount -t tmpfs -o mode=755 sm-dev /dev
for n in null zero full random urandom; do : > /dev/$n; mount --bind "$d/.hostdev/$n" /dev/$n; done
ln -s "$d/syslog.sock" /dev/log
exec "$@"
"""
            argv = [
                "unshare",
                "--uts",
                "--mount",
                "sh",
                "-c",
                script,
                "sh",
                str(self.root),
                self.hostname,
                str(sasl_dir or ""),
                str(self.tree / BINARY),
                "-C",
                str(self.cf),
                "-L",
                "sm-milterd-test",
                "-bd",
                "-q1m",
            ]
            r = subprocess.run(
                argv, env=self._env(self.tree), capture_output=True, timeout=60, check=False
            )
            if r.returncode != 0:
                raise SendmailError(
                    f"sendmail -bd exited {r.returncode}: {r.stdout!r} {r.stderr!r}\n"
                    f"--- log ---\n{self.log_text()}"
                )
            deadline = time.monotonic() + self.start_timeout
            hosts = ["127.0.0.1"] + (["::1"] if self.ipv6 else [])
            while True:
                pid = self._read_pid()
                if pid is not None and all(_listening(h, self.smtp_port) for h in hosts):
                    self._pid, self._ns = pid, _ns_of(pid)
                    break
                if time.monotonic() > deadline:
                    raise SendmailError(
                        f"sendmail did not listen on port {self.smtp_port} within "
                        f"{self.start_timeout}s\n--- log ---\n{self.log_text()}"
                    )
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def _read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def _processes(self) -> list[int]:
        """Live processes of this instance: our binary inside our UTS namespace."""
        if self.tree is None or self._ns is None:
            return []
        binary = str(self.tree / BINARY)
        found: list[int] = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.readlink(entry / "exe") != binary:
                    continue
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and _ns_of(int(entry.name)) == self._ns:
                found.append(int(entry.name))
        return found

    @property
    def running(self) -> bool:
        return bool(self._processes())

    def stop(self) -> None:
        """Stop every process of this instance and remove its directory.  Never raises."""
        with contextlib.suppress(Exception):
            if self._ns is None and (pid := self._read_pid()) is not None:
                # start() failed after the daemon came up: still find its processes.
                self._pid, self._ns = pid, _ns_of(pid)
            if self._pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self._pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while self._pid in self._processes() and time.monotonic() < deadline:
                    time.sleep(0.05)
            deadline = time.monotonic() + 5
            while (left := self._processes()) and time.monotonic() < deadline:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.05)
        if self._catcher is not None:
            self._catcher.close()
            self._catcher = None
        self._started = False
        self._pid = None
        if not self.keep_dir and not self._removed:
            shutil.rmtree(self.root, ignore_errors=True)
            self._removed = True

    # ---------------------------------------------------------------- log

    # ---------------------------------------------------------------- queue

    def queue_files(self) -> list[str]:
        """Names of the files in the queue directory (``qf*``/``df*``: mail still queued)."""
        try:
            return sorted(p.name for p in self.queue_dir.iterdir())
        except FileNotFoundError:
            return []

    def queue_ids(self) -> list[str]:
        """Ids of the messages in the queue: ``qf*`` (to deliver) and ``hf*`` (held)."""
        return sorted({f[2:] for f in self.queue_files() if f.startswith(("qf", "hf"))})

    def held_ids(self) -> list[str]:
        """Ids of quarantined messages: sendmail keeps them as ``hf*`` instead of ``qf*``."""
        return [f[2:] for f in self.queue_files() if f.startswith("hf")]

    def clear_queue(self) -> None:
        """Delete every queued (or held) message: all files in the queue directory."""
        for f in self.queue_dir.iterdir():
            f.unlink(missing_ok=True)

    def wait_queue_empty(self, timeout: float = 10.0) -> None:
        """Wait until no ``qf*`` file is left; :raises TimeoutError: listing what is left."""
        deadline = time.monotonic() + timeout
        while True:
            left = [f for f in self.queue_files() if f.startswith("qf")]
            if not left:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"queue not empty after {timeout}s: {left}\n{self.log_tail()}")
            time.sleep(0.1)
