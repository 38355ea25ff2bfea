"""Whether a state dict fits a model: the one check behind the CLI's ``--checkpoint`` and ``load_quantized``."""
from __future__ import annotations

from typing import Mapping

import torch


def _listed(items: list[str], shown: int) -> str:
    return f"{items[:shown]}{' ...' if len(items) > shown else ''} ({len(items)})"


def state_dict_mismatch(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor],
                        shown: int = 5) -> str | None:
    """What keeps ``state`` from loading into a model whose state dict has the shapes ``expected``.

    Args:
        expected: the model's state-dict keys and shapes.
        state: the tensors read from a file.
        shown: how many keys of each kind the answer names.
    Returns:
        ``None`` when every key is in both with the same shape; else a description of the keys
        missing from the file, those not in the model and those with different shapes.
    """
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {tuple(expected[k])}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    parts = [f"{label} {_listed(items, shown)}" for label, items in
             (("missing from the file:", missing), ("not in the model:", unexpected), ("different shapes:", wrong))
             if items]
    return "; ".join(parts) or None
