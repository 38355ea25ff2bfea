"""Test helpers for exports: rewrite one consistently, as someone crafting a file would."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import safetensors.torch

from timm_qconv._export_schema import DIGEST_METADATA, config_digest
from timm_qconv.export import CONFIG_FILE, WEIGHTS_FILE


def resign(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Edit the config and rewrite both files so that checksum and config digest match again."""
    config = json.loads((path / CONFIG_FILE).read_text())
    edit(config)
    tensors = safetensors.torch.load((path / WEIGHTS_FILE).read_bytes())
    data = safetensors.torch.save(tensors, metadata={"format": "pt", DIGEST_METADATA: config_digest(config)})
    config.update(weights_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (path / WEIGHTS_FILE).write_bytes(data)
    (path / CONFIG_FILE).write_text(json.dumps(config))


def set_entry(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    """An edit that sets ``config[k1][k2]... = value``."""
    def edit(config: dict[str, Any]) -> None:
        target = config
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit
