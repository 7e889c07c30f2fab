"""Hostile input over the real milter protocol: the daemon (pymilter, the bridge, every
built-in plugin, signing authenticated sessions and sealing the others) answers every
session with a final reply, no plugin fails, nothing it sends back (signatures, seals,
Authentication-Results) carries a NUL or a bare line break, and it stays up.

The in-process twin (tests/unit/test_robustness.py) covers the plugins in depth; this
one covers what only the daemon does: the bytes libmilter hands over (headers and
envelope with 8-bit and control characters, empty and huge values, odd macros), their
decoding in the bridge, and the header changes encoded back for the MTA. Hypothesis,
derandomized, against one daemon and the loopback test DNS server.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import os
import re
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.canonicalization import Relaxed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from milterd_plugins.archive.store import FileStore, Query

from tests.integration.daemon import Daemon
from tests.support.dnsserver import ZoneServer
from tests.support.keys import write_key
from tests.support.milterclient import MilterClient, Transcript

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

EXAMPLES = 3000 if os.environ.get("HYPOTHESIS_PROFILE") == "explore" else 80
FINAL = {"accept", "continue", "reject", "tempfail", "discard", "replycode"}

ZONE = {
    "example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject"]},
}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    keydir = tmp_path_factory.mktemp("keys")
    keydir.chmod(0o700)
    key = write_key(keydir / "rsa.key", rsa.generate_private_key(65537, 2048))
    with ZoneServer(ZONE) as dns:
        extra = f'[dns]\nnameservers = ["127.0.0.1:{dns.port}"]\ntimeout = 2\n'
        # authenticated sessions are signed, the others verified and sealed
        body = (
            "[plugins.spf]\n"
            f'[plugins.dkim.keys.rsa]\nselector = "s1"\nfile = "{key}"\n'
            '[[plugins.dkim.signing]]\npattern = "*"\nkeys = ["rsa"]\ndomain = "example.org"\n'
            "[plugins.authres]\n"
            f'[plugins.arc]\nselector = "arc1"\ndomain = "example.net"\nkey_file = "{key}"\n'
            "[plugins.dmarc]\n[plugins.scoring]\n[plugins.tagging]\n"
        )
        d = Daemon(body, milterd_extra=extra)
        d.write(body + f'[plugins.archive]\npath = "{d.dir}/archive"\n')
        with d:
            yield d


# No NUL: the milter protocol carries NUL-terminated strings, an MTA cannot send one.
RAW = st.binary(max_size=200).map(lambda b: b.replace(b"\0", b""))
PIECES = st.sampled_from([
    b"", b" ", b"\t", b"\r", b"\n", b"\r\n\t", b"\xff", b"\xc3\x28", "é".encode(), b"=?x?q?y?=",
    b"v=1; a=rsa-sha256; d=example.org; s=s; h=from; bh=; b=", b"i=1; cv=pass",
    b"a" * 2000, b"<a@example.org>", b"a@example.org, b@example.org", b"(comment",
])  # fmt: skip
VALUE = st.one_of(RAW, st.lists(PIECES, max_size=5).map(b"".join))
NAME = st.one_of(
    st.sampled_from(
        ["From", "To", "Subject", "DKIM-Signature", "ARC-Seal", "Authentication-Results",
         "Content-Type", "Message-ID", "Date", "X-Junk"]
    ),
    st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters=":"),
            min_size=1, max_size=10),
)  # fmt: skip
TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=40)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    headers=st.lists(st.tuples(NAME, VALUE), max_size=12),
    body=st.one_of(RAW, st.just(b"")),
    sender=st.one_of(st.just("alice@example.org"), TEXT),
    rcpt=st.one_of(st.just("bob@example.com"), TEXT),
    helo=TEXT,
    hostname=TEXT,
    ip=st.sampled_from(["192.0.2.1", "203.0.113.5", "2001:db8::2"]),
    auth=st.sampled_from([None, "alice"]),
    from_=st.one_of(st.just(b"Alice <alice@example.org>"), st.just(b""), VALUE),
)
def test_hostile_sessions_get_a_final_reply(
    daemon: Daemon,
    headers: list[tuple[str, bytes]],
    body: bytes,
    sender: str,
    rcpt: str,
    helo: str,
    hostname: str,
    ip: str,
    auth: str | None,
    from_: bytes,
) -> None:
    t = Transcript()
    try:
        with MilterClient(daemon.socket, timeout=20) as c:
            c.negotiate()
            c.connect(t, hostname=hostname or "unknown", ip=ip)
            hdrs: list[tuple[str, str | bytes]] = list(headers)
            if from_:  # most sessions get a From first, so that signing and sealing run
                hdrs.insert(0, ("From", from_))
            c.message(sender, [rcpt], hdrs, body, helo=helo, auth=auth, t=t)
    except OSError as e:  # the daemon (libmilter) dropped the connection
        tail = daemon.log_text()[-1500:]
        raise AssertionError(f"{e!r} after {list(t.replies)}: {tail}") from e
    if t.final is not None:  # None: every recipient refused (then no message was sent)
        assert t.final.verdict in FINAL, t.final
        # nothing here may make milterd defer a message (451 comes as a reply code)
        deferred = t.final.verdict == "tempfail" or t.final.text.startswith("4")
        assert not deferred, (t.final, daemon.log_text()[-2000:])
    for kind, args in t.mods:
        for a in args:
            if isinstance(a, (bytes, str)):
                text = a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a
                assert b"\0" not in text, (kind, args)
                # only folded continuation lines: CRLF or LF followed by white space
                lines = text.replace(b"\r\n", b"\n").split(b"\n")
                assert all(line[:1] in (b" ", b"\t") for line in lines[1:]), (kind, args)


RCPTS = ["bob@example.com", "carol@example.net", "dave@example.com"]
TRANSACTION = st.fixed_dictionaries(
    {
        "headers": st.lists(st.tuples(NAME, VALUE), max_size=6),
        "body": st.one_of(RAW, st.just(b""), st.just(b"line one\r\nline two\r\n")),
        "rcpts": st.lists(st.sampled_from(RCPTS), min_size=1, max_size=3, unique=True),
        "abort": st.sampled_from([None, None, None, "mail", "rcpt", "header", "eoh", "body"]),
    }
)
_serial = itertools.count()


def _relaxed_bh(body: bytes) -> str:
    return base64.b64encode(hashlib.sha256(Relaxed.canonicalize_body(body)).digest()).decode()


@settings(
    max_examples=EXAMPLES // 2,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    txns=st.lists(TRANSACTION, min_size=2, max_size=4),
    auth=st.sampled_from([None, "alice"]),
    ip=st.sampled_from(["192.0.2.1", "203.0.113.5"]),
    postfix=st.booleans(),
)
def test_messages_sharing_a_connection_are_each_filtered_on_their_own(
    daemon: Daemon, txns: list[dict[str, Any]], auth: str | None, ip: str, postfix: bool
) -> None:
    # As over an SMTP session that carries several messages, some abandoned (RSET, a lost
    # client) at any stage: every finished message gets a final reply, its own signature
    # (the body hash of its own body) and its own archive row (its queue id, its
    # recipients); an abandoned one leaves no row.
    done: list[tuple[str, dict[str, Any], Transcript]] = []
    with MilterClient(daemon.socket, timeout=20) as c:
        c.negotiate()
        c.connect(Transcript(), hostname="client.example", ip=ip)
        for x in txns:
            qid = f"SHARED{next(_serial)}"
            t = Transcript()
            hdrs: list[tuple[str, str | bytes]] = [
                ("From", b"Alice <alice@example.org>"),
                ("Subject", qid.encode()),
                *x["headers"],
            ]
            c.message(
                "alice@example.org", x["rcpts"], hdrs, x["body"], queue_id=qid, auth=auth, t=t,
                abort_after=x["abort"], queue_id_at_mail=not postfix,
            )  # fmt: skip
            done.append((qid, x, t))
    store = FileStore(daemon.dir / "archive", readonly=True)
    try:
        for qid, x, t in done:
            rows = store.search(Query(queue_id=qid))
            if t.aborted:
                assert t.final is None and rows == [], (qid, x["abort"], rows)
                continue
            assert t.final is not None and t.final.verdict in FINAL, t.final
            assert not (t.final.verdict == "tempfail" or t.final.text.startswith("4")), t.final
            if t.final.verdict not in ("continue", "accept", "quarantine"):
                continue
            accepted = [
                r
                for r, rep in zip(x["rcpts"], t.replies.get("rcpt", []), strict=True)
                if rep.verdict in ("continue", "noreply")
            ]
            assert [r.recipients for r in rows] == [accepted], (qid, rows)
            sigs = [
                str(args[-1])
                for kind, args in t.mods
                if kind in ("addheader", "insheader") and args[-2] == "DKIM-Signature"
            ]
            # Signed: authenticated sessions only; always when nothing hostile was added
            # (hostile headers may leave a message unsigned, e.g. a second From).
            assert not sigs if not auth else (bool(sigs) or bool(x["headers"])), t.mods
            lines = x["body"].replace(b"\r\n", b"")
            clean = b"\r" not in lines and b"\n" not in lines
            for sig in sigs:
                if clean:  # (bare CR or LF: the MTA would have normalized them)
                    bh = re.search(r"bh=([^;]+);", re.sub(r"\s+", "", sig))
                    assert bh and bh.group(1) == _relaxed_bh(x["body"]), (qid, sig)
    finally:
        store.close()


def test_daemon_still_up_and_no_plugin_failed(daemon: Daemon) -> None:
    assert daemon.proc is not None and daemon.proc.poll() is None
    log = daemon.log_text()
    assert "Traceback" not in log, log[-3000:]
    assert " failed at " not in log, [line for line in log.splitlines() if " failed at " in line]
