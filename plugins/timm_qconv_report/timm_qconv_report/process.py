"""Is this the main process? Only it writes files; every process sees the same levels anyway."""
from __future__ import annotations

import os
from typing import Any

import torch


def is_main_process(state: Any = None, payload: dict[str, Any] | None = None) -> bool:
    """The first answer of: ``state.is_main_process``, the payload's accelerator's
    ``is_main_process``, ``torch.distributed``'s rank, ``$RANK``; a single process is the main one."""
    for source in (state, (payload or {}).get("accelerator")):
        flag = getattr(source, "is_main_process", None)
        if isinstance(flag, bool):
            return flag
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"
