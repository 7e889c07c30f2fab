"""Rules from the config, compiled once per configuration generation, and the scan budget.

Regular expressions use the ``regex`` module, whose matching takes a timeout: a rule that
backtracks catastrophically runs out the message's scan time and marks the scan
incomplete instead of holding the connection.
"""

from __future__ import annotations

import email.errors
import email.header
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import regex  # type: ignore[import-untyped]

from .config import RuleConfig
from .content import MAX_DECODE, Attachment

__all__ = [
    "GTUBE",
    "CompiledRule",
    "MessageData",
    "MetaRule",
    "Scan",
    "compile_meta",
    "compile_rule",
    "order_meta",
]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"

Pattern = Any  # regex.Pattern[str]


class Scan:
    """The scan budget of one message: time for all matching together."""

    __slots__ = ("deadline", "incomplete", "reason")

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds
        self.incomplete = False
        self.reason = ""

    def stop(self, reason: str) -> None:
        if not self.incomplete:
            self.incomplete = True
            self.reason = reason

    def search(self, pattern: Pattern, text: str) -> Any:
        """``pattern.search(text)`` within the remaining time; None when out of budget."""
        if self.incomplete:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            self.stop("scan time exhausted")
            return None
        try:
            return pattern.search(text, timeout=left)
        except TimeoutError:
            self.stop("scan time exhausted")
            return None


def _fold_table() -> dict[int, int]:
    """A one-to-one case fold: every pair of characters that ``regex`` (V0, simple case
    folding) matches case-insensitively maps to the same character, so a folded text keeps
    its length and a folded literal can be searched in it."""
    table: dict[int, int] = {}
    for i in range(0x20000):
        if 0xD800 <= i <= 0xDFFF:
            continue
        c = chr(i)
        f = c.casefold()
        if f != c:
            table[i] = ord(f[0])
    table[0x131] = ord("i")  # dotless i: regex matches it with I
    return table


_FOLD: dict[int, int] | None = None
_FOLD_LOCK = threading.Lock()


def fold(text: str) -> str:
    """The case fold the literal prefilter compares in (see :func:`_fold_table`)."""
    global _FOLD
    if text.isascii():
        return text.lower()
    table = _FOLD
    if table is None:  # built whole on first non-ASCII text (about 0.2 s), not at import
        with _FOLD_LOCK:
            if _FOLD is None:
                _FOLD = _fold_table()
            table = _FOLD
    return text.translate(table)


#: A ``{`` that is not a repeat count the stdlib reads as a literal; ``regex`` may read it
#: as a fuzzy constraint (``(?:viagra){e<=1}``). Escaped characters are skipped.
_BRACE = re.compile(r"\\N\{[^}]*\}|\\.|\{(?!\d*(?:,\d*)?\})", re.S)


def required_literal(pattern: str, ignorecase: bool) -> tuple[str, bool] | None:
    """The longest literal every match of ``pattern`` must contain, and whether to compare it
    case-folded; None when there is none worth checking.

    Only literal runs at the top level of the pattern count (not inside a group, a branch
    or a repetition), so the literal is required: a text without it cannot match, and the
    rule is skipped with a substring test instead of a regex search.

    The pattern is read with the stdlib's parser, but rules run with ``regex``, whose
    syntax is larger. Where the two could read a pattern differently there is no
    prefilter (None): syntax the stdlib rejects (``\\p{L}``, ``(?V1)``, ``(?|...)``,
    ``\\K``...), syntax it warns about (POSIX classes ``[[:alpha:]]``, which it reads as a
    set followed by ``]``), and a ``{`` that is not a repeat count (a fuzzy match
    ``{e<=1}``, which it reads as literal text).
    """
    import importlib
    import warnings

    sre_parse: Any = importlib.import_module("re._parser")  # the stdlib's parser (3.11+)

    if any(m.group() == "{" for m in _BRACE.finditer(pattern)):
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "possible nested set" and the like: no literal
            parsed: Any = sre_parse.parse(pattern)
    except Exception:
        return None
    if parsed.state.flags & re.IGNORECASE:
        ignorecase = True
    runs: list[str] = []
    cur: list[str] = []
    for op, arg in parsed:
        if op is sre_parse.LITERAL:
            cur.append(chr(arg))
            continue
        if cur:
            runs.append("".join(cur))
            cur = []
    if cur:
        runs.append("".join(cur))
    best = max(runs, key=len, default="")
    if len(best) < 3:
        return None
    return (fold(best) if ignorecase else best), ignorecase


def _decode_header(value: str) -> str:
    """``value`` with RFC 2047 encoded words decoded, in its first MAX_DECODE characters
    (the decoder is quadratic in them); the rest of a longer field as it stands."""
    if "=?" not in value:
        return value
    head, rest = value[:MAX_DECODE], value[MAX_DECODE:]
    try:
        return str(email.header.make_header(email.header.decode_header(head))) + rest
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return value


@dataclass(slots=True)
class MessageData:
    """Everything rules match against, built once per message."""

    headers: list[tuple[str, str]]  # (name, value RFC 2047-decoded, unfolded)
    text: str
    raw: str
    hosts: list[str]
    attachments: list[Attachment]
    content_types: list[str]
    sender: str
    recipients: list[str]
    helo: str
    client: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    size: int
    _by_name: dict[str, list[str]] = field(default_factory=dict)
    _all: list[str] | None = None
    _folded: dict[str, str] = field(default_factory=dict)

    def folded(self, text: str) -> str:
        """:func:`fold` of ``text``, computed once per message and text."""
        f = self._folded.get(text)
        if f is None:
            f = self._folded[text] = fold(text)
        return f

    @staticmethod
    def header_list(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        return [
            (n, _decode_header(v.replace("\r\n", "").replace("\n", "")).strip()) for n, v in headers
        ]

    def values(self, name: str) -> list[str]:
        key = name.lower()
        if not self._by_name:
            for n, v in self.headers:
                self._by_name.setdefault(n.lower(), []).append(v)
        return self._by_name.get(key, [])

    def all_lines(self) -> list[str]:
        if self._all is None:
            self._all = [f"{n}: {v}" for n, v in self.headers]
        return self._all


#: A matcher returns the options of a hit (possibly empty) or None when the rule misses.
Matcher = Callable[[MessageData, Scan], "tuple[str, ...] | None"]


@dataclass(frozen=True, slots=True)
class CompiledRule:
    name: str
    score: float
    description: str
    match: Matcher
    enabled: bool = True
    #: Runs only a regex (no domain list, network, size or attachment check): the rules
    #: skipped once the scan time is out. The others are cheap and always run.
    regex_only: bool = False


def _show(text: str) -> str:
    text = text.replace("\r", " ").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


Literal = tuple[str, bool] | None


def _search_any(
    pattern: Pattern, texts: Iterable[str], scan: Scan, d: MessageData, lit: Literal
) -> tuple[str, ...] | None:
    for t in texts:
        if lit is not None and lit[0] not in (d.folded(t) if lit[1] else t):
            continue  # the required literal is absent: no match possible
        m = scan.search(pattern, t)
        if m is not None:
            return (_show(m.group(0)),)
    return None


def _ext(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def compile_rule(cfg: RuleConfig) -> CompiledRule:
    """Compile one non-meta rule; raises ValueError naming the rule on a bad pattern."""
    pat: Pattern = None
    lit: Literal = None
    if cfg.pattern is not None:
        flags = regex.V0 | (0 if cfg.case_sensitive else regex.IGNORECASE)
        if cfg.type in ("body", "raw"):
            flags |= regex.MULTILINE
        try:
            pat = regex.compile(cfg.pattern, flags)
        except regex.error as e:
            raise ValueError(f"rule {cfg.name}: bad pattern {cfg.pattern!r}: {e}") from e
        if not pat.flags & regex.FULLCASE:  # full case folding may change lengths
            lit = required_literal(cfg.pattern, not cfg.case_sensitive)
    t = cfg.type
    m: Matcher
    if t == "header":
        hname = cfg.header
        if hname is None or hname.upper() == "ALL":

            def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
                return _search_any(pat, d.all_lines(), s, d, lit)

        else:
            hn = hname

            def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
                return _search_any(pat, d.values(hn), s, d, lit)

    elif t == "body":

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, (d.text,), s, d, lit)

    elif t == "raw":

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, (d.raw,), s, d, lit)

    elif t == "uri":
        domains = tuple(cfg.domains)
        dotted = tuple("." + x for x in domains)

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            for h in d.hosts:
                if (domains and (h in domains or h.endswith(dotted))) or (
                    pat is not None and s.search(pat, h) is not None
                ):
                    return (h,)
            return None

    elif t in ("sender", "helo"):
        field_name = t

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, (getattr(d, field_name),), s, d, lit)

    elif t == "recipient":

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, d.recipients, s, d, lit)

    elif t == "client":
        nets = [ipaddress.ip_network(n, strict=False) for n in cfg.networks]

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            a = d.client
            if a is None:
                return None
            if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
                a = a.ipv4_mapped
            for n in nets:
                if a.version == n.version and a in n:
                    return (str(n),)
            return None

    elif t == "attachment":

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, (a.filename for a in d.attachments if a.filename), s, d, lit)

    elif t == "content_type":

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            return _search_any(pat, d.content_types, s, d, lit)

    elif t == "size":
        lo = cfg.min_size if cfg.min_size is not None else 0
        hi = cfg.max_size

        def m(d: MessageData, s: Scan) -> tuple[str, ...] | None:
            if d.size >= lo and (hi is None or d.size <= hi):
                return (str(d.size),)
            return None

    else:  # pragma: no cover - meta goes through compile_meta
        raise ValueError(f"rule {cfg.name}: type {t} is not compiled here")
    regex_only = cfg.pattern is not None and not (t == "uri" and cfg.domains)
    return CompiledRule(cfg.name, cfg.score, cfg.description, m, cfg.enabled, regex_only)


def mime_rules(
    executable: float,
    double_extension: float,
    archive: float,
    exe_ext: Iterable[str],
    arc_ext: Iterable[str],
) -> list[CompiledRule]:
    """The built-in attachment checks as rules."""
    exe = frozenset(e.lower().lstrip(".") for e in exe_ext)
    arc = frozenset(e.lower().lstrip(".") for e in arc_ext)
    exe_types = ("application/x-msdownload", "application/x-dosexec", "application/x-msdos-program")

    def is_exe(d: MessageData, s: Scan) -> tuple[str, ...] | None:
        hits = [
            a.filename or a.content_type
            for a in d.attachments
            if _ext(a.filename) in exe or a.content_type in exe_types
        ]
        return tuple(hits[:5]) if hits else None

    def double(d: MessageData, s: Scan) -> tuple[str, ...] | None:
        hits = []
        for a in d.attachments:
            parts = a.filename.lower().split(".")
            if len(parts) >= 3 and parts[-1] in exe and 1 <= len(parts[-2]) <= 5:
                hits.append(a.filename)
        return tuple(hits[:5]) if hits else None

    def is_arc(d: MessageData, s: Scan) -> tuple[str, ...] | None:
        hits = [a.filename for a in d.attachments if _ext(a.filename) in arc]
        return tuple(hits[:5]) if hits else None

    return [
        CompiledRule("MIME_EXE_ATTACHMENT", executable, "executable attachment", is_exe),
        CompiledRule("MIME_DOUBLE_EXTENSION", double_extension, "double file extension", double),
        CompiledRule("MIME_ARCHIVE_ATTACHMENT", archive, "archive attachment", is_arc),
    ]


# --- meta rules -------------------------------------------------------------------------------

_TOKEN = re.compile(r"\s*(&&|\|\||!|\(|\)|[A-Za-z_][A-Za-z0-9_]*)")
Pred = Callable[[frozenset[str] | set[str]], bool]


@dataclass(frozen=True, slots=True)
class MetaRule:
    name: str
    score: float
    description: str
    test: Pred
    refs: frozenset[str]
    enabled: bool = True


def _either(a: Pred, b: Pred) -> Pred:
    return lambda s: a(s) or b(s)


def _both(a: Pred, b: Pred) -> Pred:
    return lambda s: a(s) and b(s)


def _tokens(expr: str) -> list[str]:
    out: list[str] = []
    pos = 0
    expr = expr.rstrip()
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot parse {expr[pos:]!r}")
        tok = m.group(1)
        low = tok.lower()
        out.append({"and": "&&", "or": "||", "not": "!"}.get(low, tok))
        pos = m.end()
    return out


def compile_meta(name: str, expression: str) -> tuple[Pred, frozenset[str]]:
    """Parse ``A && (B || !C)`` (or ``and``/``or``/``not``) into a predicate over names."""
    toks = _tokens(expression)
    refs: set[str] = set()
    i = 0

    def peek() -> str | None:
        return toks[i] if i < len(toks) else None

    def take() -> str:
        nonlocal i
        if i >= len(toks):
            raise ValueError(f"meta rule {name}: unexpected end of {expression!r}")
        i += 1
        return toks[i - 1]

    def p_or() -> Pred:
        left = p_and()
        while peek() == "||":
            take()
            right = p_and()
            left = _either(left, right)
        return left

    def p_and() -> Pred:
        left = p_not()
        while peek() == "&&":
            take()
            right = p_not()
            left = _both(left, right)
        return left

    def p_not() -> Pred:
        if peek() == "!":
            take()
            inner = p_not()
            return lambda s: not inner(s)
        return p_atom()

    def p_atom() -> Pred:
        tok = take()
        if tok == "(":
            inner = p_or()
            if take() != ")":
                raise ValueError(f"meta rule {name}: missing ')' in {expression!r}")
            return inner
        if tok in ("&&", "||", ")", "!"):
            raise ValueError(f"meta rule {name}: unexpected {tok!r} in {expression!r}")
        refs.add(tok)
        return lambda s: tok in s

    pred = p_or()
    if i != len(toks):
        raise ValueError(f"meta rule {name}: unexpected {toks[i]!r} in {expression!r}")
    return pred, frozenset(refs)


def order_meta(metas: list[MetaRule]) -> list[MetaRule]:
    """Meta rules in dependency order; raises ValueError on a cycle."""
    by_name = {m.name: m for m in metas}
    done: list[MetaRule] = []
    state: dict[str, int] = {}

    def visit(m: MetaRule, path: tuple[str, ...]) -> None:
        st = state.get(m.name, 0)
        if st == 2:
            return
        if st == 1:
            raise ValueError(f"meta rules form a cycle: {' -> '.join((*path, m.name))}")
        state[m.name] = 1
        for r in sorted(m.refs):
            if r in by_name:
                visit(by_name[r], (*path, m.name))
        state[m.name] = 2
        done.append(m)

    for m in metas:
        visit(m, ())
    return done
