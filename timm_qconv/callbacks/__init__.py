"""Training callbacks: attach hash-loss training or BitQuantizer passes to an existing loop."""
from .base import EVENTS, QuantCallback, TrainControl, TrainState
from .bit_quantizer import BitQuantizerCallback, BitQuantizerOptions
from .handler import CallbackHandler
from .hash_loss import HashLossCallback, HashLossOptions

__all__ = [
    "EVENTS", "QuantCallback", "TrainControl", "TrainState", "CallbackHandler", "HashLossCallback",
    "HashLossOptions", "BitQuantizerCallback", "BitQuantizerOptions",
]
