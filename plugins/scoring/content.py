"""What the rules look at: decoded text parts (HTML reduced to text), URL hosts, attachments.

Parsing is bounded: at most ``limit`` bytes of the message are parsed; a larger message is
cut there and reported as truncated (the caller adds SCAN_INCOMPLETE).
"""

from __future__ import annotations

import contextlib
import email
import email.errors
import email.header
import email.message
import email.policy
import html
import re
from dataclasses import dataclass, field

__all__ = ["Attachment", "Content", "extract", "html_to_text", "url_hosts"]

_SCRIPT_S = re.compile(r"<(script|style)\b.*?</\1\s*>", re.I | re.S)
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_BLOCK = re.compile(r"<\s*(br|/p|p|/div|div|/tr|tr|li|/h\d|h\d|/td)\b[^>]*>", re.I)
_TAG = re.compile(r"<[^>]*>")
_HREF = re.compile(r"""\b(?:href|src)\s*=\s*["']?([^"'\s>]+)""", re.I)
_URL = re.compile(
    r"""(?:\b(?:https?|ftp)://|\bwww\.)([^\s<>"'()\[\]{}\\/?#]+)""",
    re.I,
)
_HOST_OK = re.compile(r"^[a-z0-9.-]+\.[a-z0-9-]{2,}$|^\[?[0-9a-f:.]+\]?$")
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
_MULTIPART = re.compile(rb"(?i)content-type:[ \t]*multipart/")


def html_to_text(markup: str) -> str:
    """A fast, good-enough reduction of HTML to its visible text."""
    text = _SCRIPT_S.sub(" ", markup)
    text = _COMMENT.sub(" ", text)
    text = _BLOCK.sub("\n", text)
    text = _TAG.sub(" ", text)
    text = html.unescape(text)
    return _SPACES.sub(" ", text)


def _host(raw: str) -> str | None:
    host = raw.rsplit("@", 1)[-1]
    host = host[1:].split("]", 1)[0] if host.startswith("[") else host.split(":", 1)[0]
    host = host.strip(".").lower()
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    if not host or not _HOST_OK.match(host):
        return None
    return host


def url_hosts(text: str, extra: list[str] | None = None) -> list[str]:
    """Hosts of the URLs in ``text`` (and of ``extra`` href values), unique, in order."""
    seen: dict[str, None] = {}
    for m in _URL.finditer(text):
        raw = m.group(0)
        body = m.group(1)
        if raw.lower().startswith("www."):
            body = "www." + body
        h = _host(body)
        if h:
            seen.setdefault(h, None)
    for href in extra or ():
        for m in _URL.finditer(href):
            raw = m.group(0)
            body = m.group(1)
            if raw.lower().startswith("www."):
                body = "www." + body
            h = _host(body)
            if h:
                seen.setdefault(h, None)
    return list(seen)


def _decode(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return payload.decode(charset, "replace")
    except LookupError:
        return payload.decode("utf-8", "replace")


def _filename(part: email.message.Message) -> str:
    name = part.get_filename()
    if not name:
        ct_name = part.get_param("name")
        name = ct_name if isinstance(ct_name, str) else None
    if not name:
        return ""
    try:
        return str(email.header.make_header(email.header.decode_header(name)))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        return name


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


def extract(raw: bytes, limit: int) -> Content:
    """Parse at most ``limit`` bytes of ``raw`` (header block + body) into :class:`Content`."""
    out = Content()
    if len(raw) > limit:
        raw = raw[:limit]
        out.truncated = True
    msg = None
    # The email parser's time grows faster than the nesting (0.06 s at 300 levels, 0.5 s
    # where it gives up): more multiparts than MAX_PARTS is not parsed at all.
    if len(_MULTIPART.findall(raw)) <= MAX_PARTS:
        with contextlib.suppress(RecursionError):  # nested deeper than the parser follows
            msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    if msg is None:  # read it as text
        out.too_deep = True
        blank = re.search(rb"\r?\n\r?\n", raw)  # the end of the header block
        out.text = raw[blank.end() if blank else 0 :].decode("utf-8", "replace")
        out.hosts = url_hosts(out.text, [])
        return out
    texts: list[str] = []
    hrefs: list[str] = []
    leaves, out.too_deep = _leaves(msg)
    for part in leaves:
        ctype = part.get_content_type()
        out.content_types.append(ctype)
        disposition = (part.get("Content-Disposition") or "").split(";", 1)[0].strip().lower()
        fname = _filename(part)
        if fname or disposition == "attachment":
            out.attachments.append(Attachment(fname, ctype))
            if not ctype.startswith("text/") or disposition == "attachment":
                continue
        if ctype == "text/html":
            markup = _decode(part)
            hrefs.extend(_HREF.findall(markup))
            texts.append(html_to_text(markup))
        elif ctype.startswith("text/") or (ctype == "message/rfc822"):
            texts.append(_decode(part))
    out.text = "\n".join(texts)
    out.hosts = url_hosts(out.text, hrefs)
    return out
