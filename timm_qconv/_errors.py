"""Argument checks shared by configs, layers and conversion.

Every check raises with the argument's name, the value it got and what is allowed, so that a
user reading only the last line of a traceback knows what to change.
"""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Sequence


def check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` in ``[low, high]``; raise ``TypeError``/``ValueError`` otherwise."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value!r} is out of range; expected {allowed}")
    return value


def check_float(name: str, value: Any, low: float = 0.0, *, strict: bool = True) -> float:
    """Return ``value`` as a float if it is a finite real number above ``low`` (or at least ``low``)."""
    relation = ">" if strict else ">="
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected a number {relation} {low}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")) or value < low or (strict and value == low):
        raise ValueError(f"{name}={value!r} is out of range; expected a finite number {relation} {low}")
    return value


def check_choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    """Return ``value`` if it is one of the strings in ``allowed``."""
    if not isinstance(value, str):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; expected one of {list(allowed)}")
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not allowed; expected one of {list(allowed)}")
    return value


def closest(word: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The candidates that look most like ``word`` (for 'did you mean' messages)."""
    candidates = list(candidates)
    found = difflib.get_close_matches(word, candidates, n=n, cutoff=0.5)
    if not found:  # fall back to a shared prefix, useful for dotted module names
        stem = word.split("*")[0].split("?")[0].split(".")[0]
        found = [c for c in candidates if stem and c.startswith(stem)][:n]
    return found


def check_module(name: str, value: Any) -> Any:
    """Return ``value`` if it is an ``nn.Module``."""
    from torch import nn

    if not isinstance(value, nn.Module):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"{name}={shown} has type {type(value).__name__}; expected a torch.nn.Module")
    return value


def check_device(name: str, value: Any) -> Any:
    """Return ``value`` as a ``torch.device`` if it names a device that exists here (``None`` passes through)."""
    import torch

    if value is None:
        return None
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{name}={value!r} has type {type(value).__name__}; "
                        "expected a device such as 'cpu' or 'cuda:0'")
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise ValueError(f"{name}={value!r} is not a device; expected e.g. 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"{name}={value!r} is not available: {found} CUDA device(s) found here; expected 'cpu'"
                         + (f" or cuda:0..cuda:{found - 1}" if found else ""))
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{name}={value!r} is not available here; expected 'cpu'")
    return device


def all_finite(tensor: Any) -> bool:
    """Whether a non-empty float tensor holds no NaN or inf, read by two reductions (its largest and
    smallest value, which NaN propagates to): no temporary the size of the tensor, as
    ``torch.isfinite(tensor).all()`` makes (a bool per element), which is what a model's largest
    layer would otherwise add to the peak memory of quantizing it."""
    import torch

    return bool(torch.isfinite(tensor.amax()) and torch.isfinite(tensor.amin()))
