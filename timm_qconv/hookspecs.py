"""Hook specifications of the ``timm_qconv`` pluggy project.

Plugins implement these with ``@timm_qconv.hookimpl`` and are found through the ``timm_qconv``
entry-point group. Hooks are always called with keyword arguments; an implementation may accept
only the arguments it needs.
"""
from __future__ import annotations

import pluggy

PROJECT = "timm_qconv"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_methods(register):
    """Add quantization methods by calling ``register(name, QuantizerSubclass)``."""


@hookspec(firstresult=True)
def layer_quant_config(name, module, config):
    """Decide one layer: return ``None`` (no opinion), ``False`` (keep it float) or a QuantConfig / dict of overrides.

    Args:
        name: the layer's qualified name in the model (``"layer2.0.downsample.0"``).
        module: the float layer, not yet replaced.
        config: the config the layer gets by default; a dict such as ``{"n_bits": 8}`` overrides its fields.
    """


@hookspec
def before_quantize(model, config):
    """Called before ``quantize_model`` swaps any layer."""


@hookspec
def after_quantize(model, layers):
    """Called after ``quantize_model`` swapped ``layers`` (their names)."""


@hookspec
def before_freeze(model):
    """Called before ``freeze_model`` replaces quantized layers by plain ones."""


@hookspec
def after_freeze(model):
    """Called after ``freeze_model``."""


@hookspec
def after_bit_quantizer(quantizer, report):
    """Called after a BitQuantizer pass with the quantizer and its per-layer report."""


@hookspec
def training_event(event, state, control, payload):
    """Every callback event (``"on_step_end"``...) with the run's state, control flags and event arguments.

    Args:
        event: the callback event's name.
        state: the run's counters (epoch, step...).
        control: flags a plugin may set to steer the run.
        payload: the event's own keyword arguments (model, loss, metrics...), as a dict.
    """
