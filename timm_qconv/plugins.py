"""The plugin manager: built-in methods and installed plugins register through the same hooks.

Installed plugins are discovered from the ``timm_qconv`` entry-point group. The environment
variable ``TIMM_QCONV_PLUGINS`` restricts loading: unset loads every installed plugin, an empty
value (or ``0``) loads none, and a comma-separated list loads only the plugins it names.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import pluggy

from . import hookspecs
from ._registry import add_method, remove_method

ENV_VAR = "TIMM_QCONV_PLUGINS"
BUILTIN = "timm_qconv.methods"


def _allowed_names() -> set[str] | None:
    """Plugin names allowed by the environment, or ``None`` for all."""
    value = os.environ.get(ENV_VAR)
    if value is None:
        return None
    value = value.strip()
    if value in ("", "0"):
        return set()
    return {name.strip() for name in value.split(",") if name.strip()}


@functools.lru_cache(maxsize=None)
def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and allowed installed plugins registered."""
    from . import methods

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(methods, name=BUILTIN)
    allowed = _allowed_names()
    if allowed is None:
        pm.load_setuptools_entrypoints(hookspecs.PROJECT)
    else:
        for name in sorted(allowed):
            pm.load_setuptools_entrypoints(hookspecs.PROJECT, name=name)
    return pm


def _register_from(pm: pluggy.PluginManager, plugin: Any) -> None:
    name = pm.get_name(plugin)
    for impl in pm.hook.register_methods.get_hookimpls():
        if impl.plugin is plugin:
            impl.function(register=functools.partial(add_method, owner=name))


def load_methods() -> None:
    """Ask every registered plugin for its methods (built-ins first)."""
    pm = get_plugin_manager()
    for _, plugin in pm.list_name_plugin():  # registration order: built-ins first
        _register_from(pm, plugin)


def register_plugin(plugin: Any, name: str | None = None) -> str:
    """Register a plugin object (a module or an instance with hook implementations) at run time."""
    pm = get_plugin_manager()
    name = pm.register(plugin, name=name)
    try:
        _register_from(pm, plugin)
    except Exception:
        pm.unregister(plugin)
        raise
    return name


def unregister_plugin(plugin: Any) -> None:
    """Unregister a plugin and forget the methods it added."""
    from ._registry import _OWNERS

    pm = get_plugin_manager()
    name = pm.get_name(plugin)
    pm.unregister(plugin)
    for method, owner in list(_OWNERS.items()):
        if owner == name:
            remove_method(method)
