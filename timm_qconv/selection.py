"""Which layers of a model get quantized: :class:`LayerSelection`.

One validated dataclass, used by :func:`~timm_qconv.quantize_model`, :class:`~timm_qconv.BitQuantizer`
and both callbacks' options, with one default (every plain ``nn.Conv2d``) and one normal form:
``layers`` a tuple of kind names (``"conv"``, ``"linear"``), ``avoid`` a tuple of patterns.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from ._errors import check_module, closest

FilterFn = Callable[[nn.Module, str], bool]

#: The layer kinds that can be quantized, by name.
LAYER_KINDS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "linear": nn.Linear}
_ALIASES = {"conv2d": "conv"}


def _kind_name(item: Any, allowed: str) -> str:
    if isinstance(item, str):
        name = _ALIASES.get(item.lower(), item.lower())
        if name in LAYER_KINDS:
            return name
    elif isinstance(item, type):
        for name, kind in LAYER_KINDS.items():
            if item is kind:
                return name
    else:
        raise TypeError(f"layers entry {item!r} has type {type(item).__name__}; expected {allowed}")
    raise ValueError(f"layers entry {item!r} is not allowed; expected {allowed}")


def as_layer_kinds(layers: Any) -> tuple[str, ...]:
    """``layers`` (a kind name or class, or several) as a tuple of kind names, in a fixed order."""
    allowed = (f"a tuple of {[t.__name__ for t in LAYER_KINDS.values()]} or of the names "
               f"{sorted([*LAYER_KINDS, *_ALIASES])}")
    items = (layers,) if isinstance(layers, (str, type)) else layers
    if not isinstance(items, Iterable) or not (items := tuple(items)):
        raise TypeError(f"layers={layers!r} is not allowed; expected {allowed}")
    names = {_kind_name(item, allowed) for item in items}
    return tuple(name for name in LAYER_KINDS if name in names)


def as_patterns(name: str, value: Any) -> tuple[str, ...]:
    """``value`` (a module name or glob pattern, several, or ``None``) as a tuple of strings."""
    if value is None:
        return ()
    items = (value,) if isinstance(value, str) else value
    try:
        items = tuple(items)
    except TypeError:
        raise TypeError(f"{name}={value!r} must be a module name, a glob pattern, or a list of them") from None
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} entry {item!r} has type {type(item).__name__}; "
                            "expected a module name or glob pattern (str)")
    return items


def matches(fqn: str, pattern: str) -> bool:
    """Whether module ``fqn`` is ``pattern`` or under it (``"layer4"`` covers ``"layer4.0.conv1"``)."""
    return fnmatch.fnmatchcase(fqn, pattern) or fnmatch.fnmatchcase(fqn, pattern + ".*")


def _names(value: Any) -> tuple[str, ...]:
    return () if not value else (value,) if isinstance(value, str) else tuple(value)


def first_last_names(model: nn.Module, candidates: Sequence[str]) -> set[str]:
    """The stem conv and the classifier among ``candidates``.

    timm models name them in ``pretrained_cfg`` (``first_conv``, ``classifier``); other models
    fall back to the first and the last candidate layer.
    """
    cfg = getattr(model, "pretrained_cfg", None) or {}

    def under(names: tuple[str, ...]) -> list[str]:
        return [c for c in candidates if any(c == n or c.startswith(n + ".") for n in names)]

    first = under(_names(cfg["first_conv"])) if "first_conv" in cfg else list(candidates[:1])
    last = under(_names(cfg["classifier"])) if "classifier" in cfg else list(candidates[-1:])
    return set(first) | set(last)


@dataclass
class LayerSelection:
    """Which layers to quantize, checked when created.

    Args:
        layers: layer kinds: ``"conv"`` (``nn.Conv2d``), ``"linear"`` (``nn.Linear``), or both;
            names or classes. ``None``: the default, ``("conv",)``. Only exact plain layers are
            taken: subclasses with their own forward (timm's ``Conv2dSame``, ``StdConv2d``) would
            lose their behaviour if swapped.
        avoid: module names or glob patterns to leave in float (a name covers its submodules).
        skip_first_last: leave the stem conv and the classifier in float (timm's
            ``pretrained_cfg`` ``first_conv``/``classifier`` when the model has them).
        filter_fn: ``filter_fn(module, name) -> bool``; only layers it accepts are quantized.
    """

    layers: Any = ("conv",)
    avoid: Any = ()
    skip_first_last: bool = False
    filter_fn: FilterFn | None = None

    def __post_init__(self) -> None:
        self.layers = as_layer_kinds(("conv",) if self.layers is None else self.layers)
        self.avoid = as_patterns("avoid", self.avoid)
        if not isinstance(self.skip_first_last, bool):
            raise TypeError(f"skip_first_last={self.skip_first_last!r} must be a bool")
        if self.filter_fn is not None and not callable(self.filter_fn):
            raise TypeError(f"filter_fn={self.filter_fn!r} must be callable as filter_fn(module, name) -> bool")

    @property
    def layer_types(self) -> tuple[type[nn.Module], ...]:
        """The classes of :attr:`layers`."""
        return tuple(LAYER_KINDS[name] for name in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The selection as JSON-friendly settings (``filter_fn`` only says whether there is one)."""
        return {"layers": list(self.layers), "avoid": list(self.avoid), "skip_first_last": self.skip_first_last}

    def select(self, model: nn.Module) -> list[str]:
        """Names of the selected layers of ``model``, in module order (nothing is changed).

        Raises:
            ValueError: an ``avoid`` pattern matches no module, or no layer is selected.
        """
        check_module("model", model)
        names = [n for n, _ in model.named_modules() if n]
        for pattern in self.avoid:
            if not any(matches(n, pattern) for n in names):
                raise ValueError(f"avoid entry {pattern!r} matches no module; closest names: {closest(pattern, names)}")
        kinds = self.layer_types
        # Already-quantized layers are subclasses, so the exact-type test leaves them out.
        candidates = [fqn for fqn, module in model.named_modules() if type(module) in kinds]
        skipped = first_last_names(model, candidates) if (self.skip_first_last and candidates) else set()
        modules = dict(model.named_modules())
        chosen = [
            fqn for fqn in candidates
            if fqn not in skipped
            and not any(matches(fqn, p) for p in self.avoid)
            and (self.filter_fn is None or self.filter_fn(modules[fqn], fqn))
        ]
        if not chosen:
            raise ValueError(
                f"no layer of {type(model).__name__} matches layers={[k.__name__ for k in kinds]}, "
                f"avoid={list(self.avoid)}, skip_first_last={self.skip_first_last}"
                + (", filter_fn" if self.filter_fn else "")
                + f"; candidate layers: {candidates[:10]}{' ...' if len(candidates) > 10 else ''}"
            )
        return chosen
