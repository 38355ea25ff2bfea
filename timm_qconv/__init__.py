"""timm_qconv: few-bit weight quantization for PyTorch and timm models."""
from . import plugins  # noqa: F401  (gives the method registry its loader)
from ._registry import get_method, list_methods, make_config, register_method
from .backend import get_kernel_backend, kernel_backend, set_kernel_backend
from .bit_quantizer import BitQuantizer
from .callbacks import BitQuantizerCallback, CallbackHandler, HashLossCallback, QuantCallback, TrainControl, TrainState
from .config import QuantConfig
from .convert import freeze_model, plan_quantization, quantize_model, quantized_layers
from .export import load_quantized, save_quantized
from .hookspecs import hookimpl
from .layers import QuantConv2d, QuantLinear, QuantMixin
from .loss import hash_loss
from .methods import HashConfig, KMeansConfig, LinearConfig, LogConfig, PolyConfig, Quantizer
from .prototype import quantizeModel
from .selection import LayerSelection

__version__ = "0.1.0"

__all__ = [
    "QuantConv2d", "QuantLinear", "QuantMixin", "Quantizer", "QuantConfig", "HashConfig", "KMeansConfig",
    "LinearConfig", "LogConfig", "PolyConfig", "get_method", "list_methods", "make_config",
    "register_method", "hookimpl", "quantize_model", "quantizeModel", "freeze_model", "hash_loss",
    "plan_quantization", "BitQuantizer", "quantized_layers", "__version__",
    "save_quantized", "load_quantized", "set_kernel_backend", "get_kernel_backend",
    "kernel_backend", "LayerSelection",
    "QuantCallback", "CallbackHandler", "HashLossCallback", "BitQuantizerCallback", "TrainState", "TrainControl",
]
