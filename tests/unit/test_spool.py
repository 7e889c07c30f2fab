"""The body spool: several readers at once (a plugin abandoned past its deadline may still
be reading while the next one reads) each get the whole body."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from milterd.spool import Spool


def test_interleaved_readers_each_get_the_whole_body() -> None:
    body = bytes(range(256)) * 10_000  # 2.5 MB: past the memory limit, a temporary file
    spool = Spool(limit=64 * 1024)
    for i in range(0, len(body), 65535):
        spool.write(body[i : i + 65535])
    a, b = spool.chunks(4096), spool.chunks(10_000)
    got_a, got_b = bytearray(), bytearray()
    for chunk_a in a:  # b reads between every two reads of a
        got_a += chunk_a
        got_b += next(b, b"")
    got_b += b"".join(b)
    assert bytes(got_a) == body and bytes(got_b) == body
    want = hashlib.sha256(body).hexdigest()
    results: list[str] = []

    def reader(size: int) -> None:
        h = hashlib.sha256()
        for chunk in spool.chunks(size):
            h.update(chunk)
        results.append(h.hexdigest())

    threads = [threading.Thread(target=reader, args=(s,)) for s in (1000, 4096, 65536, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [want] * 4
    assert spool.read() == body
    spool.close()


def test_a_spool_dir_that_fails_is_refused_at_start_and_tempfails_a_message_later(
    tmp_path: Path,
) -> None:
    from milterd import Message, Reject, hookimpl
    from milterd.config import ConfigError
    from milterd.testing import Harness

    ended: list[str] = []

    class Reader:  # takes the message: the body is spooled
        @hookimpl
        def eom(self, message: Message) -> None:
            message.body()

        @hookimpl
        def abort(self) -> Reject:  # ignored, as abort's contract says: not a 550 instead
            ended.append("abort")
            return Reject()

        @hookimpl
        def outcome(self) -> None:  # a message gets abort or outcome, never both
            ended.append("outcome")

    missing = tmp_path / "nope"
    with pytest.raises(ConfigError, match=r"spool_dir .*nope: cannot create a file there"):
        Harness({"milterd": {"spool_dir": str(missing)}, "plugins": {"r": {}}},
                plugins={"r": Reader})  # fmt: skip
    spool = tmp_path / "spool"
    spool.mkdir()
    config = {"milterd": {"spool_dir": str(spool), "spool_memory": 10}, "plugins": {"r": {}}}
    with Harness(config, plugins={"r": Reader}) as h:
        spool.rmdir()  # gone while running (a cleaner, a full or remounted disk)
        out = h.send(b"Subject: s\r\n\r\n" + b"x" * 100 + b"\r\n")
        assert out.verdict == "tempfail"  # an answer, with the queue id in the log
        assert ended == ["abort"] and out.decided_by == "milterd"
