"""Plugins that write down in which process each lifecycle hook ran (issue 8: start-up work
once before the fork, per-process state after it)."""

from __future__ import annotations

import os

from milterd import PluginConfig, hookimpl


class LifecycleConfig(PluginConfig):
    path: str  # a file each hook appends "<plugin> <hook> <pid>" to


class _Recorder:
    name = "?"

    @hookimpl
    def config_schema(self) -> type[LifecycleConfig]:
        return LifecycleConfig

    def _note(self, config: LifecycleConfig, hook: str) -> None:
        with open(config.path, "a") as f:  # O_APPEND: one short write per line, no mixing
            f.write(f"{self.name} {hook} {os.getpid()}\n")

    @hookimpl
    def startup(self, config: LifecycleConfig) -> None:
        self.config = config
        self._note(config, "startup")

    @hookimpl
    def worker_start(self) -> None:
        self._note(self.config, "worker_start")


class PreforkRecorder(_Recorder):
    """``prefork = True``: startup once in the supervisor."""

    name = "prefork"
    prefork = True


class WorkerRecorder(_Recorder):
    """The default (``prefork = False``): startup in every worker."""

    name = "worker"
