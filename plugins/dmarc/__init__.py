"""Built-in ``dmarc``: DMARC (RFC 7489) evaluation, policy, and aggregate reporting.

At end of message, after ``spf`` and ``dkim`` (``after``), for the one RFC5322.From
domain: policy discovery (``_dmarc.<from domain>``, then ``_dmarc.<organizational
domain>`` from the Public Suffix List of the ``publicsuffixlist`` package), SPF and DKIM
identifier alignment (relaxed or strict) against the results already on the ledger,
``p`` / ``sp`` / ``pct``, local overrides, then the action. One result on the ledger:
``dmarc=<pass|fail|none|temperror|permerror> header.from=<domain> policy.dmarc=<applied>``.

Aggregate reporting: with ``history_db`` set, one row per evaluated message (policy found)
goes into a SQLite file (WAL mode, safe for several worker processes), and
``milterd dmarc report`` writes RFC 7489 aggregate XML per policy domain and mails it to
the verified ``rua`` addresses (``--send``; :mod:`.reports`).

In a dry run (``milterd check``: ``services.dry_run``) the results and verdicts are the
same, but ``history_db`` and ``failure_spool`` are neither opened nor created, no row is
written, no failure report is spooled or sent and no thread starts: what would have been
written is logged at INFO.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from publicsuffixlist import PublicSuffixList
from pydantic import Field, field_validator, model_validator

from milterd import (
    AddHeader,
    ConfigPath,
    Context,
    DNSTempError,
    Message,
    NXDomain,
    PluginConfig,
    Quarantine,
    Reject,
    Result,
    Services,
    TempFail,
    Verdict,
    hookimpl,
)

from ..addresses import a_label, bare, domains_named, getaddresses
from ..sqlpool import SQLitePool

if TYPE_CHECKING:
    from .failures import FailureSender, FailureSpool

log = logging.getLogger("milterd.dmarc")

__all__ = [
    "DMARCConfig",
    "DMARCPlugin",
    "DMARCRecord",
    "Store",
    "parse_record",
]

Disposition = Literal["none", "quarantine", "reject"]
_DISPOSITIONS = ("none", "quarantine", "reject")
_DOWNGRADE: dict[str, Disposition] = {"reject": "quarantine", "quarantine": "none", "none": "none"}
_V = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
# What XML 1.0 cannot hold (C0 controls but tab, CR, LF; lone surrogates; U+FFFE/FFFF).
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_LABEL = r"(?!-)[a-z0-9_-]{1,63}(?<!-)|xn--[a-z0-9-]{1,59}"
_DOMAIN = re.compile(rf"(?:{_LABEL})(?:\.(?:{_LABEL}))+")
_PSL: PublicSuffixList | None = None
_PSL_LOCK = threading.Lock()
#: The history pool's wait for another writer (ms); add() uses its caller's shorter one.
POOL_BUSY_MS = 5000
# How long shutdown waits for a prune under way (its DELETE): the supervisor allows a
# worker's plugins daemon.STOP_MARGIN (10 s) past shutdown_timeout, for all of them.
PRUNER_JOIN_S = 2.0


class DMARCConfig(PluginConfig):
    reject_action: Literal["reject", "quarantine", "tag", "none"] = "reject"
    quarantine_action: Literal["quarantine", "tag", "none"] = "quarantine"
    reject_text: str = "Rejected by DMARC policy for {domain}"
    tag_header: str = "X-DMARC-Disposition"
    temperror_action: Literal["none", "tempfail"] = "none"
    reject_bad_from: bool = False  # none or several From addresses: 550 instead of permerror
    never_reject: list[str] = []  # From (or organizational) domains never rejected
    never_reject_disposition: Literal["none", "quarantine"] = "none"
    trusted_arc_sealers: list[str] = []  # honour arc=pass when one of these sealed
    check_trusted: bool = False  # also evaluate mail from authenticated/internal clients
    history_db: ConfigPath | None = None  # SQLite file for aggregate reports; None: no history
    # Rows older than this are deleted (hourly); at least 8: reports catch up 7 days.
    history_days: int = Field(31, ge=8)
    psl_file: ConfigPath | None = None  # a public_suffix_list.dat; default: the package's copy
    org_name: str = "milterd"
    report_email: str = "postmaster@localhost"
    report_contact: str | None = None
    report_smtp_host: str = "127.0.0.1"  # where `dmarc report --send` hands reports over
    report_smtp_port: int = Field(25, gt=0, lt=65536)
    failure_reports: bool = False  # RFC 7489 7.3 reports to ruf (headers only; failures.py)
    failure_spool: ConfigPath | None = None  # directory of reports waiting to be sent
    failure_reports_per_hour: int = Field(10, ge=1)  # per ruf address; more are dropped
    failure_spool_max: int = Field(1000, ge=1)  # reports waiting; more are not written
    # RFC 6590: local parts of addresses in failure reports replaced by keyed hashes
    failure_reports_redact: bool = False

    @field_validator("reject_text")
    @classmethod
    def _reject_text(cls, v: str) -> str:
        # Formatted for every rejected message: a placeholder other than {domain} would
        # raise there and tempfail each one.
        try:
            text = v.format(domain="example.org")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                f"only {{domain}} may be used (write {{{{ and }}}} for a brace): {e}"
            ) from None
        if "\r" in text or "\n" in text:
            raise ValueError("must be one line")
        return v

    @field_validator("never_reject", "trusted_arc_sealers")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        # Compared with the From domain in its ASCII (A-label) form: so must these be.
        out = []
        for d in v:
            name = a_label(d.strip().rstrip("."))
            if name is None or "" in name.split("."):  # (as the IDNA codec refused before)
                raise ValueError(f"not a domain name: {d!r}")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _spool_needed(self) -> DMARCConfig:
        if self.failure_reports and not self.failure_spool:
            raise ValueError("failure_reports = true needs failure_spool (a directory)")
        return self


# --- record parsing ---------------------------------------------------------------------------


class RecordError(ValueError):
    """A DMARC record that cannot be used (permerror)."""


@dataclass(frozen=True, slots=True)
class DMARCRecord:
    p: Disposition
    sp: Disposition | None
    adkim: Literal["r", "s"]
    aspf: Literal["r", "s"]
    pct: int
    rua: str
    fo: str
    text: str
    np: Disposition | None = None  # RFC 9091: policy for non-existent subdomains
    ruf: str = ""


def parse_record(text: str) -> DMARCRecord:
    """Parse one ``v=DMARC1`` record. Raises RecordError when it is unusable.

    RFC 7489 6.3: ``v=DMARC1`` must come first; any other syntax error is discarded in
    favour of the default (an ``adkim``, ``aspf`` or ``pct`` that is not valid, a part
    without ``=``, a repeated tag: the first one counts) or ignored (an unknown tag).
    6.6.3 step 6: a missing or invalid ``p``, or an invalid ``sp``, with a valid ``rua``
    is read as the record ``v=DMARC1; p=none`` (reports still go to the ``rua``); without
    one the record is unusable.
    """
    tags: dict[str, str] = {}
    for i, part in enumerate(text.split(";")):
        if not part.strip():
            continue
        name, eq, value = part.partition("=")
        name, value = name.strip().lower(), value.strip()
        if i == 0 and (not eq or name != "v" or value != "DMARC1"):
            raise RecordError("v=DMARC1 must come first")
        if eq and name not in tags:
            tags[name] = value
    rua = tags.get("rua", "")
    rua_ok = any(u.strip().lower().startswith("mailto:") for u in rua.split(",") if u.strip())
    p = tags.get("p", "").lower()
    sp: str | None = tags.get("sp")
    sp = sp.lower() if sp is not None else None
    if p not in _DISPOSITIONS or (sp is not None and sp not in _DISPOSITIONS):
        if not rua_ok:
            what = f"invalid sp={sp!r}" if p in _DISPOSITIONS else f"invalid or missing p={p!r}"
            raise RecordError(what)
        return DMARCRecord("none", None, "r", "r", 100, rua, "0", text, None, tags.get("ruf", ""))
    np: str | None = tags.get("np")
    if np is not None:
        np = np.lower()
        if np not in _DISPOSITIONS:  # RFC 9091 is an extension: a bad np is ignored,
            np = None  # never a reason to drop the record's p
    adkim, aspf = tags.get("adkim", "r").lower(), tags.get("aspf", "r").lower()
    adkim = adkim if adkim in ("r", "s") else "r"
    aspf = aspf if aspf in ("r", "s") else "r"
    pct = int(tags["pct"]) if re.fullmatch(r"\d{1,3}", tags.get("pct", "")) else 100
    pct = pct if pct <= 100 else 100
    fo = tags.get("fo", "0")
    ruf = tags.get("ruf", "")
    return DMARCRecord(p, sp, adkim, aspf, pct, rua, fo, text, np, ruf)  # type: ignore[arg-type]


# --- helpers ------------------------------------------------------------------------------------


def _psl(path: str | None = None) -> PublicSuffixList:
    global _PSL
    with _PSL_LOCK:
        if path:
            with open(path, "rb") as f:
                return PublicSuffixList(f)
        if _PSL is None:
            _PSL = PublicSuffixList()
        return _PSL


def org_domain(psl: PublicSuffixList, domain: str) -> str:
    """The organizational domain (RFC 7489 3.2): public suffix plus one label."""
    return psl.privatesuffix(domain) or domain


def aligned(psl: PublicSuffixList, a: str, b: str, mode: str) -> bool:
    # Both in A-labels: an SPF or DKIM domain may come as U-labels (SMTPUTF8 mail).
    a, b = a_label(a.rstrip(".")) or "", a_label(b.rstrip(".")) or ""
    if not a or not b:
        return False
    if mode == "s":
        return a == b
    return org_domain(psl, a) == org_domain(psl, b)


def from_domains(message: Message) -> tuple[list[str], bool]:
    """Domains of every address in every From field (empty string for an address without
    a domain), and whether the field is malformed. Exactly one well-formed entry is
    required to evaluate DMARC as usual. From a malformed field (``ceo@bank.example
    x@evil.example``, two addresses and no comma) the domain of every ``@`` in it is
    returned, so that the parser's guess (here ``evil.example`` alone) cannot take a
    domain out of its policy."""
    values = [h.value for h in message.headers if h.name.lower() == "from"]
    parsed = getaddresses(values)
    if parsed is None:  # malformed, or nested too deep to parse
        # Display names and comments do not name authors: only what is left without them
        # (unless they are themselves unbalanced, when nothing tells them apart).
        found = [d for v in values for d in domains_named(bare(v) or v)]
        return (found or [""] * len(values)), True
    out: list[str] = []
    for _name, addr in parsed:
        if not addr:
            continue
        out.append(addr.rpartition("@")[2].strip().lower().rstrip(".") if "@" in addr else "")
    if values and not out:
        out = [""] * len(values)
    return out, False


_STRICTNESS = {"none": 0, "quarantine": 1, "reject": 2}
#: Distinct Author Domains in From evaluated at most; a message with more is refused (550):
#: each costs DNS lookups, and real mail has one (or two) authors' domains.
MAX_AUTHOR_DOMAINS = 5
TOO_MANY = f"more than {MAX_AUTHOR_DOMAINS} From domains"


def _left(ctx: Context, deadline: float) -> float:
    """Seconds until ``deadline`` (a share of the call's time), never past the call's."""
    return max(0.0, min(ctx.time_left(), deadline - time.monotonic()))


def xml_text(value: str) -> str:
    """``value`` as text an aggregate report (UTF-8 XML) can hold: each character XML 1.0
    does not allow, a lone surrogate (a byte that was not UTF-8) included, becomes
    U+FFFD. Values from the SMTP session and the message pass through this before they
    are recorded or written into a report."""
    return _NOT_XML.sub("\ufffd", value)


#: The longest rua kept in a history row (see _remember).
MAX_RUA_STORED = 2048


def _kept_rua(rua: str) -> str:
    """``rua`` cut to MAX_RUA_STORED characters at a comma: never inside a URI, where
    ``mailto:dmarc@example.com`` could become another address, ``dmarc@example.co``."""
    if len(rua) <= MAX_RUA_STORED:
        return rua
    return rua[: MAX_RUA_STORED + 1].rpartition(",")[0]


def _author_domain(raw: str) -> str:
    """A From address's domain as DMARC looks it up (A-labels, lower case), or ``""`` when
    it cannot be one: empty, a single label, not a host name, over 253 octets."""
    if not raw or "." not in raw:
        return ""
    domain = a_label(raw)  # internationalized domains are looked up (and reported) as A-labels
    if domain is None:
        return ""
    if not _DOMAIN.fullmatch(domain) or len(domain) > 253:
        return ""
    return domain


def _sealers(message: Message) -> set[str]:
    found: set[str] = set()
    for h in message.headers:
        if h.name.lower() == "arc-seal":
            m = re.search(r"(?:^|;)\s*d\s*=\s*([^;\s]+)", h.value)
            if m:
                found.add(m.group(1).lower().rstrip("."))
    return found


# --- the store ------------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    policy_domain TEXT NOT NULL,
    header_from TEXT NOT NULL,
    envelope_from TEXT NOT NULL,
    envelope_to TEXT NOT NULL,
    source_ip TEXT NOT NULL,
    result TEXT NOT NULL,
    disposition TEXT NOT NULL,
    dkim_aligned TEXT NOT NULL,
    spf_aligned TEXT NOT NULL,
    reasons TEXT NOT NULL,
    adkim TEXT NOT NULL, aspf TEXT NOT NULL, p TEXT NOT NULL, sp TEXT NOT NULL,
    pct INTEGER NOT NULL, fo TEXT NOT NULL, rua TEXT NOT NULL,
    dkim TEXT NOT NULL,
    spf TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_ts ON messages (ts);
CREATE TABLE IF NOT EXISTS sent (
    domain TEXT NOT NULL, begin INTEGER NOT NULL, "end" INTEGER NOT NULL,
    address TEXT NOT NULL, report_id TEXT NOT NULL, ts INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (domain, begin, "end", address)
);
"""


class Store:
    """The per-message history, one SQLite file shared by every worker (WAL mode).
    Connections come from a pool (at most ``keep`` idle), not one per thread: libmilter
    runs each milter connection on a new thread, and a connection per thread kept two
    file descriptors open for every SMTP session the daemon ever served."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pool = SQLitePool(path, POOL_BUSY_MS / 1000)
        with self.pool.conn() as db:
            db.executescript(SCHEMA)
            db.commit()

    def add(self, row: dict[str, Any], timeout: float = 5.0) -> None:
        """Insert one row, waiting at most ``timeout`` seconds for another writer."""
        cols = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.pool.conn() as db:
            db.execute(f"PRAGMA busy_timeout={max(1, int(timeout * 1000))}")
            try:
                with db:
                    db.execute(
                        f"INSERT INTO messages ({cols}) VALUES ({marks})", tuple(row.values())
                    )
            finally:  # the connection goes back to the pool: its usual wait, not this one's
                db.execute(f"PRAGMA busy_timeout={POOL_BUSY_MS}")

    def rows(self, since: int, until: int) -> list[dict[str, Any]]:
        with self.pool.conn() as db:
            cur = db.execute(
                "SELECT * FROM messages WHERE ts >= ? AND ts < ? ORDER BY id", (since, until)
            )
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    def prune(self, before: float) -> int:
        """Delete the rows older than ``before`` (epoch seconds); returns their count.
        Records of sent reports go with the rows they covered."""
        with self.pool.conn() as db, db:
            db.execute('DELETE FROM sent WHERE "end" < ?', (int(before),))
            return db.execute("DELETE FROM messages WHERE ts < ?", (int(before),)).rowcount

    def handled(self, domain: str, begin: int, end: int, address: str) -> str | None:
        """How a report for ``domain`` over a period overlapping [begin, end] was handled
        for ``address`` (``sent``, or ``skipped: why`` for a permanent refusal), or None:
        a report already sent is never sent again for any part of its period."""
        with self.pool.conn() as db:
            row = db.execute(
                "SELECT outcome FROM sent WHERE domain = ? AND address = ? AND begin <= ? "
                'AND "end" >= ? ORDER BY ts LIMIT 1',
                (domain, address.lower(), end, begin),
            ).fetchone()
        return str(row[0]) if row is not None else None

    def mark(
        self, domain: str, begin: int, end: int, address: str, report_id: str, outcome: str
    ) -> None:
        """Remember how the report was handled for ``address`` (see :meth:`handled`)."""
        with self.pool.conn() as db, db:
            db.execute(
                "INSERT OR REPLACE INTO sent VALUES (?, ?, ?, ?, ?, ?, ?)",
                (domain, begin, end, address.lower(), report_id, int(time.time()), outcome),
            )

    def close(self) -> None:
        self.pool.close()


# --- the plugin -----------------------------------------------------------------------------


@dataclass
class _Evaluation:
    result: str
    domain: str = ""
    policy_domain: str = ""
    record: DMARCRecord | None = None
    disposition: Disposition = "none"
    reasons: tuple[tuple[str, str], ...] = ()  # (PolicyOverrideType, comment)
    dkim_aligned: bool = False
    spf_aligned: bool = False
    detail: str = ""
    # A failure that a DNS hiccup may explain: an SPF or DKIM check of an identifier
    # aligned with the From domain ended in temperror (it might have passed).
    transient: bool = False


class DMARCPlugin:
    """DMARC at end of message; reads the ``spf`` and ``dkim`` (and ``arc``) results."""

    actions = frozenset({"add_header", "quarantine"})
    after = ("spf", "dkim", "arc")
    reads_body = False
    # DNS and the SQLite write are both bounded by ctx.time_left(): no thread hop needed.
    isolation = "inline"
    # The public suffix list loads once before the fork; the history database connection
    # is opened per worker (worker_start): SQLite connections must not cross a fork.
    prefork = True

    def __init__(self) -> None:
        self.psl: PublicSuffixList | None = None
        self.store: Store | None = None
        self.history_db: str | None = None
        self.history_days = 31
        self._stop = threading.Event()
        self._pruner: threading.Thread | None = None
        self._sender_owner = False
        self.services: Services | None = None
        self.config: DMARCConfig | None = None
        self.spool: FailureSpool | None = None
        self.sender: FailureSender | None = None
        self.failure_reports = False
        self.dry_run = False

    @hookimpl
    def config_schema(self) -> type[DMARCConfig]:
        return DMARCConfig

    @hookimpl
    def startup(self, config: DMARCConfig, services: Services) -> None:
        self.psl = _psl(config.psl_file)
        self.history_db = config.history_db
        self.history_days = config.history_days
        self.services = services
        self.config = config
        self.failure_reports = bool(config.failure_reports and config.failure_spool)
        self.dry_run = services.dry_run
        if self.dry_run:  # milterd check: no database, no spool directory
            return
        if config.history_db:  # create it (WAL, schema) now: a bad path refuses the config
            Store(config.history_db).close()
        if config.failure_reports and config.failure_spool:
            from .failures import FailureSpool

            self.spool = FailureSpool(config.failure_spool, config.failure_spool_max)

    @hookimpl
    def worker_start(self) -> None:
        if self.dry_run:  # no store, no pruner, no sender: nothing is written or sent
            return
        self.store = Store(self.history_db) if self.history_db else None
        # One pruner per daemon (worker 0, or the only process): the history would
        # otherwise grow by a row per message for ever.
        if self.store is not None and os.environ.get("MILTERD_WORKER", "0") == "0":
            self._pruner = threading.Thread(
                target=self._prune_loop, args=(self.store, self._stop), name="dmarc-prune",
                daemon=True,
            )  # fmt: skip
            self._pruner.start()

    @hookimpl
    def worker_ready(self) -> None:
        # One sender of failure reports per daemon (the spool is shared): worker 0's, one
        # per process across reloads (the old generation lives on while its connections
        # finish; two senders would send every report twice). A new generation hands it
        # its settings, or pauses it when failure reports are off: here, once the
        # generation is accepted (a refused one's SMTP settings are never used).
        if self.dry_run:
            return
        if os.environ.get("MILTERD_WORKER", "0") == "0":
            from .failures import SenderSettings, shared_sender

            c, psl = self.config, self.psl
            assert c is not None and psl is not None and self.services is not None
            self._sender_owner = True  # released at shutdown, even with no sender now
            self.sender = shared_sender(self, SenderSettings(
                self.spool, self.services.resolver, psl, c.report_smtp_host,
                c.report_smtp_port, c.report_email, c.failure_reports_per_hour,
            ))  # fmt: skip

    def _prune_loop(self, store: Store, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                n = store.prune(time.time() - self.history_days * 86400)
                if n:
                    log.info("dmarc: pruned %d history row(s) older than %d days", n,
                             self.history_days)  # fmt: skip
            except sqlite3.Error as e:
                log.error("dmarc: history prune failed: %s", e)
            stop.wait(3600)

    @hookimpl
    def shutdown(self) -> None:
        self._stop.set()
        if self._sender_owner:
            from .failures import release_sender

            self._sender_owner = False
            release_sender(self)

        # A prune under way finishes first (one DELETE, bounded by the busy timeout): it
        # would otherwise write the history after shutdown, on a connection the closed
        # pool no longer tracks.
        if self._pruner is not None:
            self._pruner.join(PRUNER_JOIN_S)
            if self._pruner.is_alive():
                log.warning("dmarc: history prune still running at shutdown")
        if self.store is not None:
            self.store.close()

    # --- policy discovery ---------------------------------------------------------------

    def _records(self, ctx: Context, domain: str, deadline: float) -> list[str]:
        try:
            texts = ctx.resolver.lookup(f"_dmarc.{domain}", "TXT", timeout=_left(ctx, deadline))
        except NXDomain:
            return []
        return [t for t in texts if _V.match(t)]

    def _discover(
        self, ctx: Context, domain: str, deadline: float
    ) -> tuple[str, DMARCRecord | None, str]:
        """(policy domain, record, problem) — problem is ``""``, ``"none"``, or
        ``"permerror: ..."``. DNSTempError propagates."""
        assert self.psl is not None
        org = org_domain(self.psl, domain)
        for candidate in (domain, org) if org != domain else (domain,):
            found = self._records(ctx, candidate, deadline)
            if not found:
                continue
            if len(found) > 1:  # RFC 7489 6.6.3 step 5: no DMARC processing
                return candidate, None, "none: several DMARC records"
            try:
                return candidate, parse_record(found[0]), ""
            except RecordError as e:
                return candidate, None, f"permerror: {e}"
        return "", None, "none"

    def _nonexistent(self, ctx: Context, domain: str, deadline: float) -> bool:
        """RFC 9091 2.1: NXDOMAIN, or no A, AAAA and MX records. A DNS failure counts as
        existing: the stricter ``np`` is only applied when the answer says so."""
        for rdtype in ("A", "AAAA", "MX"):
            try:
                if ctx.resolver.lookup(domain, rdtype, timeout=_left(ctx, deadline)):
                    return False
            except NXDomain:
                return True
            except DNSTempError:
                return False
        return True

    def _evaluate(self, ctx: Context, message: Message) -> tuple[_Evaluation, list[_Evaluation]]:
        """The DMARC evaluation of the message's From, and every Author Domain's (for the
        history). Several addresses in From (RFC 7489 6.6.1): each distinct Author Domain
        is evaluated, and the strictest policy among those that fail applies (a failure
        that no DNS hiccup explains before one that might); an address without a domain
        is skipped. Each domain gets an equal share of the time left, so that domains
        whose lookups never answer cannot use it all up (the call would overrun and its
        verdict be lost); more than MAX_AUTHOR_DOMAINS is refused outright. A From that
        gives no usable domain is a permerror, and with ``reject_bad_from`` anything but
        exactly one address in a well-formed field is (the 550 of that option). A
        malformed From is evaluated as if it listed every domain it names."""
        conf: DMARCConfig = ctx.config
        domains, malformed = from_domains(message)
        n = len(domains)
        if (n != 1 or malformed) and (conf.reject_bad_from or not any(domains)):
            detail = "malformed From" if malformed else f"{n} From addresses"
            return _Evaluation("permerror", detail=detail), []
        usable: list[str] = []
        for raw in domains:
            domain = _author_domain(raw)
            if domain and domain not in usable:
                usable.append(domain)
        if not usable:
            return _Evaluation("permerror", detail="invalid From domain" if n == 1 else
                               f"{n} From addresses, none with a usable domain"), []  # fmt: skip
        if len(usable) > MAX_AUTHOR_DOMAINS:
            return _Evaluation("permerror", detail=TOO_MANY), []
        evaluations: list[_Evaluation] = []
        for i, d in enumerate(usable):
            share = ctx.time_left() / (len(usable) - i)
            e = self._evaluate_domain(ctx, message, d, time.monotonic() + share)
            evaluations.append(e)
            if e.result == "fail" and e.disposition == "reject" and not e.transient:
                break  # nothing can be stricter
        failed = [e for e in evaluations if e.result == "fail"]
        if failed:  # the first of equals
            chosen = max(failed, key=lambda e: (_STRICTNESS[e.disposition], not e.transient))
            return chosen, evaluations
        for word in ("temperror", "pass"):
            for e in evaluations:
                if e.result == word:
                    return e, evaluations
        return evaluations[0], evaluations

    def _evaluate_domain(
        self, ctx: Context, message: Message, domain: str, deadline: float
    ) -> _Evaluation:
        """The evaluation for one Author Domain (A-labels, checked by _author_domain), its
        lookups done by ``deadline`` (``time.monotonic()``)."""
        assert self.psl is not None
        conf: DMARCConfig = ctx.config
        try:
            policy_domain, record, problem = self._discover(ctx, domain, deadline)
        except DNSTempError:
            return _Evaluation("temperror", domain, detail="DMARC policy lookup failed")
        except (ValueError, UnicodeError):  # a name the resolver cannot even encode
            return _Evaluation("permerror", detail="invalid From domain")
        if record is None:
            word = problem.split(":", 1)[0]
            return _Evaluation(word, domain, policy_domain, detail=problem)

        dkim_ok = any(
            r.result == "pass" and aligned(self.psl, r.prop("header.d") or "", domain, record.adkim)
            for r in ctx.results_for("dkim")
        )
        spf_ok = any(
            r.result == "pass"
            and aligned(self.psl, r.prop("smtp.mailfrom") or "", domain, record.aspf)
            for r in ctx.results_for("spf")
        )
        transient = any(
            r.result == "temperror" and aligned(self.psl, r.prop("header.d") or "", domain,
                                                record.adkim)
            for r in ctx.results_for("dkim")
        ) or any(
            r.result == "temperror" and aligned(self.psl, r.prop("smtp.mailfrom") or "",
                                                domain, record.aspf)
            for r in ctx.results_for("spf")
        )  # fmt: skip
        ev = _Evaluation(
            "pass" if dkim_ok or spf_ok else "fail",
            domain,
            policy_domain,
            record,
            dkim_aligned=dkim_ok,
            spf_aligned=spf_ok,
            transient=transient,
        )
        if ev.result == "pass":
            return ev
        policy: Disposition = record.p
        if policy_domain != domain:
            if record.np is not None and self._nonexistent(ctx, domain, deadline):
                policy = record.np
            elif record.sp is not None:
                policy = record.sp
        reasons: list[tuple[str, str]] = []
        if record.pct < 100 and random.random() * 100 >= record.pct:
            policy = _DOWNGRADE[policy]
            reasons.append(("sampled_out", f"pct={record.pct}"))
        org = org_domain(self.psl, domain)
        never = {d.lower().rstrip(".") for d in conf.never_reject}
        if policy == "reject" and (domain in never or org in never):
            policy = conf.never_reject_disposition
            reasons.append(("local_policy", "never_reject"))
        if policy != "none" and conf.trusted_arc_sealers:
            arc_pass = any(r.result == "pass" for r in ctx.results_for("arc"))
            trusted = {d.lower().rstrip(".") for d in conf.trusted_arc_sealers}
            sealers = _sealers(message) & trusted
            if arc_pass and sealers:
                policy = "none"
                reasons.append(("trusted_forwarder", "arc=pass sealed by " + min(sealers)))
        ev.disposition = policy
        ev.reasons = tuple(reasons)
        return ev

    # --- hooks ------------------------------------------------------------------------------

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> Verdict | None:
        conf: DMARCConfig = ctx.config
        if ctx.connection.trusted and not conf.check_trusted:
            return None
        ev, evaluated = self._evaluate(ctx, message)
        props: list[tuple[str, str]] = []
        if ev.domain:
            props.append(("header.from", ev.domain))
        props.append(("policy.dmarc", ev.disposition))
        reason = "; ".join(f"{t} {c}" for t, c in ev.reasons)
        if ev.result in ("permerror", "temperror", "none") and ev.detail not in ("", "none"):
            reason = ev.detail
        ctx.add_result(Result("dmarc", ev.result, reason=reason[:200], properties=tuple(props)))
        if self.store is not None:  # every Author Domain's row: each owner's report sees it
            for e in evaluated or [ev]:
                if e.record is not None:
                    self._remember(ctx, e)
        elif ev.record is not None and ctx.dry_run and self.history_db:
            ctx.log.info("dry run: would record a history row (%s, dmarc=%s)",
                         ev.policy_domain, ev.result)  # fmt: skip
        if (
            self.failure_reports
            and ev.record is not None
            and ev.record.ruf
            and ev.result in ("pass", "fail")
        ):
            from .failures import wanted
            from .reports import parse_rua

            if parse_rua(ev.record.ruf) and wanted(
                ev.record.fo, ev.result, ev.dkim_aligned, ev.spf_aligned, ctx.results
            ):
                # The header block as received: at outcome the message is as delivered,
                # with our own fields (a spam report quoting the body, recipients).
                ctx.message_state["dmarc_failure"] = (ev, message.header_bytes())

        if ev.result == "permerror" and not ev.domain and conf.reject_bad_from:
            return Reject("550", "5.7.1", "Message must have exactly one From address")
        if ev.result == "permerror" and ev.detail == TOO_MANY:
            return Reject("550", "5.7.1", "Too many From addresses", reason="dmarc " + TOO_MANY)
        if ev.result == "temperror" and conf.temperror_action == "tempfail":
            return TempFail("451", "4.7.1", "DMARC policy lookup failed, try again later")
        if ev.result != "fail" or ev.disposition == "none":
            return None
        action = conf.reject_action if ev.disposition == "reject" else conf.quarantine_action
        why = f"dmarc {ev.disposition} {ev.domain}"
        if action == "reject" and ev.transient:
            # An aligned SPF or DKIM check had a DNS temperror: it might have passed, so a
            # permanent 550 could bounce legitimate mail over a DNS hiccup. Try again
            # later instead (RFC 7208 8.6: temperror is transient); a spoofer, who cannot
            # make the real domain's DNS fail, still gets the 550 once it answers.
            return TempFail("451", "4.7.1", "DMARC check incomplete (DNS), try again later",
                            reason=why + " (aligned check temperror)")  # fmt: skip
        if action == "reject":
            text = conf.reject_text.format(domain=ev.domain)
            return Reject("550", "5.7.1", text, reason=why)
        if action == "quarantine":
            return Quarantine(reason=why)
        if action == "tag":
            ctx.add_change(AddHeader(conf.tag_header, f"{ev.disposition} ({ev.domain})"))
        return None

    @hookimpl
    def outcome(self, ctx: Context, verdict: Verdict | None, message: Message) -> None:
        pending: tuple[_Evaluation, bytes] | None = ctx.message_state.get("dmarc_failure")
        if pending is None or not self.failure_reports:
            return
        ev, received_headers = pending
        if ev.record is None:
            return
        word = verdict.word if verdict is not None else "continue"
        if word == "tempfail":  # it will come back and be evaluated again
            return
        from ..authres import build_header
        from .failures import FailureInfo, failure_report

        assert self.services is not None and self.config is not None
        client = ctx.connection.client
        dkim_fail = next(
            (r for r in ctx.results_for("dkim") if r.result == "fail" and r.prop("header.d")),
            None,
        )
        info = FailureInfo(
            domain=ev.domain,
            source_ip=str(client.address) if client and client.address is not None else "",
            mail_from=ctx.message.sender if ctx.message is not None else "",
            authentication_results=build_header(
                self.services.settings.authserv_id, list(ctx.results)
            ),
            delivery={"reject": "reject", "discard": "policy", "quarantine": "spam"}.get(
                word, "delivered"
            ),
            aligned=[m for m, ok in (("dkim", ev.dkim_aligned), ("spf", ev.spf_aligned)) if ok],
            dkim=(dkim_fail.prop("header.d") or "", dkim_fail.prop("header.s") or "")
            if dkim_fail
            else None,
            headers=received_headers,
        )
        conf = self.config
        report = failure_report(
            info, conf.org_name, conf.report_email, redact=conf.failure_reports_redact
        )
        if ctx.dry_run:
            ctx.log.info("dry run: would queue a failure report for %s to %s (%d bytes)",
                         ev.domain, ev.record.ruf, len(report))  # fmt: skip
            return
        if self.spool is None:
            return
        try:
            assert self.psl is not None
            owner = org_domain(self.psl, ev.policy_domain)
            if not self.spool.put(ev.policy_domain, ev.record.ruf, report, owner=owner):
                ctx.log.warning("dmarc: failure report spool full: report for %s not written",
                                ev.domain)  # fmt: skip
                return
        except OSError as e:
            ctx.log.warning("dmarc: failure report not written: %s", e)
            return
        if self.sender is not None:
            self.sender.wake.set()

    def _remember(self, ctx: Context, ev: _Evaluation) -> None:
        """One history row for the aggregate reports. Every value a sender controls (HELO,
        MAIL FROM, DKIM d= and s=, the recipient) goes through :func:`xml_text` first: a
        byte that is not UTF-8 (a lone surrogate here) made the insert, or a later
        report run for every domain, fail, and a control character made the domain's
        XML unparseable for its receiver."""
        assert self.store is not None and ev.record is not None
        rec = ev.record
        client = ctx.connection.client
        ip = str(client.address) if client is not None and client.address is not None else ""
        if not ip:  # an aggregate report's row needs the source IP (RFC 7489 App. C)
            ctx.log.debug("dmarc: no client address: not in the aggregate reports")
            return
        spf = [
            (r.prop("smtp.mailfrom") or "", "mfrom", r.result)
            for r in ctx.results_for("spf")
            if r.prop("smtp.mailfrom") is not None
        ]
        helo = [
            (r.prop("smtp.helo") or "", "helo", r.result)
            for r in ctx.results_for("spf")
            if r.prop("smtp.helo") is not None
        ]
        dkim = [
            (r.prop("header.d") or "", r.prop("header.s") or "", r.result)
            for r in ctx.results_for("dkim")
            if r.prop("header.d")
        ]
        spf = [(xml_text(a), b, xml_text(c)) for a, b, c in spf]
        helo = [(xml_text(a), b, xml_text(c)) for a, b, c in helo]
        dkim = [(xml_text(a), xml_text(b), xml_text(c)) for a, b, c in dkim]
        msg = ctx.message
        rcpt = xml_text(msg.recipients[0].address) if msg is not None and msg.recipients else ""
        try:
            self.store.add(
                {
                    "ts": int(time.time()),
                    "policy_domain": ev.policy_domain,
                    "header_from": xml_text(ev.domain),
                    "envelope_from": spf[0][0] if spf else "",
                    "envelope_to": rcpt.rpartition("@")[2].strip("<>").lower(),
                    "source_ip": ip,
                    "result": ev.result,
                    "disposition": ev.disposition,
                    "dkim_aligned": "pass" if ev.dkim_aligned else "fail",
                    "spf_aligned": "pass" if ev.spf_aligned else "fail",
                    "reasons": json.dumps(ev.reasons),
                    "adkim": rec.adkim,
                    "aspf": rec.aspf,
                    "p": rec.p,
                    "sp": rec.sp or rec.p,
                    "pct": rec.pct,
                    "fo": rec.fo,
                    # enough for the destinations reports go to (at most five): a 64 KB
                    # rua in every row made a row 220 times the size the docs give
                    "rua": _kept_rua(rec.rua),
                    "dkim": json.dumps(dkim),
                    "spf": json.dumps(spf + helo),
                },
                timeout=min(5.0, ctx.time_left()),
            )
        except (sqlite3.Error, ValueError) as e:  # reporting must never cost a message
            ctx.log.warning("dmarc: history not written: %s", e)

    # --- command line ---------------------------------------------------------------------

    @hookimpl
    def commands(self, subparsers: Any) -> None:
        from .reports import add_commands

        add_commands(subparsers)
