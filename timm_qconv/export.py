"""Save a quantized model as packed few-bit codes, and load it back as a plain model.

A saved model is a directory with two files:

* ``model.safetensors``: for each quantized layer ``L``, ``L.weight.codes`` (its codes, bit-packed
  to ``ceil(log2(levels))`` bits each, see :mod:`timm_qconv._packing`) and ``L.weight.levels``
  (the ``(groups, levels)`` float32 level table); every other state-dict tensor as it is. Its
  metadata holds the sha256 of the config it belongs to (:func:`~timm_qconv._export_schema.config_digest`).
* ``config.json``: the timm architecture and the kwargs that recreate it, the method, bits and
  groups, each quantized layer's shape and dtype, the format version, and the size and sha256 of
  ``model.safetensors``.

Loading trusts neither file (an export may come from a stranger): the config is checked against a
schema (:mod:`timm_qconv._export_schema`: a plain timm model name, only ``num_classes``/``in_chans``
as keyword arguments, every layer entry typed and bounded), the weights file's size is compared
before it is read, its sha256 before it is parsed, the config's digest in its metadata before
anything is built, and the model is first built on the ``meta`` device so that its shapes are
compared with the file's before any memory is allocated for it. Nothing is unpickled.

Both directions stream: saving computes, packs and writes one layer's codes at a time (the file is
hashed as it is written), and loading hashes the file in chunks, checks every layer's codes and
levels one layer at a time, then decodes and loads them one layer at a time. Beyond the model
itself, neither holds more than about one layer's tensors, so the largest timm models are exported
and loaded with memory for one copy of the model.

The directory is written with :func:`timm_qconv.atomic.atomic_directory`: into a hidden sibling,
then swapped in at once, so an interrupted save (a crash, ``SIGKILL``, Ctrl-C) leaves the previous
export loadable, or, for a new path, no directory at all.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable, NamedTuple

import safetensors
import torch
from torch import Tensor, nn

from ._errors import all_finite
from ._export_schema import (
    CONFIG_FILE,
    DIGEST_METADATA,
    DTYPES,
    FORMAT,
    FORMAT_VERSION,
    WEIGHTS_FILE,
    check_config,
    config_digest,
)
from ._groups import as_rows, group_index, row_chunks
from ._packing import MAX_BITS, pack_bits, packed_size, unpack_bits
from .atomic import atomic_directory, resolve_directory
from .bit_quantizer import BitQuantizer
from .convert import freeze_model, quantized_layers
from .layers import QuantMixin
from .methods.base import Quantizer
from .state_dict import state_dict_mismatch

CODES = ".weight.codes"
LEVELS = ".weight.levels"
MAX_CONFIG_BYTES = 64 * 2**20
"""A config.json larger than this is refused before it is read (a real one is a few kB per layer)."""

__all__ = ["save_quantized", "load_quantized", "read_config", "WEIGHTS_FILE", "CONFIG_FILE"]


# ---------------------------------------------------------------------------------------- saving
class _Layer(NamedTuple):
    name: str
    weight: Tensor
    quantizer: Quantizer
    codes: Callable[[], Tensor]  # uint8 (C, K), computed when the layer is written


SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
"""The safetensors names of the dtypes a state dict may hold here."""

_Entry = tuple[str, torch.dtype, list[int], Callable[[], Tensor]]
"""One tensor of the weights file: key, dtype, shape, and how to make it when it is written."""

def _layers_of(obj: Any) -> tuple[nn.Module, list[_Layer], set[str]]:
    """The model, its quantized layers, and the state-dict keys those layers own (replaced by codes
    and levels in the file). Codes are computed one layer at a time, when written."""
    if isinstance(obj, BitQuantizer):
        if not obj.quantizers:
            raise ValueError("model_or_quantizer is a BitQuantizer that was not fitted; "
                             "call train_hash_functions() first")
        layers = [_Layer(n, obj.modules[n].weight, obj.quantizers[n], functools.partial(obj.layer_codes, n))
                  for n in obj.layer_names]
        _check_finite(layers)
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
            layers.append(_Layer(name, layer.weight, layer.quantizer, functools.partial(_eval_codes, layer)))
            owned |= {f"{name}.{k}" for k in layer.state_dict() if k == "weight" or k.startswith("quantizer.")}
        _check_finite(layers)
        return obj, layers, owned
    raise TypeError(
        f"model_or_quantizer={type(obj).__name__} is not allowed; expected a fitted BitQuantizer or an nn.Module "
        f"with quantized layers (QuantConv2d/QuantLinear)"
    )


def _eval_codes(layer: QuantMixin) -> Tensor:
    """The layer's codes in eval mode, which is what freeze_model/to_float use."""
    quantizer = layer.quantizer
    was_training = quantizer.training
    quantizer.eval()
    try:
        return quantizer.encode_uint8(as_rows(layer.weight.detach()).float())
    finally:
        quantizer.train(was_training)


def _check_finite(layers: list[_Layer]) -> None:
    """Refuse NaN/inf weights or levels, naming the layer: a NaN would otherwise be saved as some level."""
    for name, weight, quantizer, _ in layers:
        if not all_finite(weight.detach()):
            raise ValueError(f"layer {name!r} has non-finite weights (NaN or inf); the export would hide them "
                             "behind a level. Fix the weights (or keep the layer in float) before saving")
        if not bool(torch.isfinite(quantizer.levels().detach()).all()):
            raise ValueError(f"layer {name!r} has non-finite quantization levels (NaN or inf); "
                             "its quantizer diverged, so it cannot be saved")


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


def _layer_meta(layer: _Layer) -> dict[str, Any]:
    levels = layer.quantizer.levels()
    n_levels = levels.shape[1]
    if n_levels > 2**MAX_BITS:
        raise ValueError(f"layer {layer.name!r} has {n_levels} levels per group; export supports at most "
                         f"{2**MAX_BITS}")
    return {"shape": list(layer.weight.shape), "dtype": _dtype_name(layer.weight.dtype), "method": layer.quantizer.name,
            "n_bits": layer.quantizer.config.n_bits, "code_bits": max(1, (n_levels - 1).bit_length()),
            "groups": int(levels.shape[0]), "levels": n_levels}


def _packed_codes(layer: _Layer, meta: dict[str, Any]) -> Tensor:
    codes = layer.codes().detach().cpu()
    if codes.numel() and int(codes.max()) >= meta["levels"]:
        raise ValueError(f"layer {layer.name!r} has code {int(codes.max())} but only {meta['levels']} levels")
    return pack_bits(codes, meta["code_bits"])


def _summary(quantizers: list[Quantizer]) -> dict[str, Any]:
    """Method, bits and groups of the whole model ("mixed" when the layers differ)."""
    configs = {(q.name, json.dumps(q.config.to_dict(), sort_keys=True, default=str)) for q in quantizers}
    if len(configs) != 1:
        return {"method": "mixed", "n_bits": "mixed", "n_functions": "mixed", "options": None}
    q = quantizers[0]
    return {"method": q.name, "n_bits": q.config.n_bits, "n_functions": q.config.n_functions,
            "options": q.config.to_dict()}


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
    if isinstance(model_or_quantizer, BitQuantizer):  # biases and BatchNorm statistics that calibration changed
        state.update(model_or_quantizer.overrides)
    plain = {k: v for k, v in state.items() if k not in owned}
    layer_meta = {layer.name: _layer_meta(layer) for layer in layers}
    entries: list[_Entry] = []  # what the file holds, in order
    for layer in layers:
        meta = layer_meta[layer.name]
        for key in (layer.name + CODES, layer.name + LEVELS):
            if key in plain:
                raise ValueError(f"model has a tensor named {key!r}, which the export format reserves for codes/levels")
        n_codes = layer.weight.numel()
        entries.append((layer.name + CODES, torch.uint8, [packed_size(n_codes, meta["code_bits"])],
                        functools.partial(_packed_codes, layer, meta)))
        entries.append((layer.name + LEVELS, torch.float32, [meta["groups"], meta["levels"]],
                        lambda q=layer.quantizer: q.levels().detach().float()))
    for key, value in plain.items():
        if value.dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"model's tensor {key!r} has dtype {value.dtype}; the export stores "
                             f"{sorted(_dtype_name(d) for d in SAFETENSORS_DTYPES)}")
        entries.append((key, value.dtype, list(value.shape), lambda v=value: v.detach()))
    float32_bytes = _float32_bytes({**plain, **{f"{layer.name}.weight": layer.weight for layer in layers}})
    arch, kwargs = _timm_spec(model)
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "architecture": arch, "model_kwargs": kwargs,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        **_summary([layer.quantizer for layer in layers]),
        "layers": layer_meta,
        "weights_file": WEIGHTS_FILE, "float32_bytes": float32_bytes,
    }
    config = json.loads(json.dumps(config, default=str))  # exactly what a reader will parse, for the digest
    metadata = {"format": "pt", "timm_qconv_format": str(FORMAT_VERSION), DIGEST_METADATA: config_digest(config)}
    directory = Path(path)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"path={str(directory)!r} is an existing file; expected a directory "
                         f"(to hold {WEIGHTS_FILE} and {CONFIG_FILE})")
    try:
        with atomic_directory(directory) as tmp:
            size, digest = _write_safetensors(tmp / WEIGHTS_FILE, entries, metadata)
            config.update(weights_bytes=size, sha256=digest)
            (tmp / CONFIG_FILE).write_bytes((json.dumps(config, indent=2) + "\n").encode())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OSError(f"path={str(directory)!r} cannot be written: {reason} ({exc.filename or directory})") from exc
    return directory


def _write_safetensors(file: Path, entries: list[_Entry], metadata: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file one tensor at a time; return its size and sha256.

    The format (https://huggingface.co/docs/safetensors) is an 8-byte little-endian header length,
    a JSON header naming each tensor's dtype, shape and byte range, then the tensors' bytes in that
    order. The library's writer takes every tensor at once, so a model of several GB would be held
    twice; here only one tensor (one layer's packed codes) exists at a time.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for key, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[key] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the tensors start 8-byte aligned, as the library writes them
    digest = hashlib.sha256()
    with open(file, "wb") as f:
        for chunk in (struct.pack("<Q", len(encoded)), encoded):
            f.write(chunk)
            digest.update(chunk)
        for key, dtype, shape, make in entries:
            tensor = make()
            if tensor.dtype != dtype or list(tensor.shape) != shape:  # the header is already written
                raise RuntimeError(f"{key} changed while it was saved: {tensor.dtype} {list(tensor.shape)}, "
                                   f"expected {dtype} {shape}")
            data = tensor.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
            f.write(data)
            digest.update(data)
            del tensor, data  # before the next one is made
        return f.tell(), digest.hexdigest()


# ---------------------------------------------------------------------------------------- loading
def read_config(path: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The checked ``config.json`` of a saved model.

    Args:
        path: the directory given to :func:`save_quantized`.
        verify: also check ``model.safetensors``: its size, sha256 and the config digest it holds.
    """
    directory = resolve_directory(path)
    config = _read_config(directory)
    if verify:
        _verify_weights(directory, config)
    return config


def _read_config(directory: Path) -> dict[str, Any]:
    file = directory / CONFIG_FILE
    if not directory.is_dir():
        raise FileNotFoundError(f"path={str(directory)!r} is not a directory; expected one written by save_quantized")
    if not file.is_file():
        raise FileNotFoundError(f"path={str(directory)!r} has no {CONFIG_FILE}; "
                                "expected a directory written by save_quantized")
    size = file.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{file} has {size} bytes; a timm_qconv config has at most {MAX_CONFIG_BYTES}")
    try:
        config = json.loads(file.read_bytes().decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError(f"{file} is not valid JSON ({str(exc)[:100]}); the file is damaged") from None
    return check_config(config, str(file))


def _read_header(file: Path, size: int) -> dict[str, Any]:
    """The JSON header of a safetensors file (a little-endian length, then the header)."""
    with open(file, "rb") as f:
        start = f.read(8)
        if len(start) < 8:
            raise ValueError(f"{WEIGHTS_FILE} is too short to be a safetensors file")
        (length,) = struct.unpack("<Q", start)
        if length > size - 8:
            raise ValueError(f"{WEIGHTS_FILE} has a header of {length} bytes but only {size - 8} follow")
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ValueError(f"{WEIGHTS_FILE} has a damaged header") from None
    return header if isinstance(header, dict) else {}


def _check_layers_against_header(header: dict[str, Any], config: dict[str, Any]) -> None:
    """Every layer's codes and levels in the weights file have the sizes its config entry implies
    (read from the header alone, so ``read_config`` and ``info`` catch it without decoding)."""
    for name, meta in config["layers"].items():
        n_codes = 1
        for size in meta["shape"]:
            n_codes *= size
        expected = {name + CODES: ("U8", [packed_size(n_codes, meta["code_bits"])]),
                    name + LEVELS: ("F32", [meta["groups"], meta["levels"]])}
        for key, (dtype, shape) in expected.items():
            entry = header.get(key)
            found = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else None
            if found != (dtype, shape):
                raise ValueError(f"layer {name!r}: {WEIGHTS_FILE} has {key!r} as {found}, but {CONFIG_FILE} "
                                 f"implies {(dtype, shape)}; the codes or levels do not match")
    for key in header:
        if key.endswith((CODES, LEVELS)) and key.removesuffix(CODES).removesuffix(LEVELS) not in config["layers"]:
            raise ValueError(f"{WEIGHTS_FILE} has {key!r}, which {CONFIG_FILE} does not list; "
                             "the files do not belong together")


def _verify_weights(directory: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The weights file's checked header, once its size, sha256 and the config digest it names all
    match. The file is hashed in chunks, never held in memory."""
    file = directory / WEIGHTS_FILE
    if not file.is_file():
        raise FileNotFoundError(f"path={str(directory)!r} has no {WEIGHTS_FILE}")
    size = file.stat().st_size
    if size != config["weights_bytes"]:  # before reading: a huge file is never read
        raise ValueError(
            f"{file} is truncated or was changed: it has {size} bytes, "
            f"{CONFIG_FILE} records {config['weights_bytes']}"
        )
    with open(file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != config["sha256"]:
        raise ValueError(f"{file} was changed after saving: its sha256 {digest[:16]}... does not match "
                         f"{CONFIG_FILE}'s {str(config['sha256'])[:16]}...")
    header = _read_header(file, size)
    metadata = header.get("__metadata__") if isinstance(header.get("__metadata__"), dict) else {}
    bound = metadata.get(DIGEST_METADATA)
    if bound != config_digest(config):
        raise ValueError(f"{CONFIG_FILE} was changed after saving, or belongs to other weights: {WEIGHTS_FILE} "
                         f"names a config with sha256 {str(bound)[:16]}..., "
                         f"this one has {config_digest(config)[:16]}...")
    _check_layers_against_header(header, config)
    try:  # the library's own checks of every entry (dtypes, shapes, byte ranges)
        with safetensors.safe_open(str(file), framework="pt") as opened:
            keys = set(opened.keys())
    except Exception as exc:  # the checksum matched, so the writer itself produced a bad file
        raise ValueError(f"{WEIGHTS_FILE} cannot be read: {str(exc)[:200]}") from None
    return {k: v for k, v in header.items() if k in keys}


def _checked_codes(name: str, meta: dict, packed: Tensor, levels: Tensor) -> Tensor:
    """One layer's uint8 ``(C, K)`` codes, once its codes and levels from the file are checked
    against its config entry (every size before anything is allocated)."""
    shape = torch.Size(meta["shape"])
    n_channels, n_codes = shape[0], shape.numel()
    groups, n_levels, code_bits = meta["groups"], meta["levels"], meta["code_bits"]
    if tuple(levels.shape) != (groups, n_levels) or levels.dtype != torch.float32:
        raise ValueError(f"layer {name!r}: level table {tuple(levels.shape)} {levels.dtype} does not match "
                         f"{CONFIG_FILE} ({groups}, {n_levels}) float32")
    if not bool(torch.isfinite(levels).all()):
        raise ValueError(f"layer {name!r} has non-finite levels (NaN or inf) in {WEIGHTS_FILE}")
    expected = packed_size(n_codes, code_bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(f"layer {name!r}: codes {tuple(packed.shape)} {packed.dtype} do not match {CONFIG_FILE} "
                         f"(shape {list(shape)} at {code_bits} bits needs {expected} uint8 bytes)")
    codes = unpack_bits(packed, code_bits, n_codes).view(n_channels, -1)
    if n_codes and int(codes.max()) >= n_levels:
        raise ValueError(f"layer {name!r} has code {int(codes.max())} but only {n_levels} levels; the file is damaged")
    return codes


def _decode_layer(name: str, meta: dict, packed: Tensor, levels: Tensor, chunk_numel: int = 1 << 20) -> Tensor:
    """The quantized weight of one layer, exactly as ``Quantizer.decode`` computes it, in its dtype,
    a few rows at a time (no (C, K) int64 codes)."""
    codes = _checked_codes(name, meta, packed, levels)
    shape, n_channels = torch.Size(meta["shape"]), codes.shape[0]
    dtype = getattr(torch, meta["dtype"])  # one of DTYPES, checked with the config
    # Same lookup as Quantizer.decode: levels[group_index].gather(1, codes), then the layer's dtype.
    weight = torch.empty(shape, dtype=dtype).view(n_channels, -1)
    index = group_index(n_channels, meta["groups"])
    for part in row_chunks(*weight.shape, chunk_numel):
        weight[part] = levels[index[part]].gather(1, codes[part].long())
    return weight.view(shape)


def _batches(header: dict[str, Any], config: dict[str, Any]) -> list[list[str]]:
    """The state-dict keys in file order, in batches read together: a quantized layer's weight, or
    plain tensors adding up to at most half the largest layer, so that reading never holds more
    than about one layer's worth of tensors (and the file pages they come from) at once."""
    sizes: dict[str, int] = {}
    for key, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        name = key.removesuffix(CODES).removesuffix(LEVELS)
        if name in config["layers"]:
            meta = config["layers"][name]
            sizes[f"{name}.weight"] = torch.Size(meta["shape"]).numel() * getattr(torch, meta["dtype"]).itemsize
        else:
            sizes[key] = entry["data_offsets"][1] - entry["data_offsets"][0]
    budget = max(max(sizes.values(), default=0) // 2, 1 << 20)
    batches: list[list[str]] = []
    used = budget
    for key, size in sizes.items():
        if used + size > budget or key.removesuffix(".weight") in config["layers"]:
            batches.append([])
            used = 0
        batches[-1].append(key)
        used += size
    return batches


def _read_batch(file: Path, keys: list[str], config: dict[str, Any], check_only: bool = False) -> dict[str, Tensor]:
    """The tensors of ``keys`` (quantized layers' weights decoded), the file open only meanwhile;
    ``check_only``: check the quantized layers' codes and levels, return nothing."""
    tensors = {}
    with safetensors.safe_open(str(file), framework="pt") as opened:
        for key in keys:
            name = key.removesuffix(".weight")
            if key.endswith(".weight") and name in config["layers"]:
                found = (name, config["layers"][name], opened.get_tensor(name + CODES),
                         opened.get_tensor(name + LEVELS))
                if check_only:
                    _checked_codes(*found)
                else:
                    tensors[key] = _decode_layer(*found)
            elif not check_only:
                tensors[key] = opened.get_tensor(key)
    return tensors


def _specs(header: dict[str, Any], config: dict[str, Any]) -> dict[str, Tensor]:
    """The state dict the file describes, as meta tensors (shapes and dtypes, no memory)."""
    names = {v: k for k, v in SAFETENSORS_DTYPES.items()}
    specs = {f"{name}.weight": torch.empty(meta["shape"], dtype=getattr(torch, meta["dtype"]), device="meta")
             for name, meta in config["layers"].items()}
    for key, entry in header.items():
        if key != "__metadata__" and not key.endswith((CODES, LEVELS)):
            if entry["dtype"] not in names:
                raise ValueError(f"{WEIGHTS_FILE}: {key!r} has dtype {entry['dtype']!r}; expected one of "
                                 f"{sorted(names)}")
            specs[key] = torch.empty(entry["shape"], dtype=names[entry["dtype"]], device="meta")
    return specs


def _plain_state(model: nn.Module) -> dict[str, Tensor]:
    """State-dict tensors of ``model`` once its quantized layers are frozen to plain ones."""
    quant = [f"{n}.quantizer." if n else "quantizer." for n, _ in quantized_layers(model)]
    return {k: v for k, v in model.state_dict().items() if not k.startswith(tuple(quant))}


def _dtype_fits(saved: torch.dtype, own: torch.dtype) -> bool:
    """A floating tensor may be saved in any allowed float dtype (``assign`` keeps it); others must match."""
    if own.is_floating_point:
        return saved.is_floating_point and _dtype_name(saved) in DTYPES
    return saved == own


def _check_fits(model: nn.Module, state: dict[str, Tensor], config: dict[str, Any]) -> None:
    own = _plain_state(model)
    mismatch = state_dict_mismatch({k: v.shape for k, v in own.items()}, state)
    if mismatch is None:
        wrong = [f"{k}: file {_dtype_name(state[k].dtype)}, model {_dtype_name(own[k].dtype)}"
                 for k in own if not _dtype_fits(state[k].dtype, own[k].dtype)]
        mismatch = f"different dtypes: {wrong[:5]}{' ...' if len(wrong) > 5 else ''} ({len(wrong)})" if wrong else None
    if mismatch:
        raise ValueError(f"model={type(model).__name__} does not match the saved architecture "
                         f"{config.get('architecture') or config.get('model_class')!r}; {mismatch}")


def _create_model(config: dict[str, Any], state: dict[str, Tensor]) -> nn.Module:
    """The saved timm architecture, built on the meta device first: its shapes must match the file's
    before any memory is allocated for it (a config asking for 10**8 classes fails here)."""
    arch = config["architecture"]
    if not arch:
        raise ValueError(
            f"the saved model is a {config.get('model_class')}, not a timm model; "
            "pass model= with the same architecture"
        )
    import timm

    if not timm.is_model(arch):
        raise ValueError(f"{CONFIG_FILE}: architecture={arch!r} is not a timm model in this timm {timm.__version__}")
    kwargs = dict(config["model_kwargs"])
    try:
        with torch.device("meta"):
            skeleton = timm.create_model(arch, pretrained=False, **kwargs)
    except (TypeError, ValueError, RuntimeError, AssertionError) as exc:
        raise ValueError(f"{CONFIG_FILE}: timm cannot build {arch!r} with {kwargs}: {str(exc)[:200]}") from None
    _check_fits(skeleton, state, config)
    del skeleton
    return timm.create_model(arch, pretrained=False, **kwargs)


@torch.no_grad()
def load_quantized(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a model written by :func:`save_quantized` as a plain model with the quantized weights.

    Everything (the config's schema, the weights' size, sha256 and bound config digest, every
    layer's codes and levels, every key, shape and dtype against the model) is checked before the
    model is built or touched, so a bad file raises ``ValueError`` and leaves ``model`` as it was.

    Args:
        path: the directory given to :func:`save_quantized`.
        model: the module to load into, in place; ``None`` creates the saved timm architecture
            (``pretrained=False``, only ``num_classes``/``in_chans`` from the config) with the saved
            dtypes. Quantized layers in ``model`` are replaced by plain ones.
    Returns:
        the model, whose weights equal ``BitQuantizer.get_hashed_model()``'s bit for bit.
    """
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model={type(model).__name__} is not an nn.Module (or None to create the saved timm model)")
    directory = resolve_directory(path)
    config = _read_config(directory)
    header = _verify_weights(directory, config)
    specs = _specs(header, config)
    batches = _batches(header, config)
    file = directory / WEIGHTS_FILE
    for keys in batches:  # every layer's codes and levels checked before the model is built or touched
        _read_batch(file, keys, config, check_only=True)
    target = model if model is not None else _create_model(config, specs)
    _check_fits(target, specs, config)
    if quantized_layers(target):
        target = freeze_model(target)
    for keys in batches:  # one layer at a time: never a second copy of the model
        target.load_state_dict(_read_batch(file, keys, config), strict=False, assign=model is None)
    return target
