"""timm_qconv plugin adding the ``apot`` method (additive powers-of-two).

This module is the plugin object: the ``timm_qconv`` entry point ``apot`` names it, and the
plugin manager calls its ``register_methods`` hook, as it does for the built-in methods.
"""
from timm_qconv.plugin_api import hookimpl

from .apot import ApotConfig, ApotQuantizer, apot_shape

__version__ = "0.1.0"


@hookimpl
def register_methods(register):
    register("apot", ApotQuantizer)


__all__ = ["ApotConfig", "ApotQuantizer", "apot_shape", "register_methods", "__version__"]
