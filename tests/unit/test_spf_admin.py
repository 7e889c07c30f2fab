"""The ``spf`` plugin as a mail administrator carries a pyspf-milter / policyd-spf setup
over: test mode (``TestOnly = 0``), short plugin timeouts, what a temperror reveals to the
client, error messages about the policyd-spf.conf, and where a relative path points."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest
from milterd_plugins.authres import AuthenticationResults
from milterd_plugins.spf import SPFPlugin

from milterd import ConfigError, DNSTempError, Result, TempFail, load_config
from milterd.config import DnsSettings
from milterd.dns import StubResolver
from milterd.testing import FakeResolver, Harness
from tests.support.dnsserver import ZoneServer

MSG = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
ZONES: dict[str, dict[str, Any]] = {
    "example.org": {"TXT": ["v=spf1 ip4:192.0.2.1 -all"]},
    "soft.example.org": {"TXT": ["v=spf1 ip4:192.0.2.1 ~all"]},
    "broken.example.org": {"TXT": ["v=spf1 ip4:192.0.2.300 -all"]},
    "badhelo.example.org": {"TXT": ["v=spf1 -all"]},
    "slow.example.org": {"TXT": "TIMEOUT"},
}
#: What dnspython says about a SERVFAIL from milterd's resolver (milterd.dns wraps it).
SERVFAIL = (
    "temp.example/TXT: All nameservers failed to answer the query temp.example. IN TXT: "
    "Server Do53:127.0.0.1@20053 answered SERVFAIL"
)


@pytest.fixture(autouse=True)
def _milterd_log(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``milterd`` logger as the tests need it, whatever an earlier test (a CLI run
    through milterd.logs.setup) left: INFO, propagating to caplog, no stale handler."""
    logger = logging.getLogger("milterd")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "handlers", [])
    caplog.set_level(logging.INFO, logger="milterd")


def mfrom(out: Any) -> Result:
    (r,) = [r for r in out.results if r.prop("smtp.mailfrom") is not None]
    return r  # type: ignore[no-any-return]


def harness(config: dict[str, Any], **kw: Any) -> Harness:
    section = {"skip_addresses": [], **config}
    return Harness({"spf": section}, plugins={"spf": SPFPlugin}, **{"zones": ZONES, **kw})


def policyd(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policyd-spf.conf"
    path.write_text(text)
    return str(path)


# --- 1. TestOnly = 0: test mode ------------------------------------------------------------


LIVE = (
    "HELO_reject = Fail\nMail_From_reject = Softfail\nPermError_reject = True\n"
    "TempError_Defer = True\nHeader_Type = SPF\n"
)


@pytest.mark.parametrize(
    ("sender", "helo", "word"),
    [
        ("a@example.org", "", "fail"),  # reject
        ("a@soft.example.org", "", "softfail"),  # reject (Softfail)
        ("a@broken.example.org", "", "permerror"),  # reject (PermError_reject)
        ("a@slow.example.org", "", "temperror"),  # defer (TempError_Defer)
        ("", "badhelo.example.org", "fail"),  # HELO reject
    ],
)
def test_testonly_0_records_and_adds_headers_but_never_rejects_or_defers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, sender: str, helo: str, word: str
) -> None:
    conf = policyd(tmp_path, "TestOnly = 0\n" + LIVE)
    with caplog.at_level(logging.INFO), harness({"policyd_spf_conf": conf}) as h:
        out = h.send(MSG, sender=sender, client_ip="192.0.2.2", helo=helo)
    assert out.verdict == "continue" and not out.errors, out.early
    assert mfrom(out).result == word
    received = out.header("Received-SPF")
    assert received is not None and received.startswith(word + " ")
    assert "spf: test mode: would " in caplog.text


def test_testonly_1_is_live(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "TestOnly = 1\n" + LIVE)
    with harness({"policyd_spf_conf": conf}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "reject"
        assert h.send(MSG, sender="a@slow.example.org", client_ip="192.0.2.2").verdict == (
            "tempfail"
        )


def test_test_mode_is_warned_about_at_startup(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    conf = policyd(tmp_path, "TestOnly = 0\n")
    with caplog.at_level(logging.INFO), harness({"policyd_spf_conf": conf}):
        pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("TEST MODE (TestOnly = 0)" in m for m in warnings), caplog.text
    assert "TestOnly is a policy-daemon setting, ignored" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO), harness({}):
        pass
    assert "TEST MODE" not in caplog.text


def test_native_test_mode_key_and_its_precedence(tmp_path: Path) -> None:
    with harness({"test_mode": True}) as h:
        out = h.send(MSG, client_ip="192.0.2.2")
    assert out.verdict == "continue" and mfrom(out).result == "fail"
    # test_mode, when given, wins over the file's TestOnly (both ways).
    conf = policyd(tmp_path, "TestOnly = 0\n")
    with harness({"policyd_spf_conf": conf, "test_mode": False}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "reject"
    conf = policyd(tmp_path, "TestOnly = 1\n")
    with harness({"policyd_spf_conf": conf, "test_mode": True}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "continue"
    # TestOnly straight in [plugins.spf], and the old name defaultSeedOnly.
    with harness({"TestOnly": 0}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "continue"
    with harness({"defaultSeedOnly": 0}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "continue"
    with harness({"defaultSeedOnly": 0, "TestOnly": 1}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "reject"


def test_test_mode_refuses_no_recipient_with_decide_at_envrcpt() -> None:
    with harness({"TestOnly": 0, "decide_at": "envrcpt"}) as h:
        out = h.send(MSG, client_ip="192.0.2.2", recipients=["bob@example.com"])
    assert out.verdict == "continue" and not out.refused
    assert mfrom(out).result == "fail"


# --- 2. a plugin timeout at or below deadline_margin ---------------------------------------


@pytest.mark.parametrize("timeout", [0.5, 0.3])
def test_timeout_at_or_below_the_margin_still_checks(timeout: float) -> None:
    with harness({"timeout": timeout}) as h:
        ok = h.send(MSG, client_ip="192.0.2.1")
        bad = h.send(MSG, client_ip="192.0.2.2")
    assert mfrom(ok).result == "pass" and ok.verdict == "continue"
    assert mfrom(bad).result == "fail" and bad.verdict == "reject"


class Slow(FakeResolver):
    """Every lookup uses all the time it is given, then fails; the timeouts are kept."""

    def __init__(self) -> None:
        super().__init__()
        self.timeouts: list[float] = []

    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        assert timeout is not None
        self.timeouts.append(timeout)
        time.sleep(max(0.0, timeout))
        raise DNSTempError(f"{name}/{rdtype}: timeout")


def test_short_timeout_still_ends_before_the_deadline() -> None:
    slow = Slow()
    with harness({"timeout": 0.4}, resolver=slow) as h:
        out = h.send(MSG, client_ip="192.0.2.2")
    assert not out.errors, out.errors  # no overrun of the 0.4 s hook deadline
    assert mfrom(out).result == "temperror"
    assert slow.timeouts and 0.2 < slow.timeouts[0] <= 0.3  # 3/4 of 0.4 s


def test_the_margin_is_kept_with_the_default_timeout() -> None:
    slow = Slow()
    with harness({"timeout": 2, "deadline_margin": 0.5}, resolver=slow) as h:
        out = h.send(MSG, client_ip="192.0.2.2")
    assert not out.errors and mfrom(out).result == "temperror"
    assert 1.3 < slow.timeouts[0] <= 1.5


def test_negative_margin_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"deadline_margin: Input should be greater"):
        harness({"deadline_margin": -1})


def test_a_margin_beyond_half_the_stage_time_is_warned_about(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING), harness({"deadline_margin": 5}):
        pass
    assert "deadline_margin 5s is more than half of [milterd] command_timeout" in caplog.text


# --- 3. a temperror reveals no resolver --------------------------------------------------------


class ServFail(FakeResolver):
    def lookup(self, name: str, rdtype: str, timeout: float | None = None) -> list[str]:
        if name.rstrip(".").lower().endswith("temp.example"):
            self.queries.append((name, rdtype))
            raise DNSTempError(SERVFAIL)
        return super().lookup(name, rdtype, timeout)


def test_deferral_text_names_the_domain_not_the_resolver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = {"TempError_Defer": True, "HELO_reject": "Fail"}
    with caplog.at_level(logging.INFO), harness(cfg, resolver=ServFail(ZONES)) as h:
        out = h.send(MSG, sender="a@temp.example", client_ip="192.0.2.2", helo="")
        helo = h.send(MSG, sender="", client_ip="192.0.2.2", helo="mx.temp.example")
    assert isinstance(out.early, TempFail) and isinstance(helo.early, TempFail)
    assert (out.early.code, out.early.xcode) == ("451", "4.7.24")
    assert out.early.text == (
        "Message deferred due to: SPF temporary error: DNS lookup for temp.example failed"
    )
    assert "DNS lookup for mx.temp.example failed" in helo.early.text
    for text in (out.early.text, helo.early.text):
        assert "127.0.0.1" not in text and "SERVFAIL" not in text and "Do53" not in text
    # The detail is in the log, for the administrator.
    assert "spf: temperror for temp.example: " in caplog.text
    assert "127.0.0.1@20053 answered SERVFAIL" in caplog.text


def test_headers_of_a_temperror_name_no_resolver() -> None:
    cfg = {"spf": {"skip_addresses": [], "Header_Type": "SPF,AR"}, "authres": {}}
    with Harness(
        cfg,
        plugins={"spf": SPFPlugin, "authres": AuthenticationResults},
        resolver=ServFail(ZONES),
    ) as h:
        out = h.send(MSG, sender="a@temp.example", client_ip="192.0.2.2")
    assert out.verdict == "continue"
    ar, rspf = out.header("Authentication-Results"), out.header("Received-SPF")
    assert ar is not None and rspf is not None
    ar, rspf = ar.replace("\r\n", ""), rspf.replace("\r\n", "")  # unfolded
    assert "spf=temperror" in ar and rspf.startswith("temperror ")
    assert "DNS lookup for temp.example failed" in rspf
    for value in (ar, rspf):
        assert "127.0.0.1" not in value and "SERVFAIL" not in value and "Do53" not in value


def test_a_real_servfail_reveals_no_resolver(caplog: pytest.LogCaptureFixture) -> None:
    """Through milterd's StubResolver and a real DNS server on loopback answering SERVFAIL
    (dnspython's own error text, with the server's address and port)."""
    with ZoneServer({}, servfail=["temp.example"]) as server:
        settings = DnsSettings(nameservers=[f"127.0.0.1:{server.port}"], timeout=1)
        cfg = {"TempError_Defer": True, "Header_Type": "SPF"}
        with harness(cfg, resolver=StubResolver(settings)) as h:
            out = h.send(MSG, sender="a@temp.example", client_ip="192.0.2.2")
    assert isinstance(out.early, TempFail) and out.early.xcode == "4.7.24"
    assert out.early.text.endswith("SPF temporary error: DNS lookup for temp.example failed")
    assert str(server.port) not in out.early.text and "127.0.0.1" not in out.early.text
    assert f"127.0.0.1@{server.port}" in caplog.text  # the detail: in the log only


# --- 4. policyd-spf.conf errors name the file, the line and the option ------------------------


def test_unknown_option_names_file_line_and_option(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "# carried over\nHELO_reject = Fail\nBogus_Option = 1\n")
    with pytest.raises(ConfigError) as err:
        harness({"policyd_spf_conf": conf})
    msg = str(err.value)
    assert f"{conf}:3: Bogus_Option: unknown option (" in msg
    assert "known: " in msg and "Mail_From_reject" in msg
    assert "\n" not in msg and "pydantic" not in msg and "https://" not in msg
    assert "ValidationError" not in msg


def test_misspelt_option_gets_a_suggestion(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "Mail_From_Reject = Fail\n")
    with pytest.raises(ConfigError, match=r"did you mean Mail_From_reject\?"):
        harness({"policyd_spf_conf": conf})


def test_bad_value_names_file_line_and_option(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "HELO_reject = Fail\n\nMail_From_reject = Sometimes\n")
    with pytest.raises(ConfigError) as err:
        harness({"policyd_spf_conf": conf})
    msg = str(err.value)
    assert f"{conf}:3: Mail_From_reject: Input should be " in msg and "'Sometimes'" in msg
    assert "\n" not in msg and "https://" not in msg


def test_missing_file_is_one_line(tmp_path: Path) -> None:
    conf = str(tmp_path / "nope" / "policyd-spf.conf")
    with pytest.raises(ConfigError) as err:
        harness({"policyd_spf_conf": conf})
    msg = str(err.value)
    assert msg.endswith(f"{conf}: cannot read: No such file or directory")
    assert "Errno" not in msg and "FileNotFoundError" not in msg


def test_line_without_equals_sign(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "HELO_reject = Fail\nMail_From_reject Fail\n")
    with pytest.raises(ConfigError, match=rf"{conf}:2: expected 'Name = value'"):
        harness({"policyd_spf_conf": conf})


def test_milterd_keys_belong_in_the_toml(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "decide_at = envrcpt\n")
    with pytest.raises(ConfigError, match=rf"{conf}:1: decide_at: a milterd key"):
        harness({"policyd_spf_conf": conf})


def test_toml_value_overrides_a_bad_file_value(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "Mail_From_reject = Sometimes\n")
    with harness({"policyd_spf_conf": conf, "Mail_From_reject": "False"}) as h:
        assert h.send(MSG, client_ip="192.0.2.2").verdict == "continue"


# --- 5. a relative policyd_spf_conf is next to the config file -------------------------------


def test_relative_policyd_spf_conf_is_taken_from_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc" / "milterd"
    etc.mkdir(parents=True)
    (etc / "policyd-spf.conf").write_text("Mail_From_reject = Softfail\nTestOnly = 1\n")
    toml = etc / "milterd.toml"
    toml.write_text(
        '[milterd]\nauthserv_id = "mx.test.example"\n\n'
        '[plugins.spf]\npolicyd_spf_conf = "policyd-spf.conf"\nskip_addresses = []\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the daemon's working directory is / under systemd
    plugin = SPFPlugin()
    with Harness(load_config(toml), plugins={"spf": plugin}, zones=ZONES) as h:
        out = h.send(MSG, sender="a@soft.example.org", client_ip="192.0.2.2")
    assert plugin.conf is not None
    assert plugin.conf.policyd_spf_conf == str(etc / "policyd-spf.conf")
    assert out.verdict == "reject" and mfrom(out).result == "softfail"  # the file's policy


def test_absolute_policyd_spf_conf_is_kept(tmp_path: Path) -> None:
    conf = policyd(tmp_path, "Mail_From_reject = Softfail\n")
    plugin = SPFPlugin()
    with Harness(
        {"spf": {"policyd_spf_conf": conf, "skip_addresses": []}},
        plugins={"spf": plugin},
        zones=ZONES,
    ) as h:
        out = h.send(MSG, sender="a@soft.example.org", client_ip="192.0.2.2")
    assert plugin.conf is not None and plugin.conf.policyd_spf_conf == conf
    assert out.verdict == "reject"
