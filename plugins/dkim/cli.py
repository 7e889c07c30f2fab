"""``milterd dkim keygen``, ``milterd dkim testkey`` and ``milterd dkim import-opendkim``."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.util import parse_tag_value

from milterd import ConfigError, DNSTempError, NXDomain, load_config, make_resolver

from .keys import KeyFileError, check_key_directories, load_key, public_txt
from .verify import check_key_record

__all__ = ["add_commands", "dns_record", "import_opendkim", "keygen", "testkey"]


def add_commands(subparsers: Any) -> None:
    p = subparsers.add_parser("dkim", help="DKIM keys: generate, test against DNS")
    sub = p.add_subparsers(dest="dkim_command", required=True)
    g = sub.add_parser("keygen", help="write a private key (mode 0600), print its DNS record")
    g.add_argument("--domain", required=True)
    g.add_argument("--selector", required=True)
    g.add_argument("--type", choices=("rsa", "ed25519"), default="rsa")
    g.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    g.add_argument("--out", default=".", help="directory for the key file (default .)")
    g.set_defaults(fn=keygen)
    t = sub.add_parser("testkey", help="check DNS publishes every configured selector's key")
    t.add_argument("--timeout", type=float, default=None)
    t.set_defaults(fn=testkey)
    m = sub.add_parser(
        "import-opendkim",
        help="print a milterd.toml fragment converted from an opendkim.conf",
        description="Convert an opendkim.conf (and the KeyTable, SigningTable and other "
        "data set files it names) to a milterd.toml fragment on standard output; what has "
        "no equivalent is a comment there and a line on standard error. Exit 2 when a file "
        "cannot be read or is malformed.",
    )
    m.add_argument("file", nargs="?", default="/etc/opendkim.conf")
    m.set_defaults(fn=import_opendkim)


def dns_record(domain: str, selector: str, txt: str) -> str:
    """A zone-file line; the TXT value split into 255-byte strings."""
    parts = [txt[i : i + 255] for i in range(0, len(txt), 255)]
    quoted = " ".join(f'"{p}"' for p in parts)
    return f"{selector}._domainkey.{domain}. IN TXT ( {quoted} )"


def keygen(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from . import KeyEntry

    try:  # as the config will check them: a record and snippet it would refuse are no use
        entry = KeyEntry(selector=args.selector, file="-", domain=args.domain)
    except ValidationError as e:
        print(f"error: {e.errors()[0]['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    domain, selector = entry.domain or "", entry.selector
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if args.type == "rsa":
        if args.bits < 1024:
            print("error: RSA keys need at least 1024 bits (RFC 8301)", file=sys.stderr)
            return 2
        if args.bits > 8192:  # RFC 8301 verifiers need not go past 4096; larger ones take hours
            print("error: RSA keys of more than 8192 bits are not generated", file=sys.stderr)
            return 2
        key = rsa.generate_private_key(public_exponent=65537, key_size=args.bits)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    out = Path(args.out)
    path = out / f"{selector}.{domain}.{args.type}.key"
    try:  # a key start-up would refuse is no use: say so before writing anything
        # (resolved, as the snippet names it and start-up will find it)
        check_key_directories(str(out.resolve() / path.name))
    except KeyFileError as e:
        print(f"error: not writing the key: {e}", file=sys.stderr)
        return 2
    # Missing directories 0700 whatever the umask (their parents too): start-up refuses a
    # key in a directory others can write.
    missing = []
    d = out
    while not d.exists() and d != d.parent:
        missing.append(d)
        d = d.parent
    for d in reversed(missing):
        d.mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {path} exists; not overwriting a key", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(path, 0o600)  # whatever the umask
    algorithm = "rsa-sha256" if args.type == "rsa" else "ed25519-sha256"
    print(f"; private key written to {path} (mode 0600)")
    print(dns_record(domain, selector, public_txt(key)))
    # TOML: a dotted name is a nested table and a path may hold '"' or '\\': quoted
    # (a JSON string is a valid TOML basic string).
    table = selector if re.fullmatch(r"[A-Za-z0-9_-]+", selector) else json.dumps(selector)
    print(f"; config: [plugins.dkim.keys.{table}]")
    print(f";   selector = {json.dumps(selector)}\n;   file = {json.dumps(str(path.resolve()))}")
    print(f";   algorithm = {json.dumps(algorithm)}\n;   domain = {json.dumps(domain)}")
    return 0


def _pub(txt: str) -> tuple[str, str]:
    tags = {}
    for part in txt.split(";"):
        if "=" in part:
            k, v = part.split("=", 1)
            tags[k.strip()] = "".join(v.split())
    return tags.get("k", "rsa"), tags.get("p", "")


def _unusable(txt: str) -> str:
    """Why a verifier cannot use the key record ``txt`` ("" if it can): a record that
    does not parse as a tag list (dkimpy refuses it: a duplicate tag, a part without
    "="), or one RFC 6376 3.6.1 rules out (see check_key_record)."""
    raw = txt.encode("utf-8", "surrogateescape")
    try:
        parse_tag_value(raw)
    except Exception as e:
        return f"not a tag list ({type(e).__name__}: {e})"
    return check_key_record(raw)[2]


def testkey(args: argparse.Namespace) -> int:
    from . import DKIMConfig

    try:
        cfg = load_config(args.config)
        dk = cfg.plugin_model("dkim", DKIMConfig)
    except (ConfigError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not dk.keys:
        print(f"error: {args.config}: no keys in [plugins.dkim]: nothing to test", file=sys.stderr)
        return 1
    r = make_resolver(cfg, timeout=args.timeout)
    bad = 0
    for kname, entry in dk.keys.items():
        domains = {entry.domain} if entry.domain else set()
        for rule in dk.signing:
            if kname in rule.keys:
                if rule.domain:
                    domains.add(rule.domain)
                elif not entry.domain and not any(
                    c in rule.pattern.rsplit("@", 1)[-1] for c in "*?["
                ):  # a wildcard in the local part (*@example.com) still fixes the domain
                    domains.add(rule.pattern.rsplit("@", 1)[-1])
        try:
            key = load_key(entry.file, entry.algorithm, insecure=dk.insecure_keys)
        except KeyFileError as e:
            print(f"FAIL {kname}: {e}")
            bad += 1
            continue
        want_k, want_p = _pub(key.public_record())
        if not domains:
            print(f"SKIP {kname}: no fixed domain (wildcard rules only): nothing to look up")
            continue
        for domain in sorted(d.lower() for d in domains if d):
            name = f"{entry.selector}._domainkey.{domain}"
            try:
                recs = r.lookup(name, "TXT")
            except NXDomain:
                print(f"FAIL {kname}: {name}: no such name")
                bad += 1
                continue
            except DNSTempError as e:
                print(f"FAIL {kname}: {name}: lookup failed: {e}")
                bad += 1
                continue
            matching = [t for t in recs if _pub(t) == (want_k, want_p)]
            if not matching:
                print(f"FAIL {kname}: {name} publishes a different key")
                bad += 1
                continue
            # The key must also be usable, as a verifier reads it (v= first, s= with
            # email, h= with sha256): otherwise every signature with it fails.
            why = [_unusable(t) for t in matching]
            if all(why):
                print(f"FAIL {kname}: {name} publishes the matching key, unusable: {why[0]}")
                bad += 1
            else:
                print(f"OK   {kname}: {name} publishes the matching {key.algorithm} key")
    return 1 if bad else 0


def import_opendkim(args: argparse.Namespace) -> int:
    from .migrate import MigrateError, convert_file

    try:
        result = convert_file(args.file)
    except MigrateError as e:
        print(f"milterd dkim import-opendkim: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(result.toml)
    for line in result.notes:
        if "converted:" not in line or "not converted" in line:  # the rest is in the TOML
            print(f"note: {line}", file=sys.stderr)
    for line in result.warnings:
        print(f"warning: {line}", file=sys.stderr)
    return 0
