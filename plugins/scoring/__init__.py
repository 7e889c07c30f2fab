"""Built-in ``scoring``: turns everything known about a message into symbols, a score and an
action.

At end of message, in this order:

* results other plugins recorded (SPF, DKIM, ARC, DMARC, ...) become symbols
  (``SPF_FAIL``...) with configurable scores;
* GTUBE, the configured rules (header, body over decoded text parts with HTML reduced to
  text, raw, URL domains, envelope, client CIDR, attachments, MIME types, size), the
  built-in attachment checks, DNS blocklists (client address and URL domains, looked up
  concurrently), and the Bayesian classifier add their symbols; meta rules combine any
  symbols on the ledger;
* a scan budget (bytes parsed, seconds of matching) bounds the work: when it runs out the
  message gets ``SCAN_INCOMPLETE``;
* the total score (every plugin's symbols) picks the action from the thresholds, per
  recipient domain when overridden: reject (550 5.7.1), quarantine, rewrite the subject,
  add a spam header, greylist (4.7.1), or none. The decision is recorded as the zero-score
  symbol ``MILTERD_SCORING`` (options ``action=...``, ``required=...``) that the
  ``tagging`` plugin reads.

``milterd bayes train --spam PATH --ham PATH`` trains the classifier from mbox files and
Maildir folders.

In a dry run (``milterd check``: ``services.dry_run``) the score and action are the same,
but nothing is learned or recorded and no database file is created: Bayes classifies from
its database opened read-only (no Bayes symbol when it does not exist), autolearn only
logs what it would learn, and greylisting decides from the triplet's row as it is (an
unknown triplet is tempfailed, as the daemon would) without recording it.
"""

from __future__ import annotations

import concurrent.futures as cf
import email.utils
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any

from milterd import (
    AddHeader,
    ChangeHeader,
    Context,
    Message,
    Quarantine,
    Reject,
    Services,
    TempFail,
    Verdict,
    hookimpl,
)

from . import bayes as bayes_mod
from . import greylist as grey_mod
from . import scanners
from .config import DEFAULT_RESULT_SCORES, ActionThresholds, ScoringConfig
from .content import Content, extract
from .dnsbl import Hit, List, Lookups, check_test_points
from .rules import (
    GTUBE,
    CompiledRule,
    MessageData,
    MetaRule,
    Scan,
    compile_meta,
    compile_rule,
    fold,
    mime_rules,
    order_meta,
)

__all__ = ["DECISION_SYMBOL", "ScoringConfig", "ScoringPlugin"]


def _received(ctx: Context, client: Any) -> bytes:
    """A Received field naming the client, so that spamd knows where the mail came from."""
    conn = ctx.connection
    name = conn.client.hostname if conn.client else "unknown"
    addr = str(client) if client is not None else "unknown"
    helo = conn.helo or "unknown"
    date = email.utils.formatdate(localtime=False)
    qid = ctx.message.queue_id if ctx.message else ""
    line = (
        f"Received: from {helo} ({name} [{addr}])\r\n\tby milterd with ESMTP id {qid}; {date}\r\n"
    )
    return line.encode("utf-8", "surrogateescape")


def _tagged(subject: str, template: str) -> bool:
    """Whether ``subject`` already starts with the text ``template`` puts before the
    subject (its fixed part, up to the first field: ``[SPAM`` of ``[SPAM {score}] ...``)."""
    head = template.split("{subject}", 1)[0]
    static = head.split("{", 1)[0].strip()
    return bool(static) and subject.strip().startswith(static)


DECISION_SYMBOL = "MILTERD_SCORING"
ACTION_ORDER = ("reject", "quarantine", "rewrite_subject", "add_header", "greylist")
SPAM_ACTIONS = ("add_header", "rewrite_subject", "quarantine", "reject")
_GTUBE_B = GTUBE.encode()


@dataclass(frozen=True, slots=True)
class Effective:
    """Thresholds and rule switches for one message (after per-domain overrides)."""

    thresholds: dict[str, float | None]
    disabled: frozenset[str]
    enabled: frozenset[str]
    # Several recipient domains: each one's own thresholds (see ScoringPlugin.action_for).
    per_domain: tuple[dict[str, float | None], ...] = ()


#: From the most lenient outcome to the strictest, for choosing among recipient domains:
#: delivering (even tagged) before deferring, deferring before holding or refusing.
LENIENCY = ("no_action", "add_header", "rewrite_subject", "greylist", "quarantine", "reject")


def _first_reached(thresholds: dict[str, float | None], total: float) -> str:
    for a in ACTION_ORDER:
        t = thresholds.get(a)
        if t is not None and total >= t:
            return a
    return "no_action"


class ScoringPlugin:
    """Symbols, rules, blocklists, Bayes, thresholds and actions."""

    actions = frozenset({"add_header", "change_header", "quarantine"})
    # Rules compile and blocklists are checked once, before the workers fork; the I/O pool
    # and the Bayes and greylist connections are per worker (worker_start).
    prefork = True

    def __init__(self) -> None:
        self.rules: list[CompiledRule] = []
        self.metas: list[MetaRule] = []
        self.result_map: dict[tuple[str, str], tuple[str, float]] = {}
        self.lists: list[List] = []
        self.pool: cf.ThreadPoolExecutor | None = None
        self.resolver: Any = None
        self.psl: Any = None
        self.classifier: bayes_mod.Classifier | None = None
        self.store: bayes_mod.Store | None = None
        self.grey: grey_mod.SQLiteGrey | grey_mod.RedisGrey | None = None
        self.config: ScoringConfig | None = None
        self.log = logging.getLogger("milterd.scoring")
        self.dry_run = False

    # --- lifecycle ------------------------------------------------------------------------

    @hookimpl
    def config_schema(self) -> type[ScoringConfig]:
        return ScoringConfig

    @hookimpl
    def startup(self, config: ScoringConfig, services: Services) -> None:
        self.log = services.logger
        self.resolver = services.resolver
        self.dry_run = services.dry_run
        rules: list[CompiledRule] = []
        metas: list[MetaRule] = []
        for rc in config.rules:
            if rc.type == "meta":
                assert rc.expression is not None
                pred, refs = compile_meta(rc.name, rc.expression)
                metas.append(MetaRule(rc.name, rc.score, rc.description, pred, refs, rc.enabled))
            else:
                rules.append(compile_rule(rc))
        if config.mime.enabled:
            m = config.mime
            rules.extend(mime_rules(m.executable, m.double_extension, m.archive,
                                    m.executable_extensions, m.archive_extensions))  # fmt: skip
        self.rules = rules
        self.metas = order_meta(metas)
        if any(rc.pattern and not rc.case_sensitive for rc in config.rules):
            fold("\u00e9")  # build the case-fold table now, not on the first message
        names = {r.name for r in config.rules}
        for dom, ov in config.domains.items():
            for n in (*ov.disabled_rules, *ov.enabled_rules):
                if n not in names and not n.startswith("MIME_"):
                    raise ValueError(f"domains.{dom}: unknown rule {n}")
        scores = dict(DEFAULT_RESULT_SCORES) if config.result_defaults else {}
        scores.update(config.results)
        self.result_map = {}
        for key, score in scores.items():
            method, _, result = key.partition("=")
            name = config.result_names.get(key) or f"{method}_{result}".upper().replace("-", "_")
            self.result_map[(method, result)] = (name, score)
        self.lists = [List(c) for c in config.dnsbl]
        if self.lists:
            timeout = min(3.0, config.dnsbl_timeout + 1)
            check_test_points(self.lists, services.resolver, self.log, timeout=timeout)
        if any(c.type == "uri" for c in config.dnsbl):
            from publicsuffixlist import PublicSuffixList

            self.psl = PublicSuffixList()
        # Open and close the stores once here, so that a bad path refuses the config now
        # rather than in every worker; worker_start opens each worker's own.
        self.config = config
        for closable in self._open_stores(config):
            closable.close()

    def _open_stores(self, config: ScoringConfig) -> list[bayes_mod.Store | grey_mod.GreyStore]:
        b = config.bayes
        opened: list[bayes_mod.Store | grey_mod.GreyStore] = []
        if b.enabled:
            # A dry run reads the database if there is one, and creates nothing.
            opener = bayes_mod.open_store_readonly if self.dry_run else bayes_mod.open_store
            store = opener(b.backend, b.path, b.redis_url, b.redis_prefix, b.timeout)
            self.store = store
            self.classifier = (
                bayes_mod.Classifier(store, b.min_spam, b.min_ham) if store is not None else None
            )
            if store is not None:
                opened.append(store)
        if config.actions.greylist is not None or any(
            ov.actions.get("greylist") is not None for ov in config.domains.values()
        ):
            self.grey = grey_mod.open_grey(config.greylist, readonly=self.dry_run)
            opened.append(self.grey)
        return opened

    @hookimpl
    def worker_start(self) -> None:
        config = self.config
        assert config is not None
        if self.lists or config.spamd.enabled or config.rspamd.enabled:
            self.pool = cf.ThreadPoolExecutor(
                max_workers=config.dnsbl_threads, thread_name_prefix="scoring-io"
            )
        self._open_stores(config)

    @hookimpl
    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
        for closable in (self.store, self.grey):
            if closable is not None:
                try:
                    closable.close()
                except Exception:
                    self.log.exception("scoring: closing a store failed")

    @hookimpl
    def commands(self, subparsers: Any) -> None:
        from .cli import add_commands

        add_commands(subparsers)

    # --- per message ----------------------------------------------------------------------

    def effective(self, cfg: ScoringConfig, recipients: list[str]) -> Effective:
        base = cfg.actions.model_dump()
        domains = {r.rsplit("@", 1)[-1].lower().strip(".") for r in recipients if "@" in r}
        overrides = [cfg.domains.get(d) for d in sorted(domains)]
        if any("@" not in r for r in recipients) or not overrides:
            overrides.append(None)  # a bare <postmaster> (RFC 5321) is judged globally
        if all(o is None for o in overrides):
            return Effective(base, frozenset(), frozenset())
        # One message, several recipient domains: the most lenient settings win (a higher
        # threshold, a rule disabled by any of them), so no domain gets a stricter policy
        # than it configured.
        thresholds: dict[str, float | None] = {}
        for action in ActionThresholds.model_fields:
            vals: list[float | None] = []
            for o in overrides:
                vals.append(o.actions[action] if o is not None and action in o.actions
                            else base[action])  # fmt: skip
            thresholds[action] = (
                None if any(v is None for v in vals) else max(v for v in vals if v is not None)
            )
        disabled = frozenset().union(*(o.disabled_rules for o in overrides if o is not None))
        enabled_sets = [frozenset(o.enabled_rules) if o is not None else frozenset()
                        for o in overrides]  # fmt: skip
        enabled = frozenset.intersection(*enabled_sets) if enabled_sets else frozenset()
        per_domain = tuple(
            {a: (o.actions[a] if o is not None and a in o.actions else base[a]) for a in base}
            for o in overrides
        )
        return Effective(thresholds, disabled, enabled, per_domain)

    @staticmethod
    def action_for(eff: Effective, total: float) -> str:
        """The action for a message scored ``total``. With several recipient domains, the
        most lenient of the actions each domain's own thresholds give (LENIENCY): merging
        the thresholds action by action could pick one no domain would (two domains that
        each turn off a different marking action left only greylist for both)."""
        if not eff.per_domain:
            return _first_reached(eff.thresholds, total)
        return min((_first_reached(t, total) for t in eff.per_domain), key=LENIENCY.index)

    def _read(self, message: Message, limit: int) -> tuple[bytes, bool]:
        head = message.header_bytes()
        parts = [head, b"\r\n"]
        size = len(head) + 2
        truncated = False
        for chunk in message.body_chunks():
            if size + len(chunk) > limit:
                parts.append(chunk[: max(0, limit - size)])
                truncated = True
                break
            parts.append(chunk)
            size += len(chunk)
        return b"".join(parts), truncated

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> Verdict | None:
        cfg: ScoringConfig = ctx.config
        info = ctx.message
        assert info is not None
        if ctx.connection.trusted and not cfg.scan_trusted:
            ctx.add_symbol(DECISION_SYMBOL, 0.0, "not scored: trusted sender",
                           ("action=skip",))  # fmt: skip
            return None
        started = time.monotonic()
        client = ctx.connection.client.address if ctx.connection.client else None
        recipients = [r.address for r in info.recipients]
        eff = self.effective(cfg, recipients)
        out: dict[str, tuple[float, str, tuple[str, ...]]] = {}

        # DNS first: the lookups run while the rules do.
        lookups: Lookups | None = None
        dns_deadline = started + min(cfg.dnsbl_timeout, max(0.0, ctx.time_left() - 0.2))
        if self.pool is not None:
            lookups = Lookups(self.pool, ctx.resolver, timeout=max(0.05, dns_deadline - started))
            if client is not None:
                mapped = isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped
                for lst in self.lists:
                    if (lst.enabled and lst.cfg.type == "ip"
                            and (client.version == 4 or mapped or lst.cfg.ipv6)):  # fmt: skip
                        lookups.submit(lst, client)

        # Results recorded by earlier plugins.
        for r in ctx.results:
            method = r.method.lower()
            if method == "spf" and r.prop("smtp.helo") and not r.prop("smtp.mailfrom"):
                method = "spf-helo"  # the HELO check: scored only when configured
            hit = self.result_map.get((method, r.result.lower()))
            if hit is not None and hit[0] not in out:
                detail = r.prop("header.d") or r.prop("smtp.mailfrom") or r.prop("header.from")
                out[hit[0]] = (hit[1], f"{r.method}={r.result}", (detail,) if detail else ())

        raw, truncated = self._read(message, cfg.scan_bytes)
        scans = self._start_scanners(ctx, cfg, message, raw, truncated, client)
        scan = Scan(min(cfg.scan_time, max(0.05, ctx.time_left() - 0.3)))
        if truncated:
            scan.reason = f"message larger than scan_bytes ({cfg.scan_bytes})"
        content: Content = extract(raw, cfg.scan_bytes)
        if cfg.gtube and _GTUBE_B in raw:
            out["GTUBE"] = (cfg.gtube, "GTUBE test message", ())

        # URL domain lists.
        if lookups is not None and self.psl is not None and content.hosts:
            for lst in self.lists:
                if not (lst.enabled and lst.cfg.type == "uri"):
                    continue
                domains: dict[str, None] = {}
                for h in content.hosts:
                    if ":" in h or h.replace(".", "").isdigit():
                        continue
                    d = self.psl.privatesuffix(h) or h
                    domains.setdefault(d, None)
                for d in list(domains)[: cfg.max_uri_lookups]:
                    lookups.submit(lst, d)

        data = MessageData(
            headers=MessageData.header_list((h.name, h.value) for h in message.headers),
            text=content.text,
            raw=raw.decode("utf-8", "surrogateescape"),
            hosts=content.hosts,
            attachments=content.attachments,
            content_types=content.content_types,
            sender=info.sender,
            recipients=recipients,
            helo=ctx.connection.helo,
            client=client,
            size=len(message.header_bytes()) + 2 + message.body_size,
        )
        for rule in self.rules:
            if rule.name in eff.disabled or not (rule.enabled or rule.name in eff.enabled):
                continue
            if scan.incomplete and rule.regex_only:
                continue  # out of time: only the cheap checks (attachments, client...) run
            opts = rule.match(data, scan)
            if opts is not None:
                out[rule.name] = (rule.score, rule.description, opts)

        # Bayes.
        tokens: list[str] = []
        if self.classifier is not None:
            b = cfg.bayes
            tokens = bayes_mod.tokenize(data.headers, content, b.max_tokens)
            if _GTUBE_B not in raw:  # test mail is never auto-learned, whatever it scores
                ctx.message_state["bayes"] = (tokens, message.get("Message-ID"))
            try:
                prob = self.classifier.probability(tokens)
            except Exception as e:
                ctx.log.warning("bayes unavailable: %s", e)
                prob = None
            if prob is not None:
                p = f"{prob:.3f}"
                if prob >= b.spam_threshold:
                    out["BAYES_SPAM"] = (b.spam_score, "Bayes: spam", (p,))
                elif prob <= b.ham_threshold:
                    out["BAYES_HAM"] = (b.ham_score, "Bayes: ham", (p,))

        if lookups is not None:
            hits: list[Hit] = lookups.collect(dns_deadline, ctx.log)
            for dh in hits:
                if dh.symbol in out:
                    old = out[dh.symbol]
                    out[dh.symbol] = (old[0], old[1], (*old[2], dh.option)[:5])
                else:
                    out[dh.symbol] = (dh.score, dh.description, (dh.option,))
            if lookups.errors:
                ctx.log.info("dnsbl lookups failed: %s", ", ".join(lookups.errors[:5]))

        for name, sc in scans:
            self._collect_scanner(ctx, cfg, name, sc, started, out)

        if content.too_deep and not scan.reason:
            scan.reason = "MIME nested deeper than the parser follows"
        if content.too_deep and cfg.mime.enabled and "MIME_TOO_COMPLEX" not in eff.disabled:
            # Real mail never nests 64 deep or has hundreds of parts; a MIME bomb does.
            desc = "MIME structure too deep or too large to parse"
            out["MIME_TOO_COMPLEX"] = (cfg.mime.too_complex, desc, ())
        if truncated or scan.incomplete or content.too_deep:
            out["SCAN_INCOMPLETE"] = (cfg.scan_incomplete, "scan budget exhausted",
                                      (scan.reason or "incomplete",))  # fmt: skip

        # Meta rules see every symbol on the ledger and ours so far.
        present = {s.name for s in ctx.symbols} | set(out)
        for meta in self.metas:
            if meta.name in eff.disabled or not (meta.enabled or meta.name in eff.enabled):
                continue
            if meta.test(present):
                out[meta.name] = (meta.score, meta.description, ())
                present.add(meta.name)

        for name, (score, desc, opts) in out.items():
            ctx.add_symbol(name, score, desc, opts)
        total = ctx.score
        action = self.action_for(eff, total)
        # "required" is where mail starts counting as spam: the lowest threshold of an
        # action that marks it (add_header may be off while rewrite_subject is on).
        spam_thresholds = [t for a in SPAM_ACTIONS if (t := eff.thresholds.get(a)) is not None]
        required = min(spam_thresholds) if spam_thresholds else None
        if action == "greylist" and self._greylist_passes(ctx, cfg, client, recipients):
            action = "no_action"  # a retry after the delay, or a known triplet
        ctx.message_state["bayes_score"] = sum(
            s for n, (s, _, _) in out.items() if n.startswith("BAYES_")
        )
        opts = (f"action={action}", f"required={required if required is not None else ''}")
        ctx.add_symbol(DECISION_SYMBOL, 0.0, f"action {action}", opts)
        symbols = " ".join(
            f"{s.name}({s.score:g})" for s in ctx.symbols if s.name != DECISION_SYMBOL
        )
        ctx.note(  # on the message's summary line
            f"score={total:.2f} action={action} symbols=[{symbols}] "
            f"scan={(time.monotonic() - started) * 1000:.1f}ms"
        )
        return self._act(ctx, cfg, message, action, total, eff)

    def _start_scanners(
        self,
        ctx: Context,
        cfg: ScoringConfig,
        message: Message,
        raw: bytes,
        truncated: bool,
        client: Any,
    ) -> list[tuple[str, cf.Future[scanners.Scanned]]]:
        """Submit the external scanners' calls; they run while the rules do."""
        if self.pool is None or not (cfg.spamd.enabled or cfg.rspamd.enabled):
            return []
        info = ctx.message
        assert info is not None
        size = len(message.header_bytes()) + 2 + message.body_size
        full = raw
        if truncated and size <= max(cfg.spamd.max_size, cfg.rspamd.max_size):
            full = message.header_bytes() + b"\r\n" + message.body()
        jobs: list[tuple[str, cf.Future[scanners.Scanned]]] = []
        left = max(0.05, ctx.time_left() - 0.3)
        if cfg.spamd.enabled and size <= cfg.spamd.max_size:
            sd = cfg.spamd
            data = full
            if sd.add_received:
                data = _received(ctx, client) + full
            jobs.append(("spamd", self.pool.submit(
                scanners.spamd_check, sd.host, sd.port, data, min(sd.timeout, left), sd.user
            )))  # fmt: skip
        if cfg.rspamd.enabled and size <= cfg.rspamd.max_size:
            rd = cfg.rspamd
            conn = ctx.connection
            hdrs = [
                ("IP", str(client) if client is not None else ""),
                ("Helo", conn.helo),
                ("Hostname", conn.client.hostname if conn.client else ""),
                ("From", info.sender),
                ("Queue-Id", info.queue_id),
                ("User", conn.auth_user),
                ("Password", rd.password or ""),
                *(("Rcpt", r.address) for r in info.recipients),
            ]
            jobs.append(("rspamd", self.pool.submit(
                scanners.rspamd_check, rd.url, full, min(rd.timeout, left), hdrs
            )))  # fmt: skip
        return jobs

    def _collect_scanner(
        self,
        ctx: Context,
        cfg: ScoringConfig,
        name: str,
        fut: cf.Future[scanners.Scanned],
        started: float,
        out: dict[str, tuple[float, str, tuple[str, ...]]],
    ) -> None:
        sc = cfg.spamd if name == "spamd" else cfg.rspamd
        prefix = sc.prefix
        try:
            res = fut.result(timeout=max(0.0, min(sc.timeout, ctx.time_left() - 0.2)))
        except Exception as e:  # down, slow, nonsense: never a failure of the message
            fut.cancel()
            ctx.log.warning("%s unavailable: %s", name, e or type(e).__name__)
            out[f"{name.upper()}_UNAVAILABLE"] = (0.0, f"{name} did not answer", ())
            return
        if sc.mode == "total":
            rules = tuple(r[0] for r in res.rules)[:10]
            out[sc.symbol] = (round(res.score * sc.weight, 3), f"{name} score", rules)
            return
        keep_zero = getattr(sc, "keep_zero", True)
        for rule, score, desc, opts in res.rules:
            if score == 0 and not keep_zero:
                continue
            out[prefix + rule] = (round(score * sc.weight, 3), desc[:200], opts)

    def _greylist_passes(
        self, ctx: Context, cfg: ScoringConfig, client: Any, recipients: list[str]
    ) -> bool:
        """True when every recipient's triplet has passed greylisting."""
        if self.grey is None:
            return True
        g = cfg.greylist
        net = grey_mod.network_of(client, g.ipv4_prefix, g.ipv6_prefix)
        sender = ctx.message.sender if ctx.message else ""
        ok = True
        now = time.time()
        new: list[str] = []
        for rcpt in recipients:
            key = grey_mod.triplet_key(sender, rcpt, net)
            try:
                if ctx.dry_run:  # decide from the row as it is; record nothing
                    passed, known = self.grey.peek(key, now)
                    if not known:
                        new.append(rcpt)
                else:
                    passed = self.grey.check(key, now)
            except Exception as e:  # store down: do not hold mail back
                ctx.log.warning("greylist store unavailable: %s", e)
                return True
            ok = ok and passed
        if ctx.dry_run:
            ctx.log.info(
                "dry run: greylist would %s (%s), not recorded",
                "pass" if ok else "tempfail",
                f"new triplet for {', '.join(new)}" if new else "known triplet",
            )
        return ok

    def _act(
        self,
        ctx: Context,
        cfg: ScoringConfig,
        message: Message,
        action: str,
        total: float,
        eff: Effective,
    ) -> Verdict | None:
        reason = f"score {total:g}, action {action}"
        if action == "reject":
            return Reject(cfg.reject_code, cfg.reject_xcode, cfg.reject_text, reason=reason)
        if action == "greylist":
            return TempFail("451", "4.7.1", cfg.greylist.text, reason=reason)
        if action in ("quarantine", "rewrite_subject", "add_header") and cfg.spam_header:
            ctx.add_change(AddHeader(cfg.spam_header, "Yes"))
        if action == "rewrite_subject":
            subject = message.get("Subject")
            new = cfg.subject_template.format(
                subject=(subject or "").strip(), score=f"{total:.1f}"
            ).strip()
            if subject is not None and _tagged(subject, cfg.subject_template):
                pass  # already tagged (a resent message): no "***SPAM*** ***SPAM*** x"
            elif subject is None:
                ctx.add_change(AddHeader("Subject", new))
            else:
                ctx.add_change(ChangeHeader("Subject", new, 1))
        if action == "quarantine":
            return Quarantine(reason=reason)
        return None

    @hookimpl
    def outcome(self, ctx: Context, verdict: Verdict | None) -> None:
        cfg: ScoringConfig = ctx.config
        if self.classifier is None or not cfg.bayes.autolearn:
            return
        stash = ctx.message_state.get("bayes")
        if not stash:
            return
        tokens, message_id = stash
        score = ctx.score - float(ctx.message_state.get("bayes_score", 0.0))
        b = cfg.bayes
        spam = True if score >= b.autolearn_spam else False if score <= b.autolearn_ham else None
        if spam is None:
            return
        if ctx.dry_run:
            ctx.log.info("dry run: bayes would auto-learn as %s (score %.2f)",
                         "spam" if spam else "ham", score)  # fmt: skip
            return
        digest = bayes_mod.digest_of(message_id, tokens)
        if self.classifier.learn(tokens, spam, digest):  # on the summary line
            ctx.note(f"bayes: auto-learned as {'spam' if spam else 'ham'} (score {score:.2f})")
