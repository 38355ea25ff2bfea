"""Save a quantized model as packed few-bit codes, and load it back as a plain model.

A saved model is a directory with two files:

* ``model.safetensors``: for each quantized layer ``L``, ``L.weight.codes`` (its codes, bit-packed
  to ``ceil(log2(levels))`` bits each, see :mod:`timm_qconv._packing`) and ``L.weight.levels``
  (the ``(groups, levels)`` float32 level table); every other state-dict tensor as it is.
* ``config.json``: the timm architecture and the kwargs that recreate it, the method, bits and
  groups, each quantized layer's shape and dtype, the format version, and the sha256 of
  ``model.safetensors`` so that a truncated or modified file is detected before anything is loaded.

Both files are written atomically (a temporary file in the same directory, then ``os.replace``),
so an interrupted or failed save leaves the files that were there before untouched.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from ._groups import as_rows, group_index
from ._packing import MAX_BITS, pack_bits, unpack_bits
from ._state_dict import state_dict_mismatch
from .bit_quantizer import BitQuantizer
from .convert import freeze_model, quantized_layers
from .layers import QuantMixin
from .methods.base import Quantizer

FORMAT = "timm_qconv.quantized"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CODES = ".weight.codes"
LEVELS = ".weight.levels"

__all__ = ["save_quantized", "load_quantized", "read_config", "WEIGHTS_FILE", "CONFIG_FILE"]


# ---------------------------------------------------------------------------------------- saving
def _layers_of(obj: Any) -> tuple[nn.Module, list[tuple[str, Tensor, Quantizer, Tensor]], set[str]]:
    """The model, ``(name, weight, fitted quantizer, (C, K) codes)`` per quantized layer, and the
    state-dict keys those layers own (replaced by codes and levels in the file)."""
    if isinstance(obj, BitQuantizer):
        if not obj.quantizers:
            raise ValueError("model_or_quantizer is a BitQuantizer that was not fitted; "
                             "call train_hash_functions() first")
        layers = [(n, obj.modules[n].weight, obj.quantizers[n], obj.codes[n]) for n in obj.layer_names]
        return obj.model, layers, {f"{n}.weight" for n in obj.layer_names}
    if isinstance(obj, nn.Module):
        if isinstance(obj, QuantMixin):
            raise TypeError(f"model_or_quantizer={type(obj).__name__} is a single layer; "
                            "wrap it in a module (nn.Sequential)")
        found = quantized_layers(obj)
        if not found:
            raise ValueError(
                f"model_or_quantizer={type(obj).__name__} has no quantized layer; convert it with quantize_model() "
                f"or pass a fitted BitQuantizer"
            )
        layers, owned = [], set()
        for name, layer in found:
            quantizer = layer.quantizer
            was_training = quantizer.training
            quantizer.eval()  # the codes of eval mode, which is what freeze_model/to_float use
            try:
                with torch.no_grad():
                    codes = quantizer.encode(as_rows(layer.weight.detach()).float())
            finally:
                quantizer.train(was_training)
            layers.append((name, layer.weight, quantizer, codes))
            owned |= {f"{name}.{k}" for k in layer.state_dict() if k == "weight" or k.startswith("quantizer.")}
        return obj, layers, owned
    raise TypeError(
        f"model_or_quantizer={type(obj).__name__} is not allowed; expected a fitted BitQuantizer or an nn.Module "
        f"with quantized layers (QuantConv2d/QuantLinear)"
    )


def _float32_bytes(tensors: dict[str, Tensor]) -> int:
    """Size of the state dict with every floating tensor in float32 (the usual reference size)."""
    return sum(t.numel() * 4 if t.is_floating_point() else t.numel() * t.element_size() for t in tensors.values())


def _timm_spec(model: nn.Module) -> tuple[str | None, dict[str, Any]]:
    """timm architecture name and the constructor kwargs that change its parameters, if a timm model."""
    cfg = getattr(model, "pretrained_cfg", None)
    arch = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not isinstance(arch, str) or not type(model).__module__.startswith("timm."):
        return None, {}
    kwargs: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        kwargs["num_classes"] = model.num_classes
    in_chans = getattr(model, "in_chans", None)
    first = cfg.get("first_conv")
    if not isinstance(in_chans, int) and isinstance(first, str):
        in_chans = getattr(dict(model.named_modules()).get(first), "in_channels", None)
    if isinstance(in_chans, int):
        kwargs["in_chans"] = in_chans
    return arch, kwargs


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encode_layer(name: str, weight: Tensor, quantizer: Quantizer, codes: Tensor) -> tuple[Tensor, Tensor, dict]:
    levels = quantizer.levels().detach().float().cpu().contiguous()
    n_levels = levels.shape[1]
    if n_levels > 2**MAX_BITS:
        raise ValueError(f"layer {name!r} has {n_levels} levels per group; export supports at most {2**MAX_BITS}")
    code_bits = max(1, (n_levels - 1).bit_length())
    codes = codes.detach().cpu()
    if codes.numel() and int(codes.max()) >= n_levels:
        raise ValueError(f"layer {name!r} has code {int(codes.max())} but only {n_levels} levels")
    meta = {
        "shape": list(weight.shape), "dtype": _dtype_name(weight.dtype), "method": quantizer.name,
        "n_bits": quantizer.config.n_bits, "code_bits": code_bits, "groups": int(levels.shape[0]), "levels": n_levels,
    }
    return pack_bits(codes, code_bits), levels, meta


def _summary(quantizers: list[Quantizer]) -> dict[str, Any]:
    """Method, bits and groups of the whole model ("mixed" when the layers differ)."""
    configs = {(q.name, json.dumps(q.config.to_dict(), sort_keys=True, default=str)) for q in quantizers}
    if len(configs) != 1:
        return {"method": "mixed", "n_bits": "mixed", "n_functions": "mixed", "options": None}
    q = quantizers[0]
    return {"method": q.name, "n_bits": q.config.n_bits, "n_functions": q.config.n_functions,
            "options": q.config.to_dict()}


def _new_dirs(directory: Path) -> list[Path]:
    """The directories that creating ``directory`` would add, deepest first."""
    missing = []
    for p in [directory, *directory.parents]:
        if p.exists():
            break
        missing.append(p)
    return missing


def _write_temp(directory: Path, final_name: str, data: bytes) -> Path:
    """Write ``data`` to a new hidden file next to ``final_name`` and flush it to disk."""
    tmp = directory / f".{final_name}.{uuid.uuid4().hex[:12]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, like open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


@torch.no_grad()
def save_quantized(model_or_quantizer: BitQuantizer | nn.Module, path: str | os.PathLike) -> Path:
    """Save a quantized model as packed codes plus level tables (see the module docstring).

    Args:
        model_or_quantizer: a fitted :class:`BitQuantizer`, or a model with quantized layers
            (:func:`~timm_qconv.quantize_model`); those are encoded with their quantizer in eval mode.
        path: directory to write ``model.safetensors`` and ``config.json`` to; created if missing.
            Existing files of those names are replaced atomically; other files are left alone.
    Returns:
        the directory, as a ``Path``.
    """
    model, layers, owned = _layers_of(model_or_quantizer)
    state = model.state_dict()
    tensors: dict[str, Tensor] = {}
    layer_meta: dict[str, dict] = {}
    plain = {k: v for k, v in state.items() if k not in owned}
    for name, weight, quantizer, codes in layers:
        packed, levels, meta = _encode_layer(name, weight, quantizer, codes)
        for key, value in ((name + CODES, packed), (name + LEVELS, levels)):
            if key in plain:
                raise ValueError(f"model has a tensor named {key!r}, which the export format reserves for codes/levels")
            tensors[key] = value
        layer_meta[name] = meta
    for key, value in plain.items():
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()  # copy: safetensors rejects shared storage
    float32_bytes = _float32_bytes({**plain, **{f"{n}.weight": w for n, w, _, _ in layers}})
    arch, kwargs = _timm_spec(model)
    data = safetensors.torch.save(tensors, metadata={"format": "pt", "timm_qconv_format": str(FORMAT_VERSION)})
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": arch, "model_kwargs": kwargs,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        **_summary([q for _, _, q, _ in layers]),
        "layers": layer_meta,
        "weights_file": WEIGHTS_FILE, "weights_bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
        "float32_bytes": float32_bytes,
    }
    config_data = (json.dumps(config, indent=2, default=str) + "\n").encode()
    return _write_pair(Path(path), data, config_data)


def _write_pair(directory: Path, weights: bytes, config: bytes) -> Path:
    """Write both files atomically; on any error remove what this call created and re-raise."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path={str(directory)!r} is an existing file; expected a directory "
                         f"(to hold {WEIGHTS_FILE} and {CONFIG_FILE})")
    created = _new_dirs(directory)
    temps: list[Path] = []
    old_weights, backup = directory / WEIGHTS_FILE, None
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temps.append(_write_temp(directory, WEIGHTS_FILE, weights))
        temps.append(_write_temp(directory, CONFIG_FILE, config))
        if old_weights.exists():  # a hard link keeps the old weights, to restore if the config's rename fails
            backup = directory / f".{WEIGHTS_FILE}.{uuid.uuid4().hex[:12]}.old"
            try:
                os.link(old_weights, backup)
            except OSError:
                backup = None  # no hard links here; a crash in between is still caught by the checksum
        os.replace(temps[0], old_weights)
        try:
            os.replace(temps[1], directory / CONFIG_FILE)
        except BaseException:
            if backup is not None:
                os.replace(backup, old_weights)
            raise
    except BaseException as exc:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        for d in created:  # deepest first; only directories this call made, and only if empty
            try:
                d.rmdir()
            except OSError:
                break
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise OSError(f"path={str(directory)!r} cannot be written: {reason} ({exc.filename or directory})") from exc
        raise
    finally:
        if backup is not None:
            backup.unlink(missing_ok=True)
    return directory


# ---------------------------------------------------------------------------------------- loading
def read_config(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The ``config.json`` of a saved model; with ``verify``, also check ``model.safetensors``'s size and sha256."""
    directory = Path(path)
    config = _read_config(directory)
    if verify:
        _read_weights(directory, config)
    return config


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"path={str(directory)!r} is not a directory; expected one written by save_quantized")
    if not file.is_file():
        raise FileNotFoundError(f"path={str(directory)!r} has no {CONFIG_FILE}; "
                                "expected a directory written by save_quantized")
    try:
        config = json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file} is not valid JSON ({exc}); the file is damaged") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else None
        raise ValueError(f"{file} is not a timm_qconv export (format={found!r}, expected {FORMAT!r})")
    version = config.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(f"{file} has format_version={version!r}; "
                         f"this timm_qconv reads versions up to {FORMAT_VERSION}")
    for key in ("layers", "sha256", "weights_bytes"):
        if key not in config:
            raise ValueError(f"{file} lacks the {key!r} entry; the file is damaged")
    return config


def _read_weights(directory: Path, config: dict[str, Any]) -> bytes:
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"path={str(directory)!r} has no {WEIGHTS_FILE}")
    data = file.read_bytes()
    if len(data) != config["weights_bytes"]:
        raise ValueError(
            f"{file} is truncated or was changed: it has {len(data)} bytes, "
            f"{CONFIG_FILE} records {config['weights_bytes']}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != config["sha256"]:
        raise ValueError(f"{file} was changed after saving: its sha256 {digest[:16]}... does not match "
                         f"{CONFIG_FILE}'s {str(config['sha256'])[:16]}...")
    return data


def _decode_layer(name: str, meta: dict, tensors: dict[str, Tensor]) -> Tensor:
    """The quantized weight of one layer, exactly as ``Quantizer.decode`` computes it, in its dtype."""
    try:
        packed, levels = tensors.pop(name + CODES), tensors.pop(name + LEVELS)
    except KeyError as exc:
        raise ValueError(
            f"{WEIGHTS_FILE} lacks {exc.args[0]!r} listed in {CONFIG_FILE}; the files do not belong together") from None
    shape = torch.Size(meta["shape"])
    n_channels, n_codes = shape[0], shape.numel()
    groups, n_levels = meta["groups"], meta["levels"]
    if tuple(levels.shape) != (groups, n_levels) or levels.dtype != torch.float32 or not 1 <= groups <= n_channels:
        raise ValueError(f"layer {name!r}: level table {tuple(levels.shape)} {levels.dtype} does not match "
                         f"{CONFIG_FILE} ({groups}, {n_levels})")
    codes = unpack_bits(packed, meta["code_bits"], n_codes).view(n_channels, -1).long()
    if n_codes and int(codes.max()) >= n_levels:
        raise ValueError(f"layer {name!r} has code {int(codes.max())} but only {n_levels} levels; the file is damaged")
    dtype = getattr(torch, meta["dtype"], None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"layer {name!r} has dtype {meta['dtype']!r}, which is not a torch dtype")
    # Same lookup as Quantizer.decode: levels[group_index].gather(1, codes), then the layer's dtype.
    return levels[group_index(n_channels, groups)].gather(1, codes).view(shape).to(dtype)


def _decode_state(data: bytes, config: dict[str, Any]) -> dict[str, Tensor]:
    try:
        tensors = safetensors.torch.load(data)
    except Exception as exc:  # the checksum matched, so the writer itself produced a bad file
        raise ValueError(f"{WEIGHTS_FILE} cannot be read: {exc}") from None
    state = {}
    for name, meta in config["layers"].items():
        try:
            state[f"{name}.weight"] = _decode_layer(name, meta, tensors)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"layer {name!r} in {CONFIG_FILE} is incomplete or damaged ({exc})") from None
    for key, value in tensors.items():
        if key.endswith((CODES, LEVELS)):
            raise ValueError(f"{WEIGHTS_FILE} has {key!r}, which {CONFIG_FILE} does not list; "
                             "the files do not belong together")
        state[key] = value
    return state


def _plain_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """State-dict shapes of ``model`` once its quantized layers are frozen to plain ones."""
    quant = [f"{n}.quantizer." if n else "quantizer." for n, _ in quantized_layers(model)]
    return {k: v.shape for k, v in model.state_dict().items() if not k.startswith(tuple(quant))}


def _check_fits(model: nn.Module, state: dict[str, Tensor], config: dict[str, Any]) -> None:
    mismatch = state_dict_mismatch(_plain_shapes(model), state)
    if mismatch:
        raise ValueError(f"model={type(model).__name__} does not match the saved architecture "
                         f"{config.get('architecture') or config.get('model_class')!r}; {mismatch}")


def _create_model(config: dict[str, Any]) -> nn.Module:
    arch = config.get("architecture")
    if not arch:
        raise ValueError(
            f"the saved model is a {config.get('model_class')}, not a timm model; "
            "pass model= with the same architecture"
        )
    import timm

    return timm.create_model(arch, pretrained=False, **config.get("model_kwargs", {}))


@torch.no_grad()
def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by :func:`save_quantized` as a plain model with the quantized weights.

    Everything (checksum, every layer's codes and levels, every key and shape against the model)
    is checked before the model is touched, so a bad file leaves ``model`` as it was.

    Args:
        path: the directory given to :func:`save_quantized`.
        model: the module to load into, in place; ``None`` creates the saved timm architecture
            (``pretrained=False``) with the saved dtypes. Quantized layers in ``model`` are replaced by
            plain ones.
    Returns:
        the model, whose weights equal ``BitQuantizer.get_hashed_model()``'s bit for bit.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not an nn.Module (or None to create the saved timm model)")
    directory = Path(path)
    config = _read_config(directory)
    state = _decode_state(_read_weights(directory, config), config)
    target = model if model is not None else _create_model(config)
    _check_fits(target, state, config)
    if quantized_layers(target):
        target = freeze_model(target)
    target.load_state_dict(state, strict=True, assign=model is None)  # assign: keep the saved dtypes
    return target
