"""Built-in ``tagging``: the headers that tell users and mail clients what scoring decided.

Runs after ``scoring`` at end of message and reads the ledger: the total score
(``ctx.score``: every plugin's symbols) and the decision ``scoring`` recorded as the
zero-score symbol ``MILTERD_SCORING`` (options ``action=...``, ``required=...``). Without
``scoring`` the required score is this plugin's own ``required_score``.

Each routine is switchable: X-Spam-Flag, X-Spam-Score, X-Spam-Level, X-Spam-Status,
X-Spam-Report, a subject tag, and custom headers from templates with conditions. Incoming
``X-Spam*`` fields from untrusted clients are deleted first, so nobody can pre-tag their own
mail.
"""

from __future__ import annotations

import math
import re
from typing import Any, Literal

from pydantic import Field, field_validator

from milterd import (
    AddHeader,
    ChangeHeader,
    Context,
    DeleteHeader,
    Message,
    PluginConfig,
    Symbol,
    hookimpl,
)

__all__ = ["CustomHeader", "Tagging", "TaggingConfig", "decision"]

DECISION_SYMBOL = "MILTERD_SCORING"
SPAM_ACTIONS = frozenset({"add_header", "rewrite_subject", "quarantine", "reject"})
_FIELD = re.compile(r"^[!-9;-~]+$")


class CustomHeader(PluginConfig):
    """``[[plugins.tagging.headers]]``: a header from a template, under conditions."""

    name: str
    value: str  # str.format template: {score} {required} {action} {flag} {symbols} ...
    when: Literal["always", "spam", "ham"] = "always"
    min_score: float | None = None
    max_score: float | None = None
    if_symbols: list[str] = []  # every one present
    unless_symbols: list[str] = []  # none present

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _FIELD.match(v):
            raise ValueError(f"invalid header name {v!r}")
        return v


class TaggingConfig(PluginConfig):
    flag: bool = True  # X-Spam-Flag: YES on spam
    score: bool = True  # X-Spam-Score: 7.1
    level: bool = True  # X-Spam-Level: *******
    status: bool = True  # X-Spam-Status: Yes, score=7.1 required=5.0 tests=...
    report: bool = False  # X-Spam-Report: one folded line per symbol
    tag_ham: bool = True  # also stamp Score/Level/Status on mail that is not spam
    level_char: str = Field(default="*", min_length=1, max_length=1)
    subject_tag: str = ""  # e.g. "[SPAM] ", prefixed when spam (unless scoring did)
    required_score: float = 5.0  # used when scoring recorded no decision
    headers: list[CustomHeader] = []
    remove_incoming: bool = True
    remove_pattern: str = r"^X-Spam"  # incoming fields (case-insensitive) deleted
    tag_trusted: bool = False  # stamp mail from authenticated/internal clients

    @field_validator("remove_pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        re.compile(v)
        return v


def decision(symbols: list[Symbol], fallback_required: float) -> tuple[str | None, float]:
    """(action or None, required score) from the scoring plugin's decision symbol."""
    for s in reversed(symbols):
        if s.name == DECISION_SYMBOL:
            opts = dict(o.split("=", 1) for o in s.options if "=" in o)
            req = opts.get("required", "")
            try:
                required = float(req) if req else fallback_required
            except ValueError:
                required = fallback_required
            return opts.get("action"), required
    return None, fallback_required


#: Control characters (and the Unicode line and paragraph separators): text quoted from a
#: symbol's description or options (an rspamd reply, a rule's description) may carry them,
#: and a line break in a header value ends the field (the core refuses the value and the
#: message is deferred). Each run becomes one space.
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]+")
#: Where a long value may be folded: after white space or after a comma (a comma list such
#: as ``tests=A,B,C`` is one word otherwise, and past 998 octets no MTA takes it).
_FOLD_AT = re.compile(r"(?<=,)(?!\s)|\s+")


def _clean(text: str) -> str:
    return _CONTROLS.sub(" ", text)


def _fold(value: str, first: int, width: int = 76) -> str:
    """``value`` folded with CRLF+TAB before ``width`` columns, at white space or after a
    comma (as SpamAssassin folds ``tests=A,B,`` CRLF TAB ``C``); ``first`` is the column
    the value starts at. Unfolding gives back the value, except that a fold after a comma
    leaves a tab there. A single word longer than a line stays whole."""
    atoms: list[tuple[str, str]] = []  # (separator before, word)
    pos = 0
    sep = ""
    for m in _FOLD_AT.finditer(value):
        if m.start() > pos or not atoms:
            atoms.append((sep, value[pos : m.start()]))
        sep = m.group()
        pos = m.end()
    atoms.append((sep, value[pos:]))
    lines: list[str] = []
    cur = ""
    limit = width - first
    for sep, word in atoms:
        if cur and len(cur) + len(sep) + len(word) > limit:
            lines.append(cur)
            cur = word
            limit = width - 8
        else:
            cur += sep + word
    lines.append(cur)
    return "\r\n\t".join(lines)


class Tagging:
    actions = frozenset({"add_header", "change_header"})
    after = ("scoring",)
    isolation = "inline"  # no I/O at all
    prefork = True
    reads_body = False

    def __init__(self) -> None:
        self.remove: re.Pattern[str] | None = None

    @hookimpl
    def config_schema(self) -> type[TaggingConfig]:
        return TaggingConfig

    @hookimpl
    def startup(self, config: TaggingConfig, services: Any) -> None:
        self.remove = re.compile(config.remove_pattern, re.IGNORECASE)
        for h in config.headers:  # templates are checked once, not per message
            h.value.format_map(_Vars(_sample()))

    @hookimpl
    def eom(self, ctx: Context, message: Message) -> None:
        cfg: TaggingConfig = ctx.config
        trusted = ctx.connection.trusted
        if cfg.remove_incoming and not trusted and self.remove is not None:
            seen: dict[str, int] = {}
            for h in message.headers:
                key = h.name.lower()
                seen[key] = seen.get(key, 0) + 1
                if self.remove.search(h.name):
                    ctx.add_change(DeleteHeader(h.name, seen[key]))
        if trusted and not cfg.tag_trusted:
            return
        action, required = decision(ctx.symbols, cfg.required_score)
        if action == "skip":
            return
        score = ctx.score
        spam = action in SPAM_ACTIONS if action is not None else score >= required
        symbols = sorted(
            (s for s in ctx.symbols if s.name != DECISION_SYMBOL), key=lambda s: s.name
        )
        names = [s.name for s in symbols]
        values = {
            "score": f"{score:.1f}",
            "required": f"{required:.1f}",
            "action": action or ("add_header" if spam else "no_action"),
            "flag": "YES" if spam else "NO",
            "yesno": "Yes" if spam else "No",
            "symbols": ",".join(names) or "none",
            "level": cfg.level_char * _stars(score),
            "queue_id": ctx.message.queue_id if ctx.message else "",
        }
        if spam or cfg.tag_ham:
            if cfg.flag:
                ctx.add_change(AddHeader("X-Spam-Flag", values["flag"]))
            if cfg.score:
                ctx.add_change(AddHeader("X-Spam-Score", values["score"]))
            if cfg.level and values["level"]:
                ctx.add_change(AddHeader("X-Spam-Level", values["level"]))
            if cfg.status:
                head = f"{values['yesno']}, score={values['score']} required={values['required']}"
                tests = "tests=" + (",".join(names) or "none")
                ctx.add_change(AddHeader("X-Spam-Status", _fold(f"{head} {tests}", 15)))
            if cfg.report and symbols:
                lines = [
                    _fold(
                        _clean(f"* {s.score:5.1f} {s.name} {s.description}").rstrip()
                        + (f" [{_clean(', '.join(s.options))}]" if s.options else ""),
                        8,
                    )
                    for s in symbols
                ]
                ctx.add_change(AddHeader("X-Spam-Report", "\r\n\t".join(lines)))
        if spam and cfg.subject_tag and action != "rewrite_subject":
            subject = message.get("Subject")
            if subject is None:
                ctx.add_change(AddHeader("Subject", cfg.subject_tag.strip()))
            elif not subject.strip().startswith(cfg.subject_tag.strip()):
                ctx.add_change(ChangeHeader("Subject", cfg.subject_tag + subject.strip(), 1))
        present = set(names)
        for ch in cfg.headers:
            if (ch.when == "spam" and not spam) or (ch.when == "ham" and spam):
                continue
            if ch.min_score is not None and score < ch.min_score:
                continue
            if ch.max_score is not None and score > ch.max_score:
                continue
            if not all(n in present for n in ch.if_symbols):
                continue
            if any(n in present for n in ch.unless_symbols):
                continue
            value = _clean(ch.value.format_map(_Vars(values)))
            ctx.add_change(AddHeader(ch.name, _fold(value, len(ch.name) + 2)))


class _Vars(dict[str, str]):
    def __missing__(self, key: str) -> str:
        raise ValueError(f"unknown template variable {{{key}}}")


def _sample() -> dict[str, str]:
    keys = ("score", "required", "action", "flag", "yesno", "symbols", "level", "queue_id")
    return dict.fromkeys(keys, "x")


def _stars(score: float) -> int:
    """How many level characters: the score's whole part, 0 to 50. Clamped before int():
    a plugin may add an infinite score, and int() of that raises."""
    return 0 if math.isnan(score) else int(max(0.0, min(50.0, score)))
