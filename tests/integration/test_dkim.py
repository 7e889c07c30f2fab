"""DKIM and ARC end to end: SMTP client -> private Postfix or sendmail -> milterd (dkim,
authres, arc, t_mark) -> sink, with keys published by the test DNS server on loopback.

Cross-checks with independent implementations:

* what milterd signs is verified at the sink by dkimpy AND by OpenDKIM (``opendkim -t`` in
  test mode, keys from ``TestPublicKeys``; each signature checked on its own, because
  OpenDKIM's test mode reports only the first one);
* mail signed by OpenDKIM (``opendkim-testmsg``, the OpenDKIM library) is verified by
  milterd as ``dkim=pass`` in the Authentication-Results at the sink;
* ARC seals added by milterd verify with dkimpy's ``arc_verify``.

Every test runs through both MTAs (:func:`tests.integration.mta.make_mta`): one MTA, one
daemon (unix socket), one DNS server and one key set per MTA for the module.
``internal_networks`` is empty and ``sign_local`` off, so that unauthenticated loopback
SMTP is an *untrusted* (verified) client on both MTAs (sendmail has no XCLIENT to pose as
a remote address); SMTP AUTH is the trusted (signed) path, and local submission with
``sign_local`` on (:meth:`Rig.submit_locally`).
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from milterd_plugins.dkim.keys import public_txt

from tests.integration.daemon import Daemon
from tests.integration.mta import KINDS, MTA, Kind, make_mta, postfix_socket
from tests.support.dnsserver import ZoneServer
from tests.support.milterclient import MilterClient, Transcript
from tests.support.opendkim import OPENDKIM
from tests.support.opendkim import opendkim_verify as support_opendkim_verify
from tests.support.postfix import PrivatePostfix
from tests.support.sink import SinkMessage, SmtpSink
from tests.support.smtp import send

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TESTMSG = shutil.which("opendkim-testmsg") or "/usr/sbin/opendkim-testmsg"


@dataclass
class Rig:
    kind: Kind
    daemon: Daemon
    mta: MTA
    sink: SmtpSink
    keydir: Path
    records: dict[str, str]  # "sel._domainkey.dom" -> TXT
    body: str  # the daemon's config after [milterd]/[dns]

    def deliver(
        self, data: bytes, sender: str = "alice@example.com", auth: bool = False
    ) -> SinkMessage:
        """Send ``data`` (tagged with a fresh X-Case) through the MTA; return it as delivered.

        ``auth``: as alice with SMTP AUTH (trusted: signed); otherwise as an unauthenticated
        client on loopback, untrusted here (verified).
        """
        token = uuid.uuid4().hex
        data = data.replace(b"\r\n\r\n", f"\r\nX-Case: {token}\r\n\r\n".encode(), 1)
        r = send(
            "127.0.0.1",
            self.mta.smtp_port,
            sender,
            ["bob@example.net"],
            data,
            helo="mail.example.org",
            auth=("alice", "pw") if auth else None,
        )
        assert r.ok, (r.code, r.text, self.daemon.log_text()[-2000:])
        return self.wait(token)

    def submit_locally(self, sender: str, data: bytes) -> None:
        """Local submission the way each MTA's own sendmail(1) does it.

        Postfix: the command hands the message to pickup, and ``non_smtpd_milters`` shows it
        to milterd without a client address. sendmail: the command is a mail submission
        program that relays over SMTP to the MTA on loopback, so the MTA's milter sees an
        unauthenticated SMTP session from 127.0.0.1, which is what is sent here (the private
        sendmail has no MSP configuration of its own).
        """
        if isinstance(self.mta, PrivatePostfix):
            self.mta.sendmail(sender, ["bob@example.net"], data)
            return
        r = send("127.0.0.1", self.mta.smtp_port, sender, ["bob@example.net"], data, "localhost")
        assert r.ok, (r.code, r.text, self.daemon.log_text()[-2000:])

    def reconfigure(self, body: str, expect: str = "reloaded") -> int:
        """Write ``body`` as the daemon's plugin configuration and SIGHUP it; wait for the
        ``expect`` log line. Returns the log offset before the reload."""
        self.daemon.write(body)
        mark = len(self.daemon.log_text())
        self.daemon.signal(signal.SIGHUP)
        self.daemon.wait_log(expect, after=mark)
        return mark

    def wait(self, token: str, timeout: float = 20) -> SinkMessage:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for m in self.sink.messages:
                if token.encode() in m.data.split(b"\r\n\r\n", 1)[0]:
                    return m
            time.sleep(0.05)
        raise TimeoutError(f"message {token} not delivered:\n{self.mta.log_tail()}")

    def dnsfunc(self, name: bytes, timeout: int = 5) -> bytes | None:
        v = self.records.get(name.decode().rstrip("."))
        return v.encode() if v else None


def write_key(path: Path, key: Any) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL
            if isinstance(key, rsa.RSAPrivateKey)
            else serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)
    return path


class OpenDKIMMilter:
    """OpenDKIM (Debian's ``opendkim``) as a milter on a unix socket, in its own
    root-owned, non-world-writable directory (OpenDKIM refuses others; run as root, it
    wants the key owned by root, mode 0600). ``mode`` "s": signs
    everything (InternalHosts 0.0.0.0/0) for ``domain`` with ``selector``/``key``;
    "v": verifies with keys from ``TestPublicKeys`` (no DNS)."""

    def __init__(
        self,
        mode: str,
        *,
        key: Path | None = None,
        domain: str = "",
        selector: str = "",
        records: dict[str, str] | None = None,
        parent: str = "/var/lib",
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="milterd-odk-", dir=parent))
        self.dir.chmod(0o755)
        self.socket_path = self.dir / "odk.sock"
        self.socket = f"unix:{self.socket_path}"
        lines = [
            f"Mode {mode}",
            f"Socket local:{self.socket_path}",
            "UMask 000",
            "Background no",
            "Syslog no",
            "Canonicalization relaxed/relaxed",
            "SignatureAlgorithm rsa-sha256",
            "MinimumKeyBits 1024",
            "AlwaysAddARHeader yes",
            "AuthservID odk.test",
        ]
        if mode == "s":
            assert key is not None
            k = self.dir / "sign.key"
            shutil.copyfile(key, k)
            k.chmod(0o600)
            lines += [f"Domain {domain}", f"Selector {selector}", f"KeyFile {k}"]
            lines += ["InternalHosts 0.0.0.0/0", "OversignHeaders From"]
        if records:
            keys = self.dir / "keys.txt"
            keys.write_text("".join(f"{n} {v}\n" for n, v in records.items()))
            lines.append(f"TestPublicKeys {keys}")
        self.conf = self.dir / "opendkim.conf"
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OpenDKIMMilter:
        self.proc = subprocess.Popen(
            [OPENDKIM, "-f", "-x", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                err = self.proc.stderr.read() if self.proc.stderr else b""
                self.__exit__()
                raise RuntimeError(f"opendkim did not start: {err!r}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def sign(self, data: bytes) -> bytes:
        """The message with OpenDKIM's DKIM-Signature on top (over the milter protocol)."""
        head, body = data.split(b"\r\n\r\n", 1)
        fields = re.split(rb"\r\n(?![ \t])", head)
        headers = [(f.split(b":", 1)[0].decode(), f.split(b":", 1)[1].lstrip(b" ")) for f in fields]
        with MilterClient(self.socket) as c:
            c.negotiate()
            t = Transcript()
            c.connect(t, hostname="localhost", ip="127.0.0.1")
            c.message("alice@example.org", ["bob@example.net"], headers, body, t=t)
        sigs = [m[1] for m in t.mods if m[0] in ("addheader", "insheader")]
        found = [a for a in sigs if any(x == "DKIM-Signature" for x in a)]
        assert found, t.mods
        args = found[0]
        value = next(x for x in args if isinstance(x, str) and x.lstrip().startswith("v="))
        value = value.replace("\r\n", "\n").replace("\n", "\r\n").lstrip(" ")
        return b"DKIM-Signature: " + value.encode() + b"\r\n" + data


@pytest.fixture(scope="module", params=KINDS)
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    kind: Kind = request.param
    # root-owned, not world-writable: milterd's key checks and OpenDKIM's both accept it
    keydir = Path(tempfile.mkdtemp(prefix="milterd-dkim-it-", dir="/var/lib"))
    keydir.chmod(0o755)
    keys = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "odk": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "arc": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    }
    paths = {n: write_key(keydir / f"{n}.key", k) for n, k in keys.items()}
    records = {
        "r2026._domainkey.example.com": public_txt(keys["rsa"]),
        "e2026._domainkey.example.com": public_txt(keys["ed"]),
        "r2026._domainkey.dual.example.com": public_txt(keys["rsa"]),
        "e2026._domainkey.dual.example.com": public_txt(keys["ed"]),
        "r2026._domainkey.ed.example.com": public_txt(keys["rsa"]),
        "e2026._domainkey.ed.example.com": public_txt(keys["ed"]),
        "odk._domainkey.example.org": public_txt(keys["odk"]),
        "arc._domainkey.mx.example.net": public_txt(keys["arc"]),
    }
    body = f"""
[plugins.t_mark]
[plugins.dkim]
sign_local = false
headers = ["from", "to", "cc", "subject", "date", "message-id", "x-test-mark", "x-case",
           "mime-version", "content-type"]
[plugins.dkim.keys.rsa]
selector = "r2026"
file = "{paths["rsa"]}"
[plugins.dkim.keys.ed]
selector = "e2026"
file = "{paths["ed"]}"
[[plugins.dkim.signing]]
pattern = "dual.example.com"
keys = ["rsa", "ed"]
[[plugins.dkim.signing]]
pattern = "ed.example.com"
keys = ["ed"]
[[plugins.dkim.signing]]
pattern = "example.com"
keys = ["rsa"]
[plugins.authres]
[plugins.arc]
selector = "arc"
domain = "mx.example.net"
key_file = "{paths["arc"]}"
"""
    try:
        with ZoneServer({k: {"TXT": [v]} for k, v in records.items()}) as zs:
            dns_cfg = f'internal_networks = []\n\n[dns]\nnameservers = ["127.0.0.1:{zs.port}"]\n'
            dns_cfg += "timeout = 2\n"
            with (
                Daemon(body, socket_kind="unix", milterd_extra=dns_cfg) as d,
                SmtpSink() as sink,
                make_mta(
                    kind,
                    sink_port=sink.port,
                    milter=d.socket,
                    sasl_users={"alice": "pw"},
                    postfix_options={"non_smtpd_milters": postfix_socket(d.socket)},
                ) as mta,
            ):
                yield Rig(kind, d, mta, sink, keydir, records, body)
    finally:
        shutil.rmtree(keydir, ignore_errors=True)


MSG = (
    "From: Alice <alice@{dom}>\r\n"
    "To: Bob <bob@example.net>\r\n"
    "Subject: quarterly figures\r\n"
    "Date: Sun, 22 Nov 2026 04:00:00 +0000\r\n"
    "Message-ID: <{mid}@{dom}>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=us-ascii\r\n"
    "\r\n"
    "Hello Bob,\r\n\r\nthe figures are attached in spirit.\r\n"
)


def msg(dom: str) -> bytes:
    return MSG.format(dom=dom, mid=uuid.uuid4().hex).encode()


def dkim_sigs(data: bytes) -> list[bytes]:
    return [v for n, v in dkim.DKIM(data).headers if n.lower() == b"dkim-signature"]


def only_signature(data: bytes, idx: int) -> bytes:
    """The message with only its idx-th DKIM-Signature (signatures don't cover each other)."""
    head, body = data.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    sigs = [i for i, f in enumerate(fields) if f.lower().startswith(b"dkim-signature:")]
    keep = [f for i, f in enumerate(fields) if i not in sigs or i == sigs[idx]]
    return b"\r\n".join(keep) + b"\r\n\r\n" + body


def opendkim_verify(rig: Rig, data: bytes) -> str:
    """OpenDKIM's verdict on the top signature: its test-mode output line."""
    return support_opendkim_verify(rig.records, data, rig.keydir)


def assert_both_verify(rig: Rig, data: bytes, algs: list[str]) -> None:
    sigs = dkim_sigs(data)
    got = sorted(
        re.search(rb"a=([\w-]+)", s).group(1).decode()  # type: ignore[union-attr]
        for s in sigs
    )
    assert got == sorted(algs)
    for i in range(len(sigs)):
        single = only_signature(data, i)
        assert dkim.verify(single, dnsfunc=rig.dnsfunc), f"dkimpy: signature {i}"
        out = opendkim_verify(rig, single)
        assert "verification" in out and "succeeded" in out, out


def ar_dkim(m: SinkMessage) -> list[str]:
    ars = [v for v in m.header("Authentication-Results") if v.startswith("mx.test")]
    assert len(ars) == 1, m.header("Authentication-Results")
    return re.findall(r"dkim=(\w+)", ars[0])


# --- milterd signs, others verify ------------------------------------------------------------


@pytest.mark.parametrize(
    ("dom", "algs"),
    [
        ("example.com", ["rsa-sha256"]),
        ("ed.example.com", ["ed25519-sha256"]),
        ("dual.example.com", ["rsa-sha256", "ed25519-sha256"]),
    ],
)
def test_signed_mail_verifies_with_dkimpy_and_opendkim(rig: Rig, dom: str, algs: list[str]) -> None:
    m = rig.deliver(msg(dom), sender=f"alice@{dom}", auth=True)
    assert_both_verify(rig, m.data, algs)
    # the t_mark plugin's header was added before signing and is covered
    assert m.header("X-Test-Mark")
    for s in dkim_sigs(m.data):
        assert b"x-test-mark" in re.sub(rb"\s", b"", s)
    # trusted mail: no verification, no A-R
    assert not [v for v in m.header("Authentication-Results") if v.startswith("mx.test")]


def test_local_submission_is_signed(rig: Rig) -> None:
    # sign_local (the plugin's default; off in this module's configuration) for this test
    rig.reconfigure(rig.body.replace("sign_local = false", "sign_local = true"))
    try:
        token = uuid.uuid4().hex
        data = msg("example.com").replace(b"\r\n\r\n", f"\r\nX-Case: {token}\r\n\r\n".encode(), 1)
        rig.submit_locally("alice@example.com", data)
        m = rig.wait(token)
    finally:
        rig.reconfigure(rig.body)
    assert_both_verify(rig, m.data, ["rsa-sha256"])


def test_changed_in_transit_fails_everywhere(rig: Rig) -> None:
    m = rig.deliver(msg("example.com"), auth=True)
    changed = m.data.replace(b"in spirit", b"in spirits")
    assert not dkim.verify(changed, dnsfunc=rig.dnsfunc)
    assert "failed" in opendkim_verify(rig, changed)
    # and milterd itself, receiving it from an untrusted client
    again = rig.deliver(strip_transport(changed), sender="x@example.org")
    assert ar_dkim(again) == ["fail"]


def strip_transport(data: bytes) -> bytes:
    """Drop Received, X-Case and our own A-R/ARC fields so the message can be resent."""
    head, body = data.split(b"\r\n\r\n", 1)
    fields = re.split(rb"\r\n(?![ \t])", head)
    drop = (b"received:", b"x-case:", b"arc-", b"authentication-results:", b"x-test-mark:")
    keep = [f for f in fields if not f.lower().startswith(drop)]
    return b"\r\n".join(keep) + b"\r\n\r\n" + body


# --- others sign, milterd verifies -----------------------------------------------------------


@pytest.fixture(scope="module")
def odk_signer(rig: Rig) -> Iterator[OpenDKIMMilter]:
    with OpenDKIMMilter("s", key=rig.keydir / "odk.key", domain="example.org", selector="odk") as m:
        yield m


def test_opendkim_signed_mail_passes_in_milterd(rig: Rig, odk_signer: OpenDKIMMilter) -> None:
    signed = odk_signer.sign(msg("example.org"))
    assert b"a=rsa-sha256" in signed
    m = rig.deliver(signed, sender="alice@example.org")
    assert ar_dkim(m) == ["pass"], m.data
    ar = next(v for v in m.header("Authentication-Results") if v.startswith("mx.test"))
    assert "header.d=example.org" in ar and "header.s=odk" in ar
    assert ar.endswith("arc=none")
    # milterd sealed it: the ARC chain verifies with dkimpy, cv=none at i=1
    assert "cv=none" in m.header("ARC-Seal")[0]
    cv, _, reason = dkim.arc_verify(m.data, dnsfunc=rig.dnsfunc)
    assert cv == dkim.CV_Pass, reason


def test_opendkim_signed_then_changed_fails(rig: Rig, odk_signer: OpenDKIMMilter) -> None:
    signed = odk_signer.sign(msg("example.org"))
    m = rig.deliver(signed.replace(b"quarterly figures", b"quarterly figurez"))
    assert ar_dkim(m) == ["fail"]
    m = rig.deliver(signed.replace(b"in spirit", b"in spirits"))
    assert ar_dkim(m) == ["fail"]


def test_opendkim_rsa_sha1_signature_does_not_pass(rig: Rig) -> None:
    """``opendkim-testmsg`` (the OpenDKIM library) still signs with rsa-sha1."""
    r = subprocess.run(
        [TESTMSG, "-C", "-d", "example.org", "-s", "odk", "-k", str(rig.keydir / "odk.key")],
        input=msg("example.org"),
        capture_output=True,
        timeout=30,
        check=True,
    )
    signed = r.stdout.replace(b"\r\r\n", b"\r\n")
    assert signed.startswith(b"DKIM-Signature:") and b"a=rsa-sha1" in signed
    assert dkim.verify(signed, dnsfunc=rig.dnsfunc)  # dkimpy alone would pass it
    m = rig.deliver(signed)
    assert ar_dkim(m) == ["fail"]


def test_length_tag_with_appended_text_does_not_pass(rig: Rig) -> None:
    base = msg("example.org")
    pem = (rig.keydir / "odk.key").read_bytes()
    sig = dkim.sign(
        base,
        b"odk",
        b"example.org",
        pem,
        include_headers=[b"from", b"to", b"subject"],
        length=True,
    )
    exact = rig.deliver(sig + base)
    assert ar_dkim(exact) == ["pass"]
    appended = rig.deliver(sig + base + b"\r\nClick here: http://spam.test/\r\n")
    assert ar_dkim(appended) == ["policy"]


def test_rsa_sha1_does_not_pass(rig: Rig) -> None:
    base = msg("example.org")
    sig = dkim.DKIM(base, signature_algorithm=b"rsa-sha1").sign(
        b"odk",
        b"example.org",
        (rig.keydir / "odk.key").read_bytes(),
        include_headers=[b"from", b"to", b"subject"],
    )
    assert dkim.verify(sig + base, dnsfunc=rig.dnsfunc)  # dkimpy alone would pass it
    m = rig.deliver(sig + base)
    assert ar_dkim(m) == ["fail"]


def test_unsigned_untrusted_mail_is_none(rig: Rig) -> None:
    m = rig.deliver(msg("example.org"))
    assert ar_dkim(m) == ["none"]
    assert not dkim_sigs(m.data)


# --- rotation (last: it changes the daemon's configuration) ---------------------------------


def test_reload_rotation_overlap_and_unsafe_key_refused(rig: Rig) -> None:
    new = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = write_key(rig.keydir / "rsa_new.key", new)
    rig.records["r2027._domainkey.example.com"] = public_txt(new)
    body = (
        rig.body.replace(
            '[[plugins.dkim.signing]]\npattern = "example.com"\nkeys = ["rsa"]',
            '[[plugins.dkim.signing]]\npattern = "example.com"\nkeys = ["rsa", "rsa_new"]',
        )
        + f'[plugins.dkim.keys.rsa_new]\nselector = "r2027"\nfile = "{path}"\n'
    )
    assert body != rig.body
    d = rig.daemon
    rig.reconfigure(body)
    m = rig.deliver(msg("example.com"), auth=True)
    sels = sorted(re.findall(rb"\bs=(r20\d\d);", b"".join(dkim_sigs(m.data))))
    assert sels == [b"r2026", b"r2027"]  # both selectors active during the overlap
    assert_both_verify(rig, m.data, ["rsa-sha256", "rsa-sha256"])

    # a new generation with an unsafe key is refused as a whole: the old one keeps signing
    path.chmod(0o644)
    new_only = body.replace('keys = ["rsa", "rsa_new"]', 'keys = ["rsa_new"]')
    mark = rig.reconfigure(new_only, expect="reload refused, old config kept")
    assert "rsa_new.key: mode 0644" in d.log_text()[mark:]
    m = rig.deliver(msg("example.com"), auth=True)
    sels = sorted(re.findall(rb"\bs=(r20\d\d);", b"".join(dkim_sigs(m.data))))
    assert sels == [b"r2026", b"r2027"]
