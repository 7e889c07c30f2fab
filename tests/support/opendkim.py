"""OpenDKIM as an independent DKIM verifier for tests (``opendkim -t``, no DNS)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"


def opendkim_verify(records: Mapping[str, str], data: bytes, workdir: Path) -> str:
    """OpenDKIM's test-mode output for ``data``, keys from ``records`` (TXT name -> value)
    given as TestPublicKeys. ``workdir`` must not sit under a world-writable directory:
    OpenDKIM refuses its config file there."""
    work = Path(tempfile.mkdtemp(prefix="odk-", dir=workdir))
    try:
        keys = work / "keys.txt"
        keys.write_text("".join(f"{k} {v}\n" for k, v in records.items() if "_domainkey" in k))
        conf = work / "opendkim.conf"
        conf.write_text(f"Mode v\nTestPublicKeys {keys}\nSyslog no\nMinimumKeyBits 1024\n")
        eml = work / "msg.eml"
        eml.write_bytes(data)
        r = subprocess.run(
            [OPENDKIM, "-x", str(conf), "-t", str(eml)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return r.stdout + r.stderr
    finally:
        shutil.rmtree(work, ignore_errors=True)
