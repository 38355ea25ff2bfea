"""The ``timm-qconv`` command line (also ``python -m timm_qconv``).

Examples::

    timm-qconv quantize --model resnet34 --pretrained --bits 4 --functions 32 --iters 50 --out resnet34_q4
    timm-qconv quantize --model resnet18 --checkpoint model.pth --method kmeans --bits 3 --out resnet18_q3
    timm-qconv quantize --model resnet18 --checkpoint model.pth --bits 2 --calibration images/ --out resnet18_q2
    timm-qconv info resnet34_q4
    timm-qconv plugins

Errors print as one line, ``timm-qconv: error: ...``: exit code 2 for bad arguments or input,
1 when something outside (the network, a file) fails. ``--traceback`` shows the full traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from ._table import render_table
from .state_dict import state_dict_mismatch

PROG = "timm-qconv"
DEFAULT_HUB = "https://huggingface.co"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


class CLIError(Exception):
    """An error to print as one line; ``code`` is the exit status."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    """argparse ``type=``: an integer in ``low..high``; argparse names the flag in the error."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; expected {allowed}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{value} is out of range; expected {allowed}")
        return value

    return parse


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _one_line(exc: BaseException) -> str:
    """The first line of the message, or the exception's type when it has no message."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _cause(exc: BaseException) -> str:
    """``Type: first line`` of an exception from outside timm_qconv (timm, torch, the hub)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# ------------------------------------------------------------------------------ model creation
def _check_model_name(name: str) -> None:
    import timm

    from ._errors import closest

    if not timm.is_model(name):
        known = timm.list_models()
        hint = closest(name, known)
        suggestion = f"; did you mean {', '.join(hint)}?" if hint else f"; see timm.list_models() ({len(known)} models)"
        raise CLIError(f"argument --model: unknown timm model {name!r}{suggestion}")


def _hub_unreachable() -> str | None:
    """``host:port (reason)`` when the Hugging Face hub cannot be reached directly, else ``None``.

    A two-second probe: without it the hub client retries for about a minute before failing.
    Skipped behind a proxy (the direct connection proves nothing) and in offline mode.
    """
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    if offline or any(os.environ.get(v) for v in PROXY_VARS):
        return None
    url = urlparse(os.environ.get("HF_ENDPOINT") or DEFAULT_HUB)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"{host}:{port} ({exc.strerror or exc})"
    return None


def _go_offline() -> None:
    """Make the hub client use only its local cache (no retries against an unreachable host)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants
    except ImportError:
        return
    constants.HF_HUB_OFFLINE = True  # read at call time; the env var alone is read only at import


def _create_pretrained(name: str, kwargs: dict[str, Any]) -> Any:
    import timm

    unreachable = _hub_unreachable()
    if unreachable:
        _go_offline()  # weights already in the local cache still load
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # no wall of retry warnings
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except (TypeError, ValueError):
        raise
    except Exception as exc:
        if unreachable:
            raise CLIError(
                f"--pretrained: cannot download the weights of {name!r}: the hub at {unreachable} is unreachable "
                f"and they are not in the local cache; use --checkpoint PATH with a local file", 1) from exc
        raise CLIError(f"--pretrained: timm could not load the weights of {name!r}: "
                       f"{_cause(exc)}", 1) from exc


def _read_state_dict(path: str) -> dict[str, Any]:
    import torch

    file = Path(path)
    if not file.is_file():
        raise CLIError(f"argument --checkpoint: {path!r} is not a file")
    try:
        if file.suffix == ".safetensors":
            import safetensors.torch

            state = safetensors.torch.load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's weights_only loader refused a Python object
        raise CLIError(f"argument --checkpoint: {path!r} holds pickled Python objects (a whole saved model?), which "
                       "are not loaded because unpickling can run code; expected a state dict: save it with "
                       "torch.save(model.state_dict(), path) or as .safetensors", 2) from exc
    except Exception as exc:
        raise CLIError(f"argument --checkpoint: cannot read {path!r}: {_cause(exc)}", 1) from exc
    for key in ("state_dict", "model", "module"):  # training checkpoints wrap the state dict
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"argument --checkpoint: {path!r} holds no state dict (a dict of tensors)")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _load_checkpoint(model: Any, path: str) -> None:
    state = _read_state_dict(path)
    own = model.state_dict()
    mismatch = state_dict_mismatch({k: v.shape for k, v in own.items()}, state, shown=3)
    if mismatch:
        wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
        raise CLIError(f"argument --checkpoint: {path!r} does not fit {type(model).__name__}: {mismatch}"
                       + _classifier_hint(model, state, wrong))
    model.load_state_dict(state)


def _classifier_hint(model: Any, state: dict[str, Any], wrong: list[str]) -> str:
    """``; pass --num-classes N`` when only the classifier's output size differs."""
    cfg = getattr(model, "pretrained_cfg", None)
    head = cfg.get("classifier") if isinstance(cfg, dict) else None
    if not isinstance(head, str) or not wrong or not all(k.startswith(head + ".") for k in wrong):
        return ""
    weight = state.get(head + ".weight")
    if weight is None or weight.dim() < 1:
        return ""
    return f"; the checkpoint's classifier {head!r} has {weight.shape[0]} outputs: pass --num-classes {weight.shape[0]}"


def _create_model(args: argparse.Namespace) -> Any:
    import timm

    _check_model_name(args.model)
    kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("in_chans", args.in_chans)) if v is not None}
    if args.pretrained:
        return _create_pretrained(args.model, kwargs)
    model = timm.create_model(args.model, pretrained=False, **kwargs)
    if args.checkpoint:
        _load_checkpoint(model, args.checkpoint)
    else:
        print(f"{PROG}: note: no --pretrained or --checkpoint; quantizing randomly initialised weights",
              file=sys.stderr)
    return model


def _check_writable(out: str, overwrite: bool = False) -> None:
    """Fail before the fit, not after it, when ``--out`` cannot or must not be written."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise CLIError(f"argument --out: {out!r} is an existing file; expected a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"argument --out: {out!r} already exists and is not empty; pass --overwrite to replace "
                       "the export in it (other files there are kept), or choose another directory")
    parent = next(p for p in [path, *path.parents] if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise CLIError(f"argument --out: {out!r} cannot be written ({parent} is not a writable directory)", 1)


# ------------------------------------------------------------------------------ subcommands
def cmd_quantize(args: argparse.Namespace) -> int:
    """Fit a model's layers to few bits, save it, print the per-layer error and the sizes."""
    from ._errors import check_device
    from ._registry import make_config
    from .bit_quantizer import BitQuantizer
    from .export import CONFIG_FILE, WEIGHTS_FILE, read_config, save_quantized

    _check_writable(args.out, args.overwrite)
    try:
        check_device("--device", args.device)  # before the model loads and the progress bar starts
    except ValueError as exc:
        raise CLIError(f"argument {exc}") from None
    # A bad --method fails before the model loads.
    make_config(args.method, n_bits=args.bits, n_functions=args.functions)
    _check_calibration(args.calibration)
    model = _create_model(args)
    quantizer = BitQuantizer(model, args.functions, args.bits, avoid=args.avoid or (), layers=tuple(args.layers),
                             method=args.method, device=args.device, verbose=True)
    start = time.perf_counter()
    quantizer.train_hash_functions(args.iters)
    seconds = time.perf_counter() - start
    calibrated = ""
    if args.calibration:
        from .calibration_data import calibration_loader

        loader = calibration_loader(args.calibration, model, args.calibration_samples)
        start = time.perf_counter()
        quantizer.calibrate(loader, args.calibration_samples)
        calibrated = (f"; calibrated on {args.calibration_samples} images of {args.calibration} "
                      f"in {time.perf_counter() - start:.1f} s")
    out = save_quantized(quantizer, args.out)
    before = read_config(out, verify=False)["float32_bytes"]
    after = sum((out / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE))
    print(quantizer.report())
    print(f"\nfitted {len(quantizer.layer_names)} layers in {seconds:.1f} s ({quantizer.method.name}, "
          f"{args.bits} bits, {args.functions} groups, {args.iters} iterations){calibrated}")
    print(f"size: {_size(before)} (float32 state dict) -> {_size(after)} ({out}), {100 * after / before:.1f}%")
    return 0


def _check_calibration(source: str | None) -> None:
    """Fail before the model loads when ``--calibration`` is neither a dataset name nor a folder."""
    from .datasets import list_datasets

    if source and source not in list_datasets() and not Path(source).is_dir():
        raise CLIError(f"argument --calibration: {source!r} is neither a folder nor a dataset name; expected an "
                       f"image folder (one sub-folder per class) or one of {list_datasets()}")


def cmd_info(args: argparse.Namespace) -> int:
    """Describe a directory written by ``quantize`` (or ``save_quantized``), after checking its checksum."""
    from .atomic import resolve_directory
    from .export import CONFIG_FILE, WEIGHTS_FILE, read_config

    config = read_config(args.path, verify=True)
    directory = resolve_directory(args.path)
    files = sum((directory / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE))
    layers, before = config["layers"], config["float32_bytes"]
    n_weights = sum(_numel(meta["shape"]) for meta in layers.values())
    kwargs = ", ".join(f"{k}={v}" for k, v in config.get("model_kwargs", {}).items())
    arch = (f"{config['architecture']} ({kwargs})" if config.get("architecture")
            else f"{config.get('model_class')} (not a timm model)")
    groups = sorted({meta["groups"] for meta in layers.values()})
    rows = [
        ("path", str(directory)),
        ("architecture", arch),
        ("method", str(config.get("method"))),
        ("bits", str(config.get("n_bits"))),
        ("groups", f"{config.get('n_functions')} per layer (actual: {groups[0]}..{groups[-1]})" if groups else "-"),
        ("quantized layers", f"{len(layers)} ({n_weights:,} weights)"),
        ("files", f"{_size(files)} ({WEIGHTS_FILE} + {CONFIG_FILE})"),
        ("float32 state dict", _size(before)),
        ("compression", f"{100 * files / before:.1f}% of float32 ({before / files:.2f}x smaller)"),
        ("checksum", "sha256 ok"),
        ("format version", str(config["format_version"])),
    ]
    print(render_table(rows))
    return 0


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def cmd_plugins(args: argparse.Namespace) -> int:
    """List the loaded plugins (built-ins first) with their versions, hooks and methods."""
    from .plugins import describe_plugins

    rows = [(p["name"], str(p.get("version") or "-"), ", ".join(p.get("hooks") or []) or "-",
             ", ".join(p.get("methods") or []) or "-") for p in describe_plugins()]
    print(render_table(rows, header=("plugin", "version", "hooks", "methods")))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "quantize": cmd_quantize,
    "info": cmd_info,
    "plugins": cmd_plugins,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Few-bit weight quantization for timm models.")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    q = sub.add_parser("quantize", help=cmd_quantize.__doc__, description=cmd_quantize.__doc__)
    q.add_argument("--model", required=True, help="timm model name, e.g. resnet34")
    source = q.add_mutually_exclusive_group()
    source.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (from the hub)")
    source.add_argument("--checkpoint", metavar="PATH",
                        help="state dict file (.pth/.pt via torch.load, or .safetensors)")
    q.add_argument("--num-classes", type=_int_at_least(0), help="classifier outputs (timm's num_classes)")
    q.add_argument("--in-chans", type=_int_at_least(1), help="input channels (timm's in_chans)")
    q.add_argument("--bits", type=_int_at_least(1, 8), default=4, help="bits per weight, 1..8 (default 4)")
    q.add_argument("--functions", type=_int_at_least(1), default=32,
                   help="channel groups per layer (n_functions), each with its own levels (default 32)")
    q.add_argument("--iters", type=_int_at_least(1), default=50, help="fitting iterations, >= 1 (default 50)")
    q.add_argument("--method", default="hash",
                   help="quantization method: hash, kmeans, or any registered (default hash)")
    q.add_argument("--avoid", nargs="+", metavar="NAME", help="module names or glob patterns to keep in float")
    q.add_argument("--layers", nargs="+", choices=("conv", "linear"), default=["conv", "linear"],
                   help="layer kinds to quantize (default: conv linear)")
    q.add_argument("--device", default=None, help="device to fit on, e.g. cuda (default: where the model is)")
    q.add_argument("--calibration", metavar="DIR_OR_DATASET",
                   help="refine with calibration images: an image folder (one sub-folder per class), "
                        "fashion-mnist or cifar10")
    q.add_argument("--calibration-samples", type=_int_at_least(1), default=512,
                   help="calibration images, >= 1 (default 512)")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (model.safetensors + config.json)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing export in --out")

    i = sub.add_parser("info", help=cmd_info.__doc__, description=cmd_info.__doc__)
    i.add_argument("path", metavar="DIR", help="a directory written by quantize")

    sub.add_parser("plugins", help=cmd_plugins.__doc__, description=cmd_plugins.__doc__)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 on success)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = COMMANDS[args.command](args)
        sys.stdout.flush()  # here, so that a closed pipe (``info ... | head``) is handled below
        return code
    except BrokenPipeError:
        # The reader went away: say nothing more, and keep Python from complaining at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # like a shell command killed by SIGPIPE
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError, RuntimeError) as exc:
        if args.traceback:
            raise
        code = exc.code if isinstance(exc, CLIError) else 2 if isinstance(exc, (ValueError, TypeError)) else 1
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return code
    except Exception as exc:  # a bug of ours or of a library: still one line, with the way to see more
        if args.traceback:
            raise
        print(f"{PROG}: error: unexpected {_cause(exc)} (run with --traceback for details)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
