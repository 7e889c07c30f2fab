"""Private keys for tests: written as PEM (PKCS#8), with the mode milterd's key checks want."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization


def write_key(path: Path, key: Any, mode: int = 0o600) -> Path:
    """Write ``key`` (an RSA or Ed25519 private key object) to ``path``; returns ``path``."""
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    path.write_bytes(pem)
    path.chmod(mode)
    return path
