"""The plugin manager: built-in methods and installed plugins register through the same hooks.

Installed plugins are discovered from the ``timm_qconv`` entry-point group. The environment
variable ``TIMM_QCONV_PLUGINS`` restricts loading: unset loads every installed plugin, an empty
value (or ``0``) loads none, and a comma-separated list of entry-point names loads only those.
The built-in methods (:mod:`timm_qconv.methods`) always load.

Library code calls hooks through :func:`call_hook`, never through ``pm.hook`` directly, so that
an exception raised inside a plugin names the plugin::

    call_hook("training_event", event="on_step_end", state=state, control=control, payload=payload)

At run time, :func:`register_plugin` adds a plugin object (a module or an instance with
``@hookimpl`` methods) and :func:`unregister_plugin` removes it with the methods it added. Tests
that change ``TIMM_QCONV_PLUGINS`` call :func:`reset_plugin_manager` before and after.
"""
from __future__ import annotations

import functools
import importlib.metadata
import os
import warnings
from typing import Any

import pluggy

from . import hookspecs
from ._errors import closest
from ._registry import add_method, methods_owned_by, remove_method, set_loader

ENV_VAR = "TIMM_QCONV_PLUGINS"
BUILTIN = "timm_qconv.methods"


class PluginError(RuntimeError):
    """A plugin failed: it raised inside a hook, or an installed plugin could not be loaded."""


def _allowed_names() -> set[str] | None:
    """Plugin names allowed by the environment, or ``None`` for all."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    value = value.strip()
    if value in ("", "0"):
        return set()
    return {name.strip() for name in value.split(",") if name.strip()}


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    """The installed plugins that ``TIMM_QCONV_PLUGINS`` allows, sorted by name (the load order)."""
    found = {ep.name: ep for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)}
    allowed = _allowed_names()
    if allowed is None:
        return [found[name] for name in sorted(found)]
    unknown = allowed - set(found) - {BUILTIN}
    if unknown:
        warnings.warn(f"{ENV_VAR} names {sorted(unknown)}, which are not installed plugins; "
                      f"installed: {sorted(found)}", stacklevel=3)
    return [found[name] for name in sorted(allowed & set(found))]


@functools.lru_cache(maxsize=None)
def _builtin_manager() -> pluggy.PluginManager:
    """The plugin manager with the built-in methods only (they always load)."""
    from . import methods

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    _add(pm, methods, BUILTIN)
    return pm


_installed_loaded = False  # whether the allowed installed plugins are registered in _builtin_manager()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and allowed installed plugins registered.

    Building it also fills the method registry. Installed plugins that fail to load raise
    :class:`PluginError`, and the registry is left as it was (the built-ins stay); the next call
    tries again.
    """
    global _installed_loaded
    pm = _builtin_manager()
    if _installed_loaded:
        return pm
    _installed_loaded = True  # a plugin that looks a method up while it loads must not start again
    added = []
    try:
        for ep in _entry_points():
            try:
                added.append(_add(pm, ep.load(), ep.name))
            except Exception as error:
                raise PluginError(f"installed plugin {ep.name!r} ({ep.value}) could not be loaded: {error}\n"
                                  f"(set {ENV_VAR} to the plugins to load, empty for none, to skip it)") from error
    except BaseException:
        _installed_loaded = False
        for name in added:
            pm.unregister(name=name)
            _remove_methods_of(name)
        raise
    return pm


def _load_methods(everything: bool) -> None:
    """The registry's loader: the built-in methods, and with ``everything`` the installed plugins'."""
    get_plugin_manager() if everything else _builtin_manager()


set_loader(_load_methods)


def reset_plugin_manager() -> None:
    """Forget the plugin manager and the methods its plugins added; the next use builds it anew.

    For tests that change ``TIMM_QCONV_PLUGINS``. Methods added with ``@register_method`` stay.
    """
    global _installed_loaded
    if _builtin_manager.cache_info().currsize:
        for name, _ in _builtin_manager().list_name_plugin():
            _remove_methods_of(name)
    _builtin_manager.cache_clear()
    _installed_loaded = False


def _known_hooks(pm: pluggy.PluginManager) -> list[str]:
    return sorted(name for name, caller in vars(pm.hook).items() if caller.has_spec())


def _add(pm: pluggy.PluginManager, plugin: Any, name: str | None) -> str:
    """Register ``plugin``, check its hooks and add its methods; on any error it is removed again."""
    # pluggy checks here that every implementation's arguments are in its hook's spec, and raises
    # PluginValidationError naming the plugin and the hook otherwise.
    name = pm.register(plugin, name=name)
    try:
        for caller in pm.get_hookcallers(plugin) or []:
            if not caller.has_spec():
                known = _known_hooks(pm)
                raise pluggy.PluginValidationError(
                    plugin, f"plugin {name!r} implements {caller.name!r}, which is not a timm_qconv hook; "
                            f"did you mean {closest(caller.name, known)}? hooks: {known}")
        others = [p for p in pm.get_plugins() if p is not plugin]
        _call(pm.subset_hook_caller("register_methods", others), register=functools.partial(add_method, owner=name))
    except BaseException:
        pm.unregister(plugin)
        _remove_methods_of(name)
        raise
    return name


def _remove_methods_of(name: str) -> None:
    for method in methods_owned_by(name):
        remove_method(method)


def _culprit(caller: pluggy.HookCaller, error: BaseException) -> str | None:
    """Name of the plugin whose implementation raised ``error``: its function's frame in the traceback."""
    by_code: dict[Any, list[Any]] = {}
    for impl in caller.get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None:
            by_code.setdefault(code, []).append(impl)
    tb = error.__traceback__
    while tb is not None:
        impls = by_code.get(tb.tb_frame.f_code, [])
        if len(impls) > 1:  # instances of one class: tell them apart by ``self``
            impls = [i for i in impls if getattr(i.function, "__self__", None) is tb.tb_frame.f_locals.get("self")]
        if impls:
            return impls[0].plugin_name
        tb = tb.tb_next
    return None


def _call(caller: pluggy.HookCaller, **kwargs: Any) -> Any:
    try:
        return caller(**kwargs)
    except PluginError:
        raise  # already names the plugin that failed (a nested hook call)
    except Exception as error:
        plugin = _culprit(caller, error)
        if plugin is None:
            raise
        raise PluginError(f"plugin {plugin!r} failed in hook {caller.name!r}: "
                          f"{type(error).__name__}: {error}") from error


def call_hook(hook: str, **kwargs: Any) -> Any:
    """Call ``hook`` on every loaded plugin; the way library code fires hooks.

    Args:
        hook: a hook of :mod:`timm_qconv.hookspecs`, e.g. ``"training_event"``.
        **kwargs: all of the hook's arguments, by name.
    Returns:
        the list of the implementations' non-``None`` results, or for a ``firstresult`` hook
        (``layer_quant_config``) the first non-``None`` result or ``None``.
    Raises:
        PluginError: an implementation raised; the message names its plugin and the hook.
        ValueError: ``hook`` is not a timm_qconv hook.
        TypeError: an argument of the hook is missing or unknown.
    """
    pm = get_plugin_manager()
    caller = getattr(pm.hook, hook, None)
    if caller is None or not caller.has_spec():
        raise ValueError(f"hook={hook!r} is not a timm_qconv hook; known: {_known_hooks(pm)}")
    expected = caller.spec.argnames
    if set(kwargs) != set(expected):
        raise TypeError(f"hook {hook!r} takes the arguments {list(expected)}; got {sorted(kwargs)}")
    return _call(caller, **kwargs)


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object (a module or an instance with ``@hookimpl`` methods) at run time.

    Args:
        plugin: the object whose ``@hookimpl`` functions implement hooks.
        name: its name in messages and in :func:`describe_plugins` (default: pluggy's choice).
    Returns:
        the name it was registered under.
    Raises:
        pluggy.PluginValidationError: an implementation takes an argument its hook does not
            have, or implements no timm_qconv hook; the message names the plugin.
        PluginError: its ``register_methods`` raised, e.g. a method name already taken (the
            message names both plugins).
    """
    return _add(get_plugin_manager(), plugin, name)


def unregister_plugin(plugin: Any) -> None:
    """Unregister a plugin (the object, or its name) and forget the methods it added."""
    pm = get_plugin_manager()
    name = plugin if isinstance(plugin, str) else pm.get_name(plugin)
    if name is None or pm.get_plugin(name) is None:
        raise ValueError(f"plugin {plugin!r} is not registered; registered: {[n for n, _ in pm.list_name_plugin()]}")
    pm.unregister(name=name)
    _remove_methods_of(name)


def describe_plugins() -> list[dict[str, Any]]:
    """The loaded plugins, in load order, for ``timm-qconv plugins``.

    Returns:
        one dict per plugin: ``name``, ``version`` (its distribution's, ``None`` when it was not
        installed, e.g. registered at run time), ``hooks`` it implements and ``methods`` it added.
    """
    from . import __version__

    pm = get_plugin_manager()
    versions = {ep.name: ep.dist.version for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT)
                if ep.dist is not None}
    versions[BUILTIN] = __version__
    return [
        {"name": name, "version": versions.get(name),
         "hooks": sorted(c.name for c in pm.get_hookcallers(plugin) or []), "methods": methods_owned_by(name)}
        for name, plugin in pm.list_name_plugin() if plugin is not None
    ]
