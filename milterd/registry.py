"""Finding, loading, validating and ordering plugins.

Plugins are found through the entry-point group ``milterd.plugins``; the entry-point name
is the plugin's name and its config section ``[plugins.NAME]``. Entry points are loaded one
at a time, and only for enabled plugins: a broken plugin that is not enabled never stops
the daemon, a broken enabled one stops start-up with a message naming it.

An entry point names a class (instantiated once per configuration generation, so a reload
gets fresh objects) or any other object (a module with hook functions, used as is).
A plugin may declare, as class or module attributes:

``actions``  the changes it may record (:data:`ACTIONS`); default: all of them.
``macros``   MTA macros it reads, per stage: ``{"envfrom": ["{auth_authen}"]}``.
``after``    plugin names that must run before it when enabled (checked at start-up).
``isolation`` ``"thread"`` (default: hard deadline) or ``"inline"`` (no thread hop), for all
           hooks, or per hook: ``{"finalize": "thread", "default": "inline"}``. The config
           key ``isolation`` overrides it for every hook.
``reads_body`` False when the plugin takes ``message`` only for its headers, so that the
           body is not requested from the MTA for it (default True).
``prefork``  True when its ``startup`` opens nothing per process (connections, threads,
           files), so that it runs once in the supervisor before the workers fork; such
           state then goes in ``worker_start`` (default False: ``startup`` per worker).
``signs``    True when its ``finalize`` signs or seals the message (DKIM, ARC): see
           :func:`finalize_order` (default False).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy
from pydantic import BaseModel, ValidationError

from milterd import hookspecs
from milterd.config import (
    CORE_PLUGIN_KEYS,
    Config,
    ConfigError,
    PluginSettings,
    describe,
    validation_context,
)

__all__ = [
    "ACTIONS",
    "GROUP",
    "Impl",
    "Installed",
    "LoadedPlugin",
    "installed",
    "load_plugins",
]

GROUP = "milterd.plugins"
#: Every change kind a plugin may declare in ``actions``.
ACTIONS = frozenset(
    {
        "add_header",
        "change_header",
        "add_recipient",
        "delete_recipient",
        "change_sender",
        "replace_body",
        "quarantine",
    }
)
MACRO_STAGES = ("connect", "helo", "envfrom", "envrcpt", "data", "eoh", "eom")
HOOKS = (*hookspecs.STAGES, *hookspecs.LIFECYCLE)
#: The arguments each hook may take (an implementation takes any subset).
HOOK_ARGS: dict[str, tuple[str, ...]] = {
    h: tuple(inspect.signature(getattr(hookspecs, h)).parameters) for h in HOOKS
}
log = logging.getLogger("milterd")


def contained(e: BaseException) -> bool:
    """Whether ``e``, raised out of plugin code, is that plugin's failure, handled as any
    other. On the threads the daemon runs hooks on (libmilter's, helpers), everything is:
    let through there, a ``SystemExit`` (a plugin calling ``sys.exit()``) silently ended
    libmilter's thread and left the MTA waiting. On the main thread (the harness, start-up)
    ``Exception``, ``SystemExit`` and ``GeneratorExit`` are, and the other subclasses of
    ``BaseException`` go through: a ``KeyboardInterrupt`` there is a Ctrl-C, and pytest's
    ``fail()`` and ``skip()`` in a test plugin's hook must reach pytest."""
    if isinstance(e, Exception | SystemExit | GeneratorExit):
        return True
    return threading.current_thread() is not threading.main_thread()


#: How much of an exception's text goes into a log line, an error and a ConfigError.
MAX_EXCEPTION_TEXT = 1000


def exception_text(e: BaseException) -> str:
    """``Type: text`` for an exception out of plugin code, never raising and never long:
    a ``__str__`` that raises, or megabytes of text, must not turn a contained failure
    into a core error or flood the log."""
    try:
        text = str(e)
    except BaseException:  # whatever __str__ raises, the failure is e's
        text = "(its text could not be read)"
    if len(text) > MAX_EXCEPTION_TEXT:
        text = text[:MAX_EXCEPTION_TEXT] + f"... ({len(text)} characters)"
    return f"{type(e).__name__}: {text}"


@dataclass(frozen=True, slots=True)
class Installed:
    """An installed plugin, from package metadata alone (nothing imported)."""

    name: str
    value: str
    dist: str
    version: str


def installed() -> list[Installed]:
    """Every plugin installed in this environment, sorted by name."""
    out = []
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        out.append(Installed(ep.name, ep.value, dist, version))
    return sorted(out, key=lambda p: p.name)


def load_entry_point(name: str) -> object:
    """Import one plugin's entry point. Raises ConfigError naming it on any failure."""
    found = md.entry_points(group=GROUP)
    eps = [ep for ep in found if ep.name == name]
    if not eps:
        close = difflib.get_close_matches(name, sorted({ep.name for ep in found}), n=1)
        hint = f"; did you mean [plugins.{close[0]}]?" if close else ""
        raise ConfigError(
            f"[plugins.{name}]: plugin {name!r} is enabled but not installed (no entry "
            f"point {name!r} in group {GROUP!r}; `milterd plugins` lists those installed)"
            f"{hint}"
        )
    try:
        return eps[0].load()
    except BaseException as e:  # any import error must name the plugin, not crash start-up
        if not contained(e):
            raise
        raise ConfigError(
            f"plugin {name!r} failed to load ({eps[0].value}): {exception_text(e)}"
        ) from e


@dataclass(frozen=True, slots=True)
class Impl:
    """One plugin's implementation of one stage hook."""

    plugin: str
    function: Callable[..., Any]
    argnames: tuple[str, ...]


@dataclass(slots=True)
class LoadedPlugin:
    name: str
    obj: object
    settings: PluginSettings
    config: Any
    impls: dict[str, Impl] = field(default_factory=dict)
    actions: frozenset[str] = ACTIONS
    macros: dict[str, tuple[str, ...]] = field(default_factory=dict)
    isolation: dict[str, str] = field(default_factory=lambda: {"default": "thread"})
    after: tuple[str, ...] = ()
    reads_body: bool = True
    prefork: bool = False
    signs: bool = False

    def isolation_for(self, stage: str) -> str:
        return self.isolation.get(stage, self.isolation["default"])


def _instantiate(name: str, source: object) -> object:
    if isinstance(source, type):
        try:
            return source()
        except BaseException as e:
            if not contained(e):
                raise
            raise ConfigError(
                f"plugin {name!r}: creating {source.__name__}() failed: {exception_text(e)}"
            ) from e
    return source


def new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def load_plugins(
    config: Config, sources: Mapping[str, object] | None = None
) -> tuple[pluggy.PluginManager, list[LoadedPlugin]]:
    """Load, validate and configure the enabled plugins, in pipeline order.

    ``sources`` maps plugin names to classes or objects used instead of entry points (the
    test harness and ``milterd check --plugin`` use it). Raises ConfigError naming the
    plugin, and for config problems the file, section and key.
    """
    sources = sources or {}
    pm = new_manager()
    loaded: list[LoadedPlugin] = []
    for name in config.enabled_plugins():
        try:
            source = sources[name] if name in sources else load_entry_point(name)
        except ConfigError as e:
            raise ConfigError(f"{config.path}: {e}") from e
        obj = _instantiate(name, source)
        _check_hooks(name, obj)
        try:
            pm.register(obj, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            raise ConfigError(f"plugin {name!r}: {e}") from e
        loaded.append(_describe(name, obj, config, pm))
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as e:
        name = pm.get_name(e.plugin) or repr(e.plugin)
        hooks = ", ".join(
            h
            for h in pm.hook.__dict__
            if h not in hookspecs.STAGES + hookspecs.LIFECYCLE
            and any(i.plugin_name == name for i in getattr(pm.hook, h).get_hookimpls())
        )
        raise ConfigError(
            f"plugin {name!r}: unknown hook {hooks or '?'} (a misspelt hook name? "
            f"hooks are: {', '.join(hookspecs.STAGES + hookspecs.LIFECYCLE)})"
        ) from e
    _check_order(loaded)
    return pm, loaded


def check_disabled(config: Config) -> list[str]:
    """Problems in the sections of plugins that are present but disabled (``enabled =
    false``), which the daemon never loads: a misspelt key there would otherwise surface
    only the day the plugin is enabled. For ``config check``, as warnings."""
    out = []
    names = sorted({ep.name for ep in md.entry_points(group=GROUP)})
    for name in config.plugins:
        if config.plugin_settings(name).enabled:
            continue
        if name not in names:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean [plugins.{close[0]}]?" if close else ""
            out.append(f"[plugins.{name}] (disabled): no plugin {name!r} is installed{hint}")
            continue
        try:
            obj = _instantiate(name, load_entry_point(name))
            pm = new_manager()
            pm.register(obj, name=name)
            _describe(name, obj, config, pm)
        except BaseException as e:  # only warnings: whatever a disabled plugin raises
            if not contained(e):
                raise
            what = str(e) if isinstance(e, ConfigError) else exception_text(e)
            out.append(f"[plugins.{name}] (disabled): {what}")
    return out


def _params(fn: Any) -> list[str] | None:
    """The arguments pluggy would pass by name: positional ones without a default (a bound
    method's, so without ``self``). None when the signature cannot be read."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in positional and p.default is inspect.Parameter.empty
    ]


def _check_hooks(name: str, obj: object) -> None:
    """What pluggy would accept silently or report obscurely, said plainly.

    Raises ConfigError when a marked hook takes an argument milterd never passes. Logs a
    warning for a method that looks like a hook (a hook's name and only that hook's
    argument names) but is not marked with ``@hookimpl``, so is never called, and for a
    plugin with no hook at all.
    """
    marked = 0
    for hook in HOOKS:
        fn = getattr(obj, hook, None)
        if not callable(fn):
            continue
        params = _params(fn)
        accepted = HOOK_ARGS[hook]
        if getattr(fn, f"{hookspecs.PROJECT}_impl", None) is not None:
            marked += 1
            if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
                # Called, it would return a coroutine nobody awaits: a failure per call.
                raise ConfigError(
                    f"plugin {name!r}: hook {hook} is 'async def'; hooks are plain "
                    f"functions (blocking I/O is fine in them, within ctx.time_left())"
                )
            extra = [a for a in params or () if a not in accepted]
            if extra:
                raise ConfigError(
                    f"plugin {name!r}: hook {hook}({', '.join(params or ())}) takes "
                    f"{', '.join(map(repr, extra))}, which milterd does not pass; {hook} "
                    f"takes any of: {', '.join(accepted) or 'no arguments'}"
                )
        elif params is not None and (
            (params and set(params) <= set(accepted)) or (not params and hook == "config_schema")
        ):
            log.warning(
                "plugin %r: %s(%s) is not marked @hookimpl (from milterd import hookimpl), "
                "so milterd never calls it", name, hook, ", ".join(params),
            )  # fmt: skip
    if not marked and not any(
        getattr(getattr(obj, a, None), f"{hookspecs.PROJECT}_impl", None) is not None
        for a in dir(obj)
        if not a.startswith("__")
    ):
        log.warning("plugin %r has no @hookimpl-marked hook: it does nothing", name)


def _names(name: str, attr: str, value: Any) -> tuple[str, ...]:
    """A plugin attribute that lists names: a string would be read letter by letter."""
    if isinstance(value, str | bytes):
        raise ConfigError(
            f"plugin {name!r}: {attr} must be a list of names such as [{value!r}], "
            f"not a string"
        )
    try:
        return tuple(str(v) for v in value)
    except TypeError:
        raise ConfigError(
            f"plugin {name!r}: {attr} must be a list of names, got {value!r}"
        ) from None


def _describe(name: str, obj: object, config: Config, pm: pluggy.PluginManager) -> LoadedPlugin:
    settings = config.plugin_settings(name)
    impls: dict[str, Impl] = {}
    for stage in (*hookspecs.STAGES, *hookspecs.LIFECYCLE):
        for hi in getattr(pm.hook, stage).get_hookimpls():
            if hi.plugin_name == name:
                impls[stage] = Impl(name, hi.function, tuple(hi.argnames))
    section = f"plugins.{name}"
    options = config.plugin_options(name)
    schema: type[BaseModel] | None = None
    if "config_schema" in impls:
        try:
            schema = impls.pop("config_schema").function()
        except BaseException as e:
            if not contained(e):
                raise
            raise ConfigError(
                f"plugin {name!r}: config_schema failed: {exception_text(e)}"
            ) from e
        if schema is not None and not (
            isinstance(schema, type) and issubclass(schema, BaseModel)
        ):
            raise ConfigError(
                f"plugin {name!r}: config_schema must return a model class (a subclass of "
                f"milterd.PluginConfig), not {schema!r}"
            )
        clash = sorted(CORE_PLUGIN_KEYS & set(schema.model_fields)) if schema else []
        if clash:
            raise ConfigError(
                f"plugin {name!r}: its config_schema declares {', '.join(clash)}, which the "
                f"core reserves in every [plugins.NAME] section "
                f"({', '.join(sorted(CORE_PLUGIN_KEYS))}); rename the field"
            )
    if schema is None:
        if options:
            raise ConfigError(
                f"{config.path}: [{section}] {next(iter(options))}: unknown key "
                f"(plugin {name!r} takes no settings of its own)"
            )
        plugin_config = None
    else:
        try:
            plugin_config = schema.model_validate(options, context=validation_context(config.path))
        except ValidationError as e:
            raise ConfigError(describe(e, config.path, section)) from None
        except BaseException as e:  # a validator raising something else (re.error, ...)
            if not contained(e):
                raise
            raise ConfigError(f"{config.path}: [{section}]: {exception_text(e)}") from None
    actions = frozenset(_names(name, "actions", getattr(obj, "actions", ACTIONS)))
    unknown = actions - ACTIONS
    if unknown:
        raise ConfigError(
            f"plugin {name!r} declares unknown actions {sorted(unknown)}; actions are: "
            f"{', '.join(sorted(ACTIONS))}"
        )
    raw_macros: dict[str, Any] = dict(getattr(obj, "macros", {}) or {})
    bad = set(raw_macros) - set(MACRO_STAGES)
    if bad:
        raise ConfigError(
            f"plugin {name!r} declares macros for unknown stages {sorted(bad)}; stages with "
            f"macros are: {', '.join(MACRO_STAGES)}"
        )
    macros = {k: _names(name, f"macros[{k!r}]", v) for k, v in raw_macros.items()}
    declared = settings.isolation or getattr(obj, "isolation", "thread")
    isolation: dict[str, str] = (
        {str(k): str(v) for k, v in declared.items()}
        if isinstance(declared, dict)
        else {"default": str(declared)}
    )
    isolation.setdefault("default", "thread")
    if set(isolation.values()) - {"thread", "inline"} or set(isolation) - {
        "default",
        *hookspecs.STAGES,
    }:
        raise ConfigError(
            f"plugin {name!r}: isolation must be 'thread' or 'inline', or a mapping of "
            f"hook names (and 'default') to those"
        )
    return LoadedPlugin(
        name=name,
        obj=obj,
        settings=settings,
        config=plugin_config,
        impls={
            k: v
            for k, v in impls.items()
            if k in hookspecs.STAGES or k in ("startup", "worker_start", "worker_ready", "shutdown")
        },
        actions=actions,
        macros=macros,
        isolation=isolation,
        after=_names(name, "after", getattr(obj, "after", ())),
        reads_body=bool(getattr(obj, "reads_body", True)),
        prefork=bool(getattr(obj, "prefork", False)),
        signs=bool(getattr(obj, "signs", False)),
    )


#: The actions that change the message itself (quarantine only holds it).
CHANGES = ACTIONS - {"quarantine"}


def finalize_order(plugins: list[LoadedPlugin]) -> list[LoadedPlugin]:
    """The order ``finalize`` runs in: pipeline order, except that a plugin that may change
    the message (its ``actions`` name a change other than ``quarantine``; a plugin that
    declares no ``actions`` may make any) and is listed after a signer (``signs``) runs
    just before the first signer, so that signatures cover every change and their fields
    are on top whatever order the config lists them in. A plugin that declares ``after``
    one that stays in place (a signer, say), directly or through others, stays where it
    is, and so does every plugin that changes nothing (an archive listed after the
    signers sees the signed message)."""
    first = next((i for i, p in enumerate(plugins) if p.signs), None)
    if first is None:
        return list(plugins)
    # In pipeline order (an ``after`` dependency is always earlier, checked at start-up):
    # a plugin stays when it signs, changes nothing, or must follow one that stays.
    stays: set[str] = set()
    moved: list[LoadedPlugin] = []
    for p in plugins[first:]:
        if p.signs or not p.actions & CHANGES or stays & set(p.after):
            stays.add(p.name)
        else:
            moved.append(p)
    rest = [p for p in plugins if p not in moved]
    return rest[:first] + moved + rest[first:]


def _check_order(loaded: list[LoadedPlugin]) -> None:
    position = {p.name: i for i, p in enumerate(loaded)}
    for p in loaded:
        for dep in p.after:
            if dep in position and position[dep] > position[p.name]:
                raise ConfigError(
                    f"plugin {p.name!r} must run after {dep!r}: give [plugins.{dep}] a lower "
                    f"'order' than [plugins.{p.name}] (or list it first)"
                )
