"""Built-in quantization methods. This module is itself the built-in plugin: it registers the
methods through the same ``register_methods`` hook that third-party plugins implement."""
from ..hookspecs import hookimpl
from .base import Quantizer
from .hash import HashConfig, HashQuantizer
from .kmeans import KMeansConfig, KMeansQuantizer
from .linear import LinearConfig, LinearQuantizer
from .log import LogConfig, LogQuantizer
from .poly import PolyConfig, PolyQuantizer
from .scaled_shape import ScaledShapeQuantizer

BUILTIN_METHODS = {
    "hash": HashQuantizer,
    "kmeans": KMeansQuantizer,
    "linear": LinearQuantizer,
    "log": LogQuantizer,
    "poly": PolyQuantizer,
}


@hookimpl
def register_methods(register):
    for name, cls in BUILTIN_METHODS.items():
        register(name, cls)


__all__ = [
    "Quantizer", "HashConfig", "HashQuantizer", "KMeansConfig", "KMeansQuantizer", "LinearConfig",
    "LinearQuantizer", "LogConfig", "LogQuantizer", "ScaledShapeQuantizer", "PolyConfig", "PolyQuantizer",
    "BUILTIN_METHODS",
]
