"""The prototype's decorator, :func:`quantizeModel`, kept for compatibility.

New code calls :func:`~timm_qconv.quantize_model` and :func:`~timm_qconv.hash_loss` directly.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

from torch import nn

from ._registry import make_config
from .convert import quantize_model
from .loss import hash_loss

_CONVERT_ARGS = {"method", "layers", "avoid", "skip_first_last", "mode", "filter_fn", "kernels"}


def quantizeModel(n_functions: int | None = None, n_bits: int | None = None, **kwargs: Any) -> Callable[[Any], Any]:
    """The prototype's decorator, kept for compatibility.

    ``@quantizeModel(n_functions=4, n_bits=2)`` on an ``nn.Module`` class quantizes every instance at
    the end of its ``__init__``; ``quantizeModel(...)(model)`` converts an existing instance. Both
    give the model a ``get_hash_loss()`` method. Other keywords go to :func:`quantize_model`.
    """
    make_config(kwargs.get("method", "hash"), n_bits=n_bits, n_functions=n_functions,
                **{k: v for k, v in kwargs.items() if k not in _CONVERT_ARGS})  # fail at decoration time

    def convert(model: nn.Module) -> nn.Module:
        return quantize_model(model, n_bits=n_bits, n_functions=n_functions, **kwargs)

    def wrap_init(init: Callable[..., None]) -> Callable[..., None]:
        # Convert once, when the outermost wrapped __init__ returns, so that layers a subclass adds
        # after super().__init__() are converted too.
        @functools.wraps(init)
        def __init__(self: nn.Module, *args: Any, **kw: Any) -> None:
            depth = self.__dict__.get("_timm_qconv_init_depth", 0)
            self.__dict__["_timm_qconv_init_depth"] = depth + 1
            try:
                init(self, *args, **kw)
            finally:
                self.__dict__["_timm_qconv_init_depth"] = depth
            if depth == 0:
                del self.__dict__["_timm_qconv_init_depth"]
                convert(self)

        return __init__

    def decorate(target: Any) -> Any:
        if isinstance(target, type) and issubclass(target, nn.Module):
            parent_hook = target.__dict__.get("__init_subclass__")

            def __init_subclass__(sub: type, **kw: Any) -> None:
                if parent_hook is not None:
                    parent_hook.__func__(sub, **kw)
                else:
                    super(target, sub).__init_subclass__(**kw)
                if "__init__" in sub.__dict__:
                    sub.__init__ = wrap_init(sub.__init__)

            target.__init__ = wrap_init(target.__init__)
            target.__init_subclass__ = classmethod(__init_subclass__)
            target.get_hash_loss = hash_loss
            return target
        if isinstance(target, nn.Module):
            convert(target)
            target.get_hash_loss = functools.partial(hash_loss, target)
            return target
        raise TypeError(f"quantizeModel decorates an nn.Module class or instance, not {target!r}")

    return decorate

