#!/usr/bin/env python3
"""Archiving's cost per 5 KB message, as a ratio to the same pipeline without it.

  archive.py [--count 3000] [--conns 10] [--rounds 3] [--workers 1] [--variants a,b,...]

Over the milter protocol, no MTA: bench/milter_load.py plays Postfix against a real
``milterd run`` on a unix socket. Every variant runs the same pipeline (``authres`` +
``example_header``); the archive variants add ``[plugins.archive]`` writing to a fresh
directory under WORK (default /var/lib/milterd-bench, i.e. the machine's real disk, not
tmpfs). Rounds alternate between variants so drift hits all of them alike; the median
round is reported. Throughput ratio = archive msgs/s / baseline msgs/s (target: >= 0.85).
The archives are kept until the end of the run (see run_variant). CPU ms/msg (the milter's
process tree, from /proc) moves far less with other load than msgs/s does: on a shared
machine compare that column.

Variants: base (no archive), archive (defaults: delivered copy, fsync file + directory,
SQLite synchronous=FULL), both-zstd (both copies, zstd), nofsync (fsync = false,
index_synchronous = normal), index-normal (files fsynced, index_synchronous = normal).

``--fs journal``: the archives go to a fresh ext4 filesystem with a journal (mkfs.ext4's
defaults, as a Debian installer formats a disk) in a 4 GiB image file under WORK,
loop-mounted for the run (root and loop devices needed), instead of WORK's own filesystem
(``--fs work``, the default). On a VM whose root filesystem is ext4 *without* a journal
(this one: "mounted filesystem r/w without journal"), ext4's inode allocator skips every
inode freed in the last 5 minutes (``recently_deleted``), one buffer lookup each, so each
file created after Postfix's queue churn costs 0.2-1.1 ms of CPU; a journaled filesystem
never does that. ``--fs journal-ram``: the same fresh ext4 with a journal on the
kernel's RAM block device (zram0) instead of a loop device: the filesystem's own work
without this VM's storage stack under it (see mount_ram_journal_fs). ``--fs tmpfs``: a
fresh tmpfs instead, no disk under the archive at
all (fsync does nothing there): what archiving costs in CPU alone, which splits the
archive's cost into its CPU and its disk's. Postfix's queue stays on WORK either way.

``--postfix``: the same variants end to end instead, as ``postfix_bench.py`` measures:
smtp-source (SESSIONS sessions, a new connection per message) -> a private Postfix with
``smtpd_milters`` = the variant's daemon -> smtp-sink; WARMUP then COUNT messages per run
(the environment knobs of bench/README.md; ``--count`` is not used). The socket lives
in WORK/sock, where Postfix's smtpd can reach it. Reported: end-to-end msgs/s (until the
sink has every message), the milter's and Postfix's CPU ms/msg, and the whole machine's
(every process and kernel thread, from /proc/stat) with its busy % over the run: near
100 % per CPU, the run is CPU-bound and any CPU the archive adds anywhere (the kernel's
I/O path included) lowers the rate.

Prints a markdown section; appends one JSON line per round and one per variant summary to
bench/out/archive.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

from benchlib import (
    BENCH_DIR,
    MILTERD,
    PYTHON,
    WORK,
    Endpoint,
    Proc,
    Target,
    tree_pids,
    unix_listening,
    wait_for,
    wait_quiet,
)
from make_msg import write_message

OUT = BENCH_DIR / "out" / "archive.jsonl"

VARIANTS: dict[str, str] = {
    "base": "",
    # The same pipeline plus a plugin that only makes the MTA send the body (dkim with
    # nothing to do): what archiving costs on top of any pipeline that reads the body.
    "base-body": "[plugins.dkim]\nsign = false\nverify = false\n",
    "archive": "[plugins.archive]\npath = '{dir}'\n",
    # the same with named temporary files renamed into place (MILTERD_ARCHIVE_TMPFILE=0),
    # as before unnamed O_TMPFILE files linked into place
    "archive-rename": "[plugins.archive]\npath = '{dir}'\n",
    "both-zstd": "[plugins.archive]\npath = '{dir}'\nstore = 'both'\ncompress = 'zstd'\n",
    "nofsync": "[plugins.archive]\npath = '{dir}'\nfsync = false\nindex_synchronous = 'normal'\n",
    "inline": "[plugins.archive]\npath = '{dir}'\nisolation = 'inline'\n",
    # files fsynced as by default, the index commit not flushed (WAL, synchronous=NORMAL)
    "index-normal": "[plugins.archive]\npath = '{dir}'\nindex_synchronous = 'normal'\n",
    "inline-nofsync": "[plugins.archive]\npath = '{dir}'\nisolation = 'inline'\nfsync = false\n"
    "index_synchronous = 'normal'\n",
}


VARIANT_ENV: dict[str, dict[str, str]] = {"archive-rename": {"MILTERD_ARCHIVE_TMPFILE": "0"}}


def config(sock: str, workers: int, extra: str, affinity: str = "auto") -> str:
    return (
        "[milterd]\n"
        f'socket = "unix:{sock}"\nsocket_mode = "0666"\nworkers = {workers}\n'
        f'cpu_affinity = "{affinity}"\n'
        'log_level = "warning"\nauthserv_id = "mx.bench"\n\n'
        "[plugins.authres]\ntrusted = true\n[plugins.example_header]\n" + extra
    )


def run_variant(
    name: str, workdir: Path, msg: Path, a: argparse.Namespace, round_no: int
) -> dict[str, Any]:
    vdir = workdir / f"{name}-{round_no}"
    vdir.mkdir(parents=True)
    sock = vdir / "milterd.sock"
    archive = (a.archive_root or vdir) / f"archive-{name}-{round_no}"
    conf = vdir / "milterd.toml"
    conf.write_text(
        config(str(sock), a.workers, VARIANTS[name].format(dir=archive), a.cpu_affinity)
    )
    proc = Proc(f"milterd-{name}", [MILTERD, "-c", str(conf), "run"], vdir / "milterd.log",
                VARIANT_ENV.get(name))  # fmt: skip
    try:
        wait_for(lambda: unix_listening(str(sock)), 30, f"{name} socket", proc)
        wait_for(lambda: len(tree_pids(proc.pid)) >= 1 + a.workers, 30, "workers", proc)
        busy_before = wait_quiet()  # other people's load on a shared machine
        out = subprocess.run(
            [PYTHON, str(BENCH_DIR / "milter_load.py"), f"unix:{sock}", "--conns", str(a.conns),
             "--count", str(a.count), "--msg", str(msg), "--pid", str(proc.pid),
             "--expect-header", "X-Milterd-Example", "--label", f"archive-bench-{name}"],
            capture_output=True, text=True, timeout=600, check=False,
        )  # fmt: skip
        if out.returncode != 0:
            raise RuntimeError(f"{name}: milter_load failed:\n{out.stdout}\n{out.stderr}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        archived = None
        if "archive" in VARIANTS[name]:
            with sqlite3.connect(archive / "index.sqlite3") as db:
                archived = int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
        result.update(variant=name, round=round_no, archived=archived, busy_before=busy_before)
        return result
    finally:
        # The archive stays until the whole run ends (main() removes WORK's run directory):
        # on ext4 without a journal, creating files just after thousands were deleted is
        # several times slower (the inode allocator skips recently deleted inodes), which
        # would penalise whichever variant runs next.
        proc.stop()


def report_postfix(
    names: list[str], rows: dict[str, list[dict[str, Any]]], a: argparse.Namespace,
    pfb: Any, stamp: str, jf: Any,
) -> None:  # fmt: skip
    """The markdown section (and summary JSON lines) of a ``--postfix`` run."""
    base_rate = median(x["rate"] for x in rows["base"])
    base_cpu = median(x["milter_cpu_ms_per_msg"] for x in rows["base"])
    print(f"## Archive cost through Postfix ({stamp})\n")
    print(
        f"smtp-source -> Postfix (milter on a unix socket) -> smtp-sink, 5 KB message, "
        f"{pfb.warmup} + {pfb.count} messages x {a.rounds} rounds per variant, "
        f"{pfb.sessions} sessions, workers={a.workers}, {os.cpu_count()} CPUs; median round; "
        f"{_where(a)}. Target: throughput ratio >= 0.85.\n"
    )
    print("| variant | e2e msgs/s | ratio to base | accept msgs/s | milter CPU ms/msg "
          "| extra CPU ms/msg | Postfix CPU ms/msg | machine CPU ms/msg "
          f"| machine busy % (of {100 * (os.cpu_count() or 1)}) | archived |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in names:
        rate = median(x["rate"] for x in rows[n])
        accept = median(x["accept_rate"] for x in rows[n])
        cpu = median(x["milter_cpu_ms_per_msg"] for x in rows[n])
        pf_cpu = median(x["postfix_cpu_ms_per_msg"] for x in rows[n])
        all_cpu = median(x["all_cpu_ms_per_msg"] for x in rows[n])
        busy = median(x["machine_busy_pct"] for x in rows[n])
        archived = [x["archived"] for x in rows[n]]
        summary = {
            "summary": True, "mode": "postfix", "stamp": stamp, "variant": n, "rate": rate,
            "ratio": round(rate / base_rate, 3), "accept_rate": accept, "cpu_ms_per_msg": cpu,
            "extra_cpu_ms_per_msg": round(cpu - base_cpu, 3), "postfix_cpu_ms_per_msg": pf_cpu,
            "all_cpu_ms_per_msg": all_cpu, "machine_busy_pct": busy,
            "archived": archived, "count": pfb.count, "warmup": pfb.warmup,
            "rounds": a.rounds, "sessions": pfb.sessions, "workers": a.workers,
        }  # fmt: skip
        jf.write(json.dumps(summary, sort_keys=True) + "\n")
        print(
            f"| {n} | {rate:.0f} | {rate / base_rate:.2f} | {accept:.0f} | {cpu:.3f} | "
            f"{cpu - base_cpu:+.3f} | {pf_cpu:.3f} | {all_cpu:.3f} | {busy:.0f} | "
            f"{'/'.join(str(x) for x in archived) if archived[0] is not None else '-'} |"
        )


@dataclass
class _Running:
    """What PostfixBench.run_once needs of a milter under test."""

    endpoint: Endpoint
    pid: int


def run_variant_postfix(
    name: str, workdir: Path, a: argparse.Namespace, round_no: int, pfb: Any
) -> dict[str, Any]:
    """One variant end to end through Postfix (postfix_bench.PostfixBench.run_once)."""
    vdir = workdir / f"pf-{name}-{round_no}"
    vdir.mkdir(parents=True)
    sockdir = WORK / "sock"  # 0755 directories: smtpd runs as postfix
    sockdir.mkdir(parents=True, exist_ok=True)
    os.chmod(WORK, 0o755)
    os.chmod(sockdir, 0o755)
    sock = sockdir / f"archive-bench-{name}.sock"
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    archive = (a.archive_root or vdir) / f"archive-pf-{name}-{round_no}"
    conf = vdir / "milterd.toml"
    conf.write_text(
        config(str(sock), a.workers, VARIANTS[name].format(dir=archive), a.cpu_affinity)
    )
    proc = Proc(f"milterd-{name}", [MILTERD, "-c", str(conf), "run"], vdir / "milterd.log",
                VARIANT_ENV.get(name))  # fmt: skip
    try:
        wait_for(lambda: unix_listening(str(sock)), 30, f"{name} socket", proc)
        wait_for(lambda: len(tree_pids(proc.pid)) >= 1 + a.workers, 30, "workers", proc)
        busy_before = wait_quiet()
        target = Target(f"archive-{name}", "milterd", "unix", a.workers)
        res: dict[str, Any] = pfb.run_once(
            target, _Running(Endpoint("unix", path=str(sock)), proc.pid), round_no
        )
        if res["errors"]:
            raise RuntimeError(f"{name} through Postfix: {res['errors']}")
        archived = None
        if "archive" in VARIANTS[name]:  # warm-up messages included
            with sqlite3.connect(archive / "index.sqlite3") as db:
                archived = int(db.execute("SELECT count(*) FROM messages").fetchone()[0])
        cpu = res["cpu_ms_per_msg"]
        res.update(
            variant=name, round=round_no, archived=archived, busy_before=busy_before,
            rate=res["e2e_rate"], milter_cpu_ms_per_msg=cpu["milter"],
            postfix_cpu_ms_per_msg=cpu["postfix"], mode="postfix",
            # the whole machine (kernel I/O threads included) over the timed run
            all_cpu_ms_per_msg=round(
                10 * res["machine_busy_pct"] * res["e2e_s"] / res["count"], 3
            ),
        )  # fmt: skip
        return res
    finally:
        proc.stop()  # the archive stays until the run ends (see run_variant)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()


def _where(a: argparse.Namespace) -> str:
    where = "archives on WORK's filesystem"
    if a.fs == "journal":
        where = "archives on a fresh ext4 with a journal (loop-mounted image, --fs journal)"
    elif a.fs == "journal-dio":
        where = (
            "archives on a fresh ext4 with a journal (loop-mounted image, the loop device "
            "with direct I/O, --fs journal-dio)"
        )
    elif a.fs == "tmpfs":
        where = "archives on a tmpfs (no disk: what is left is CPU, --fs tmpfs)"
    elif a.fs == "journal-ram":
        where = (
            "archives on a fresh ext4 with a journal on a block device in RAM (zram0, "
            "--fs journal-ram)"
        )
    return f"{where}; cpu_affinity = {a.cpu_affinity}"


def mount_journal_fs(
    workdir: Path, journal: bool = True, name: str = "jfs", direct_io: bool = False
) -> Path:
    """A fresh ext4 filesystem (with a journal unless ``journal`` is false) in
    WORKDIR/NAME.img, loop-mounted on WORKDIR/NAME (unmounted by
    :func:`umount_journal_fs`). Returns the mount point. ``direct_io``: the loop device
    reads and writes its image with O_DIRECT (``losetup --direct-io=on``), so that its
    blocks are not cached a second time, and written back a second time, in the page
    cache of the filesystem holding the image, as a partition's blocks never are."""
    img, mnt = workdir / f"{name}.img", workdir / name
    with img.open("wb") as f:
        f.truncate(4 << 30)
    features = [] if journal else ["-O", "^has_journal"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(img)], check=True)
    mnt.mkdir()
    if direct_io:
        dev = subprocess.run(
            ["losetup", "--direct-io=on", "--find", "--show", str(img)],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        try:
            subprocess.run(["mount", dev, str(mnt)], check=True)
        except BaseException:
            subprocess.run(["losetup", "-d", dev], check=False)
            raise
        # Detached by the kernel when unmounted, as ``mount -o loop`` arranges.
        subprocess.run(["losetup", "-d", dev], check=False)
    else:
        subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], check=True)
    mnt.chmod(0o755)
    return mnt


def mount_tmpfs(workdir: Path) -> Path:
    """A fresh tmpfs on WORKDIR/tmpfs (unmounted by :func:`umount_journal_fs`): an
    archive with no disk under it, which leaves what archiving costs in CPU alone
    (fsync is a no-op there)."""
    mnt = workdir / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2g,mode=0755", "tmpfs", str(mnt)],
                   check=True)  # fmt: skip
    return mnt


def mount_ram_journal_fs(workdir: Path) -> Path:
    """A fresh ext4 with a journal (mkfs.ext4's defaults) on the kernel's RAM block
    device ``/dev/zram0`` (reset, 4 GiB), mounted on WORKDIR/ramfs (unmounted, and the
    device reset, by :func:`umount_journal_fs`). The filesystem does all its work (inode
    and block allocation, journal commits, writeback) but the block device under it costs
    what a physical disk's driver does, a few microseconds an I/O, where the loop device
    of ``--fs journal`` writes each block again through this VM's own filesystem and
    virtual disk. A flush is a no-op on it, so it is no model of a disk's latency."""
    zram = Path("/sys/block/zram0")
    if not zram.exists():
        raise SystemExit("--fs journal-ram: no /dev/zram0 here")
    (zram / "reset").write_text("1")
    (zram / "disksize").write_text(str(4 << 30))
    subprocess.run(["mkfs.ext4", "-q", "-F", "/dev/zram0"], check=True)
    mnt = workdir / "ramfs"
    mnt.mkdir()
    subprocess.run(["mount", "/dev/zram0", str(mnt)], check=True)
    mnt.chmod(0o755)
    return mnt


def umount_journal_fs(mnt: Path) -> None:
    # A daemon just stopped may hold a file there for a moment longer: "target is busy".
    for _ in range(50):
        tried = subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        if tried.returncode == 0:
            break
        time.sleep(0.2)
    else:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    with contextlib.suppress(FileNotFoundError):
        (mnt.parent / f"{mnt.name}.img").unlink()
    if mnt.name == "ramfs":
        with contextlib.suppress(OSError):
            Path("/sys/block/zram0/reset").write_text("1")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=3000)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument(
        "--variants", default="base,base-body,archive,inline,both-zstd,nofsync,inline-nofsync"
    )
    ap.add_argument("--postfix", action="store_true", help="end to end through Postfix")
    ap.add_argument("--cpu-affinity", choices=("auto", "none"), default="auto",
                    help="[milterd] cpu_affinity of every variant")  # fmt: skip
    ap.add_argument("--fs", choices=("work", "journal", "journal-dio", "journal-ram", "tmpfs"),
                    default="work",
                    help="where the archives live (see above)")  # fmt: skip
    a = ap.parse_args()
    names = [v for v in a.variants.split(",") if v]
    if "base" not in names or any(v not in VARIANTS for v in names):
        ap.error(f"variants from {list(VARIANTS)}, base included")
    WORK.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="archive-bench-", dir=WORK))
    a.archive_root = None
    if a.fs in ("journal", "journal-dio"):
        a.archive_root = mount_journal_fs(workdir, direct_io=a.fs == "journal-dio")
    elif a.fs == "journal-ram":
        a.archive_root = mount_ram_journal_fs(workdir)
    elif a.fs == "tmpfs":
        a.archive_root = mount_tmpfs(workdir)
    msg = write_message(workdir / "msg.eml", 5000)
    pfb: Any = None
    if a.postfix:
        from postfix_bench import PostfixBench

        pfb = PostfixBench()
    rows: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    try:
        with OUT.open("a") as jf:
            for r in range(a.rounds):
                for n in names:
                    if pfb is not None:
                        res = run_variant_postfix(n, workdir, a, r, pfb)
                    else:
                        res = run_variant(n, workdir, msg, a, r)
                    res["stamp"] = stamp
                    rows[n].append(res)
                    jf.write(json.dumps(res, sort_keys=True) + "\n")
                    print(
                        f"round {r} {n}: {res['rate']} msg/s, "
                        f"{res['milter_cpu_ms_per_msg']} ms CPU/msg, archived {res['archived']}, "
                        f"machine busy before {res['busy_before']:.0f}%",
                        file=sys.stderr,
                    )
            if pfb is not None:
                report_postfix(names, rows, a, pfb, stamp, jf)
                return 0
            base_rate = median(x["rate"] for x in rows["base"])
            base_cpu = median(x["milter_cpu_ms_per_msg"] for x in rows["base"])
            print(f"## Archive cost ({stamp})\n")
            print(
                f"milter_load.py, 5 KB message, {a.count} messages x {a.rounds} rounds per "
                f"variant, {a.conns} connections, workers={a.workers}, unix socket, "
                f"{os.cpu_count()} CPUs; median round; {_where(a)}. Target: throughput ratio "
                ">= 0.85.\n"
            )
            print("| variant | msgs/s | ratio to base | milter CPU ms/msg | extra CPU ms/msg "
                  "| p50 ms | p99 ms | archived |")  # fmt: skip
            print("| --- | --- | --- | --- | --- | --- | --- | --- |")
            for n in names:
                rate = median(x["rate"] for x in rows[n])
                cpu = median(x["milter_cpu_ms_per_msg"] for x in rows[n])
                p50 = median(x["p50_ms"] for x in rows[n])
                p99 = median(x["p99_ms"] for x in rows[n])
                archived = [x["archived"] for x in rows[n]]
                summary = {
                    "summary": True, "stamp": stamp, "variant": n, "rate": rate,
                    "ratio": round(rate / base_rate, 3), "cpu_ms_per_msg": cpu,
                    "extra_cpu_ms_per_msg": round(cpu - base_cpu, 3), "p50_ms": p50,
                    "p99_ms": p99, "archived": archived, "count": a.count,
                    "rounds": a.rounds, "conns": a.conns, "workers": a.workers,
                }  # fmt: skip
                jf.write(json.dumps(summary, sort_keys=True) + "\n")
                print(
                    f"| {n} | {rate:.0f} | {rate / base_rate:.2f} | {cpu:.3f} | "
                    f"{cpu - base_cpu:+.3f} | {p50:.2f} | {p99:.2f} | "
                    f"{'/'.join(str(x) for x in archived) if archived[0] is not None else '-'} |"
                )
    finally:
        if a.archive_root is not None:
            umount_journal_fs(a.archive_root)
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
