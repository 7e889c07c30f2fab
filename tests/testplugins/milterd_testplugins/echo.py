"""``t_echo``: echoes what milterd knows about the SMTP session into one header.

``X-Test-Echo: auth=USER type=MECH client=IP family=FAMILY addr=RAW daemon=NAME qid=QID``:
the SASL login (``ctx.connection.auth_user``, from ``{auth_authen}``), ``{auth_type}``, the
client address and family as parsed by the core, the raw ``{client_addr}`` macro as the MTA
sent it, ``{daemon_name}`` and the queue id.
Empty values stay empty (``auth=``), so a test can tell "not sent" from "sent".
"""

from __future__ import annotations

from milterd import AddHeader, Context, PluginConfig, hookimpl


class EchoConfig(PluginConfig):
    header: str = "X-Test-Echo"


class Echo:
    actions = frozenset({"add_header"})
    isolation = "inline"

    @hookimpl
    def config_schema(self) -> type[EchoConfig]:
        return EchoConfig

    @hookimpl
    def eom(self, ctx: Context) -> None:
        conn = ctx.connection
        client = conn.client
        fields = {
            "auth": conn.auth_user,
            "type": conn.macros.get("{auth_type}", ""),
            "client": client.ip if client else "",
            "family": client.family if client else "",
            "addr": conn.macros.get("{client_addr}", ""),
            "daemon": conn.macros.get("{daemon_name}", ""),
            "qid": ctx.message.queue_id if ctx.message else "",
        }
        ctx.add_change(
            AddHeader(ctx.config.header, " ".join(f"{k}={v}" for k, v in fields.items()))
        )
