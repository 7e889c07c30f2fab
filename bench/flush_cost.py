#!/usr/bin/env python3
"""What one durable write costs on a filesystem: wall time and the whole machine's CPU.

  flush_cost.py [--count 2000] [--rounds 3] [--fs work,journal,nojournal] [--kinds a,b,...]

The archive plugin (issue 6) keeps each message as a file written the atomic way
(temporary file, fsync, rename, fsync of the directory) and commits an index row to an
SQLite WAL. Through Postfix on this 2-CPU VM every run is CPU-bound, so what a flush costs
in CPU (not only in time) decides the archive's share. This measures, single-threaded,
COUNT operations of each kind on each filesystem:

- ``write``: create a file, write 5 KB, close (no flush): the floor;
- ``write+fsync``: the same with fsync before close (a new file: data, inode, and on a
  journaled filesystem a journal commit);
- ``atomic``: the archive's sequence: write to ``tmp/``, fsync, rename into a directory,
  fsync the directory;
- ``atomic-tmpfile``: the same guarantee without a name for the temporary file: an
  unnamed file (O_TMPFILE) in the target directory, fsync, linked into place, fsync of
  the directory (no directory entry to create and rename away; a crash frees it);
- ``overwrite+fdatasync``: rewrite 4 KB of an existing, allocated file and fdatasync it
  (what a steady-state SQLite WAL commit asks of the filesystem);
- ``store``: the archive's own ``FileStore.store()`` as shipped (one delivered copy, its
  index row committed with ``synchronous = FULL``), one writer, so no group commit;
  ``store-index-normal`` the same with the index at ``synchronous = NORMAL`` (no WAL
  flush a commit), ``store-nofsync`` with ``fsync = false`` (the copy and its directory
  not flushed), ``store-noflush`` with neither flush: what each flush of a message costs
  (not in the default ``--kinds``).

Filesystems (``--fs``): ``work`` = WORK's own (on this VM the root filesystem, ext4
without a journal, on the virtual disk directly); ``journal`` = a fresh ext4 with a
journal, loop-mounted from an image on WORK (what ``archive.py --fs journal`` uses);
``nojournal`` = the same loop mount without a journal, which separates the loop device's
cost from the journal's. Root and loop devices are needed for the last two.

Reported per operation: wall ms, machine CPU ms (all processes and kernel threads, from
/proc/stat; this script is the only load it waits for) and this process's CPU ms (system
calls included); the median of ROUNDS rounds. Prints a markdown section; appends one JSON
line per filesystem and kind to bench/out/flush_cost.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median

from archive import mount_journal_fs, umount_journal_fs
from benchlib import BENCH_DIR, CLK_TCK, WORK, machine_busy, wait_quiet

OUT = BENCH_DIR / "out" / "flush_cost.jsonl"
DATA = (b"X" * 76 + b"\r\n") * 64  # 5,120 bytes, like the archive bench's message
PAGE = b"Y" * 4096
KINDS = ("write", "write+fsync", "atomic", "atomic-tmpfile", "overwrite+fdatasync")
# FileStore(fsync=..., synchronous=...) for the store kinds.
STORE_KINDS = {
    "store": (True, "full"),
    "store-index-normal": (True, "normal"),
    "store-nofsync": (False, "full"),
    "store-noflush": (False, "normal"),
}


def _new_file(path: str, sync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, DATA)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _store(
    root: Path, fsync: bool, synchronous: str
) -> tuple[Callable[[int], None], Callable[[], None]]:
    """A fresh FileStore at ROOT: a function storing message I in it as the plugin does,
    and its close."""
    from milterd_plugins.archive.store import FileStore, Record, new_id

    fs = FileStore(root, fsync=fsync, synchronous=synchronous)

    def store(i: int) -> None:
        now = time.time()
        rec = Record(
            id=new_id(now), received=now, sender="sender@example.org",
            recipients=["to@example.net", "bcc@example.net"], client_address="192.0.2.1",
            client_name="mail.example.org", helo="mail.example.org", queue_id=f"Q{i}",
            message_id=f"<{i}@example.org>", subject="bench", date="Fri, 4 Dec 2026",
            results=["spf=pass"],
        )  # fmt: skip
        fs.store(rec, {"delivered": (DATA,)})

    return store, fs.close


def one_kind(root: Path, kind: str, count: int) -> dict[str, float]:
    """COUNT operations of KIND in a fresh directory under ROOT; per-operation costs."""
    d = Path(tempfile.mkdtemp(prefix=f"flush-{kind.replace('+', '-')}-", dir=root))
    (d / "tmp").mkdir()
    (d / "day").mkdir()
    ops: Callable[[int], None]
    close: Callable[[], None] | None = None
    fd = -1
    if kind in ("write", "write+fsync"):
        sync = kind == "write+fsync"

        def ops(i: int) -> None:
            _new_file(f"{d}/day/{i}.eml", sync)

    elif kind == "atomic":

        def ops(i: int) -> None:
            _new_file(f"{d}/tmp/{i}", True)
            os.rename(f"{d}/tmp/{i}", f"{d}/day/{i}.eml")
            _fsync_dir(f"{d}/day")

    elif kind == "atomic-tmpfile":
        # os.link() calls link(2), which does not follow the /proc symlink; a dir fd
        # makes it linkat(2) with AT_SYMLINK_FOLLOW (the path is absolute: fd unused).
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

        def ops(i: int) -> None:
            f = os.open(f"{d}/day", os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o640)
            try:
                os.write(f, DATA)
                os.fsync(f)
                os.link(f"/proc/self/fd/{f}", f"{d}/day/{i}.eml", src_dir_fd=fd)
            finally:
                os.close(f)
            _fsync_dir(f"{d}/day")

    elif kind in STORE_KINDS:
        store, close = _store(d / "archive", *STORE_KINDS[kind])
        for i in range(-50, 0):  # the index's first pages and the day directory exist
            store(i)
        os.sync()
        ops = store

    else:
        fd = os.open(d / "wal", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        for _ in range(64):  # allocated and durable first, as a WAL is after its first use
            os.write(fd, PAGE)
        os.fsync(fd)

        def ops(i: int) -> None:
            os.pwrite(fd, PAGE, (i % 64) * 4096)
            os.fdatasync(fd)

    try:
        busy0, p0, t0 = machine_busy()[0], time.process_time(), time.monotonic()
        for i in range(count):
            ops(i)
        if kind in STORE_KINDS:  # what the store left to write back is its cost too
            os.sync()
        wall = time.monotonic() - t0
        proc = time.process_time() - p0
        machine = (machine_busy()[0] - busy0) / CLK_TCK
    finally:
        if fd >= 0:
            os.close(fd)
        if close is not None:
            close()
        shutil.rmtree(d, ignore_errors=True)
    return {
        "wall_ms": 1000 * wall / count,
        "machine_cpu_ms": 1000 * machine / count,
        "process_cpu_ms": 1000 * proc / count,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fs", default="work,journal,nojournal")
    ap.add_argument("--kinds", default=",".join(KINDS))
    a = ap.parse_args()
    kinds = [k for k in a.kinds.split(",") if k]
    if not kinds or any(k not in (*KINDS, *STORE_KINDS) for k in kinds):
        ap.error("--kinds: " + ", ".join((*KINDS, *STORE_KINDS)))
    names = [f for f in a.fs.split(",") if f]
    if any(f not in ("work", "journal", "nojournal") for f in names):
        ap.error("--fs: work, journal, nojournal")
    WORK.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="flush-cost-", dir=WORK))
    mounts: dict[str, Path] = {}
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    results: dict[tuple[str, str], list[dict[str, float]]] = {}
    try:
        for f in names:
            if f == "work":
                mounts[f] = workdir
            else:
                mounts[f] = mount_journal_fs(workdir, journal=f == "journal", name=f)
        for _ in range(a.rounds):  # rounds alternate, so drift hits every cell alike
            for f in names:
                for kind in kinds:
                    wait_quiet()
                    results.setdefault((f, kind), []).append(one_kind(mounts[f], kind, a.count))
    finally:
        for f, mnt in mounts.items():
            if f != "work":
                umount_journal_fs(mnt)
        shutil.rmtree(workdir, ignore_errors=True)
    where = {
        "work": f"WORK's filesystem ({WORK})",
        "journal": "fresh ext4 with a journal, loop-mounted",
        "nojournal": "fresh ext4 without a journal, loop-mounted",
    }
    print(f"## Cost of a durable write ({stamp})\n")
    print(
        f"bench/flush_cost.py: {a.count} operations x {a.rounds} rounds, one thread, "
        f"{os.cpu_count()} CPUs; median round. Per operation: wall ms, the whole machine's "
        "CPU ms (kernel threads included), this process's CPU ms.\n"
    )
    print("| filesystem | " + " | ".join(kinds) + " |")
    print("| --- |" + " --- |" * len(kinds))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as jf:
        for f in names:
            cells = []
            for kind in kinds:
                rs = results[(f, kind)]
                m = {k: round(median(r[k] for r in rs), 3) for k in rs[0]}
                jf.write(json.dumps({"stamp": stamp, "fs": f, "kind": kind, **m}) + "\n")
                cells.append(
                    f"{m['wall_ms']:.3f} / {m['machine_cpu_ms']:.3f} / {m['process_cpu_ms']:.3f}"
                )
            print(f"| {where[f]} | " + " | ".join(cells) + " |")
    print(
        f"\nReproduce: `cd bench && ../.venv/bin/python flush_cost.py --fs {a.fs} "
        f"--kinds {','.join(kinds)}` (root)."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
