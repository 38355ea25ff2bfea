"""timm_qconv plugin: each quantized layer's error and distinct levels per epoch, to CSV/JSON and PNG.

``plugin`` is the object the ``timm_qconv`` entry point ``report`` names. Installed, it does
nothing until ``TIMM_QCONV_REPORT=1`` switches it on; its other settings come from the environment
too (see :mod:`timm_qconv_report.settings`). Register your own :class:`ReportPlugin` to turn it on
and set them in code.
"""
from .plugin import ReportPlugin
from .snapshot import LayerSnapshot

__version__ = "0.1.0"

plugin = ReportPlugin(enabled=None)  # on only with TIMM_QCONV_REPORT=1

__all__ = ["ReportPlugin", "LayerSnapshot", "plugin", "__version__"]
