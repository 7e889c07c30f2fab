"""milterd: a pluggable content-filtering mail filter (milter) for Postfix and sendmail.

This module is the whole public API for plugin authors: import from ``milterd`` only.
Everything else in the package may change between versions.

A plugin is a class with hook methods marked ``@hookimpl``, registered as an entry point
in the group ``milterd.plugins``; see the README's plugin-author guide and
:mod:`milterd.hookspecs` for every hook's contract.
"""

from milterd.actions import (
    Accept,
    AddHeader,
    AddRecipient,
    ChangeHeader,
    ChangeSender,
    DeleteHeader,
    DeleteRecipient,
    Discard,
    InsertHeader,
    Quarantine,
    Reject,
    ReplaceBody,
    Result,
    Symbol,
    TempFail,
    Verdict,
)
from milterd.config import ConfigError, ConfigPath, PluginConfig
from milterd.config import load as load_config
from milterd.context import ConnectionInfo, Context, MessageInfo, Recipient, Services
from milterd.dns import DNSTempError, NXDomain, Resolver, make_resolver
from milterd.events import (
    Abort,
    Body,
    Client,
    Close,
    Connect,
    Data,
    EnvFrom,
    EnvRcpt,
    Eoh,
    Eom,
    Header,
    Helo,
)
from milterd.hookspecs import hookimpl
from milterd.spool import Message

__version__ = "0.1.0"

__all__ = [
    "Abort",
    "Accept",
    "AddHeader",
    "AddRecipient",
    "Body",
    "ChangeHeader",
    "ChangeSender",
    "Client",
    "Close",
    "ConfigError",
    "ConfigPath",
    "Connect",
    "ConnectionInfo",
    "Context",
    "DNSTempError",
    "Data",
    "DeleteHeader",
    "DeleteRecipient",
    "Discard",
    "EnvFrom",
    "EnvRcpt",
    "Eoh",
    "Eom",
    "Header",
    "Helo",
    "InsertHeader",
    "Message",
    "MessageInfo",
    "NXDomain",
    "PluginConfig",
    "Quarantine",
    "Recipient",
    "Reject",
    "ReplaceBody",
    "Resolver",
    "Result",
    "Services",
    "Symbol",
    "TempFail",
    "Verdict",
    "__version__",
    "hookimpl",
    "load_config",
    "make_resolver",
]
