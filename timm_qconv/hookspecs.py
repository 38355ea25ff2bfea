"""Hook specifications of the ``timm_qconv`` pluggy project.

Plugins implement these with ``@timm_qconv.hookimpl`` and are found through the ``timm_qconv``
entry-point group. Hooks are always called with keyword arguments.
"""
from __future__ import annotations

import pluggy

PROJECT = "timm_qconv"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register):
    """Add quantization methods by calling ``register(name, QuantizerSubclass)``."""
