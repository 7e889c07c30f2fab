"""``milterd dmarc import-opendmarc FILE``: an opendmarc.conf(5) as a milterd.toml fragment.

The file is read as OpenDMARC 1.4 reads it (``opendmarc/config.c``): ``#`` starts a comment,
a line is a name (case-insensitive), white space, and the rest of the line as the value; a
Boolean is judged by its first character; the last occurrence of a name wins. A missing or
illegal value is an error (exit status 2, ``FILE:LINE: Name: problem``), as it is for
OpenDMARC; a name OpenDMARC does not know is reported and left out.

The fragment (standard output) reproduces what OpenDMARC did with the options that have a
milterd equivalent, says in a comment next to each key where the two differ, and lists
every option without an equivalent in a comment (and on standard error). Behaviour
follows the OpenDMARC 1.4.0 to 1.4.2 milter (the releases in current distributions).
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import json
import os
import sys
import textwrap
from dataclasses import dataclass, field
from typing import Any

from ..dkim.migrate import HostList, host_list

__all__ = ["Converted", "OpenDMARCError", "Option", "add_command", "convert", "parse"]

# Every name OpenDMARC 1.3 to 1.4.2 accepts (opendmarc-config.h), lower case -> (name, type).
# b: Boolean, i: integer, s: string.
_NAMES = {
    n.lower(): (n, t)
    for n, t in (
        ("AuthservID", "s"), ("AuthservIDWithJobID", "b"), ("AutoRestart", "b"),
        ("AutoRestartCount", "i"), ("AutoRestartRate", "s"), ("Background", "b"),
        ("BaseDirectory", "s"), ("ChangeRootDirectory", "s"), ("CopyFailuresTo", "s"),
        ("DNSTimeout", "i"), ("EnableCoredumps", "b"), ("FailureReports", "b"),
        ("FailureReportsBcc", "s"), ("FailureReportsOnNone", "b"),
        ("FailureReportsSentBy", "s"), ("HistoryFile", "s"), ("HoldQuarantinedMessages", "b"),
        ("IgnoreAuthenticatedClients", "b"), ("IgnoreHosts", "s"), ("IgnoreMailFrom", "s"),
        ("MilterDebug", "i"), ("PidFile", "s"), ("PublicSuffixList", "s"),
        ("RecordAllMessages", "b"), ("RejectFailures", "b"), ("RejectMultiValueFrom", "b"),
        ("ReportCommand", "s"), ("RequiredHeaders", "b"), ("Socket", "s"),
        ("SoftwareHeader", "b"), ("SPFIgnoreResults", "b"), ("SPFSelfValidate", "b"),
        ("Syslog", "b"), ("SyslogFacility", "s"), ("TemporaryDirectory", "s"),
        ("TestDNSData", "s"), ("TrustedAuthservIDs", "s"), ("UMask", "i"), ("UserID", "s"),
    )
}  # fmt: skip

# Options of the OpenDMARC process itself: milterd has its own ways, nothing to convert.
_ELSEWHERE = {
    "Socket": "milterd listens on one socket for all its plugins ([milterd] socket, default "
    "unix:/run/milterd/milterd.sock): point the MTA's milter list at it and drop OpenDMARC's",
    "PidFile": "milterd runs under systemd (systemd/milterd.service) and writes no PID file",
    "UserID": "milterd's unit runs as the milterd user; started as root it drops to "
    "[milterd] user/group",
    "Syslog": "milterd logs to standard error (the journal under systemd); [milterd] "
    "log_level, log_format",
    "SyslogFacility": "no syslog facility: milterd logs to standard error (the journal)",
    "UMask": "the socket's permissions are [milterd] socket_mode (0660) and socket_group",
    "AutoRestart": "systemd restarts milterd (Restart= in the unit)",
    "AutoRestartCount": "systemd's StartLimitBurst= plays this part",
    "AutoRestartRate": "systemd's StartLimitIntervalSec= plays this part",
    "Background": "milterd runs in the foreground under systemd",
    "BaseDirectory": "relative paths in milterd.toml are taken from its own directory",
    "ChangeRootDirectory": "no chroot; the unit's sandboxing (ProtectSystem= and friends) "
    "confines milterd",
    "EnableCoredumps": "core dumps are systemd's business (LimitCORE=)",
    "MilterDebug": '[milterd] log_level = "debug"',
    "DNSTimeout": "DNS timeouts are [dns] timeout (3 s), shared by every plugin and never "
    "beyond the hook's deadline",
    "TemporaryDirectory": "OpenDMARC never used it; milterd's [milterd] spool_dir is for "
    "message bodies and unrelated",
    "TestDNSData": "test data for OpenDMARC's test mode; milterd's tests use "
    "milterd.testing.FakeResolver",
}


class OpenDMARCError(ValueError):
    """An unreadable or malformed opendmarc.conf; ``str()`` names the file and the line."""


@dataclass(frozen=True)
class Option:
    name: str  # OpenDMARC's spelling
    value: str
    line: int

    @property
    def on(self) -> bool:
        return self.value[:1] in ("t", "T", "y", "Y", "1")

    def __str__(self) -> str:
        return f"{self.name} {_shown(self.value)} (line {self.line})"


@dataclass
class Converted:
    """The TOML fragment and the lines for standard error."""

    toml: str
    not_converted: list[str] = field(default_factory=list)
    differs: list[str] = field(default_factory=list)


def _shown(text: str) -> str:
    """``text`` safe inside a TOML comment (no control characters)."""
    return "".join("?" if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in text)


def _integer(text: str) -> int:
    """strtol(text, &end, 0) with nothing left over, as OpenDMARC checks integers."""
    sign, digits = (-1, text[1:]) if text[:1] == "-" else (1, text.lstrip("+"))
    if digits[:2].lower() == "0x":
        return sign * int(digits[2:], 16)
    if digits[:1] == "0" and len(digits) > 1:
        return sign * int(digits[1:], 8)
    return sign * int(digits, 10)


def parse(text: str, path: str) -> tuple[dict[str, Option], list[Option]]:
    """The known options (last occurrence wins, as OpenDMARC's config_get finds it) and the
    unknown ones. Raises OpenDMARCError for a missing or illegal value."""
    known: dict[str, Option] = {}
    unknown: list[Option] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip(" \t\r\n")
        if not line:
            continue
        name = line.replace("\t", " ").partition(" ")[0]
        value = line[len(name):].strip(" \t")  # fmt: skip
        if name.lower() not in _NAMES:
            unknown.append(Option(name, value, number))
            continue
        canonical, kind = _NAMES[name.lower()]
        if not value:
            raise OpenDMARCError(f"{path}:{number}: {canonical}: required value missing")
        if kind == "b" and value[:1] not in "tTyY1fFnN0":
            raise OpenDMARCError(
                f"{path}:{number}: {canonical}: illegal value {_shown(value)!r} "
                "(a Boolean: true/false, yes/no, 1/0)"
            )
        if kind == "i":
            try:
                _integer(value)
            except ValueError:
                raise OpenDMARCError(
                    f"{path}:{number}: {canonical}: illegal value {_shown(value)!r} (an integer)"
                ) from None
        known[canonical] = Option(canonical, value, number)
    return known, unknown


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


class _Fragment:
    def __init__(self) -> None:
        self.sections: dict[str, list[str]] = {
            "milterd": [], "plugins.spf": [], "plugins.dkim": [], "plugins.dmarc": [],
            "plugins.authres": [],
        }  # fmt: skip
        self.emit = {"milterd": False, "plugins.spf": False}
        self.tail: list[str] = []
        self.not_converted: list[str] = []
        self.differs: list[str] = []

    def note(self, section: str, text: str) -> None:
        self.sections[section] += _comment(text)

    def set(self, section: str, key: str, value: Any, why: str = "") -> None:
        if why:
            self.note(section, why)
        self.sections[section].append(f"{key} = {_toml(value)}")
        if section in self.emit:
            self.emit[section] = True

    def missing(self, opt: Option, why: str) -> None:
        """An option with no milterd equivalent: a comment at the end and a summary line."""
        self.tail += _comment(f"{opt}: {why}")
        self.not_converted.append(f"{opt}: {why}")

    def text(self, path: str) -> str:
        out = _comment(
            f"milterd.toml fragment converted from {_shown(path)} by `milterd dmarc "
            "import-opendmarc` (OpenDMARC 1.4 semantics). Merge the keys into the sections of "
            "the same name in milterd.toml (a section must not appear twice). spf and dkim "
            "must come before dmarc in the pipeline (file order or `order`), authres after it."
        )
        for name, lines in self.sections.items():
            if name in self.emit and not self.emit[name]:  # comments only: no header
                out += ["", *lines] if lines else []
                continue
            out += ["", f"[{name}]", *lines]
        if self.tail:
            out += ["", *_comment("--- OpenDMARC options with no milterd equivalent ---"),
                    *self.tail]  # fmt: skip
        return "\n".join(out) + "\n"


def _comment(text: str) -> list[str]:
    return [
        "# " + line
        for line in textwrap.wrap(_shown(text), 94, break_long_words=False, break_on_hyphens=False)
    ]


def _ignore_hosts(opt: Option, path: str, base: str) -> HostList:
    """An IgnoreHosts file read as OpenDMARC reads it (``dmarcf_loadlist``: the first word of
    each line, ``#`` comments) and matched (``dmarcf_checkhost``, ``dmarcf_checkip``)."""
    where = opt.value if os.path.isabs(opt.value) else os.path.join(base, opt.value)
    try:
        with open(where, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise OpenDMARCError(
            f"{path}:{opt.line}: IgnoreHosts: cannot read {where}: {e.strerror}"
        ) from None
    rows: list[tuple[str, str]] = []
    for number, raw in enumerate(lines, 1):
        words = raw.split("#", 1)[0].split()
        if words:
            rows.append((words[0], f"{where}:{number}"))
    return host_list(rows, "OpenDMARC")


def convert(text: str, path: str) -> Converted:
    """Convert the text of an opendmarc.conf (``path`` for messages and relative paths)."""
    opts, unknown = parse(text, path)
    f = _Fragment()
    base = opts["BaseDirectory"].value if "BaseDirectory" in opts else os.path.dirname(
        os.path.abspath(path)
    )  # fmt: skip

    def on(name: str) -> bool:
        return name in opts and opts[name].on

    def said(name: str, default: str = "") -> str:
        return str(opts[name]) if name in opts else f"{name} {default or 'unset'}"

    # --- [milterd] -------------------------------------------------------------------------
    if "AuthservID" in opts and opts["AuthservID"].value != "HOSTNAME":
        f.set("milterd", "authserv_id", opts["AuthservID"].value, f"{opts['AuthservID']}.")
    elif "AuthservID" in opts:
        f.note("milterd", f"{opts['AuthservID']}: OpenDMARC used gethostname(); milterd's "
               "default authserv_id is this host's FQDN (socket.getfqdn()). Set authserv_id "
               "if the two differ.")  # fmt: skip
    else:
        f.note("milterd", "AuthservID unset: OpenDMARC used the MTA's name (macro j); milterd "
               "uses [milterd] authserv_id, by default this host's FQDN.")  # fmt: skip
    if on("AuthservIDWithJobID"):
        f.missing(opts["AuthservIDWithJobID"], "milterd never appends the queue ID to its "
                  "authserv-id")  # fmt: skip

    ignore_auth = on("IgnoreAuthenticatedClients")
    if "IgnoreHosts" in opts:
        hl = _ignore_hosts(opts["IgnoreHosts"], path, base)
        f.set("milterd", "internal_networks", hl.networks,
              f"{opts['IgnoreHosts']}: the addresses and networks in that file, without the "
              "clients its ! entries excluded (the most precise entry decides, as in "
              "OpenDMARC). Clients in internal_networks are trusted by every plugin, not only "
              "dmarc (not evaluated, not SPF-checked, signed by dkim): merge the lists of the "
              "other milters (OpenDKIM InternalHosts) that milterd replaces.")  # fmt: skip
        if hl.names:
            why = (
                f"host names {', '.join(hl.names)} in IgnoreHosts are not converted: "
                "internal_networks takes addresses only (add theirs); until then mail "
                "from them is evaluated, and may be rejected, where OpenDMARC ignored it"
            )
            f.note("milterd", why)
            f.differs.append(f"IgnoreHosts: {why}")
        for where, problem in hl.problems:
            f.note("milterd", f"{where}: {problem}")
            f.differs.append(f"IgnoreHosts {where}: {problem}")
    else:
        f.note("milterd", "IgnoreHosts unset: OpenDMARC ignored 127.0.0.1 only; milterd's "
               "default internal_networks (kept) is 127.0.0.0/8 and ::1, whose mail is not "
               "evaluated either.")  # fmt: skip
        f.differs.append(
            "IgnoreHosts unset: mail from 127.0.0.0/8 and ::1 (OpenDMARC: only "
            "127.0.0.1) is not evaluated (internal_networks)"
        )

    # --- [plugins.spf] ---------------------------------------------------------------------
    spf_self, spf_ignore = on("SPFSelfValidate"), on("SPFIgnoreResults")
    record_only = ("milterd's dmarc uses the spf plugin's result (smtp.mailfrom; for the "
                   "null sender the HELO name) for SPF alignment, never a header. "
                   "HELO_reject and Mail_From_reject = \"False\": record only; OpenDMARC "
                   "never refused mail for SPF itself.")  # fmt: skip
    if spf_self:
        when = "always" if spf_ignore else "when the header held no trusted SPF result"
        f.note("plugins.spf", f"{opts['SPFSelfValidate']}, {said('SPFIgnoreResults', 'false')}"
               f": OpenDMARC checked SPF itself {when}. {record_only} Difference: milterd "
               "always checks SPF itself and never uses an upstream result.")  # fmt: skip
    elif not spf_ignore:
        f.note("plugins.spf", "SPFSelfValidate false, SPFIgnoreResults false: OpenDMARC took "
               "SPF from Authentication-Results of TrustedAuthservIDs or from the first "
               "Received-SPF field. milterd reads neither, so the spf plugin checks SPF here "
               f"to keep SPF in the DMARC result. {record_only} Rejecting on SPF stays with "
               "what did it before (e.g. policyd-spf), or moves here (policyd_spf_conf, "
               "docs/plugins/spf.md).")  # fmt: skip
    if spf_self or not spf_ignore:
        f.set("plugins.spf", "HELO_reject", "False")
        f.set("plugins.spf", "Mail_From_reject", "False")
    else:
        f.note("plugins.dmarc", f"{opts['SPFIgnoreResults']}, SPFSelfValidate false: "
               "OpenDMARC judged DMARC on DKIM alone. That holds while no [plugins.spf] is "
               "enabled in milterd.toml; with one, SPF-aligned mail passes too.")  # fmt: skip

    # --- [plugins.dkim] --------------------------------------------------------------------
    f.note("plugins.dkim", f"{said('TrustedAuthservIDs', '(default: AuthservID)')}: "
           "OpenDMARC took DKIM results from Authentication-Results fields added upstream "
           "(OpenDKIM) under those authserv-ids. milterd's dmarc reads only the dkim "
           "plugin's results (never incoming headers; authres removes forged ones), so "
           "verification must run in milterd or DKIM-aligned mail fails DMARC. "
           "sign = false: signing stays where it is (or see docs/plugins/dkim.md).")  # fmt: skip
    f.set("plugins.dkim", "sign", False)
    if "TrustedAuthservIDs" in opts:
        f.missing(
            opts["TrustedAuthservIDs"],
            "results in incoming Authentication-Results "
            "are never used; the spf and dkim plugins produce them (see [plugins.dkim])",
        )

    # --- [plugins.dmarc]: who is refused ---------------------------------------------------
    d = "plugins.dmarc"
    reject = on("RejectFailures")
    hold = on("HoldQuarantinedMessages")
    if reject:
        f.set(d, "reject_action", "reject", f"{opts['RejectFailures']}: a failing p=reject "
              "gets 550 5.7.1, as from OpenDMARC (text: reject_text, naming the From domain "
              "where OpenDMARC named the policy domain). pct: OpenDMARC accepted a sampled-"
              "out failure; milterd applies the next lower policy (reject -> quarantine, "
              "i.e. quarantine_action).")  # fmt: skip
        f.set(d, "temperror_action", "tempfail", "RejectFailures true also temp-failed a "
              "message whose evaluation could not be completed (opendmarc.conf(5)): 451 "
              "4.7.1 when the policy lookup fails.")  # fmt: skip
    else:
        f.set(d, "reject_action", "none", f"{said('RejectFailures', 'false (default)')}: "
              "nothing refused, only Authentication-Results (authres). \"none\" records "
              "the result; \"tag\" would also add X-DMARC-Disposition.")  # fmt: skip
        f.set(d, "temperror_action", "none")
    if reject and hold:
        f.set(d, "quarantine_action", "quarantine", f"{opts['HoldQuarantinedMessages']}: a "
              "failing p=quarantine goes to the MTA's hold queue (the milter quarantine), as "
              "with OpenDMARC. Difference: a p=reject failure sampled out by pct is held too "
              "(OpenDMARC delivered it).")  # fmt: skip
        f.differs.append(
            "pct: a p=reject failure outside the pct sample is held "
            "(quarantine_action); OpenDMARC delivered it"
        )
    else:
        why = f"{said('HoldQuarantinedMessages', 'false (default)')}: p=quarantine failures "
        why += "are delivered with Authentication-Results, as by OpenDMARC."
        if hold:
            why += (
                " (OpenDMARC 1.4.0-1.4.2 held them only when RejectFailures was true "
                'too; later versions hold them anyway: then say "quarantine".)'
            )
        elif reject:
            why += (
                " (Before 1.4.0 OpenDMARC held them whenever RejectFailures was true: "
                'for such a version say "quarantine".)'
            )
        f.set(d, "quarantine_action", "none", why)

    multi, required = on("RejectMultiValueFrom"), on("RequiredHeaders")
    if multi or required:
        extra = []
        if multi and not required:
            extra.append(
                "a missing From, several From fields and a From without a usable "
                "domain (OpenDMARC accepted those without RequiredHeaders)"
            )
        if required and not multi:
            extra.append(
                "one From field with several addresses (OpenDMARC ignored it "
                "without RejectMultiValueFrom)"
            )
        if multi:
            extra.append("several addresses all in one domain (OpenDMARC 1.4.2 evaluated those)")
        which = ", ".join(str(opts[n]) for n in ("RejectMultiValueFrom", "RequiredHeaders")
                          if on(n))  # fmt: skip
        why = f"{which}: mail without exactly one From address with a domain is refused (550 "
        why += "5.7.1). Difference: milterd also refuses " + "; and ".join(extra) + "."
        f.set(d, "reject_bad_from", True, why)
        f.differs.append("reject_bad_from also refuses " + "; and ".join(extra))
    if required:
        f.missing(
            opts["RequiredHeaders"],
            "only its From checks are converted "
            "(reject_bad_from); the other RFC 5322 3.6 counts (exactly one Date, at "
            "most one To, Cc, Bcc, Reply-To, Message-Id, In-Reply-To, References, "
            "Subject) are not checked, so such messages are no longer refused",
        )

    f.set(
        d,
        "check_trusted",
        False,
        f"{said('IgnoreAuthenticatedClients', 'false')}: "
        "mail from authenticated (SMTP AUTH) clients and internal_networks is not "
        "evaluated."
        + (
            ""
            if ignore_auth
            else " Difference: OpenDMARC evaluated (and "
            "could reject) authenticated clients; milterd cannot evaluate them without also "
            "evaluating internal_networks (check_trusted = true), which OpenDMARC ignored."
        ),
    )
    if not ignore_auth:
        f.differs.append(
            "IgnoreAuthenticatedClients false: mail from authenticated clients "
            "is no longer evaluated nor rejected (check_trusted = false)"
        )

    if "IgnoreMailFrom" in opts:
        from . import _psl, org_domain

        domains = [x.strip().split()[0].lower().rstrip(".")
                   for x in opts["IgnoreMailFrom"].value.split(",") if x.strip()]  # fmt: skip
        psl = _psl()  # the package's list, unless the file's own one can be read
        if "PublicSuffixList" in opts:
            given = os.path.join(base, opts["PublicSuffixList"].value)
            if os.path.isdir(given):
                given = os.path.join(given, "public_suffix_list.dat")
            with contextlib.suppress(OSError):
                psl = _psl(given)
        wider = [x for x in domains if org_domain(psl, x) == x]
        why = (
            f"{opts['IgnoreMailFrom']}: OpenDMARC skipped these From domains entirely; "
            "never_reject only turns their reject into none (never_reject_disposition), "
            "and still records the result (Authentication-Results, history)."
        )
        if wider:
            why += (
                f" Difference: subdomains of {', '.join(wider)} are exempt too (an "
                "organizational domain covers them; OpenDMARC matched the exact From "
                "domain)."
            )
            f.differs.append(f"IgnoreMailFrom: subdomains of {', '.join(wider)} are exempt too")
        if reject and hold:
            why += " Difference: their p=quarantine failures are still held."
            f.differs.append("IgnoreMailFrom: p=quarantine failures of those domains are held")
        f.set(d, "never_reject", domains, why)
        f.set(d, "never_reject_disposition", "none")

    # --- [plugins.dmarc]: public suffixes, history, reports --------------------------------
    if "PublicSuffixList" in opts:
        psl_path = os.path.join(base, opts["PublicSuffixList"].value)  # absolute stays so
        why = f"{opts['PublicSuffixList']}."
        if os.path.isdir(psl_path):
            psl_path = os.path.join(psl_path, "public_suffix_list.dat")
            why += " A directory: its public_suffix_list.dat is meant."
        f.set(d, "psl_file", os.path.normpath(psl_path), why)
    else:
        why = ("PublicSuffixList unset: OpenDMARC found no organizational domain, so it "
               "looked up only _dmarc.<From domain> and aligned on exact names. milterd uses "
               "the publicsuffixlist package's list: a subdomain without its own record now "
               "gets its organizational domain's policy (sp/p), and relaxed alignment "
               "counts, so more mail can pass and more can fail.")  # fmt: skip
        f.note(d, why)
        f.differs.append(
            "PublicSuffixList unset: milterd always uses a Public Suffix List "
            "(organizational-domain policies and relaxed alignment apply)"
        )

    if "HistoryFile" in opts:
        f.set(d, "history_db", "/var/lib/milterd/dmarc.sqlite", f"{opts['HistoryFile']}: "
              "milterd keeps its history in SQLite instead of OpenDMARC's text file, so "
              "opendmarc-import (and its MySQL database) is not needed, and "
              "`milterd dmarc report --send` replaces opendmarc-reports: enable "
              "systemd/milterd-dmarc-report.timer (daily, after midnight UTC). The old "
              "history is not imported: send OpenDMARC's last reports before switching. Set "
              "org_name and report_email (opendmarc-reports' --report-org and "
              "--report-email). The daemon creates the file at start-up, so its directory "
              "must exist and be writable by the user milterd runs as (and by the "
              "one `milterd dmarc report` runs as): /var/lib/milterd is the systemd unit's "
              "StateDirectory= (systemd/milterd.service), created by systemd for the milterd "
              "user; "
              "elsewhere, create the directory or choose a writable path.")  # fmt: skip
        if on("RecordAllMessages"):
            f.missing(
                opts["RecordAllMessages"],
                "milterd records only messages whose From "
                "domain has a DMARC policy (all that aggregate reports need)",
            )
    else:
        f.note(d, "HistoryFile unset: no history_db, no aggregate reports (as before).")

    sent_by = opts.get("FailureReportsSentBy")
    if sent_by is not None:
        _, addr = email.utils.parseaddr(sent_by.value)
        if "@" in addr:
            f.set(
                d,
                "report_email",
                addr,
                f"{sent_by}: the sender of failure reports; in "
                "milterd also of aggregate reports, and their contact address.",
            )
        else:
            f.missing(sent_by, "no address in it; set report_email")
    if on("FailureReports"):
        diffs = [
            "milterd follows the policy's fo tag (fo=1, d, s report even some "
            "passing mail), honours an address's size limit, mails only ruf addresses "
            "that pass the RFC 7489 7.1 check, and sends at most "
            "failure_reports_per_hour per address"
        ]
        if not on("FailureReportsOnNone"):
            diffs.append(
                "failures under p=none are reported too (OpenDMARC: only with FailureReportsOnNone)"
            )
            f.differs.append("FailureReportsOnNone false: milterd also reports p=none failures")
        f.set(
            d,
            "failure_reports",
            True,
            f"{opts['FailureReports']}, "
            f"{said('FailureReportsOnNone', 'false')}: RFC 6591 failure reports to the "
            "ruf addresses, headers only. Differences: " + "; ".join(diffs) + ".",
        )
        f.set(d, "failure_spool", "/var/lib/milterd/dmarc-failures", "Reports wait here "
              "for worker 0's sender. The daemon creates the directory at start-up (mode "
              "0750), so its parent must be writable by the user milterd runs as: "
              "/var/lib/milterd is the systemd unit's StateDirectory= "
              "(systemd/milterd.service), created by systemd for the milterd user; "
              "elsewhere, create it or choose a writable path.")  # fmt: skip
    elif "FailureReports" in opts or "FailureReportsOnNone" in opts:
        f.note(d, f"{said('FailureReports', 'false')}: no failure reports.")
    if "FailureReportsBcc" in opts:
        f.missing(
            opts["FailureReportsBcc"],
            "milterd sends failure reports only to the "
            "domain's ruf addresses, never a copy to a local one",
        )
    if "ReportCommand" in opts:
        f.missing(
            opts["ReportCommand"],
            "milterd hands reports over SMTP to "
            "report_smtp_host:report_smtp_port (127.0.0.1:25), not to a command",
        )
    elif on("FailureReports"):
        f.note(
            d,
            "ReportCommand unset (/usr/sbin/sendmail): milterd hands reports over SMTP "
            "to report_smtp_host:report_smtp_port (127.0.0.1:25) instead.",
        )
    if "CopyFailuresTo" in opts:
        f.missing(opts["CopyFailuresTo"], "milterd adds no recipient to failing mail")
    if on("SoftwareHeader"):
        f.missing(opts["SoftwareHeader"], "milterd adds no DMARC-Filter header")

    f.note(
        "plugins.authres",
        "OpenDMARC added Authentication-Results itself; in milterd the "
        "authres plugin writes the one header with every plugin's results.",
    )

    # --- the rest ----------------------------------------------------------------------------
    for name, why in _ELSEWHERE.items():
        if name in opts:
            f.missing(opts[name], why)
    for name in ("AuthservIDWithJobID", "SoftwareHeader", "RecordAllMessages"):
        if name in opts and not opts[name].on:
            f.tail += _comment(f"{opts[name]}: off, nothing to convert.")
    for opt in unknown:
        f.missing(opt, "not an OpenDMARC 1.4 option (OpenDMARC refuses to start with it)")
    return Converted(f.text(path), f.not_converted, f.differs)


def import_command(args: argparse.Namespace) -> int:
    path: str = args.file
    try:
        with open(path, "rb") as fh:
            text = fh.read().decode("utf-8", errors="replace")
        result = convert(text, path)
    except OpenDMARCError as e:
        print(f"milterd dmarc import-opendmarc: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"milterd dmarc import-opendmarc: {path}: cannot read: {e.strerror}",
              file=sys.stderr)  # fmt: skip
        return 2
    sys.stdout.write(result.toml)
    err = sys.stderr
    if result.not_converted:
        print(f"{path}: {len(result.not_converted)} option(s) not converted (see the "
              "comments):", file=err)  # fmt: skip
        for line in result.not_converted:
            print(f"  {line}", file=err)
    if result.differs:
        print(f"{path}: {len(result.differs)} difference(s) from OpenDMARC:", file=err)
        for line in result.differs:
            print(f"  {line}", file=err)
    return 0


def add_command(sub: Any) -> None:
    """``milterd dmarc import-opendmarc FILE`` (``sub``: the ``dmarc`` subparsers)."""
    p = sub.add_parser(
        "import-opendmarc",
        help="convert an opendmarc.conf into a milterd.toml fragment (standard output)",
        description="Print a milterd.toml fragment ([milterd], [plugins.spf], [plugins.dkim], "
        "[plugins.dmarc], [plugins.authres]) that does what the OpenDMARC configuration "
        "did, with comments where milterd differs; options with no equivalent are listed "
        "in comments and on standard error. Exit status 2 for an unreadable or malformed file.",
    )
    p.add_argument("file", help="the opendmarc.conf, e.g. /etc/opendmarc.conf")
    p.set_defaults(fn=import_command)
