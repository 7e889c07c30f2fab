"""The configuration file: TOML, validated with pydantic, errors that name file/section/key.

The file has three kinds of section: ``[milterd]`` (the daemon), ``[dns]`` (the one
resolver), and ``[plugins.NAME]`` (one per plugin: the core keys below plus the plugin's
own keys, validated against the schema the plugin declares in ``config_schema``).
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket as _socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

__all__ = [
    "CORE_PLUGIN_KEYS",
    "Config",
    "ConfigError",
    "ConfigPath",
    "DnsSettings",
    "PluginConfig",
    "PluginSettings",
    "Settings",
    "load",
    "parse_socket",
]


class ConfigError(Exception):
    """A configuration problem. ``str()`` names the file, the section and the key."""


_M = TypeVar("_M", bound=BaseModel)


def _resolve_path(value: str, info: ValidationInfo) -> str:
    base = (info.context or {}).get("config_dir")
    if value and base and not os.path.isabs(value):
        return os.path.normpath(os.path.join(base, value))
    return value


#: A file or directory key: a relative path is taken relative to the directory of the
#: config file it is written in (not the working directory, which is ``/`` under
#: systemd), so ``config check`` run anywhere and the daemon agree. Plugin schemas use it
#: for their path keys: ``key_file: ConfigPath | None = None``.
ConfigPath = Annotated[str, AfterValidator(_resolve_path)]


def validation_context(path: str) -> dict[str, Any]:
    """The context config models are validated with: the config file's directory."""
    if path.startswith("<"):  # "<memory>": a dict or text with no file
        return {}
    return {"config_dir": os.path.dirname(os.path.abspath(path))}


class PluginConfig(BaseModel):
    """Base for plugin config schemas: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


_SOCKET_UNIX = re.compile(r"(?:unix|local):(/.+)")
_SOCKET_INET = re.compile(r"inet6?:(\d+)@(.+)")


def parse_socket(spec: str) -> tuple[str, str, int]:
    """Parse ``unix:/path``, ``inet:PORT@HOST``, ``inet6:PORT@HOST`` (HOST may be ``[::1]``).

    Returns (family, host-or-path, port). Raises ValueError with a readable message.
    """
    m = _SOCKET_UNIX.fullmatch(spec)
    if m:
        if len(os.fsencode(m.group(1))) > 107:  # sockaddr_un's sun_path: 108 bytes with NUL
            raise ValueError(f"unix socket path longer than 107 bytes: {m.group(1)!r}")
        return ("unix", m.group(1), 0)
    m = _SOCKET_INET.fullmatch(spec)
    if m:
        port = int(m.group(1))
        host = m.group(2).strip("[]")
        if not 0 < port < 65536:
            raise ValueError(f"port out of range in {spec!r}")
        family = "inet6" if spec.startswith("inet6:") or ":" in host else "inet"
        if family == "inet6" and spec.startswith("inet:"):  # libmilter cannot open that
            raise ValueError(f"an IPv6 address needs inet6:, not inet: ({spec!r})")
        return (family, host, port)
    raise ValueError(f"socket must be unix:/PATH, inet:PORT@HOST or inet6:PORT@HOST, got {spec!r}")


class Settings(BaseModel):
    """``[milterd]``: the daemon itself."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    socket: str = "unix:/run/milterd/milterd.sock"
    socket_mode: str = "0660"
    socket_group: str | None = None
    user: str | None = None
    group: str | None = None
    workers: int = Field(default=0, ge=0, le=64, description="0 = one per core")
    cpu_affinity: Literal["auto", "none"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    authserv_id: str = Field(default_factory=_socket.getfqdn)
    internal_networks: list[str] = ["127.0.0.0/8", "::1/128"]
    spool_memory: int = Field(default=1 << 20, ge=0, description="body bytes kept in memory")
    spool_dir: ConfigPath | None = None
    max_message_size: int = Field(default=50 << 20, gt=0)
    max_header_bytes: int = Field(default=1 << 20, gt=0)
    max_headers: int = Field(default=2000, gt=0)
    max_recipients: int = Field(default=0, ge=0, description="0 = off: the MTA's own limit")
    command_timeout: float = Field(default=8.0, gt=0, le=25, description="per stage, seconds")
    eom_timeout: float = Field(default=120.0, gt=0, le=280)
    progress_interval: float = Field(default=5.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, ge=0, le=86400)
    metrics_listen: str | None = None
    milter_timeout: int = Field(
        default=600, gt=0, le=86400, description="libmilter I/O timeout"
    )

    @field_validator("socket")
    @classmethod
    def _socket(cls, v: str) -> str:
        parse_socket(v)
        return v

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", v):
            raise ValueError("an octal mode such as 0660")
        return v

    @field_validator("internal_networks")
    @classmethod
    def _networks(cls, v: list[str]) -> list[str]:
        for net in v:
            ipaddress.ip_network(net, strict=False)
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, v: str | None) -> str | None:
        if v is not None:
            host, _, port = v.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError("HOST:PORT with a port from 1 to 65535, e.g. 127.0.0.1:9899")
        return v

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(n, strict=False) for n in self.internal_networks]

    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def check_metrics_listen(settings: Settings) -> None:
    """``metrics_listen``'s host is an address this host can listen on (resolved, and a
    socket bound to it on a free port: the configured port itself is held by a daemon
    already running, so it is not tried). Raises ConfigError."""
    if settings.metrics_listen is None:
        return
    import socket as so

    host = settings.metrics_listen.rpartition(":")[0].strip("[]")
    try:
        infos = so.getaddrinfo(host, None, type=so.SOCK_STREAM, flags=so.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        with so.socket(family, kind, proto) as s:
            s.bind((addr[0], 0, *addr[2:]))
    except OSError as e:
        raise ConfigError(
            f"[milterd] metrics_listen {settings.metrics_listen!r}: cannot listen on "
            f"{host!r}: {e.strerror or e}"
        ) from None


def check_accounts(settings: Settings, socket: bool = False) -> None:
    """The accounts ``[milterd]`` names exist here; with ``socket`` (just before opening
    it), an unprivileged process can also give its socket to ``socket_group``. Raises
    ConfigError naming the key. (Not a model validator: a file written for another host
    still loads; ``config check`` and ``run`` call this.)"""
    import grp
    import pwd

    for key in ("user", "group", "socket_group"):
        name = getattr(settings, key)
        if name is None:
            continue
        try:
            (pwd.getpwnam if key == "user" else grp.getgrnam)(name)
        except KeyError:
            kind = "user" if key == "user" else "group"
            raise ConfigError(f"[milterd] {key}: no {kind} {name!r} on this host") from None
    unix = settings.socket.startswith(("unix:", "local:"))
    if socket and unix and settings.socket_group and os.geteuid() != 0:
        gid = grp.getgrnam(settings.socket_group).gr_gid
        if gid != os.getegid() and gid not in os.getgroups():
            raise ConfigError(
                f"[milterd] socket_group: this process (uid {os.geteuid()}) is not in group "
                f"{settings.socket_group!r}, so it cannot give the socket to it: add the "
                f"group to the service (systemd: SupplementaryGroups={settings.socket_group})"
            )


class DnsSettings(BaseModel):
    """``[dns]``: the resolver every plugin shares."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    nameservers: list[str] = Field(
        default_factory=list, description="HOST or HOST:PORT ([v6]:PORT); empty = resolv.conf"
    )
    # At least 0.2 s: a lookup keeps a 0.12 s margin under the time it is given.
    timeout: float = Field(default=3.0, ge=0.2, le=25)
    cache_size: int = Field(default=10000, ge=0)

    @field_validator("nameservers")
    @classmethod
    def _servers(cls, v: list[str]) -> list[str]:
        for s in v:
            split_hostport(s)
        return v


def split_hostport(spec: str, default_port: int = 53) -> tuple[str, int]:
    """``1.2.3.4``, ``1.2.3.4:5353``, ``::1``, ``[::1]:5353`` -> (address, port)."""
    if spec.startswith("["):
        host, _, rest = spec[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else default_port
    elif spec.count(":") == 1:
        host, _, p = spec.partition(":")
        port = int(p)
    else:
        host, port = spec, default_port
    ipaddress.ip_address(host)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {spec!r}")
    return host, port


class PluginSettings(BaseModel):
    """The core keys of every ``[plugins.NAME]`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    enabled: bool = True
    order: int | None = None
    on_error: Literal["continue", "tempfail", "reject"] = "tempfail"
    timeout: Annotated[float, Field(gt=0, le=280)] = 5.0
    isolation: Literal["thread", "inline"] | None = None


CORE_PLUGIN_KEYS = frozenset(PluginSettings.model_fields)


class Config(BaseModel):
    """The whole file, validated except for each plugin's own keys (see registry)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    milterd: Settings = Settings()
    dns: DnsSettings = DnsSettings()
    plugins: dict[str, dict[str, Any]] = {}
    path: str = "<memory>"

    def plugin_settings(self, name: str) -> PluginSettings:
        section = self.plugins.get(name, {})
        return PluginSettings(**{k: v for k, v in section.items() if k in CORE_PLUGIN_KEYS})

    def plugin_model(self, name: str, schema: type[_M]) -> _M:
        """``[plugins.NAME]``'s own keys validated against ``schema`` as the daemon does
        (relative :data:`ConfigPath` values resolved against this file's directory), for a
        plugin's command-line tools. Raises ConfigError naming the file, the section and
        the key, as :func:`load` does."""
        try:
            return schema.model_validate(
                self.plugin_options(name), context=validation_context(self.path)
            )
        except ValidationError as e:
            raise ConfigError(describe(e, self.path, f"plugins.{name}")) from None

    def plugin_options(self, name: str) -> dict[str, Any]:
        section = self.plugins.get(name, {})
        return {k: v for k, v in section.items() if k not in CORE_PLUGIN_KEYS}

    def enabled_plugins(self) -> list[str]:
        """Enabled plugin names in pipeline order: ``order`` first, then file order."""
        names = [n for n in self.plugins if self.plugin_settings(n).enabled]
        position = {n: i for i, n in enumerate(self.plugins)}

        def key(n: str) -> tuple[int, int]:
            order = self.plugin_settings(n).order
            return (order if order is not None else 10_000, position[n])

        return sorted(names, key=key)


def describe(err: ValidationError, path: str, section: str) -> str:
    """Turn pydantic's errors into lines naming the file, the section and the key."""
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        sect = section
        if not section and loc and loc[0] in ("milterd", "dns"):
            sect, loc = loc[0], loc[1:]
        elif not section and len(loc) >= 2 and loc[0] == "plugins":
            sect, loc = f"plugins.{loc[1]}", loc[2:]
        key = ".".join(loc) or "(section)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            if not sect:  # a misspelt section name: [plugin.dkim], [milter], [DNS]
                lines.append(
                    f"{path}: [{key}]: unknown section (sections are [milterd], [dns] and "
                    f"[plugins.NAME])"
                )
                continue
        lines.append(f"{path}: [{sect}] {key}: {msg}")
    return "\n".join(lines)


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError naming file, section and key."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return loads(decode(data, str(p)), str(p))


def decode(data: bytes, path: str) -> str:
    """A config file's bytes as text; ConfigError naming ``path`` when they are not UTF-8
    (TOML is UTF-8)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 (byte {e.start}): TOML files are UTF-8") from None


def loads(text: str, path: str = "<memory>") -> Config:
    """Validate config text. ``path`` is only used in error messages."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    return from_dict(data, path)


def from_dict(data: dict[str, Any], path: str = "<memory>") -> Config:
    plugins = data.get("plugins", {})
    if not isinstance(plugins, dict) or not all(isinstance(v, dict) for v in plugins.values()):
        raise ConfigError(f"{path}: [plugins] must hold one table per plugin: [plugins.NAME]")
    for name, section in plugins.items():
        try:
            PluginSettings(**{k: v for k, v in section.items() if k in CORE_PLUGIN_KEYS})
        except ValidationError as e:
            raise ConfigError(describe(e, path, f"plugins.{name}")) from None
    try:
        return Config.model_validate({**data, "path": path}, context=validation_context(path))
    except ValidationError as e:
        raise ConfigError(describe(e, path, "")) from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None
