"""DMARC failure reports (RFC 7489 7.3, in the RFC 6591 format), off by default.

At end of message (``outcome``: the final verdict is known) a message that the domain's
``fo`` tag asks about gets a report, written to a spool directory; the message's own path
pays for one small file write, never for DNS or SMTP. One thread in worker 0 (one per
process, kept across reloads: :func:`shared_sender`) sends the spool every
:data:`INTERVAL` seconds to the ``mailto:`` URIs of ``ruf``, after the same
external-destination check as aggregate reports (RFC 7489 7.1), at most
``failure_reports_per_hour`` sends per address (more wait). The report carries the
original *header block as received* (``text/rfc822-headers``), never the body. With
``failure_reports_redact`` the local parts of the addresses in it (and in the report's own
fields) are replaced by keyed hashes (RFC 6590; :class:`Redactor`) before the report is
written to the spool.

Spool file: a first line of JSON (``domain``, ``ruf``, ``created``, ``done``: addresses
already handled) and the report message. A report is dropped after :data:`MAX_AGE`
seconds of temporary failures; the spool holds at most ``failure_spool_max`` reports, and
one policy domain at most a tenth of them (more are not written, and counted in the log).
"""

from __future__ import annotations

import contextlib
import email.policy
import email.utils
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import smtplib
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from publicsuffixlist import PublicSuffixList

from milterd import Resolver, Result, __version__

from ..addresses import getaddresses
from .reports import authorize, parse_rua, smtp_reply, smtp_send

__all__ = [
    "FailureSender",
    "FailureSpool",
    "Redactor",
    "SenderSettings",
    "failure_report",
    "release_sender",
    "shared_sender",
    "wanted",
]

log = logging.getLogger("milterd.dmarc")

INTERVAL = 15.0  # seconds between two passes of the sender
RELEASE_JOIN_S = 2.0  # how long shutdown waits for a pass under way (daemon.STOP_MARGIN)
MAX_AGE = 86400.0  # a report not sent within a day (temporary failures) is dropped
_POLICY = email.policy.SMTP.clone(max_line_length=998)


def wanted(fo: str, dmarc_result: str, dkim_aligned: bool, spf_aligned: bool,
           results: Sequence[Result]) -> bool:  # fmt: skip
    """Whether RFC 7489 6.3 ``fo`` asks for a failure report about this message.

    ``0`` (default): every mechanism failed to give an aligned pass (DMARC fail);
    ``1``: any mechanism failed to give an aligned pass; ``d``: a DKIM signature failed
    to verify, aligned or not; ``s``: SPF failed, aligned or not. Several options are
    separated by ``:``; unknown ones are ignored.
    """
    opts = {o.strip().lower() for o in (fo or "0").split(":")}
    if "0" in opts and dmarc_result == "fail":
        return True
    if "1" in opts and not (dkim_aligned and spf_aligned):
        return True
    if "d" in opts and any(r.method == "dkim" and r.result == "fail" for r in results):
        return True
    return "s" in opts and any(
        r.method == "spf" and r.result == "fail" and r.prop("smtp.mailfrom") is not None
        for r in results
    )


@dataclass
class FailureInfo:
    """What a report says about one message."""

    domain: str  # the From domain (Reported-Domain)
    source_ip: str
    mail_from: str
    authentication_results: str  # field body, ours
    delivery: str  # RFC 6591 Delivery-Result: delivered, spam, policy, reject, other
    aligned: list[str] = field(default_factory=list)  # mechanisms that aligned
    dkim: tuple[str, str] | None = None  # (d, s) of a failed signature
    headers: bytes = b""  # the original header block, CRLF line ends


# Fields holding mailbox lists (RFC 5322 3.6.2, 3.6.3, 3.6.6 and common extensions): a
# redacted report rewrites each mailbox as token@domain, dropping display names and
# comments (a name identifies a person as well as a local part does).
_MAILBOX_FIELDS = frozenset(
    {"from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender",
     "resent-to", "resent-cc", "resent-bcc", "mail-followup-to", "mail-reply-to",
     "disposition-notification-to"}
)  # fmt: skip
# Message identifiers look like addresses but are not personal: kept, as the domain owner
# finds the message in its logs by them.
_ID_FIELDS = frozenset(
    {"message-id", "in-reply-to", "references", "resent-message-id", "content-id",
     "original-message-id"}
)  # fmt: skip
# Fields of tag=value or ptype.property=value pairs: in "header.i=user@d" or "i=user@d"
# the key before the first "=" stays.
_KEYED_FIELDS = frozenset(
    {"authentication-results", "arc-authentication-results", "dkim-signature",
     "arc-message-signature", "arc-seal", "received-spf"}
)  # fmt: skip
_KEYED_SUFFIXES = ("-authentication-results", "-dkim-signature", "-arc-seal", "-received-spf")
# A local part: a quoted string, or a whole run of atext and dots (also non-ASCII, as
# latin-1 characters of the raw bytes), followed by "@" and the start of a domain. A run is
# only taken whole (the look-behind) and never backtracked into (possessive): linear time
# on any header block.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\x80-\xff-"
_LOCAL_PART = re.compile(
    rf'(?:"(?:[^"\\\r\n]|\\.)*+"|(?<![{_ATEXT}.])[{_ATEXT}.]++)(?=@[A-Za-z0-9\[\x80-\xff])'
)
_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]+)?=")


def _raw(text: str) -> str:
    """``text`` (decoded with surrogateescape) as latin-1 text of its UTF-8 octets: the
    form the header block is redacted in, so that one mailbox gets one token."""
    return text.encode("utf-8", "surrogateescape").decode("latin-1")


def _text(raw: str) -> str:
    """The inverse of :func:`_raw` (tokens are ASCII, the rest comes back unchanged)."""
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")


class Redactor:
    """RFC 6590 redaction of the local parts of email addresses in one failure report.

    Each local part is replaced by ``HMAC-SHA256(key, local part)``, the first 16 hex
    digits (64 bits): RFC 6590 section 3's recipe (a consistent, collision-resistant
    transformation of the private string combined with a secret redaction key) applied to
    section 4's subject, the local part, leaving the domain intact, as the domain is what
    the report is about. The key is random and new for each report, and never stored:

    * within one report the same local part (compared case-insensitively, quotes removed)
      always gives the same token, so the report still shows that Original-Mail-From,
      Return-Path and Sender are one mailbox, or that To and a Received ``for`` clause name
      the same recipient;
    * across reports nothing links two tokens, and with the key gone nobody, us included,
      can test a guessed address against a token (a plain hash, or a fixed key, could be
      inverted by hashing a list of likely local parts). A fixed string such as
      ``redacted`` would lose the correlations within a report.

    Lowercase hex is a valid dot-atom local part, so a redacted address is still an
    address. Mailbox-list fields (From, To, Cc, Reply-To, Sender, ...) are rewritten as
    ``token@domain`` without display names or comments; in every other field each
    address's local part is replaced in place. Message identifiers (Message-ID,
    References, ...) are kept. Only addresses are redacted: a Subject or other free text
    is not.
    """

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key if key is not None else secrets.token_bytes(32)

    def token(self, local: str) -> str:
        """The redacted form of one local part, given as latin-1 text of its raw bytes
        (:func:`_raw`): the same octets give the same token wherever they come from, and
        only ASCII letters are folded to lower case."""
        if len(local) >= 2 and local[0] == local[-1] == '"':
            local = re.sub(r"\\(.)", r"\1", local[1:-1])
        data = local.encode("latin-1", "replace").lower()
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()[:16]

    def address(self, addr: str) -> str:
        """``local@domain`` with the local part redacted (no ``@``: all of it)."""
        local, at, domain = addr.rpartition("@")
        if not at:
            return self.token(addr) if addr else addr
        return f"{self.token(local)}@{domain}" if local else addr

    def text(self, text: str, keyed: bool = False) -> str:
        """``text`` with the local part of every address in it redacted; ``keyed``: in a
        field of ``key=value`` pairs, where the first ``=`` of a run ends a key."""

        def sub(m: re.Match[str]) -> str:
            run = m.group(0)
            k = _KEY.match(run)
            # "header.i=@d", "i=@d": a key and no local part, kept whole (also outside the
            # keyed fields: a run ending in "=" is a key, an address's local part is not)
            if k is not None and (keyed or k.end() == len(run)):
                rest = run[k.end() :]
                return run[: k.end()] + (self.token(rest) if rest else "")
            return self.token(run)

        return _LOCAL_PART.sub(sub, text)

    def mailboxes(self, value: str) -> str | None:
        """A mailbox-list field body rewritten as ``token@domain, ...``; None when it
        does not parse as one (the caller redacts it in place instead)."""
        parsed = getaddresses([value])
        if parsed is None:  # nested too deep: redacted in place instead
            return None
        out = []
        for _name, addr in parsed:
            if not addr:
                continue
            if "@" in addr and (not addr.rpartition("@")[0] or "@" in addr.rpartition("@")[0]):
                return None
            out.append(self.address(addr))
        return ", ".join(out) if out else None

    def headers(self, block: bytes) -> bytes:
        """A header block (CRLF line ends) with every address's local part redacted."""
        text = block.decode("latin-1")  # one character per byte: nothing is lost
        fields = re.split(r"(?<=\n)(?=[^ \t])", text)
        out: list[str] = []
        for f in fields:
            name, colon, value = f.partition(":")
            lname = name.strip().lower()
            if not colon or lname in _ID_FIELDS:
                out.append(f if colon else self.text(f))
                continue
            ending = value[len(value.rstrip("\r\n")) :]
            body = value[: len(value) - len(ending)]
            if lname in _MAILBOX_FIELDS:
                rebuilt = self.mailboxes(re.sub(r"\r?\n(?=[ \t])", "", body).strip())
                if rebuilt is not None:
                    sep = ",\r\n " if len(rebuilt) > 900 else ", "
                    out.append(f"{name}: {rebuilt.replace(', ', sep)}{ending}")
                    continue
            # (also the copies other hops keep: X-Original-Authentication-Results,
            # X-Google-DKIM-Signature, ...)
            keyed = lname in _KEYED_FIELDS or lname.endswith(_KEYED_SUFFIXES)
            out.append(f"{name}:{self.text(body, keyed=keyed)}{ending}")
        return "".join(out).encode("latin-1")


def failure_report(
    info: FailureInfo,
    org_name: str,
    report_email: str,
    to: Sequence[str] = (),
    redact: bool = False,
) -> bytes:
    """The report as an RFC 6591 ``multipart/report; report-type=feedback-report``.

    ``redact``: the local parts of the addresses in Original-Mail-From, our
    Authentication-Results and the header block are replaced by tokens (:class:`Redactor`,
    one random key for this report), and the text part says so. RFC 6590 defines no
    report field that marks a redacted report, so none is added.
    """
    note = ""
    if redact:
        r = Redactor()
        info = replace(
            info,
            mail_from=_text(r.address(_raw(info.mail_from))),
            authentication_results=_text(r.text(_raw(info.authentication_results), keyed=True)),
            headers=r.headers(info.headers),
        )
        note = (
            "The local parts of email addresses in this report are redacted (RFC 6590):\n"
            "each is replaced by a keyed hash, the same for the same local part within\n"
            "this report only.\n"
        )
    msg = EmailMessage(policy=_POLICY)
    msg["From"] = email.utils.formataddr((org_name, report_email))
    if to:
        msg["To"] = ", ".join(to)
    msg["Subject"] = f"DMARC failure report for {info.domain} from {info.source_ip or 'unknown'}"
    msg["Date"] = email.utils.formatdate(usegmt=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=report_email.rpartition("@")[2] or None)
    msg["Auto-Submitted"] = "auto-generated"
    source = info.source_ip or "an unknown address"
    msg.set_content(
        f"This is an authentication failure report (RFC 7489 7.3) from {org_name} for a\n"
        f"message with From domain {info.domain}, received from {source}.\n"
        "The message's header block is attached; its body is not.\n" + note
    )
    fields = [
        ("Feedback-Type", "auth-failure"),
        ("User-Agent", f"milterd/{__version__}"),
        ("Version", "1"),
        ("Original-Mail-From", f"<{info.mail_from}>"),
        ("Arrival-Date", email.utils.formatdate(usegmt=True)),
        ("Source-IP", info.source_ip),
        ("Reported-Domain", info.domain),
        ("Authentication-Results", info.authentication_results),
        ("Auth-Failure", "dmarc"),
        ("Identity-Alignment", ", ".join(info.aligned) or "none"),
        ("Delivery-Result", info.delivery),
    ]
    if info.dkim:
        fields += [("DKIM-Domain", info.dkim[0]), ("DKIM-Selector", info.dkim[1])]
    text = "".join(f"{k}: {_fold(_one_line(v))}\r\n" for k, v in fields if v)
    msg.make_mixed()
    report = EmailMessage(policy=_POLICY)
    report.set_content(text.encode("ascii", "replace"), maintype="message",
                       subtype="feedback-report", cte="7bit")  # fmt: skip
    del report["MIME-Version"]
    msg.attach(report)
    original = EmailMessage(policy=email.policy.SMTP)  # base64 lines of 76 (RFC 2045)
    original.set_content(info.headers, maintype="text", subtype="rfc822-headers",
                         cte=_cte(info.headers))  # fmt: skip
    del original["MIME-Version"]
    msg.attach(original)
    msg.set_type("multipart/report")
    msg.set_param("report-type", "feedback-report")
    return msg.as_bytes()


def _fold(v: str) -> str:
    """Fold a long field value after each ``;`` (Authentication-Results can hold many
    results; a line over 998 octets is refused by strict MTAs)."""
    if len(v) <= 900:
        return v
    return ";\r\n ".join(part.strip() for part in v.split(";"))


def _one_line(v: str) -> str:
    return " ".join(v.replace("\r", " ").replace("\n", " ").split())


def _cte(data: bytes) -> str:
    """7bit or 8bit as the header block is; base64 when a line would break SMTP's 998."""
    if any(len(line) > 998 for line in data.split(b"\n")):
        return "base64"
    return "8bit" if any(b > 127 for b in data) else "7bit"


def _domain_tag(domain: str) -> str:
    """A short tag of the policy domain for spool file names (counted per domain)."""
    return "d" + hashlib.sha256(domain.lower().encode("utf-8", "replace")).hexdigest()[:10]


class FailureSpool:
    """The directory of reports waiting to be sent (created 0750 when missing)."""

    def __init__(self, path: str, max_reports: int) -> None:
        self.dir = Path(path)
        self.max_reports = max_reports
        self.dir.mkdir(mode=0o750, parents=True, exist_ok=True)

    def files(self) -> list[Path]:
        """Waiting reports, oldest first (none if the directory went away)."""
        try:
            return sorted(p for p in self.dir.iterdir() if p.suffix == ".report")
        except FileNotFoundError:
            return []

    def put(self, domain: str, ruf: str, report: bytes, owner: str | None = None) -> bool:
        """Write one report (temporary file, rename). False when the spool is full, or
        when ``owner`` (the policy domain's organizational domain; default ``domain``)
        already holds its share of it (a tenth, at least one): a domain whose owner
        publishes ``fo=1`` and a ruf address, and sends failing mail as it, must not keep
        the spool full so that no other domain's report is written. (Counted by owner,
        not policy domain: a wildcard TXT makes every subdomain a policy domain.)"""
        n = mine = 0
        tag = _domain_tag(owner or domain)
        share = max(1, self.max_reports // 10)
        with os.scandir(self.dir) as it:
            for entry in it:
                if entry.name.endswith(".report"):
                    n += 1
                    mine += tag in entry.name
                if n >= self.max_reports or mine >= share:
                    return False
        head = {"domain": domain, "ruf": ruf, "created": time.time(), "done": []}
        name = f"{time.time_ns():020d}-{tag}-{uuid.uuid4().hex[:12]}"
        tmp = self.dir / f".{name}.tmp"
        try:
            tmp.write_bytes(json.dumps(head).encode() + b"\n" + report)
            tmp.rename(self.dir / f"{name}.report")
        except OSError:  # a full disk: leave no half-written file behind
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return True

    def sweep(self, older_than: float = 3600.0) -> int:
        """Remove temporary files a crashed writer left (older than ``older_than`` s)."""
        n = 0
        cutoff = time.time() - older_than
        for p in self.dir.glob(".*.tmp"):
            with contextlib.suppress(OSError):
                if p.stat().st_mtime < cutoff:
                    p.unlink()
                    n += 1
        return n

    @staticmethod
    def read(path: Path) -> tuple[dict[str, Any], bytes]:
        data = path.read_bytes()
        first, _, report = data.partition(b"\n")
        head = json.loads(first)
        if not isinstance(head, dict):
            raise ValueError("spool header is not an object")
        return head, report

    @staticmethod
    def update(path: Path, head: dict[str, Any], report: bytes) -> None:
        tmp = path.with_name(f".{path.stem}.tmp")
        tmp.write_bytes(json.dumps(head).encode() + b"\n" + report)
        tmp.rename(path)


@dataclass(frozen=True)
class SenderSettings:
    """What the sender needs from a plugin generation; ``spool`` None pauses it."""

    spool: FailureSpool | None
    resolver: Resolver
    psl: PublicSuffixList
    host: str  # SMTP server reports are handed to
    port: int
    sender: str  # envelope sender of reports
    per_hour: int  # sends per ruf address an hour


class FailureSender:
    """Sends the spool: one thread (:meth:`start`), or one pass (:meth:`run_once`)."""

    def __init__(self, settings: SenderSettings) -> None:
        self.settings = settings  # replaced whole by configure: a pass reads it once
        self.sent: dict[str, deque[float]] = {}
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.thread: threading.Thread | None = None
        self._exit_lock = threading.Lock()
        self.exited = False  # the thread decided to end (under _exit_lock): no revive

    def start(self) -> None:
        self.thread = threading.Thread(target=self._loop, name="dmarc-failures", daemon=True)
        self.thread.start()

    def revive(self) -> bool:
        """Cancel a stop the thread has not acted on yet (a generation starts while the
        last one's sender is still finishing a pass). False if it has ended or is ending:
        a new sender is needed then."""
        with self._exit_lock:
            if self.exited or self.thread is None:
                return False
            self.stop.clear()
            return True

    def _loop(self) -> None:
        while True:
            with self._exit_lock:
                if self.stop.is_set():
                    self.exited = True
                    return
            try:
                self.run_once()
            except Exception:  # the sender must outlive any one bad pass
                log.exception("dmarc: failure report pass failed")
            self.wake.wait(INTERVAL)
            self.wake.clear()

    def configure(self, settings: SenderSettings) -> None:
        """New settings (a reload): a pass under way ends at its next report or address,
        and the next pass, started now, uses them."""
        self.settings = settings
        self.wake.set()

    def _interrupted(self, settings: SenderSettings) -> bool:
        """Whether the pass that started with ``settings`` must end now: a stop, or other
        settings (a reload, or a refused one's taken back)."""
        return self.stop.is_set() or self.settings is not settings

    def _allowed(self, address: str, now: float, per_hour: int) -> bool:
        """Whether ``address`` may get another report this hour (sends are counted by
        :meth:`_count` once they succeed: a failed attempt uses no quota)."""
        key = address.lower()
        times = self.sent.get(key)
        if times is None:
            return True
        while times and times[0] <= now - 3600:
            times.popleft()
        if not times:
            del self.sent[key]  # no entry per address ever seen, only per recent one
            return True
        return len(times) < per_hour

    def _count(self, address: str, now: float) -> None:
        self.sent.setdefault(address.lower(), deque()).append(now)

    def run_once(self) -> dict[str, int]:
        """Try every waiting report once. Returns counts by outcome, for the log and tests:
        ``sent``, ``refused`` (7.1, size, 5xx: dropped for that address), ``limited``
        (per-hour cap reached: kept for a later pass), ``deferred`` (DNS or SMTP trouble:
        kept), ``expired`` (kept a day: dropped), ``bad`` (unreadable spool file, removed)."""
        counts = {k: 0 for k in ("sent", "refused", "limited", "deferred", "expired", "bad")}
        settings = self.settings
        spool = settings.spool
        if spool is None:
            return counts
        spool.sweep()
        for path in spool.files():
            if self._interrupted(settings):
                break
            try:
                self._one(settings, spool, path, counts)
            except OSError as e:  # this file only: the others are still worth trying
                log.warning("dmarc: failure report %s: %s", path.name, e)
        if any(counts.values()):
            log.info("dmarc: failure reports: %s",
                     ", ".join(f"{k} {v}" for k, v in counts.items() if v))  # fmt: skip
        return counts

    def _one(
        self, s: SenderSettings, spool: FailureSpool, path: Path, counts: dict[str, int]
    ) -> None:
        try:
            head, report = spool.read(path)
            domain, ruf = str(head["domain"]), str(head["ruf"])
            done = {str(a).lower() for a in head.get("done", [])}
            created = float(head.get("created", 0))
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("dmarc: removing unreadable failure report %s: %s", path.name, e)
            counts["bad"] += 1
            with contextlib.suppress(OSError):
                path.unlink()
            return
        allowed, refused, deferred = authorize(
            s.resolver, s.psl, domain, parse_rua(ruf), timeout=10.0, tag="ruf"
        )
        for d, why in refused:
            if d.address.lower() not in done:
                log.info("dmarc: failure report for %s not sent to %s: %s",
                         domain, d.address, why)  # fmt: skip
                counts["refused"] += 1
                done.add(d.address.lower())
        pending = len(deferred)
        stopped = False
        counts["deferred"] += len(deferred)
        for d in allowed:
            if d.address.lower() in done:
                continue
            if self._interrupted(s):  # the rest waits for the next pass
                pending += 1
                stopped = True
                continue
            now = time.time()
            data = _addressed(report, d.address)  # the limit applies to what is sent
            if d.limit is not None and len(data) > d.limit:
                counts["refused"] += 1
            elif not self._allowed(d.address, now, s.per_hour):
                counts["limited"] += 1
                pending += 1
                continue
            else:
                try:
                    smtp_send(s.host, s.port, s.sender, d.address, data)
                except (OSError, smtplib.SMTPException, ValueError) as e:
                    code, _text = smtp_reply(e)
                    if not 500 <= code < 600:
                        log.warning("dmarc: failure report to %s deferred: %s", d.address, e)
                        pending += 1
                        counts["deferred"] += 1
                        continue
                    log.warning("dmarc: failure report to %s refused: %s", d.address, e)
                    counts["refused"] += 1
                else:
                    self._count(d.address, now)
                    counts["sent"] += 1
            done.add(d.address.lower())
        if pending and (stopped or time.time() - created < MAX_AGE):
            # (An interrupted pass keeps a report even past its age: the next one decides.)
            head["done"] = sorted(done)
            spool.update(path, head, report)
            return
        if pending:
            counts["expired"] += 1
            log.warning("dmarc: failure report for %s dropped after a day", domain)
        with contextlib.suppress(OSError):
            path.unlink()


_SHARED: FailureSender | None = None
# The live plugin generations of this process that configured the sender, oldest first,
# with their settings: the newest one's are in use. A reload's new generation registers
# (in worker_ready, once accepted) before the old one shuts down.
_OWNERS: list[tuple[object, SenderSettings]] = []
_SHARED_LOCK = threading.Lock()


def shared_sender(owner: object, settings: SenderSettings) -> FailureSender | None:
    """This process's one sender, started on first use with a spool and reconfigured by
    later generations (a ``spool`` of None pauses it); ``owner`` (a plugin generation)
    must call :func:`release_sender` when it shuts down. Returns the sender, or None if
    none is needed."""
    global _SHARED
    with _SHARED_LOCK:
        _OWNERS[:] = [(o, st) for o, st in _OWNERS if o is not owner] + [(owner, settings)]
        if _SHARED is not None:
            _SHARED.configure(settings)
            if _SHARED.revive():
                return _SHARED
            _SHARED = None  # it ended: a new one below
        if settings.spool is None:
            return None
        _SHARED = FailureSender(settings)
        _SHARED.start()
        return _SHARED


def release_sender(owner: object) -> None:
    """``owner``'s generation shuts down: the sender goes
    back to the newest remaining generation's settings; with none left it is stopped, and
    shutdown waits up to ``RELEASE_JOIN_S`` for a pass under way, so no spool file changes
    after it returns. (A pass checks for the stop between reports and addresses; one
    still sending after the wait ends on its own, and a later generation revives it
    rather than start a second sender.)"""
    with _SHARED_LOCK:
        _OWNERS[:] = [(o, st) for o, st in _OWNERS if o is not owner]
        sender = _SHARED
        if sender is None:
            return
        if _OWNERS:
            sender.configure(_OWNERS[-1][1])
            return
        sender.configure(replace(sender.settings, spool=None))
        sender.stop.set()
        sender.wake.set()
    if sender.thread is not None:
        sender.thread.join(RELEASE_JOIN_S)
        if sender.thread.is_alive():
            log.warning("dmarc: failure report sender still sending at shutdown")


def _addressed(report: bytes, address: str) -> bytes:
    """The report with ``To:`` set to this address (added on top of the header block)."""
    return f"To: {address}\r\n".encode() + report
