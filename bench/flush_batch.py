#!/usr/bin/env python3
"""What flushing archive copies in groups would save: machine CPU per durable copy.

  flush_batch.py [--count 2000] [--rounds 2]

The archive (issue 6) writes each copy as an unnamed file (O_TMPFILE), fsyncs it, links
it into its day directory, and its group commit then fsyncs the directory once for all
the copies committed together (plugins/archive/store.py, _GroupCommit). This measures,
single-threaded, on a fresh journaled ext4 in a loop-mounted image (as ``archive.py --fs
journal``), COUNT copies of 5 KB written in groups of B:

- ``per-file`` (B=1): fsync the file, link, fsync the directory, one copy at a time;
- ``fsync-each``: B files written and fsynced one by one, linked, one directory fsync
  (the archive's group commit when B writers meet in one batch);
- ``sfr``: B files written, sync_file_range(WRITE) on all of them (the writeback of every
  file starts, so one journal commit can cover every allocation), fdatasync each, link,
  one directory fsync: what moving the data flush into the group commit would cost;
- ``syncfs``: B files written, one syncfs, linked, one more syncfs (the whole filesystem).

Prints one line per kind and group size: wall ms and the whole machine's CPU ms (kernel
threads included, from /proc/stat) per copy, the median of ROUNDS rounds. Root and a loop
device are needed.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

from archive import mount_journal_fs, umount_journal_fs
from benchlib import CLK_TCK, WORK, machine_busy, wait_quiet
from flush_cost import _fsync_dir

DATA = (b"X" * 76 + b"\r\n") * 64  # 5,120 bytes, like the archive bench's message
SYNC_FILE_RANGE_WRITE = 2
KINDS = (("per-file", 1), ("fsync-each", 4), ("fsync-each", 8), ("sfr", 4), ("sfr", 8),
         ("syncfs", 2), ("syncfs", 4), ("syncfs", 8))  # fmt: skip
_libc = ctypes.CDLL(None, use_errno=True)


def one(root: Path, kind: str, group: int, count: int) -> tuple[float, float]:
    """(wall ms, machine CPU ms) per copy for COUNT copies in groups of GROUP."""
    d = Path(tempfile.mkdtemp(dir=root))
    day = f"{d}/day"
    os.mkdir(day)
    rootfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)  # linkat(AT_SYMLINK_FOLLOW)
    try:
        busy0, t0 = machine_busy()[0], time.monotonic()
        for start in range(0, count, group):
            fds = []
            for _ in range(group):
                f = os.open(day, os.O_TMPFILE | os.O_WRONLY, 0o640)
                os.write(f, DATA)
                fds.append(f)
                if kind == "per-file":
                    os.fsync(f)
            if kind == "fsync-each":
                for f in fds:
                    os.fsync(f)
            elif kind == "sfr":
                for f in fds:
                    _libc.sync_file_range(
                        f, ctypes.c_longlong(0), ctypes.c_longlong(0), SYNC_FILE_RANGE_WRITE
                    )
                for f in fds:
                    os.fdatasync(f)
            elif kind == "syncfs":
                _libc.syncfs(fds[0])
            for i, f in enumerate(fds):
                os.link(f"/proc/self/fd/{f}", f"{day}/{start + i}.eml", src_dir_fd=rootfd)
                os.close(f)
                if kind == "per-file":
                    _fsync_dir(day)
            if kind == "syncfs":
                dfd = os.open(day, os.O_RDONLY | os.O_DIRECTORY)
                _libc.syncfs(dfd)
                os.close(dfd)
            elif kind != "per-file":
                _fsync_dir(day)
        wall = time.monotonic() - t0
        cpu = (machine_busy()[0] - busy0) / CLK_TCK
    finally:
        os.close(rootfd)
        shutil.rmtree(d, ignore_errors=True)
    return 1000 * wall / count, 1000 * cpu / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="flush-batch-", dir=WORK))
    mnt = mount_journal_fs(workdir, journal=True, name="jb")
    got: dict[tuple[str, int], list[tuple[float, float]]] = {}
    try:
        for _ in range(a.rounds):  # rounds alternate, so drift hits every kind alike
            for kind, group in KINDS:
                wait_quiet()
                got.setdefault((kind, group), []).append(one(mnt, kind, group, a.count))
    finally:
        umount_journal_fs(mnt)
        shutil.rmtree(workdir, ignore_errors=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"flush_batch.py {stamp}: {a.count} copies x {a.rounds} rounds, one thread, "
          "journaled ext4 in a loop-mounted image; per copy, median round")  # fmt: skip
    print("| kind | group | wall ms | machine CPU ms |\n| --- | --- | --- | --- |")
    for (kind, group), rs in got.items():
        print(f"| {kind} | {group} | {median(r[0] for r in rs):.3f} | "
              f"{median(r[1] for r in rs):.3f} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
