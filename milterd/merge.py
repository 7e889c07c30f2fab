"""Merge a message's ledger into one verdict and one ordered list of MTA operations.

All conflict rules and all header index arithmetic live here, in pure functions:

* Verdict: the highest severity wins (discard > reject > tempfail > quarantine > accept >
  continue); on a tie the plugin earliest in the pipeline wins. Every plugin's verdict
  and reason is kept in :attr:`Decision.reasons`.
* Nothing is applied when the verdict is reject, tempfail or discard.
* Header edits refer to the message *as received* (occurrence N of a name, position N).
  Operations come out in an order that is safe under MTA semantics: changes and deletions
  first, per name from the highest occurrence down (so earlier deletions cannot shift
  later ones), then insertions with positions translated for deleted fields and earlier
  insertions, then appended fields.
* Authentication headers (:data:`TOP_HEADERS`) always go on top, even when added with
  AddHeader: later contributions stand above earlier ones, so a signature added at
  ``finalize`` sits above the Authentication-Results it covers.
* A deletion beats a change of the same field; between two changes, or two body
  replacements, or two sender changes, the later plugin wins. Each conflict is reported.

:func:`render` applies operations to a header list with the MTA's own semantics; the
harness and ``milterd check --output`` use it, and so does the ``finalize`` stage.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from milterd.actions import (
    AddHeader,
    AddRecipient,
    Change,
    ChangeHeader,
    ChangeSender,
    DeleteHeader,
    DeleteRecipient,
    InsertHeader,
    Quarantine,
    ReplaceBody,
    Severity,
    Verdict,
)
from milterd.context import Entry
from milterd.events import Header

__all__ = ["TOP_HEADERS", "Decision", "Op", "merge", "render"]

#: Header fields that always go on top of the message (RFC 8601 section 5, RFC 6376, RFC 8617).
TOP_HEADERS = frozenset(
    {
        "authentication-results",
        "arc-authentication-results",
        "arc-message-signature",
        "arc-seal",
        "dkim-signature",
        "received-spf",
    }
)


@dataclass(frozen=True, slots=True)
class Op:
    """One MTA operation, exactly as libmilter takes it.

    ``kind`` is one of ``chgheader`` (name, index = current 1-based occurrence,
    value None deletes), ``insheader`` (index = current 0-based position, name, value),
    ``addheader`` (name, value), ``addrcpt`` (address, params), ``delrcpt`` (address),
    ``chgfrom`` (address, params), ``replbody`` (body), ``quarantine`` (value = reason).
    """

    kind: str
    name: str = ""
    value: str | None = None
    index: int = 0
    address: str = ""
    params: tuple[str, ...] = ()
    body: bytes | None = None
    plugin: str = ""


@dataclass(slots=True)
class Decision:
    """The outcome of one message: what the bridge tells the MTA, and why."""

    verdict: Verdict | None  # None = continue (deliver)
    plugin: str = ""  # who decided the verdict
    reasons: list[tuple[str, Verdict]] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)

    @property
    def word(self) -> str:
        """``continue``, ``accept``, ``quarantine``, ``tempfail``, ``reject`` or ``discard``."""
        return self.verdict.word if self.verdict is not None else "continue"

    @property
    def delivers(self) -> bool:
        return self.verdict is None or self.verdict.severity <= Severity.QUARANTINE


def _verdict(entries: list[Entry]) -> tuple[Verdict | None, str, list[tuple[str, Verdict]]]:
    best: Verdict | None = None
    who = ""
    reasons: list[tuple[str, Verdict]] = []
    for e in entries:
        if isinstance(e.value, Verdict):
            reasons.append((e.plugin, e.value))
            if best is None or e.value.severity > best.severity:
                best, who = e.value, e.plugin
    return best, who, reasons


def merge(entries: list[Entry], headers: list[Header] | None = None) -> Decision:
    """Merge ledger entries (verdicts and changes, in pipeline order) into a Decision.

    ``headers`` are the header fields as received, when the core has them; edits naming a
    field that does not exist are then dropped and reported as conflicts.
    """
    verdict, who, reasons = _verdict(entries)
    decision = Decision(verdict, who, reasons)
    if not decision.delivers:
        return decision
    changes = [(e.plugin, e.value) for e in entries if isinstance(e.value, Change)]
    decision.ops.extend(_header_ops(changes, headers, decision.conflicts))
    decision.ops.extend(_envelope_ops(changes, decision.conflicts))
    if verdict is not None and isinstance(verdict, Quarantine):
        text = "; ".join(
            f"{p}: {v.reason}" if v.reason else p for p, v in reasons if isinstance(v, Quarantine)
        )
        decision.ops.append(Op("quarantine", value=text or "quarantined", plugin=who))
    return decision


def _header_ops(
    changes: list[tuple[str, Change]], headers: list[Header] | None, conflicts: list[str]
) -> list[Op]:
    if not changes:
        return []
    counts: dict[str, int] | None = None
    if headers is not None and any(
        isinstance(ch, ChangeHeader | DeleteHeader) for _, ch in changes
    ):
        counts = defaultdict(int)
        for h in headers:
            counts[h.name.lower()] += 1

    edits: dict[tuple[str, int], tuple[str, str, str | None]] = {}  # -> (plugin, name, value)
    inserts: list[tuple[str, str, str, int]] = []  # plugin, name, value, original index
    appends: list[tuple[str, str, str]] = []
    for plugin, ch in changes:
        if isinstance(ch, ChangeHeader | DeleteHeader):
            key = (ch.name.lower(), ch.occurrence)
            if counts is not None and ch.occurrence > counts.get(key[0], 0):
                conflicts.append(f"{plugin}: no field {ch.name} #{ch.occurrence} to edit")
                continue
            new = ch.value if isinstance(ch, ChangeHeader) else None
            if key in edits:
                prev_plugin, _, prev = edits[key]
                if prev is None and new is not None:
                    conflicts.append(
                        f"{plugin}: change of {ch.name} #{ch.occurrence} lost to "
                        f"{prev_plugin}'s deletion"
                    )
                    continue
                conflicts.append(f"{plugin} overrides {prev_plugin} on {ch.name} #{ch.occurrence}")
            edits[key] = (plugin, ch.name, new)
        elif isinstance(ch, InsertHeader):
            inserts.append((plugin, ch.name, ch.value, ch.index))
        elif isinstance(ch, AddHeader):
            if ch.name.lower() in TOP_HEADERS:
                inserts.append((plugin, ch.name, ch.value, 0))
            else:
                appends.append((plugin, ch.name, ch.value))

    ops: list[Op] = []
    # Highest occurrence first: deleting #1 before #2 would make the old #2 the new #1.
    for (_, occ), (plugin, name, value) in sorted(
        edits.items(), key=lambda kv: (kv[0][0], -kv[0][1])
    ):
        ops.append(Op("chgheader", name=name, index=occ, value=value, plugin=plugin))

    deleted_positions: list[int] = []
    if headers is not None and any(v is None for _, _, v in edits.values()):
        seen: dict[str, int] = defaultdict(int)
        for pos, h in enumerate(headers):
            lname = h.name.lower()
            seen[lname] += 1
            hit = edits.get((lname, seen[lname]))
            if hit is not None and hit[2] is None:
                deleted_positions.append(pos)
    placed: list[int] = []
    for plugin, name, value, wanted in inserts:
        index = min(wanted, len(headers)) if headers is not None else wanted
        shift = sum(1 for p in deleted_positions if p < index)
        before = sum(1 for q in placed if q < index)
        ops.append(
            Op("insheader", name=name, value=value, index=index - shift + before, plugin=plugin)
        )
        placed.append(index)
    ops.extend(Op("addheader", name=n, value=v, plugin=p) for p, n, v in appends)
    return ops


def _envelope_ops(changes: list[tuple[str, Change]], conflicts: list[str]) -> list[Op]:
    ops: list[Op] = []
    deleted: set[str] = set()
    added: set[str] = set()
    sender: tuple[str, ChangeSender] | None = None
    body: tuple[str, ReplaceBody] | None = None
    for plugin, ch in changes:
        if isinstance(ch, DeleteRecipient):
            if ch.address.lower() not in deleted:
                deleted.add(ch.address.lower())
                ops.append(Op("delrcpt", address=ch.address, plugin=plugin))
        elif isinstance(ch, ChangeSender):
            if sender is not None and sender[1] != ch:
                conflicts.append(f"{plugin} overrides {sender[0]}'s sender change")
            sender = (plugin, ch)
        elif isinstance(ch, ReplaceBody):
            if body is not None:
                conflicts.append(f"{plugin} overrides {body[0]}'s body replacement")
            body = (plugin, ch)
    # Additions after deletions, so that "delete X, add X with new params" works.
    for plugin, ch in changes:
        if isinstance(ch, AddRecipient) and ch.address.lower() not in added:
            added.add(ch.address.lower())
            ops.append(Op("addrcpt", address=ch.address, params=ch.params, plugin=plugin))
    if sender is not None:
        ops.append(
            Op("chgfrom", address=sender[1].address, params=sender[1].params, plugin=sender[0])
        )
    if body is not None:
        ops.append(Op("replbody", body=body[1].body, plugin=body[0]))
    return ops


def render(headers: list[Header], ops: list[Op]) -> tuple[list[Header], bytes | None]:
    """Apply header and body operations with MTA semantics.

    Returns the new header list and the replacement body (None when the body is unchanged).
    Envelope operations are ignored here.
    """
    out = list(headers)
    body: bytes | None = None
    for op in ops:
        if op.kind == "chgheader":
            lname, n = op.name.lower(), 0
            for pos, h in enumerate(out):
                if h.name.lower() == lname:
                    n += 1
                    if n == op.index:
                        if op.value is None:
                            del out[pos]
                        else:
                            out[pos] = _header(op.name, op.value)
                        break
        elif op.kind == "insheader":
            out.insert(min(op.index, len(out)), _header(op.name, op.value or ""))
        elif op.kind == "addheader":
            out.append(_header(op.name, op.value or ""))
        elif op.kind == "replbody":
            body = op.body
    return out, body


def _header(name: str, value: str) -> Header:
    """The field as the MTA will write it: the bridge sends a value that already starts
    with white space as it is (``Name:<TAB>v``), any other with one space before it."""
    raw = value.encode("utf-8", "surrogateescape")
    return Header(name, value, raw if raw[:1] in (b" ", b"\t") else b" " + raw)
