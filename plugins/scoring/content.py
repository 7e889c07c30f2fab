"""What the rules look at: decoded text parts (HTML reduced to text), URL hosts, attachments.

Parsing is bounded: at most ``limit`` bytes of the message are parsed; a larger message is
cut there and reported as truncated (the caller adds SCAN_INCOMPLETE).
"""

from __future__ import annotations

import codecs
import contextlib
import email
import email.errors
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import html
import re
from dataclasses import dataclass, field
from typing import Any

from ..addresses import a_label, browser_a_label

__all__ = ["Attachment", "Content", "extract", "html_to_text", "url_hosts"]

# Every pattern here runs on untrusted text before the scan budget starts and holds the GIL,
# so each must be linear: no pattern may rescan the rest of the text from every start
# position. A tag is therefore ``<[^<>]*>`` (a ``<`` inside ends the candidate), and
# comments, scripts and styles are cut with ``str.find`` loops (see ``_cut``).
_OPEN_SCRIPT = re.compile(r"<(script|style)\b", re.I)
_CLOSE = {name: re.compile(rf"</{name}\s*>", re.I) for name in ("script", "style")}
_BLOCK = re.compile(r"<\s*(br|/p|p|/div|div|/tr|tr|li|/h\d|h\d|/td)\b[^<>]*>", re.I)
_TAG = re.compile(r"<[^<>]*>")
_HREF = re.compile(
    r"""\b(?:href|src|action|background|formaction)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^"'\s>]+))""",
    re.I,
)
# ``//host`` (protocol-relative) and ``http:\\host`` (browsers read backslashes as slashes).
_URL = re.compile(
    r"""(?:\b(?:https?|ftp):[/\\]{2}|\bwww\.)(\[[0-9a-f:.]+\]|[^\s<>"'()\[\]{}\\/?#]+)""",
    re.I,
)
_SCHEMELESS = re.compile(r"""^[/\\]{2}([^\s<>"'()\[\]{}\\/?#]+)""")
_CONTROL = re.compile(r"[\x00-\x20\x7f]+")  # browsers drop tabs and newlines inside a URL
#: An ASCII character that is not part of a host name or port ends the host: running text
#: ends a URL at punctuation ("see http://x.example, now", "go http://x.example!").
_HOST_END = re.compile(r"[\x00-\x2c/;-@\[-^`{-\x7f]")
_HOST_OK = re.compile(r"^[a-z0-9_.-]+\.[a-z0-9-]{2,}$|^\[?[0-9a-f:.]+\]?$")
_SPACES = re.compile(r"[ \t\r\f\v]+")


@dataclass(frozen=True, slots=True)
class Attachment:
    filename: str
    content_type: str


@dataclass(slots=True)
class Content:
    text: str = ""  # every text part, decoded, HTML reduced to text, parts joined by \n
    hosts: list[str] = field(default_factory=list)  # URL hosts in order, unique, lower-case
    attachments: list[Attachment] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)  # every part's type
    truncated: bool = False
    too_deep: bool = False  # MIME deeper than MAX_DEPTH or over MAX_PARTS: not all read


#: How deep multipart nesting is followed. Real mail nests a few levels; a message nested a
#: thousand deep made Python's email parser (and ``walk()``) raise RecursionError, which
#: failed the plugin and deferred the message.
MAX_DEPTH = 64
#: More multipart parts than this (nested or not) and the message is read as text.
MAX_PARTS = 4 * MAX_DEPTH
#: More leaf parts than this and the message is read as text too: the parser takes about
#: 15 microseconds a part (3 s for 200,000 empty ones). Also the most leaf parts whose
#: headers are read for attachments when the message is read as text.
MAX_LEAVES = 4 * MAX_PARTS
def _split_params(value: str) -> list[str]:
    """What ``email.message._parseparam`` returns for ``value`` (the items between ``;``
    outside quoted strings, names lower-cased), in one pass. The stdlib's is quadratic
    in the ``;``: it counts the quotes from an item's start again at each ``;`` and
    copies the rest of the field at each item (one 90 KB Content-Type of ``;`` in an
    open quote took 11 s, and the message was deferred at every try)."""
    out: list[str] = []
    n, p = len(value), 0
    while True:
        end = value.find(";", p)
        if end > p:  # an item that may hold a quoted ';': where does it end?
            quotes = value.count('"', p, end) - value.count('\\"', p, end)
            while quotes % 2:
                nxt = value.find(";", end + 1)
                if nxt < 0:
                    end = -1
                    break
                # no escaped quote spans a ';': counting piece by piece is the same
                quotes += value.count('"', end, nxt) - value.count('\\"', end, nxt)
                end = nxt
        if end < 0:
            end = n
        item = value[p:end]
        if "=" in item:
            i = item.index("=")
            item = item[:i].strip().lower() + "=" + item[i + 1 :].strip()
        out.append(item.strip())
        if end >= n:
            return out
        p = end + 1


class _Part(email.message.Message):
    """A message (part) whose parameters are read in linear time (:func:`_split_params`)
    and never raise: used for every part the email parser builds here, so the parser
    itself, which reads each multipart's boundary, stays linear and cannot fail on one."""

    def _get_params_preserve(self, failobj: Any, header: str) -> Any:
        value = self.get(header)
        if value is None:
            return failobj
        params = []
        for item in _split_params(str(value)):
            name, eq, val = item.partition("=")
            params.append((name.strip(), val.strip()) if eq else (item.strip(), ""))
        try:
            return email.utils.decode_params(params)
        except Exception:  # RFC 2231 continuation numbers over int()'s 4,300 digits...
            return params

    def get_boundary(self, failobj: Any = None) -> Any:
        try:
            return super().get_boundary(failobj)
        except Exception:  # an RFC 2231 boundary in a charset that cannot decode it
            return failobj


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_CT_HEADER = re.compile(rb"(?im)^content-type:([^\r\n]*(?:\r?\n[ \t][^\r\n]*)*)")
_FOLD_BREAK = re.compile(rb"\r?\n")


def _cut(markup: str) -> str:
    """``markup`` without comments, scripts and styles, each replaced by a space.

    One pass with ``str.find`` and anchored searches, so linear in the input: every
    search starts after the previous cut, and an opening without its close (``<!--`` or
    ``<script`` with no ``-->`` or ``</script>``) hides the rest of the text, as it does in
    a browser, which ends the loop.
    """
    out: list[str] = []
    pos = 0
    n = len(markup)
    c = -1  # the next "<!--" at or after pos (n: none), searched again only once passed
    while pos < n:
        if c < pos:
            c = markup.find("<!--", pos)
            if c < 0:
                c = n
        m = _OPEN_SCRIPT.search(markup, pos, c)
        if c == n and m is None:
            break
        if m is not None:  # a script or style opens before the next comment
            out.append(markup[pos : m.start()])
            close = _CLOSE[m.group(1).lower()].search(markup, m.end())
            pos = close.end() if close else n
        else:
            out.append(markup[pos:c])
            end = markup.find("-->", c + 4)
            pos = end + 3 if end >= 0 else n
        out.append(" ")
    out.append(markup[pos:])
    return "".join(out)


def html_to_text(markup: str) -> str:
    """A fast, good-enough reduction of HTML to its visible text; linear in its input (it
    runs on untrusted markup outside the scan time budget)."""
    text = _cut(markup)
    text = _BLOCK.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    return _SPACES.sub(" ", text)


def _host(raw: str) -> str | None:
    host = raw.rsplit("@", 1)[-1]
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    else:
        end = _HOST_END.search(host)
        host = host[: end.start()] if end else host
        host = host.split(":", 1)[0]
    host = host.strip(".").lower()
    if not host.isascii():  # IDNA2008, as the lists publish them (not strasse.de)
        ascii_host = a_label(host) or browser_a_label(host)
        if ascii_host is None:
            return None
        host = ascii_host
    if not host or not _HOST_OK.match(host):
        return None
    return host


def _href_url(value: str) -> str:
    """An attribute value as a browser reads it: entities decoded (``h&#116;tp:``),
    tabs, newlines and other controls dropped (``ht\\ttp:``)."""
    return _CONTROL.sub("", html.unescape(value))


def url_hosts(text: str, extra: list[str] | None = None) -> list[str]:
    """Hosts of the URLs in ``text`` and of ``extra`` (``href``/``src``... attribute values,
    decoded by :func:`_href_url`; ``//host`` counts there), unique, in order."""
    seen: dict[str, None] = {}

    def add_all(source: str) -> None:
        for m in _URL.finditer(source):
            body = m.group(1)
            if m.group(0).lower().startswith("www."):
                body = "www." + body
            h = _host(body)
            if h:
                seen.setdefault(h, None)

    add_all(text)
    for href in extra or ():
        url = _href_url(href)
        m = _SCHEMELESS.match(url)
        if m:
            h = _host(m.group(1))
            if h:
                seen.setdefault(h, None)
        else:
            add_all(url)
    return list(seen)


#: Codecs Python has that no mail is written in, read as UTF-8 instead: punycode decodes
#: in quadratic time (an 800 KB body took 35 s), idna and undefined always fail.
_NOT_TEXT_CODECS = frozenset({"punycode", "idna", "undefined"})
#: At most this much of a field goes through ``email.header.decode_header``, which is
#: quadratic in the encoded words (800 KB of them took 12 s); the rest is not decoded.
MAX_DECODE = 8192


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    try:
        charset = part.get_content_charset() or "utf-8"
        if codecs.lookup(charset).name in _NOT_TEXT_CODECS:
            charset = "utf-8"
        return payload.decode(charset, "replace")
    except Exception:  # unknown (LookupError), or a codec that fails even so: idna, ...
        return payload.decode("utf-8", "replace")


def _filename(part: email.message.Message) -> str:
    try:
        name = part.get_filename()
        if not name:
            ct_name = part.get_param("name")
            name = ct_name if isinstance(ct_name, str) else None
    except Exception:  # an RFC 2231 name in a charset that cannot decode it (idna...)
        return ""
    if not name:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(name[:MAX_DECODE])))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return name


@dataclass(slots=True)
class _Walk:
    multiparts: int = 0  # multiparts with a boundary and enclosed messages: containers
    leaves: list[tuple[int, int]] = field(default_factory=list)  # leaf header blocks


def _content_type(head: bytes, default: str) -> tuple[str, bytes | None]:
    """(type, multipart boundary) from a part's header block, as the email parser reads
    them: the first Content-Type field, ``default`` without one."""
    m = _CT_HEADER.search(head)
    if m is None:
        return default, None
    value = _FOLD_BREAK.sub(b"", m.group(1))
    low = value.lower()
    if b"multipart" not in low and b"message" not in low:
        return "text/x-other", None  # only containers matter here
    part = _Part()
    part["Content-Type"] = value.decode("ascii", "surrogateescape")
    boundary = part.get_boundary()
    ctype = part.get_content_type()
    if boundary is None or not ctype.startswith("multipart/"):
        return ctype, None
    try:
        return ctype, boundary.encode("ascii", "surrogateescape")
    except UnicodeEncodeError:
        # A byte that is not ASCII in the boundary comes back from the email package as
        # U+FFFD, which no delimiter line can match: no parts, as the parser finds none.
        return ctype, None


def _after(newline: int) -> int:
    return newline + 1 if newline >= 0 else -1


def _walk(raw: bytes) -> _Walk:
    """The MIME structure the email parser will find in ``raw``, found without parsing it:
    how many multiparts (with a boundary) there are, and where each leaf part's header
    block is.

    Only real part headers count: text in a body that merely looks like
    ``Content-Type: multipart/...`` is not a part (counting such text anywhere in the
    message let a few KB of it switch MIME parsing off). Iterative, and linear in
    ``raw``: the next delimiter line of any open multipart is found with ``bytes.find``
    once per change of the open multiparts and reused until passed. Where the parser and
    this walk could differ (a header block ended by a line that is not a header field),
    the walk counts more, never fewer, multiparts.
    """
    w = _Walk()
    n = len(raw)
    stack: list[tuple[bytes, bool]] = []  # open multiparts: boundary, is multipart/digest
    open_: dict[bytes, int] = {}  # boundary -> times on the stack
    version = 0  # changes whenever open_ does
    cached: tuple[int, int, int, bytes, bool] | None = None  # version, start, eol, b, close

    def next_delimiter(pos: int) -> tuple[int, int, bytes, bool] | None:
        """(line start, line end, boundary, closing) of the next delimiter line."""
        nonlocal cached
        if cached is not None and cached[0] == version and cached[1] >= pos:
            return None if cached[1] >= n else cached[1:]
        found: tuple[int, int, int, bytes, bool] = (version, n, n, b"", False)  # none
        # Every call is at the start of a line; -1: no more lines starting with "--".
        i = pos if raw.startswith(b"--", pos) else _after(raw.find(b"\n--", pos))
        while i >= 0:
            eol = raw.find(b"\n", i)
            eol = n if eol < 0 else eol
            line = raw[i + 2 : eol].rstrip(b" \t\r")
            if line in open_:
                found = (version, i, eol, line, False)
                break
            if line.endswith(b"--") and line[:-2] in open_:
                found = (version, i, eol, line[:-2], True)
                break
            i = _after(raw.find(b"\n--", eol)) if eol < n else -1
        cached = found
        return None if found[1] >= n else found[1:]

    def pop_to(boundary: bytes, inclusive: bool) -> None:
        """Close the multiparts inside ``boundary``'s (and it too when ``inclusive``)."""
        nonlocal version
        while stack:
            b = stack[-1][0]
            if b == boundary and not inclusive:
                return
            stack.pop()
            open_[b] -= 1
            if not open_[b]:
                del open_[b]
            version += 1
            if b == boundary:
                return

    pos = 0
    in_head = True
    default = "text/plain"
    # Past these the message is read as text: there is no need to walk on.
    while pos <= n and len(w.leaves) <= MAX_LEAVES and w.multiparts <= 4 * MAX_LEAVES:
        if in_head:
            start = pos
            d = next_delimiter(pos) if open_ else None
            limit = d[0] if d is not None else n
            if raw.startswith(b"\n", pos) or raw.startswith(b"\r\n", pos):
                end, body = pos, raw.index(b"\n", pos) + 1
            else:
                m = _BLANK_LINE.search(raw, pos, limit)
                end, body = (m.start(), m.end()) if m else (limit, limit)
            ctype, boundary = _content_type(raw[start:end], default)
            pos = body
            default = "text/plain"
            if boundary is not None:
                w.multiparts += 1
                stack.append((boundary, ctype == "multipart/digest"))
                open_[boundary] = open_.get(boundary, 0) + 1
                version += 1
            elif ctype.startswith("message/") and ctype != "message/delivery-status":
                w.multiparts += 1  # the parser nests into an enclosed message too
                continue  # its header block follows
            else:
                w.leaves.append((start, end))
            in_head = False
        if not open_:
            break
        d = next_delimiter(pos)
        if d is None:
            break
        _, eol, boundary, closing = d
        pos = eol + 1
        if closing:
            pop_to(boundary, inclusive=True)
        else:
            pop_to(boundary, inclusive=False)
            default = "message/rfc822" if stack[-1][1] else "text/plain"
            in_head = True
    return w


def _leaves(msg: email.message.Message) -> tuple[list[email.message.Message], bool]:
    """The non-multipart parts in ``walk()`` order, without recursion, at most MAX_DEPTH
    multipart levels down; and whether deeper ones were left out."""
    out: list[email.message.Message] = []
    deep = False
    stack: list[tuple[email.message.Message, int]] = [(msg, 0)]
    while stack:
        part, depth = stack.pop()
        if not part.is_multipart():
            out.append(part)
        elif depth >= MAX_DEPTH:
            deep = True
        else:
            subparts = part.get_payload()
            if isinstance(subparts, list):
                stack.extend(
                    (p, depth + 1)
                    for p in reversed(subparts)
                    if isinstance(p, email.message.Message)
                )
    return out, deep


def _fallback_attachments(raw: bytes, walk: _Walk, out: Content) -> None:
    """Attachments and types of the leaf parts ``walk`` found, for a message read as text
    (a MIME bomb must not hide its ``.exe``)."""
    parser = email.parser.BytesHeaderParser(_Part, policy=email.policy.compat32)
    for start, end in walk.leaves[:MAX_LEAVES]:
        _note_part(parser.parsebytes(raw[start:end] + b"\r\n\r\n"), out)


def _note_part(part: email.message.Message, out: Content) -> tuple[str, str, str]:
    """Record one leaf part's type, and the part as an attachment when it has a file name
    or says ``attachment``; returns (content type, file name, disposition)."""
    ctype = part.get_content_type()
    out.content_types.append(ctype)
    disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
    fname = _filename(part)
    if fname or disposition == "attachment":
        out.attachments.append(Attachment(fname, ctype))
    return ctype, fname, disposition


def _hrefs(markup: str) -> list[str]:
    return [a or b or c for a, b, c in _HREF.findall(markup)]


def extract(raw: bytes, limit: int) -> Content:
    """Parse at most ``limit`` bytes of ``raw`` (header block + body) into :class:`Content`.

    A message with more than MAX_PARTS multiparts or MAX_LEAVES other parts (counted by
    :func:`_walk`, real part headers only) is not parsed: its text is the raw body, its
    attachments and types come from the walk, and ``too_deep`` is set.
    """
    out = Content()
    if len(raw) > limit:
        raw = raw[:limit]
        out.truncated = True
    msg = None
    # The email parser's time grows faster than the nesting (0.06 s at 300 levels, 0.5 s
    # where it gives up): more multiparts than MAX_PARTS is not parsed at all.
    walk = _walk(raw)
    if walk.multiparts <= MAX_PARTS and len(walk.leaves) <= MAX_LEAVES:
        with contextlib.suppress(RecursionError):  # nested deeper than the parser follows
            msg = email.message_from_bytes(raw, _Part, policy=email.policy.compat32)
    if msg is None:  # read it as text
        out.too_deep = True
        blank = re.search(rb"\r?\n\r?\n", raw)  # the end of the header block
        out.text = raw[blank.end() if blank else 0 :].decode("utf-8", "replace")
        out.hosts = url_hosts(out.text, _hrefs(out.text))
        _fallback_attachments(raw, walk, out)
        return out
    texts: list[str] = []
    hrefs: list[str] = []
    extra_text: list[str] = []  # read for URLs only: HTML attachments
    leaves, out.too_deep = _leaves(msg)
    for part in leaves:
        ctype, fname, disposition = _note_part(part, out)
        if fname or disposition == "attachment":
            if ctype == "text/html" or fname.lower().endswith((".htm", ".html")):
                # A phishing page sent as an attachment: its links count, its text does
                # not (it is not the message's text).
                markup = _decode(part)
                hrefs.extend(_hrefs(markup))
                extra_text.append(markup)
            if not ctype.startswith("text/") or disposition == "attachment":
                continue
        if ctype == "text/html":
            markup = _decode(part)
            hrefs.extend(_hrefs(markup))
            texts.append(html_to_text(markup))
        elif ctype.startswith("text/") or (ctype == "message/rfc822"):
            texts.append(_decode(part))
    out.text = "\n".join(texts)
    out.hosts = url_hosts("\n".join([out.text, *extra_text]), hrefs)
    return out
