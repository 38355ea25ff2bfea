"""Everything a plugin may use, under public names; a plugin imports nothing else from timm_qconv.

A **method plugin** subclasses :class:`Quantizer` (or :class:`ScaledShapeQuantizer`, whose
levels are a fixed shape times a fitted scale per group), gives it a config dataclass subclassing
:class:`QuantConfig` whose ``__post_init__`` checks its fields with :func:`check_int`,
:func:`check_float` and :func:`check_choice`, and registers it from a ``register_methods`` hook.
Fitting helpers work on :class:`SortedGroups` (a layer's weights sorted per channel group):
:func:`lloyd` and :func:`density_init` place free levels, :func:`fit_scale` fits a scale.

A **listening plugin** implements the other hooks of :mod:`timm_qconv.hookspecs` with
:data:`hookimpl`. Plugins are found through the ``timm_qconv`` entry-point group, or added at run
time with :func:`register_plugin`. A plugin that writes files writes each with :func:`atomic_write`
(readers never see half a file). The README's "Plugins" section has a complete example.
"""
from ._errors import check_choice, check_float, check_int
from ._groups import SortedGroups, as_rows, group_index
from ._registry import get_method, list_methods, register_method
from .atomic import atomic_write
from .config import MAX_BITS, QuantConfig
from .convert import quantized_layers
from .hookspecs import hookimpl
from .layers import QuantMixin
from .methods.base import Quantizer
from .methods.lloyd import density_init, lloyd
from .methods.scaled_shape import ScaledShapeQuantizer, fit_scale
from .plugins import PluginError, register_plugin, unregister_plugin
from .report import LayerReport, QuantReport
from .selection import LayerSelection

__all__ = [
    "MAX_BITS", "atomic_write", "LayerReport", "LayerSelection", "PluginError", "QuantConfig", "QuantMixin",
    "QuantReport",
    "Quantizer", "ScaledShapeQuantizer", "SortedGroups", "as_rows", "check_choice", "check_float", "check_int",
    "density_init", "fit_scale", "get_method", "group_index", "hookimpl", "list_methods", "lloyd",
    "quantized_layers", "register_method", "register_plugin", "unregister_plugin",
]
