"""``milterd dmarc report``: RFC 7489 aggregate reports from the history, written and sent.

A report covers one policy domain and one period (by default the previous UTC day). It is
written as XML (``--output``) and/or mailed (``--send``) to the ``mailto:`` URIs of the
domain's ``rua`` tag, as RFC 7489 7.2.1.1 describes: gzip-compressed XML in an
``application/gzip`` part named ``<receiver>!<domain>!<begin>!<end>.xml.gz``, with the
subject ``Report Domain: <domain> Submitter: <receiver> Report-ID: <id>`` (``receiver``:
the domain of ``report_email``).

Before a report goes to an address outside the policy domain's organizational domain, the
receiving domain must have agreed (RFC 7489 7.1): a TXT record starting ``v=DMARC1`` at
``<policy domain>._report._dmarc.<address domain>``. Without it the address is skipped; a
DNS failure leaves it for a later run. An address's size limit (``mailto:a@b!10m``) is
honoured: the limit is compared with the whole message as handed to the MTA (header
fields, text part, base64 of the gzip'd XML), and a larger report is not sent there; the
address gets the short error report of RFC 7489 7.2.1 and 7.2.2 instead
(:func:`notice_message`). Every report or notice sent (or permanently refused) is
remembered in the history database (table ``sent``): no part of a period is reported
twice to an address (``--force`` does). ``--send`` without a period catches up: every
complete UTC day of the last ``--days`` (7) not yet handled.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import email.policy
import email.utils
import fcntl
import gzip
import json
import re
import smtplib
import sqlite3
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote
from xml.sax.saxutils import escape

from publicsuffixlist import PublicSuffixList

from milterd import ConfigError, DNSTempError, NXDomain, Resolver, load_config, make_resolver

from ..addresses import a_label
from ..cliargs import port_number
from . import _DOMAIN, _V, DMARCConfig, Store, _psl, org_domain, xml_text

__all__ = [
    "Destination",
    "Outcome",
    "Report",
    "add_commands",
    "authorize",
    "build_reports",
    "catch_up",
    "notice_message",
    "parse_rua",
    "report_message",
    "send_reports",
    "smtp_reply",
    "smtp_send",
    "write_reports",
]

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^(\d+)([kmgt]?)$", re.I)
# RFC 5321 Dot-string, without "%" and "!" (source-routing hacks of some MTAs), ASCII only.
_ATOM = r"[A-Za-z0-9#$&'*+/=?^_`{|}~-]+"
_LOCAL = re.compile(rf"{_ATOM}(?:\.{_ATOM})*")


@dataclass(frozen=True)
class Report:
    """One aggregate report: a policy domain, a period ([begin, end], seconds, inclusive as
    RFC 7489's ``date_range`` is) and the XML."""

    domain: str
    begin: int
    end: int
    report_id: str
    rua: str  # the domain's rua tag as last seen in the period
    xml: bytes
    receiver: str  # our domain (the report_email domain): RFC 7489 7.2.1.1 "receiver"

    @property
    def filename(self) -> str:
        """RFC 7489 7.2.1.1, without the extension."""
        return f"{self.receiver}!{self.domain}!{self.begin}!{self.end}"


@dataclass(frozen=True)
class Destination:
    """One ``mailto:`` URI of a rua tag: the address and its size limit in bytes, if any."""

    address: str
    limit: int | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower().rstrip(".")


#: The most destinations of one rua (or ruf) tag that get reports.
MAX_DESTINATIONS = 5


def parse_rua(rua: str) -> list[Destination]:
    """The ``mailto:`` destinations of a rua (or ruf) tag, in order, without duplicates.

    At most MAX_DESTINATIONS (RFC 7489 6.2 lets a receiver limit them): each external one
    costs an authorization lookup, and a record listing thousands made one report run
    take hours.
    Other URI schemes are skipped (RFC 7489 6.2: a receiver uses the schemes it supports).
    ``!size`` takes k, m, g or t (powers of two). A URI is dropped when its size is
    malformed or its address is not a plain ``local@domain``: the local part an RFC 5321
    dot-string of ASCII without ``%`` or ``!``, the domain a valid name (internationalized
    ones become A-labels). Anyone can publish a record: nothing else reaches SMTP.
    """
    out: list[Destination] = []
    seen: set[str] = set()
    for raw in rua.split(","):
        uri = raw.strip()
        if uri[:7].lower() != "mailto:":
            continue
        addr, bang, size = uri[7:].partition("!")
        addr = unquote(addr.split("?", 1)[0]).strip()
        limit: int | None = None
        if bang:
            m = _SIZE.match(size.strip())
            if m is None:
                continue
            limit = int(m.group(1)) * _UNITS[m.group(2).lower()]
        local, at, domain = addr.rpartition("@")
        if not at or not _LOCAL.fullmatch(local) or len(local) > 64:
            continue
        ascii_domain = a_label(domain.rstrip("."))
        if ascii_domain is None:
            continue
        domain = ascii_domain
        if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
            continue
        addr = f"{local}@{domain}"
        if addr.lower() in seen:
            continue
        seen.add(addr.lower())
        out.append(Destination(addr, limit))
        if len(out) == MAX_DESTINATIONS:
            break
    return out


def authorize(
    resolver: Resolver,
    psl: PublicSuffixList,
    policy_domain: str,
    dests: list[Destination],
    timeout: float = 10.0,
    tag: str = "rua",
) -> tuple[list[Destination], list[tuple[Destination, str]], list[tuple[Destination, str]]]:
    """RFC 7489 7.1, verifying external destinations.

    Returns (allowed, refused, deferred): refused with why (no authorization record, an
    override naming another host), deferred with the DNS error (try again later).
    A destination in the policy domain's organizational domain needs no check. An
    authorization record's own ``tag`` (``rua`` for aggregate reports, ``ruf`` for failure
    reports) replaces the URI when it names the same host.
    """
    allowed: list[Destination] = []
    refused: list[tuple[Destination, str]] = []
    deferred: list[tuple[Destination, str]] = []
    own = org_domain(psl, policy_domain)
    for d in dests:
        if org_domain(psl, d.domain) == own:
            allowed.append(d)
            continue
        name = f"{policy_domain}._report._dmarc.{d.domain}"
        try:
            texts = [t for t in resolver.lookup(name, "TXT", timeout=timeout) if _V.match(t)]
        except NXDomain:
            texts = []
        except DNSTempError as e:
            deferred.append((d, f"{name}: {e}"))
            continue
        if not texts:
            refused.append((d, f"{d.domain} does not accept reports for {policy_domain} "
                               f"(no v=DMARC1 record at {name})"))  # fmt: skip
            continue
        m = re.search(rf"(?:^|;)\s*{tag}\s*=\s*([^;]*)", texts[0])
        override = parse_rua(m.group(1)) if m else []
        if not override:
            allowed.append(d)
        elif all(o.domain == d.domain for o in override):
            allowed.extend(o for o in override if o not in allowed)
        else:
            refused.append((d, f"{name} redirects reports to another host"))
    return allowed, refused, deferred


# --- building -----------------------------------------------------------------------------


def _el(name: str, value: object) -> str:
    """``<name>value</name>``, escaped, and with what XML cannot hold replaced (rows
    recorded before 2026-12-03 may hold control characters or lone surrogates)."""
    return f"<{name}>{escape(xml_text(str(value)))}</{name}>"


def build_reports(store: Store, conf: DMARCConfig, since: int, until: int) -> list[Report]:
    """One aggregate report per policy domain for the history rows in [since, until)."""
    by_domain: dict[str, list[dict[str, Any]]] = {}
    for row in store.rows(since, until):
        by_domain.setdefault(row["policy_domain"], []).append(row)
    reports: list[Report] = []
    for domain, drows in sorted(by_domain.items()):
        try:
            reports.append(_build(domain, drows, conf, since, until))
        except Exception as e:  # one domain's odd rows must not cost every other report
            print(f"milterd dmarc report: {domain}: report not built: {type(e).__name__}: {e}",
                  file=sys.stderr)  # fmt: skip
    return reports


def _build(
    domain: str, drows: list[dict[str, Any]], conf: DMARCConfig, since: int, until: int
) -> Report:
    """The aggregate report of one policy domain from its history rows."""
    latest = drows[-1]
    groups: dict[tuple[Any, ...], int] = {}
    for row in drows:
        key = (
            row["source_ip"],
            row["disposition"],
            row["dkim_aligned"],
            row["spf_aligned"],
            row["reasons"],
            row["header_from"],
            row["envelope_from"],
            row["envelope_to"],
            row["dkim"],
            row["spf"],
        )
        groups[key] = groups.get(key, 0) + 1
    report_id = uuid.uuid4().hex
    parts = ['<?xml version="1.0" encoding="UTF-8"?>', "<feedback>", _el("version", "1.0")]
    parts.append("<report_metadata>")
    parts += [_el("org_name", conf.org_name), _el("email", conf.report_email)]
    if conf.report_contact:
        parts.append(_el("extra_contact_info", conf.report_contact))
    parts += [
        _el("report_id", report_id),
        "<date_range>",
        _el("begin", since),
        _el("end", until - 1),
        "</date_range>",
        "</report_metadata>",
        "<policy_published>",
        _el("domain", domain),
        _el("adkim", latest["adkim"]),
        _el("aspf", latest["aspf"]),
        _el("p", latest["p"]),
        _el("sp", latest["sp"]),
        _el("pct", latest["pct"]),
        _el("fo", latest["fo"]),
        "</policy_published>",
    ]
    for key, count in groups.items():
        ip, disp, dk, sp, reasons, hfrom, efrom, eto, dkim, spf = key
        parts += ["<record>", "<row>", _el("source_ip", ip), _el("count", count)]
        parts += ["<policy_evaluated>", _el("disposition", disp)]
        parts += [_el("dkim", dk), _el("spf", sp)]
        for rtype, comment in _json(reasons):
            parts += ["<reason>", _el("type", rtype), _el("comment", comment), "</reason>"]
        parts += ["</policy_evaluated>", "</row>", "<identifiers>"]
        if eto:
            parts.append(_el("envelope_to", eto))
        parts += [_el("envelope_from", efrom), _el("header_from", hfrom)]
        parts += ["</identifiers>", "<auth_results>"]
        for d, s, res in _json(dkim):
            parts += ["<dkim>", _el("domain", d)]
            if s:
                parts.append(_el("selector", s))
            parts += [_el("result", res), "</dkim>"]
        spf_rows = _json(spf) or [[efrom or hfrom, "mfrom", "none"]]
        for d, scope, res in spf_rows:
            parts += ["<spf>", _el("domain", d), _el("scope", scope), _el("result", res)]
            parts.append("</spf>")
        parts += ["</auth_results>", "</record>"]
    parts.append("</feedback>")
    xml = ("\n".join(parts) + "\n").encode("utf-8")
    return Report(domain, since, until - 1, report_id, latest["rua"], xml, receiver(conf))


def receiver(conf: DMARCConfig) -> str:
    """Our domain as RFC 7489 7.2.1.1 wants it in file names and the Submitter: the domain
    of ``report_email`` (``org_name`` is free text, for the XML)."""
    domain = conf.report_email.rpartition("@")[2].strip().lower()
    return re.sub(r"[^a-z0-9.-]", "-", domain) or "localhost"


def _json(text: str) -> list[Any]:
    value = json.loads(text)
    return value if isinstance(value, list) else []


def write_reports(
    store: Store, conf: DMARCConfig, since: int, until: int, out_dir: Path
) -> list[Path]:
    """Write one ``<receiver>!<domain>!<begin>!<end>.xml`` per policy domain; returns paths."""
    return _write(build_reports(store, conf, since, until), out_dir)


def _write(reports: list[Report], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in reports:
        path = out_dir / f"{r.filename}.xml"
        path.write_bytes(r.xml)
        paths.append(path)
    return paths


# --- sending ------------------------------------------------------------------------------


def _mail(conf: DMARCConfig, to: list[str], subject: str) -> EmailMessage:
    """A message from us with the header fields every report carries."""
    # Lines up to 998 octets are legal (RFC 5322 2.1.1); at 78 the library would move the
    # whole Subject to a continuation line.
    msg = EmailMessage(policy=email.policy.SMTP.clone(max_line_length=998))
    msg["From"] = email.utils.formataddr((conf.org_name, conf.report_email))
    msg["To"] = ", ".join(to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=conf.report_email.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834: no vacation replies to this
    return msg


def _iso(ts: int) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat()


def report_message(report: Report, conf: DMARCConfig, to: list[str]) -> EmailMessage:
    """The report as RFC 7489 7.2.1.1 mail: a short text part and the gzip'd XML."""
    msg = _mail(
        conf,
        to,
        f"Report Domain: {report.domain} Submitter: {report.receiver} "
        f"Report-ID: <{report.report_id}@{report.receiver}>",
    )
    begin, end = _iso(report.begin), _iso(report.end)
    msg.set_content(
        f"DMARC aggregate report (RFC 7489) from {conf.org_name} for {report.domain},\n"
        f"mail received from {begin} to {end}.\n"
    )
    msg.add_attachment(
        gzip.compress(report.xml, mtime=0),
        maintype="application",
        subtype="gzip",
        filename=f"{report.filename}.xml.gz",
    )
    return msg


def _size_text(limit: int) -> str:
    """A size limit as a rua URI writes it: the largest unit that divides it exactly."""
    for unit in ("t", "g", "m", "k"):
        if limit and limit % _UNITS[unit] == 0:
            return f"{limit // _UNITS[unit]}{unit}"
    return str(limit)


def notice_message(report: Report, conf: DMARCConfig, dest: Destination, size: int) -> EmailMessage:
    """The short error report (RFC 7489 7.2.2) sent instead of a report that is ``size``
    bytes as mailed, more than ``dest``'s size limit (7.2.1: the receiver SHOULD send a
    short report saying that a report is available but could not be sent).

    A MIME message whose first text/plain part holds the fields 7.2.2 requires, as
    ``Name: value`` lines like a DSN's: ``Report-Date`` (now, RFC 5322 date),
    ``Report-Domain``, ``Report-ID`` (as the report's Subject gives it), ``Report-Size``
    (the bytes the report would have taken, the number compared with the limit),
    ``Submitter`` (our domain, as in the report) and ``Submitting-URI`` (this address's
    URI, size limit included); a second text/plain part explains it in a sentence (7.2.2:
    MAY). Its own Subject is not the report's, so that report parsers do not take it for
    one.
    """
    uri = f"mailto:{dest.address}" + (f"!{_size_text(dest.limit)}" if dest.limit else "")
    msg = _mail(
        conf,
        [dest.address],
        f"DMARC aggregate report for {report.domain} not sent: too large",
    )
    fields = [
        ("Report-Date", email.utils.format_datetime(dt.datetime.now(dt.UTC))),
        ("Report-Domain", report.domain),
        ("Report-ID", f"<{report.report_id}@{report.receiver}>"),
        ("Report-Size", str(size)),
        ("Submitter", report.receiver),
        ("Submitting-URI", uri),
    ]
    msg.set_content("".join(f"{k}: {v}\n" for k, v in fields))
    explanation = (
        f"The DMARC aggregate report (RFC 7489) from {conf.org_name} for {report.domain}, "
        f"mail received from {_iso(report.begin)} to {_iso(report.end)}, is {size} bytes "
        f"as mailed: more than the {dest.limit} bytes that {uri} takes, so it was not sent "
        "there. Raise or remove the size limit in the rua tag of the domain's DMARC record "
        "to receive such reports."
    )
    text = textwrap.fill(explanation, 76, break_long_words=False, break_on_hyphens=False)
    msg.add_attachment(text + "\n", disposition="inline")
    for part in msg.iter_parts():
        del part["MIME-Version"]
    return msg


@dataclass
class Outcome:
    """What happened to one report at one address: ``sent``, ``skipped``, ``failed``, or
    ``would send`` (dry run)."""

    report: Report
    address: str
    status: str
    why: str = ""


def smtp_send(host: str, port: int, sender: str, rcpt: str, data: bytes) -> None:
    """One message over SMTP. Raises what smtplib raises for the transaction; a failing
    QUIT after the message was accepted is ignored (the message is sent)."""
    smtp = smtplib.SMTP(host, port, timeout=60)
    try:
        smtp.sendmail(sender, [rcpt], data)
    finally:
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()


def smtp_reply(e: Exception) -> tuple[int, str]:
    """The SMTP reply code and text in an smtplib exception, or (0, "")."""
    if isinstance(e, smtplib.SMTPRecipientsRefused) and e.recipients:
        code, text = next(iter(e.recipients.values()))
        return int(code), text.decode(errors="replace")
    if isinstance(e, smtplib.SMTPResponseException):
        err = e.smtp_error
        return int(e.smtp_code), err.decode(errors="replace") if isinstance(err, bytes) else err
    return 0, ""


def send_reports(
    reports: list[Report],
    conf: DMARCConfig,
    store: Store,
    resolver: Resolver,
    psl: PublicSuffixList,
    host: str,
    port: int,
    force: bool = False,
    dry_run: bool = False,
) -> list[Outcome]:
    """Mail every report to its verified rua addresses over SMTP to ``host:port``.

    A report over an address's size limit (the whole message as it would be handed to
    the MTA) is not sent there: the address gets :func:`notice_message` instead, after
    the same 7.1 check, by the same path, and remembered the same way (``sent`` with why
    ``report too large (N bytes > limit M), notice sent``), so it gets one notice per
    period, not one per run.

    ``skipped``: not authorized (7.1), over the size limit with no room even for the
    notice, refused by the MTA (5xx), no mailto rua, or already handled for an
    overlapping period (unless ``force``); all but the last are remembered, so later runs
    do not ask again. ``failed``: a DNS failure during the check, a temporary SMTP failure
    or an unreachable server: nothing is remembered, so a later run for the period tries
    again.
    """
    outcomes: list[Outcome] = []

    def done(report: Report, address: str, status: str, why: str = "") -> None:
        outcomes.append(Outcome(report, address, status, why))
        if dry_run or status not in ("sent", "skipped") or why.startswith("already"):
            return
        key = address or "-"
        if status == "sent":
            remembered = f"notice: {why}" if why else "sent"
        else:
            remembered = f"skipped: {why}"
        try:
            store.mark(report.domain, report.begin, report.end, key, report.report_id,
                       remembered)  # fmt: skip
        except sqlite3.Error as e:  # it went out; the worst case is a second copy later
            outcomes.append(Outcome(report, address, "failed", f"not remembered: {e}"))

    for report in reports:
        dests = parse_rua(report.rua)
        if not dests:
            if force or store.handled(report.domain, report.begin, report.end, "-") is None:
                done(report, "", "skipped", "no usable mailto: rua in the policy")
            continue
        todo = [
            d for d in dests
            if force or store.handled(report.domain, report.begin, report.end, d.address) is None
        ]  # fmt: skip
        already = {d.address.lower() for d in dests if d not in todo}
        for d in dests:
            if d not in todo:
                outcomes.append(Outcome(report, d.address, "skipped", "already sent"))
        if not todo:
            continue
        allowed, refused, deferred = authorize(resolver, psl, report.domain, todo)
        for d, why in refused:
            done(report, d.address, "skipped", why)
        outcomes += [Outcome(report, d.address, "failed", why) for d, why in deferred]
        for d in allowed:
            # An address that its 7.1 record put in place of a published one is not in
            # todo: without this check it got the period again on every run.
            if (
                d not in todo
                and not force
                and store.handled(report.domain, report.begin, report.end, d.address) is not None
            ):
                if d.address.lower() not in already:  # (said above for a published one)
                    outcomes.append(Outcome(report, d.address, "skipped", "already sent"))
                continue
            data = report_message(report, conf, [d.address]).as_bytes()
            why = ""
            if d.limit is not None and len(data) > d.limit:
                size = len(data)
                data = notice_message(report, conf, d, size).as_bytes()
                if len(data) > d.limit:
                    done(report, d.address, "skipped",
                         f"report is {size} bytes, the address takes at most {d.limit} "
                         f"(too little even for the {len(data)}-byte notice)")  # fmt: skip
                    continue
                why = f"report too large ({size} bytes > limit {d.limit}), notice sent"
            if dry_run:
                outcomes.append(Outcome(report, d.address, "would send",
                                        why.replace("notice sent", "notice instead")))  # fmt: skip
                continue
            try:
                smtp_send(host, port, conf.report_email, d.address, data)
            except (OSError, smtplib.SMTPException, ValueError) as e:
                code, text = smtp_reply(e)
                if 500 <= code < 600:  # permanent: remembered, not tried again
                    done(report, d.address, "skipped", f"refused: {code} {text}")
                else:
                    outcomes.append(Outcome(report, d.address, "failed", f"{host}:{port}: {e}"))
                continue
            done(report, d.address, "sent", why)
    return outcomes


# --- command line -------------------------------------------------------------------------


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("dmarc", help="DMARC tools")
    sub = p.add_subparsers(dest="dmarc_command", required=True)
    r = sub.add_parser(
        "report",
        help="write and/or mail RFC 7489 aggregate reports, one per policy domain",
        description="Aggregate reports for [--since, --until), by default the previous "
        "UTC day; --send without a period sends every complete UTC day of the last --days "
        "not yet sent. Without --send the XML files are written (--output, default the "
        "current directory) and their paths printed.",
    )
    r.add_argument("--since", help="UTC date/time or epoch seconds (default: yesterday 00:00)")
    r.add_argument("--until", help="excluded end (default: a day after --since)")
    r.add_argument("--output", "-o", help="directory for the XML files")
    r.add_argument("--db", help="history database (default: [plugins.dmarc] history_db)")
    r.add_argument("--send", action="store_true", help="mail them to the domains' rua")
    r.add_argument("--smtp-host", help="SMTP server (default: report_smtp_host)")
    r.add_argument("--smtp-port", type=port_number, help="SMTP port (default: report_smtp_port)")
    r.add_argument("--force", action="store_true", help="send again what was sent")
    r.add_argument("--dry-run", action="store_true", help="check destinations, send nothing")
    r.add_argument(
        "--days", type=int, default=7, choices=range(1, 32), metavar="N",
        help="--send without a period: each complete UTC day of the last N (default 7)",
    )  # fmt: skip
    r.set_defaults(fn=report_command)
    from .migrate import add_command as add_import  # `dmarc import-opendmarc`

    add_import(sub)


def _when(text: str) -> int:
    text = text.strip()
    if re.fullmatch(r"\d{8}", text):  # 20261121: a date, not 1970's epoch seconds
        text = f"{text[:4]}-{text[4:6]}-{text[6:]}"
    elif re.fullmatch(r"\d+", text):
        return int(text)
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return int(value.timestamp())


def _midnight(now: float | None) -> int:
    today = dt.datetime.fromtimestamp(time.time() if now is None else now, dt.UTC)
    return int(today.replace(hour=0, minute=0, second=0, microsecond=0).timestamp())


def period(since: str | None, until: str | None, now: float | None = None) -> tuple[int, int]:
    """[since, until) from the options. Both missing: the previous UTC day; one missing:
    a day from (or up to) the other."""
    start = _when(since) if since else None
    stop = _when(until) if until else None
    if start is None:
        start = stop - 86400 if stop is not None else _midnight(now) - 86400
    if stop is None:
        stop = start + 86400 if since else _midnight(now)
    if stop <= start:
        raise ValueError(f"--until ({stop}) must come after --since ({start})")
    if not 0 <= start < 1 << 40 or stop >= 1 << 40:
        raise ValueError("--since/--until out of range")
    return start, stop


def catch_up(days: int, now: float | None = None) -> list[tuple[int, int]]:
    """The last ``days`` complete UTC days, oldest first."""
    midnight = _midnight(now)
    return [(midnight - n * 86400, midnight - (n - 1) * 86400) for n in range(days, 0, -1)]


def report_command(args: argparse.Namespace) -> int:
    try:
        return _report(args)
    except (ConfigError, ValueError, OSError, sqlite3.Error) as e:
        print(f"milterd dmarc report: {e}", file=sys.stderr)
        return 2


def _report(args: argparse.Namespace) -> int:
    if args.dry_run and not args.send:
        print("milterd dmarc report: --dry-run goes with --send (without --send nothing "
              "is sent; the XML files are written)", file=sys.stderr)  # fmt: skip
        return 2
    config = None
    conf = DMARCConfig.model_validate({})
    # The config is read when -c names it (it must exist then) or the default exists;
    # without one, --db and the defaults (org_name, report_email) are used.
    if getattr(args, "config", None) and (
        getattr(args, "config_given", True) or Path(args.config).exists()
    ):
        config = load_config(args.config)
        conf = config.plugin_model("dmarc", DMARCConfig)
    if args.send and not args.since and not args.until:
        periods = catch_up(args.days)
    else:
        periods = [period(args.since, args.until)]
    db = args.db or conf.history_db
    if not db:
        print("milterd dmarc report: no history_db configured (or --db)", file=sys.stderr)
        return 2
    if args.send and config is None:
        print("milterd dmarc report --send: needs the config (-c) for [dns]", file=sys.stderr)
        return 2
    if not Path(db).is_file():  # never create one (as root, in the wrong place)
        print(f"milterd dmarc report: no history database at {db}", file=sys.stderr)
        return 2
    store = Store(db)
    outcomes: list[Outcome] = []
    count = 0
    try:
        with _lock(db, args.send) as locked:
            if not locked:
                print("milterd dmarc report: another --send run holds the lock", file=sys.stderr)
                return 1
            for since, until in periods:
                reports = build_reports(store, conf, since, until)
                count += len(reports)
                if args.output or not args.send:
                    for path in _write(reports, Path(args.output or ".")):
                        print(path)
                if not args.send or config is None:
                    continue
                outcomes += send_reports(
                    reports,
                    conf,
                    store,
                    make_resolver(config, timeout=10.0),
                    _psl(conf.psl_file),
                    args.smtp_host or conf.report_smtp_host,
                    args.smtp_port or conf.report_smtp_port,
                    force=args.force,
                    dry_run=args.dry_run,
                )
    finally:
        store.close()
    quiet = args.send and not args.since and not args.until
    repeated = 0
    for o in outcomes:
        if quiet and o.why == "already sent":
            repeated += 1
            continue
        line = f"{o.status} {o.report.domain} {o.address or '-'}"
        print(f"{line}: {o.why}" if o.why else line)
    if repeated:
        print(f"{repeated} report(s) already sent earlier", file=sys.stderr)
    if not count:
        first, last = periods[0][0], periods[-1][1]
        print(f"no history rows in [{first}, {last})", file=sys.stderr)
    return 1 if any(o.status == "failed" for o in outcomes) else 0


@contextlib.contextmanager
def _lock(db: str, wanted: bool) -> Iterator[bool]:
    """An exclusive lock next to the database for ``--send`` runs (the timer and a manual
    run at once would both send). Yields False when another run holds it."""
    if not wanted:
        yield True
        return
    with open(f"{db}.report-lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
