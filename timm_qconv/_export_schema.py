"""What an export's ``config.json`` may contain, checked before anything is read or built from it.

An export may come from a stranger, so its config is treated as hostile input: every entry has a
type and a range, the architecture must be a plain timm model name (no ``hf-hub:``/``local-dir:``
prefix, no path, no pretrained download), and only the keyword arguments that change a timm model's
parameter shapes are allowed (``num_classes``, ``in_chans``), as integers in a range. The weights
file names the config it belongs to by digest (:func:`config_digest`, stored in the safetensors
metadata, which the config's sha256 in turn covers), so neither file can be swapped or edited alone.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ._packing import MAX_BITS

FORMAT = "timm_qconv.quantized"
FORMAT_VERSION = 2
"""Version 2 binds config and weights together; version 1 exports are refused (re-save them)."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
DIGEST_METADATA = "timm_qconv_config_sha256"
"""safetensors metadata key holding :func:`config_digest` of the config the weights belong to."""

UNBOUND = ("sha256", "weights_bytes")
"""Config entries describing the weights file itself, left out of the config's digest."""

DTYPES = ("float32", "float16", "bfloat16", "float64")
"""Weight dtypes an export may name (the floating types a quantized layer can have)."""

MODEL_KWARGS = {"num_classes": (0, 1_000_000), "in_chans": (1, 4096)}
"""timm keyword arguments an export may pass to ``timm.create_model``, with their allowed ranges."""

_ARCHITECTURE = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_MAX_DIMS = 8


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the config's canonical JSON, without the entries that describe the weights file."""
    bound = {k: v for k, v in config.items() if k not in UNBOUND}
    text = json.dumps(bound, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _fail(file: str, entry: str, value: Any, allowed: str) -> ValueError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ValueError(f"{file}: {entry}={shown} is not allowed; expected {allowed}")


def _int(file: str, entry: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise _fail(file, entry, value, allowed)
    return value


def check_architecture(file: str, value: Any) -> str | None:
    """``None`` (not a timm model) or a plain timm model name, optionally with a ``.tag``."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 200 or not _ARCHITECTURE.fullmatch(value):
        raise _fail(file, "architecture", value, "null or a plain timm model name such as 'resnet34' "
                    "(letters, digits, '_' and one '.tag'; no hub or folder prefix)")
    return value


def check_model_kwargs(file: str, value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise _fail(file, "model_kwargs", value, f"an object with some of {sorted(MODEL_KWARGS)}")
    for key, item in value.items():
        if key not in MODEL_KWARGS:
            raise _fail(file, f"model_kwargs.{key}", item, f"only the keys {sorted(MODEL_KWARGS)}")
        _int(file, f"model_kwargs.{key}", item, *MODEL_KWARGS[key])
    return value


def check_layer(file: str, name: Any, meta: Any) -> None:
    """One entry of ``layers``: shape, dtype, method, bits, code bits, groups and levels."""
    if not isinstance(name, str) or not name or len(name) > 1000:
        raise _fail(file, "layers", name, "layer names as non-empty strings")
    entry = f"layers[{name!r}]"
    keys = {"shape", "dtype", "method", "n_bits", "code_bits", "groups", "levels"}
    if not isinstance(meta, dict) or not keys <= set(meta):
        raise _fail(file, entry, meta, f"an object with the entries {sorted(keys)}")
    shape = meta["shape"]
    if not isinstance(shape, list) or not 1 <= len(shape) <= _MAX_DIMS:
        raise _fail(file, f"{entry}.shape", shape, f"a list of 1..{_MAX_DIMS} integers >= 1")
    for size in shape:
        _int(file, f"{entry}.shape", size, 1, 2**40)
    if meta["dtype"] not in DTYPES:
        raise _fail(file, f"{entry}.dtype", meta["dtype"], f"one of {list(DTYPES)}")
    if not isinstance(meta["method"], str):
        raise _fail(file, f"{entry}.method", meta["method"], "a method name")
    _int(file, f"{entry}.n_bits", meta["n_bits"], 1, MAX_BITS)
    code_bits = _int(file, f"{entry}.code_bits", meta["code_bits"], 1, MAX_BITS)
    _int(file, f"{entry}.groups", meta["groups"], 1, shape[0])
    _int(file, f"{entry}.levels", meta["levels"], 1, 2**code_bits)


def check_config(config: Any, file: str) -> dict[str, Any]:
    """Return ``config`` if it is a well-formed export config; raise ``ValueError`` naming the entry otherwise.

    Args:
        config: the parsed ``config.json``.
        file: the file's path, for the messages.
    """
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{file} is not a timm_qconv export (format={found!r}, expected {FORMAT!r})")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        hint = "; re-save it with this timm_qconv (version 1 did not bind the config to the weights)" \
            if version == 1 else ""
        raise _fail(file, "format_version", version, f"{FORMAT_VERSION}, the version this timm_qconv reads{hint}")
    for key in ("layers", "sha256", "weights_bytes", "weights_file", "float32_bytes", "architecture", "model_kwargs"):
        if key not in config:
            raise ValueError(f"{file} lacks the {key!r} entry; the file is damaged")
    if config["weights_file"] != WEIGHTS_FILE:
        raise _fail(file, "weights_file", config["weights_file"], repr(WEIGHTS_FILE))
    if not isinstance(config["sha256"], str) or not _SHA256.fullmatch(config["sha256"]):
        raise _fail(file, "sha256", config["sha256"], "64 lowercase hex digits")
    _int(file, "weights_bytes", config["weights_bytes"], 8)
    _int(file, "float32_bytes", config["float32_bytes"], 1)
    check_architecture(file, config["architecture"])
    check_model_kwargs(file, config["model_kwargs"])
    if not isinstance(config.get("model_class", ""), str):
        raise _fail(file, "model_class", config["model_class"], "a string")
    layers = config["layers"]
    if not isinstance(layers, dict) or not layers:
        raise _fail(file, "layers", layers, "an object with one entry per quantized layer")
    for name, meta in layers.items():
        check_layer(file, name, meta)
    return config
