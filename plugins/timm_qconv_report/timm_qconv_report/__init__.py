"""timm_qconv plugin: each quantized layer's error and distinct levels per epoch, to CSV/JSON and PNG.

``plugin`` is the object the ``timm_qconv`` entry point ``report`` names; its settings come from
the environment (see :mod:`timm_qconv_report.settings`). Register your own :class:`ReportPlugin`
to set them in code.
"""
from .plugin import ReportPlugin
from .snapshot import LayerSnapshot

__version__ = "0.1.0"

plugin = ReportPlugin()

__all__ = ["ReportPlugin", "LayerSnapshot", "plugin", "__version__"]
