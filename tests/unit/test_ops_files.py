"""The operations files stay valid: the systemd unit, sysusers/tmpfiles, the MTA snippets, and
docs/operations.md that explains them.

The real tools check them, and a missing tool is a failure naming the Debian package, never a
skip:

* ``systemd-analyze``, ``systemd-sysusers``, ``systemd-tmpfiles``: package ``systemd``;
* ``postconf``: package ``postfix`` (``make deps`` installs it unconfigured);
* ``m4`` and ``/usr/share/sendmail/cf``: packages ``m4`` and ``sendmail-cf`` (m4 files only,
  no MTA). ``MILTERD_SENDMAIL_CF`` may point at another copy of that ``cf`` directory.

The tmpfiles test chowns inside a scratch root, so the suite runs as root (``make test`` does).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath

import pytest

from milterd.config import Settings, loads, parse_socket
from milterd.daemon import STOP_MARGIN
from milterd.pipeline import CORE_MACROS

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "milterd.service"
SYSUSERS = ROOT / "systemd" / "milterd.sysusers"
TMPFILES = ROOT / "systemd" / "milterd.tmpfiles"
REPORT_UNIT = ROOT / "systemd" / "milterd-dmarc-report.service"
REPORT_TIMER = ROOT / "systemd" / "milterd-dmarc-report.timer"
POSTFIX = ROOT / "etc" / "postfix-main.cf.snippet"
SENDMAIL = ROOT / "etc" / "sendmail.mc.snippet"
DOCS = ROOT / "docs" / "operations.md"

#: Debian package of each tool the tests run.
PACKAGES = {
    "systemd-analyze": "systemd",
    "systemd-sysusers": "systemd",
    "systemd-tmpfiles": "systemd",
    "postconf": "postfix",
    "m4": "m4",
}
SENDMAIL_CF = Path(os.environ.get("MILTERD_SENDMAIL_CF", "/usr/share/sendmail/cf"))
#: Postfix's queue directory on Debian: its daemons' working directory and chroot.
POSTFIX_QUEUE = PurePosixPath("/var/spool/postfix")
#: The supervisor SIGKILLs workers this long after shutdown_timeout (daemon.Supervisor.run).
KILL_MARGIN = float(STOP_MARGIN)

# milterd stage -> the MTA setting that lists the macros sent at that stage.
POSTFIX_MACROS = {
    "connect": "milter_connect_macros",
    "helo": "milter_helo_macros",
    "envfrom": "milter_mail_macros",
    "envrcpt": "milter_rcpt_macros",
    "data": "milter_data_macros",
    "eoh": "milter_end_of_header_macros",
    "eom": "milter_end_of_data_macros",
}
SENDMAIL_MACROS = {
    "connect": "CONNECT",
    "helo": "HELO",
    "envfrom": "ENVFROM",
    "envrcpt": "ENVRCPT",
    "data": "DATA",
    "eoh": "EOH",
    "eom": "EOM",
}
#: What DKIM signing (coming) needs on top of the core's macros, and what the brief names.
REQUIRED_MACROS = {"i", "j", "{daemon_name}", "{auth_authen}", "{client_addr}"}

HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "RestrictNamespaces": "yes",
    "LockPersonality": "yes",
    "MemoryDenyWriteExecute": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service",
    "UMask": "0027",
}
RUNNING = {
    "User": "milterd",
    "Group": "milterd",
    "RuntimeDirectory": "milterd",
    "StateDirectory": "milterd",
    "ExecReload": "/bin/kill -HUP $MAINPID",
    "KillMode": "mixed",
    "Restart": "on-failure",
    "SupplementaryGroups": "postfix",
}
#: systemd-analyze security's exposure score, times ten (the unit scores 1.5 on systemd 252).
MAX_EXPOSURE = 25


# --- helpers --------------------------------------------------------------------------------


def tool(name: str) -> str:
    """Absolute path of a tool; fail (never skip) naming the Debian package if it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")
    if path is None:
        pkg = PACKAGES[name]
        pytest.fail(f"{name} not found: install the Debian package {pkg!r} (apt-get install {pkg})")
    return path


def run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False, cwd=cwd)


def unit_sections(text: str) -> dict[str, dict[str, list[str]]]:
    """systemd's INI dialect: [Section], Key=Value (a key may repeat), # and ; comments."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        assert not line.endswith("\\"), f"line {n}: continuation lines are not used here"
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"line {n}: outside any [Section]: {raw!r}"
        key, eq, value = line.partition("=")
        assert eq, f"line {n}: not Key=Value: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def service() -> dict[str, list[str]]:
    return unit_sections(UNIT.read_text())["Service"]


def one(entries: dict[str, list[str]], key: str) -> str:
    values = entries.get(key)
    assert values is not None, f"{key}= missing"
    assert len(values) == 1, f"{key}= set {len(values)} times: {values}"
    return values[0]


def runnable_unit(tmp_path: Path, unit: Path = UNIT) -> Path:
    """A copy of the unit whose ExecStart names a binary that exists here (verify checks it)."""
    exe = Path(sys.executable).with_name("milterd")
    if not os.access(exe, os.X_OK):
        exe = Path("/bin/true")
    text = re.sub(r"^ExecStart=\S+", f"ExecStart={exe}", unit.read_text(), flags=re.MULTILINE)
    copy = tmp_path / unit.name
    copy.write_text(text)
    return copy


def seconds(value: str, default_unit: str = "s") -> float:
    """A Postfix/sendmail/systemd duration such as 30, 30s, 5m, 1h (no mixed units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)?", value.strip())
    assert m, f"not a simple duration: {value!r}"
    unit = {"sec": "s", "min": "m"}.get(m[2] or default_unit, m[2] or default_unit)
    return float(m[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]


def ceiling(field: str) -> float:
    """The largest value milterd accepts for a [milterd] key (its pydantic ``le``)."""
    for meta in Settings.model_fields[field].metadata:
        le = getattr(meta, "le", None)
        if le is not None:
            return float(le)
    raise AssertionError(f"Settings.{field} has no upper bound")


def default(field: str) -> float:
    value = Settings.model_fields[field].default
    assert isinstance(value, int | float)
    return float(value)


def postfix_params(text: str) -> dict[str, str]:
    """main.cf syntax: ``name = value``; # comments; a line starting with space continues."""
    params: dict[str, str] = {}
    key: str | None = None
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if raw[0].isspace():
            assert key is not None, f"line {n}: continuation without a parameter"
            params[key] += " " + raw.strip()
            continue
        m = re.fullmatch(r"([a-z0-9_]+)\s*=\s*(.*)", raw)
        assert m, f"line {n}: not 'name = value': {raw!r}"
        key = m[1]
        assert key not in params, f"line {n}: {key} set twice"
        params[key] = m[2].strip()
    return params


def macro_list(value: str) -> list[str]:
    return [m for m in re.split(r"[\s,]+", value.strip()) if m]


def colon_file(path: Path) -> dict[str, list[str]]:
    """/etc/passwd or /etc/group: name -> fields."""
    return {f[0]: f for f in (line.split(":") for line in path.read_text().splitlines()) if f[0]}


def tmpfiles_dirs() -> dict[str, tuple[str, str, str]]:
    """``d`` lines of the tmpfiles snippet: path -> (mode, user, group)."""
    out: dict[str, tuple[str, str, str]] = {}
    for raw in TMPFILES.read_text().splitlines():
        fields = raw.split()
        if not fields or fields[0].startswith("#"):
            continue
        assert fields[0] == "d", f"unexpected tmpfiles line type: {raw!r}"
        out[fields[1]] = (fields[2], fields[3], fields[4])
    return out


FILTER_RE = re.compile(r"^INPUT_MAIL_FILTER\(`milterd',\s*`([^`']*)'\)dnl$", re.MULTILINE)
DEFINE_RE = re.compile(r"^define\(`confMILTER_MACROS_([A-Z]+)',\s*``([^`']*)''\)dnl$", re.MULTILINE)


def sendmail_filter() -> dict[str, str]:
    """The INPUT_MAIL_FILTER equates: S=, F=, T=."""
    found = FILTER_RE.findall(SENDMAIL.read_text())
    assert len(found) == 1, "expected one INPUT_MAIL_FILTER(`milterd', `...')dnl line"
    equates: dict[str, str] = {}
    for part in found[0].split(","):
        key, eq, value = part.strip().partition("=")
        assert eq and key in {"S", "F", "T"}, f"unknown filter equate {part!r}"
        equates[key] = value
    return equates


def sendmail_timeouts() -> dict[str, float]:
    out: dict[str, float] = {}
    for item in sendmail_filter()["T"].split(";"):
        key, colon, value = item.partition(":")
        assert colon and key in {"C", "S", "R", "E"}, f"unknown timeout {item!r}"
        out[key] = seconds(value)
    return out


def sendmail_macros() -> dict[str, list[str]]:
    return {stage: macro_list(value) for stage, value in DEFINE_RE.findall(SENDMAIL.read_text())}


# --- systemd unit ---------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = runnable_unit(tmp_path)
    r = run([tool("systemd-analyze"), "verify", "--man=no", str(unit)], cwd=tmp_path)
    output = (r.stdout + r.stderr).strip()
    about_unit = [line for line in output.splitlines() if unit.name in line]
    assert r.returncode == 0, f"systemd-analyze verify exited {r.returncode}:\n{output}"
    assert not about_unit, "systemd-analyze verify complains:\n" + "\n".join(about_unit)


def test_verify_reports_a_broken_unit(tmp_path: Path) -> None:
    """Control: on this systemd, verify names the unit for a typo (exit status stays 0), so
    the test above would see one."""
    unit = runnable_unit(tmp_path)
    unit.write_text(
        unit.read_text().replace("ProtectHome=yes", "ProtectHome=yes\nProtectHomme=yes")
    )
    r = run([tool("systemd-analyze"), "verify", "--man=no", str(unit)], cwd=tmp_path)
    assert unit.name in r.stdout + r.stderr


def test_unit_exposure_stays_low(tmp_path: Path) -> None:
    unit = runnable_unit(tmp_path)
    r = run(
        [
            tool("systemd-analyze"),
            "security",
            "--offline=yes",
            f"--threshold={MAX_EXPOSURE}",
            "--no-pager",
            str(unit),
        ],
        cwd=tmp_path,
    )
    assert r.returncode == 0, f"exposure above {MAX_EXPOSURE / 10}:\n{r.stdout}{r.stderr}"


@pytest.mark.parametrize(("key", "value"), sorted({**HARDENING, **RUNNING}.items()))
def test_unit_sets(key: str, value: str) -> None:
    assert one(service(), key) == value


def test_unit_type_and_exec_start() -> None:
    svc = service()
    # notify: the daemon says READY=1 once it listens (milterd.daemon.sd_notify), and the
    # main process (the supervisor) is the one allowed to say it
    assert one(svc, "Type") == "notify" and one(svc, "NotifyAccess") == "main"
    argv = shlex.split(one(svc, "ExecStart"))
    assert argv[0].startswith("/") and argv[0].endswith("/milterd"), argv
    assert argv[1:] == ["-c", "/etc/milterd/milterd.toml", "run"]


def test_unit_stop_timeout_covers_the_drain() -> None:
    stop = seconds(one(service(), "TimeoutStopSec"))
    assert stop > default("shutdown_timeout") + KILL_MARGIN, (
        f"TimeoutStopSec={stop:g}s does not let open sessions finish (shutdown_timeout "
        f"{default('shutdown_timeout'):g}s + {KILL_MARGIN:g}s) before SIGKILL"
    )


def test_unit_is_installable() -> None:
    sections = unit_sections(UNIT.read_text())
    assert one(sections["Install"], "WantedBy") == "multi-user.target"
    assert one(sections["Unit"], "Description")


def test_dmarc_report_service_and_timer(tmp_path: Path) -> None:
    """The daily report job: both files verify, the service is as hardened as the daemon,
    and its command is one milterd's command line takes."""
    unit = runnable_unit(tmp_path, REPORT_UNIT)
    timer = tmp_path / REPORT_TIMER.name
    timer.write_text(REPORT_TIMER.read_text())
    r = run([tool("systemd-analyze"), "verify", "--man=no", str(unit), str(timer)], cwd=tmp_path)
    output = (r.stdout + r.stderr).strip()
    assert r.returncode == 0, output
    assert not [line for line in output.splitlines() if "milterd-dmarc-report" in line], output
    r = run(
        [tool("systemd-analyze"), "security", "--offline=yes", f"--threshold={MAX_EXPOSURE}",
         "--no-pager", str(unit)],
        cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, f"exposure above {MAX_EXPOSURE / 10}:\n{r.stdout}{r.stderr}"
    svc = unit_sections(REPORT_UNIT.read_text())["Service"]
    assert one(svc, "Type") == "oneshot"
    assert one(svc, "User") == one(service(), "User")
    argv = shlex.split(one(svc, "ExecStart"))
    assert argv[1:] == ["-c", "/etc/milterd/milterd.toml", "dmarc", "report", "--send"]
    for key, value in HARDENING.items():
        assert one(svc, key) == value, key
    help_run = run([sys.executable, "-m", "milterd.cli", *argv[3:], "--help"])
    assert help_run.returncode == 0 and "--send" in help_run.stdout, help_run.stderr
    tm = unit_sections(REPORT_TIMER.read_text())
    assert one(tm["Timer"], "Persistent") == "true"
    assert "UTC" in one(tm["Timer"], "OnCalendar")
    assert one(tm["Install"], "WantedBy") == "timers.target"


# --- sysusers / tmpfiles --------------------------------------------------------------------


def test_sysusers_and_tmpfiles_create_what_the_unit_needs(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    r = run([tool("systemd-sysusers"), f"--root={root}", str(SYSUSERS)])
    assert r.returncode == 0, r.stderr
    users = colon_file(root / "etc/passwd")
    assert "milterd" in users, "sysusers created no milterd user"
    assert users["milterd"][5] == "/var/lib/milterd"
    assert users["milterd"][6].endswith("/nologin")
    with (root / "etc/group").open("a") as f:
        f.write("postfix:x:4242:\n")  # what the postfix package creates
    uids = {"root": 0, "milterd": int(users["milterd"][2])}
    gids = {"root": 0, **{name: int(f[2]) for name, f in colon_file(root / "etc/group").items()}}

    if os.geteuid() != 0:
        pytest.fail("systemd-tmpfiles --create chowns: run the tests as root (make test does)")
    r = run([tool("systemd-tmpfiles"), f"--root={root}", "--create", str(TMPFILES)])
    assert r.returncode == 0 and not r.stderr, r.stderr
    for path, (mode, user, group) in tmpfiles_dirs().items():
        st = (root / path.lstrip("/")).stat()
        assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == (
            oct(int(mode, 8)),
            uids[user],
            gids[group],
        ), path


def test_config_directory_is_readable_by_milterd_only() -> None:
    assert tmpfiles_dirs()["/etc/milterd"] == ("0750", "root", "milterd")


# --- Postfix --------------------------------------------------------------------------------


def test_postfix_snippet_settings() -> None:
    params = postfix_params(POSTFIX.read_text())
    assert params["smtpd_milters"]
    assert params["non_smtpd_milters"] in {"$smtpd_milters", params["smtpd_milters"]}
    assert params["milter_default_action"] == "tempfail"
    assert params["milter_protocol"] == "6"
    sent = set().union(*(macro_list(params[p]) for p in POSTFIX_MACROS.values() if p in params))
    assert sent >= REQUIRED_MACROS, f"missing {REQUIRED_MACROS - sent}"


@pytest.mark.parametrize("stage", sorted(CORE_MACROS))
def test_postfix_sends_what_the_core_reads(stage: str) -> None:
    params = postfix_params(POSTFIX.read_text())
    name = POSTFIX_MACROS[stage]
    assert name in params, f"the snippet should show {name} (the core reads {stage} macros)"
    missing = set(CORE_MACROS[stage]) - set(macro_list(params[name]))
    assert not missing, f"{name} lacks {sorted(missing)}"


def test_postfix_deadlines_sit_above_milterds() -> None:
    params = postfix_params(POSTFIX.read_text())
    assert seconds(params["milter_command_timeout"]) > ceiling("command_timeout")
    assert seconds(params["milter_content_timeout"]) > ceiling("eom_timeout")


def test_postconf_accepts_the_snippet(tmp_path: Path) -> None:
    """Postfix itself parses it: no unknown parameter, and the values are what we meant."""
    conf = tmp_path / "postfix"
    conf.mkdir()
    (conf / "main.cf").write_text(POSTFIX.read_text())
    (conf / "master.cf").write_text("")
    postconf = tool("postconf")
    r = run([postconf, "-c", str(conf), "-n"])
    assert r.returncode == 0 and not r.stderr, r.stderr
    got = dict(line.split(" = ", 1) for line in r.stdout.splitlines() if " = " in line)
    for key, value in postfix_params(POSTFIX.read_text()).items():
        assert got.get(key) == value, key
    r = run([postconf, "-c", str(conf), "-xh", "non_smtpd_milters"])
    assert r.stdout.strip() == got["smtpd_milters"]


def test_postfix_socket_is_inside_the_chroot_and_prepared() -> None:
    """The default socket works with Debian's chrooted smtpd/cleanup: a path relative to the
    queue directory, a directory that tmpfiles creates for group postfix, writable in the
    unit, and the milterd.toml line the comment tells the admin to write."""
    params = postfix_params(POSTFIX.read_text())
    spec = params["smtpd_milters"].split()[0]
    assert spec.startswith("unix:") and not spec.startswith("unix:/"), spec
    path = POSTFIX_QUEUE / spec.removeprefix("unix:")
    directory = str(path.parent)
    assert tmpfiles_dirs()[directory][2] == "postfix"
    assert {p.lstrip("-") for p in service().get("ReadWritePaths", [])} >= {directory}
    toml_line = f'socket = "unix:{path}"'
    assert toml_line in POSTFIX.read_text()
    assert parse_socket(f"unix:{path}") == ("unix", str(path), 0)


# --- sendmail -------------------------------------------------------------------------------


def test_sendmail_snippet_is_only_filter_defines_and_comments() -> None:
    for n, line in enumerate(SENDMAIL.read_text().splitlines(), 1):
        ok = line.startswith("dnl") or FILTER_RE.fullmatch(line) or DEFINE_RE.fullmatch(line)
        assert ok, f"line {n}: neither dnl, INPUT_MAIL_FILTER nor a macro define: {line!r}"


def test_sendmail_filter_fails_closed_with_strict_timeouts() -> None:
    eq = sendmail_filter()
    assert "T" in eq["F"], "F=T: temp-fail when milterd is unavailable"
    assert parse_socket(eq["S"])  # the same spec milterd.toml takes
    t = sendmail_timeouts()
    assert set(t) == {"C", "S", "R", "E"}
    assert t["S"] <= 10 and t["R"] <= 10
    assert t["R"] > default("command_timeout") and t["R"] > default("progress_interval")
    assert t["E"] > ceiling("eom_timeout")


def test_sendmail_socket_is_the_units_runtime_directory() -> None:
    family, where, _ = parse_socket(sendmail_filter()["S"])
    assert family == "unix"
    assert PurePosixPath(where).parent == PurePosixPath("/run") / one(service(), "RuntimeDirectory")


def test_sendmail_snippet_macros() -> None:
    macros = sendmail_macros()
    sent = set().union(*macros.values())
    assert sent >= REQUIRED_MACROS, f"missing {REQUIRED_MACROS - sent}"


@pytest.mark.parametrize("stage", sorted(CORE_MACROS))
def test_sendmail_sends_what_the_core_reads(stage: str) -> None:
    name = SENDMAIL_MACROS[stage]
    macros = sendmail_macros()
    assert name in macros, f"define confMILTER_MACROS_{name} (the core reads {stage} macros)"
    missing = set(CORE_MACROS[stage]) - set(macros[name])
    assert not missing, f"confMILTER_MACROS_{name} lacks {sorted(missing)}"


def build_sendmail_cf(tmp_path: Path) -> list[str]:
    """Debian's own sendmail.mc with the snippet before MAILER_DEFINITIONS, through m4."""
    if not (SENDMAIL_CF / "m4" / "cf.m4").is_file():
        pytest.fail(
            f"{SENDMAIL_CF}/m4/cf.m4 not found: install the Debian package 'sendmail-cf' "
            "(m4 files only; it installs no MTA), or set MILTERD_SENDMAIL_CF"
        )
    m4 = tool("m4")
    cf = str(SENDMAIL_CF)
    lines = []
    for line in (SENDMAIL_CF / "debian" / "sendmail.mc").read_text().splitlines(keepends=True):
        if "/etc/mail/m4/" in line:  # dialup.m4/provider.m4 belong to an installed sendmail
            continue
        if line.startswith("include(`/usr/share/sendmail/cf/m4/cf.m4')"):
            # Also works for a copy elsewhere: autoconf.m4 first keeps OSTYPE(debian) and
            # DOMAIN(debian-mta) from including it by its absolute path.
            lines.append(f"include(`{cf}/m4/cf.m4')dnl\ninclude(`{cf}/debian/autoconf.m4')dnl\n")
            continue
        if line.startswith("MAILER_DEFINITIONS"):
            lines.append(SENDMAIL.read_text())
        lines.append(line)
    assert SENDMAIL.read_text() in lines, "Debian's sendmail.mc has no MAILER_DEFINITIONS line"
    mc = tmp_path / "sendmail.mc"
    mc.write_text("".join(lines))
    r = run([m4, str(mc)], cwd=tmp_path)
    assert r.returncode == 0 and not r.stderr, f"m4 failed:\n{r.stderr}"
    return r.stdout.splitlines()


def cfhead_defaults() -> dict[str, list[str]]:
    """sendmail-cf's default macro lists (cf/m4/cfhead.m4)."""
    text = (SENDMAIL_CF / "m4" / "cfhead.m4").read_text()
    found = re.findall(r"define\(`confMILTER_MACROS_([A-Z]+)',\s*`+([^`']*)'+\)", text)
    assert found, "no default macro lists in cfhead.m4"
    return {stage: macro_list(value) for stage, value in found}


def test_sendmail_cf_builds_with_the_snippet(tmp_path: Path) -> None:
    cf = build_sendmail_cf(tmp_path)
    assert "O InputMailFilters=milterd" in cf
    args = FILTER_RE.findall(SENDMAIL.read_text())[0]
    assert f"Xmilterd, {args}" in cf
    options = {
        line.split("=", 1)[0].removeprefix("O Milter.macros."): macro_list(line.split("=", 1)[1])
        for line in cf
        if line.startswith("O Milter.macros.")
    }
    defaults = cfhead_defaults()
    for name, wanted in sendmail_macros().items():
        got = options.get(name.lower())
        assert got == wanted, f"Milter.macros.{name.lower()}: {got} != {wanted}"
        lost = set(defaults.get(name, [])) - set(got)
        assert not lost, f"Milter.macros.{name.lower()} drops sendmail's defaults {sorted(lost)}"
    for stage, names in CORE_MACROS.items():
        assert set(names) <= set(options[SENDMAIL_MACROS[stage].lower()]), stage


# --- docs -----------------------------------------------------------------------------------


def test_docs_toml_examples_are_valid_config() -> None:
    blocks = re.findall(r"```toml\n(.*?)```", DOCS.read_text(), re.DOTALL)
    assert blocks, "docs/operations.md has no TOML example"
    for block in blocks:
        tomllib.loads(block)
        loads(block, "docs/operations.md")


def test_docs_explain_every_line() -> None:
    """Every unit directive, Postfix parameter and sendmail define is named in the guide."""
    docs = DOCS.read_text()
    names = [key for section in unit_sections(UNIT.read_text()).values() for key in section]
    names += list(postfix_params(POSTFIX.read_text()))
    names += [f"confMILTER_MACROS_{stage}" for stage in sendmail_macros()]
    names += ["INPUT_MAIL_FILTER", "F=T", "T=" + sendmail_filter()["T"]]
    missing = [n for n in names if n not in docs]
    assert not missing, f"docs/operations.md does not mention {missing}"


def test_docs_name_each_file() -> None:
    docs = DOCS.read_text()
    for path in (UNIT, SYSUSERS, TMPFILES, POSTFIX, SENDMAIL):
        assert str(path.relative_to(ROOT)) in docs, path
