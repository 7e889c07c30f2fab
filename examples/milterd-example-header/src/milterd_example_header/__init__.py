"""An example third-party milterd plugin: adds ``X-Milterd-Example`` to every message.

Enable it in milterd.toml::

    [plugins.example_header]
    header = "X-Milterd-Example"   # optional
    greeting = "hello from milterd"  # optional
    skip_authenticated = false     # optional
"""

from __future__ import annotations

from milterd import AddHeader, Context, PluginConfig, hookimpl


class ExampleHeaderConfig(PluginConfig):
    header: str = "X-Milterd-Example"
    greeting: str = "hello from milterd"
    skip_authenticated: bool = False


class ExampleHeader:
    """Adds one header at end of message. Reads nothing but the envelope."""

    # Only what we use is negotiated with the MTA.
    actions = frozenset({"add_header"})
    # Pure CPU work, bounded: no need for a thread hop.
    isolation = "inline"

    @hookimpl
    def config_schema(self) -> type[ExampleHeaderConfig]:
        return ExampleHeaderConfig

    @hookimpl
    def eom(self, ctx: Context) -> None:
        config: ExampleHeaderConfig = ctx.config
        if config.skip_authenticated and ctx.connection.authenticated:
            return None
        ctx.add_change(AddHeader(config.header, config.greeting))
        return None
