"""Tiny plugins the integration tests enable in a real daemon, configured per test."""

from __future__ import annotations

import os
import subprocess
import time
from typing import Any

from milterd import AddHeader, Context, EnvRcpt, PluginConfig, Reject, hookimpl
from milterd.hookspecs import STAGES


class MarkConfig(PluginConfig):
    header: str = "X-Test-Mark"
    value: str = "marked"
    fail_startup: bool = False  # startup raises: a config that validates but cannot start
    fail_worker_start: bool = False  # worker_start raises: every worker would refuse it
    startup_seconds: float = 0.0  # startup sleeps this long: a slow generation
    # worker_start opens two files in this directory, runs a subprocess, and raises if
    # either file changed meanwhile (a SIGCHLD handler writing to a reused descriptor)
    files_dir: str = ""


class Mark:
    """Adds one header at end of message; echoes the queue id and the client address."""

    actions = frozenset({"add_header"})
    isolation = "inline"

    @hookimpl
    def config_schema(self) -> type[MarkConfig]:
        return MarkConfig

    @hookimpl
    def startup(self, config: MarkConfig) -> None:
        if config.fail_startup:
            raise RuntimeError("t_mark told to fail at startup")
        time.sleep(config.startup_seconds)
        self.fail_worker_start = config.fail_worker_start
        self.files_dir = config.files_dir

    @hookimpl
    def worker_start(self) -> None:
        if self.fail_worker_start:
            raise RuntimeError("t_mark told to fail at worker_start")
        if self.files_dir:
            files = [open(f"{self.files_dir}/{n}-{os.getpid()}", "wb") for n in "ab"]  # noqa: SIM115
            for f in files:
                f.write(b"abc")
                f.flush()
            subprocess.run(["true"], check=True)
            time.sleep(0.2)  # the SIGCHLD handler runs
            for f in files:
                f.close()
                with open(f.name, "rb") as r:
                    if r.read() != b"abc":
                        raise RuntimeError(f"{f.name} changed behind the plugin's back")

    @hookimpl
    def eom(self, ctx: Context) -> None:
        qid = ctx.message.queue_id if ctx.message else ""
        client = ctx.connection.client.ip if ctx.connection.client else ""
        ctx.add_change(
            AddHeader(ctx.config.header, f"{ctx.config.value} qid={qid} client={client}")
        )

    @hookimpl
    def commands(self, subparsers: Any) -> None:
        p = subparsers.add_parser("t-mark-echo", help="test command contributed by a plugin")
        p.add_argument("word")
        p.set_defaults(fn=lambda args: print(f"echo {args.word} {args.config}") or 0)


class RejectRcptConfig(PluginConfig):
    prefix: str = "reject"


class RejectRcpt:
    """Rejects recipients whose local part starts with ``prefix``."""

    isolation = "inline"

    @hookimpl
    def config_schema(self) -> type[RejectRcptConfig]:
        return RejectRcptConfig

    @hookimpl
    def envrcpt(self, ctx: Context, event: EnvRcpt) -> Reject | None:
        if event.recipient.startswith(ctx.config.prefix):
            return Reject("550", "5.1.1", "Recipient refused by test plugin")
        return None


class RaiseConfig(PluginConfig):
    # What to raise: RuntimeError, or what is no Exception (SystemExit, as a plugin
    # calling sys.exit() raises; KeyboardInterrupt; GeneratorExit).
    exception: str = "RuntimeError"


class RaiseEverywhere:
    """Raises in every stage hook."""

    exception: type[BaseException] = RuntimeError

    @hookimpl
    def config_schema(self) -> type[RaiseConfig]:
        return RaiseConfig

    @hookimpl
    def startup(self, config: RaiseConfig) -> None:
        self.exception = {
            "RuntimeError": RuntimeError, "SystemExit": SystemExit,
            "KeyboardInterrupt": KeyboardInterrupt, "GeneratorExit": GeneratorExit,
        }[config.exception]  # fmt: skip


def _raiser(stage: str):  # type: ignore[no-untyped-def]
    def hook(self: RaiseEverywhere) -> None:
        raise self.exception(f"t_raise fails at {stage}")

    hook.__name__ = stage
    return hookimpl(hook)


for _stage in STAGES:
    setattr(RaiseEverywhere, _stage, _raiser(_stage))


class SleepConfig(PluginConfig):
    seconds: float = 30.0
    stage: str = "eom"


class Sleep:
    """Sleeps in eom (or envrcpt): a plugin hanging past its timeout; or in worker_start
    (``stage = "worker_start"``): a slow start of each generation."""

    @hookimpl
    def config_schema(self) -> type[SleepConfig]:
        return SleepConfig

    @hookimpl
    def startup(self, config: SleepConfig) -> None:
        self.config = config

    @hookimpl
    def worker_start(self) -> None:
        if self.config.stage == "worker_start":
            time.sleep(self.config.seconds)

    @hookimpl
    def envrcpt(self, ctx: Context) -> None:
        if ctx.config.stage == "envrcpt":
            time.sleep(ctx.config.seconds)

    @hookimpl
    def eom(self, ctx: Context) -> None:
        if ctx.config.stage == "eom":
            time.sleep(ctx.config.seconds)
