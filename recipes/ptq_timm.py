"""Post-training quantization of a timm model with BitQuantizer, evaluated before and after.

    python recipes/ptq_timm.py --from-run runs/resnet34_q --bits 4 2                 # the float model a recipe trained
    python recipes/ptq_timm.py --model resnet50 --pretrained --image-folder imagenet/val --bits 4
    python recipes/ptq_timm.py --model resnet18 --checkpoint my.safetensors --num-classes 10 --dataset cifar10
    python recipes/ptq_timm.py --from-run runs/resnet34_q --bits 2 --calibration-samples 512     # calibrated PTQ

The model comes from timm's hub (``--pretrained``), from a weights file (``--checkpoint``: safetensors,
or a state dict saved by ``torch.save``, read without running code), or from the float run of
``recipes/resnet34_q.py`` / ``recipes/lenet_q.py`` (``--from-run``). It is evaluated in float and after
``BitQuantizer`` (calibrated on a few hundred training images with ``--calibration-samples``) at every
width of ``--bits`` on Fashion-MNIST, CIFAR-10 or an image folder read by
timm's own ``create_dataset``/``create_loader`` (one sub-folder per class), or just quantized when no
data is given. ``--output-dir`` gets ``results.json``, one packed export per width and a chart.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from resnet34_q import PRECISIONS, TimmConfig, create_model, evaluate, new_accelerator, option, parse_args, print_table
from timm.data import create_dataset, create_loader, resolve_data_config
from torch import nn
from torch.utils.data import DataLoader

from timm_qconv import BitQuantizer, list_methods, save_quantized
from timm_qconv.atomic import atomic_write
from timm_qconv.calibration_data import calibration_loader
from timm_qconv.datasets import DatasetNotFoundError, dataset_info, list_datasets, load_dataset
from timm_qconv.plots import plot_accuracy_vs_bits
from timm_qconv.state_dict import state_dict_mismatch


@dataclass
class PTQConfig:
    """Options of a post-training run; each is a flag (``image_folder`` -> ``--image-folder``)."""

    model: str = option("resnet18", "timm model name (ignored with --from-run)")
    pretrained: bool = option(False, "timm's pretrained weights (downloads them)")
    checkpoint: str = option("", "weights file: .safetensors, or a torch.save'd state dict")
    from_run: str = option("", "output folder of recipes/resnet34_q.py or lenet_q.py (its float model)")
    num_classes: int = option(0, "classifier size for --checkpoint (0: the dataset's, else timm's default)")
    dataset: str = option("", "evaluate on this dataset", choices=("", *list_datasets()))
    data_dir: str = option("", "where the dataset is (also $TIMM_QCONV_DATA)")
    image_folder: str = option("", "evaluate on this image folder (one sub-folder per class)")
    eval_samples: int = option(0, "evaluate on the first N test images only (0: all)")
    bits: list[int] = option([4, 2], "bits per weight (several: one run each)")
    method: str = option("kmeans", "quantization method (kmeans: free levels, the lowest weight error)",
                         choices=list_methods())
    n_functions: int = option(32, "channel groups per layer, each with its own levels")
    iters: int = option(50, "BitQuantizer fitting iterations")
    calibration_samples: int = option(0, "training images for BitQuantizer.calibrate (0: data-free)")
    calibration: str = option("", "dataset name or image folder to calibrate on (default: the evaluation data's)")
    batch_size: int = option(256, "evaluation batch size")
    output_dir: str = option("runs/ptq_timm", "where results, exports and the chart go")
    mixed_precision: str = option("", "autocast of the evaluations: no, bf16 or fp16 (GPUs only) "
                                      "(default: accelerate launch's --mixed_precision, else no)")

    def __post_init__(self) -> None:
        if not self.bits or not all(isinstance(b, int) and 1 <= b <= 8 for b in self.bits):
            raise ValueError(f"--bits {self.bits!r} is not allowed; expected one or more of 1..8")
        if sum(map(bool, (self.pretrained, self.checkpoint, self.from_run))) > 1:
            raise ValueError("pass at most one of --pretrained, --checkpoint and --from-run")
        if self.dataset and self.image_folder:
            raise ValueError("pass --dataset or --image-folder, not both")
        for name in ("n_functions", "iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)} is not allowed; expected >= 1")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"--mixed-precision {self.mixed_precision!r} is not allowed; expected no, bf16 or fp16")
        if self.num_classes < 0 or self.eval_samples < 0 or self.calibration_samples < 0:
            raise ValueError("--num-classes, --eval-samples and --calibration-samples must be >= 0")


def model_from_run(folder: Path) -> tuple[nn.Module, str]:
    """The float model of a recipe's output folder and its dataset (its results.json is checked first)."""
    try:
        config = json.loads((folder / "results.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise SystemExit(f"error: --from-run {folder}: no readable results.json with a 'config' ({error})") from None
    known = {f.name for f in fields(TimmConfig)}
    if not isinstance(config, dict) or not set(config) <= known:
        raise SystemExit(f"error: --from-run {folder}: results.json's config has unknown keys")
    if config.get("model", "lenet5") not in timm.list_models():
        raise SystemExit(f"error: --from-run {folder}: model {config.get('model', 'lenet5')!r} is not a timm model "
                         "(a LeNet run: quantize it with recipes/lenet_q.py --mode ptq)")
    cfg = TimmConfig(**config)
    model = create_model(cfg, dataset_info(cfg.dataset))
    load_weights(model, folder / "float" / "model.safetensors")
    return model, cfg.dataset


def load_weights(model: nn.Module, path: Path) -> None:
    """Load a state dict without running code from the file; the classifier must fit."""
    if not path.is_file():
        raise SystemExit(f"error: checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state = safetensors.torch.load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)  # tensors and containers only
        except Exception as error:  # noqa: BLE001 - any unpickling refusal means "not a plain state dict"
            raise SystemExit(f"error: checkpoint {path} is not a plain state dict ({str(error).splitlines()[0]})")
    state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SystemExit(f"error: checkpoint {path}: expected a state dict of tensors")
    mismatch = state_dict_mismatch({k: v.shape for k, v in model.state_dict().items()}, state)
    if mismatch:
        raise SystemExit(f"error: checkpoint {path} does not fit {type(model).__name__}: {mismatch}; "
                         "is --num-classes right?")
    model.load_state_dict(state)


def test_loader(cfg: PTQConfig, dataset: str, model: nn.Module) -> DataLoader | None:
    """Batches of the test images, or None when no data was given."""
    if cfg.image_folder:
        if not Path(cfg.image_folder).is_dir():
            raise SystemExit(f"error: --image-folder {cfg.image_folder} is not a folder")
        data_config = resolve_data_config({}, model=model)
        images = create_dataset("", root=cfg.image_folder, split="validation")
        if cfg.eval_samples:
            images = torch.utils.data.Subset(images, range(min(cfg.eval_samples, len(images))))
        return create_loader(images, data_config["input_size"], cfg.batch_size, is_training=False, num_workers=0,
                             use_prefetcher=False,  # the prefetcher is for CUDA only
                             mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])
    if not dataset:
        return None
    try:
        _, test_set = load_dataset(dataset, cfg.data_dir or None)
    except DatasetNotFoundError as error:
        raise SystemExit(f"error: {error}") from None
    return DataLoader(test_set.subset(cfg.eval_samples) if cfg.eval_samples else test_set, cfg.batch_size)


def main(cfg: PTQConfig) -> dict[str, Any]:
    accelerator = new_accelerator(cfg.mixed_precision)
    cfg.mixed_precision = accelerator.mixed_precision  # the setting in force (flag or launcher), as results.json says
    if cfg.from_run:
        model, dataset = model_from_run(Path(cfg.from_run))
        dataset = cfg.dataset or dataset
    else:
        dataset = cfg.dataset
        num_classes = cfg.num_classes or (dataset_info(dataset).num_classes if dataset else None)
        kwargs = {"num_classes": num_classes} if num_classes else {}
        try:
            model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
        except (OSError, RuntimeError) as error:  # no network for --pretrained
            raise SystemExit(f"error: could not create {cfg.model} (pretrained={cfg.pretrained}): "
                             f"{str(error).splitlines()[0]}") from None
        if cfg.checkpoint:
            load_weights(model, Path(cfg.checkpoint))
    model = model.to(accelerator.device).eval()
    loader = test_loader(cfg, dataset, model)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"config": asdict(cfg), "final": {}}

    def finish(run: str, n_bits: int | None, evaluated: nn.Module, saved: int) -> None:
        accuracy = evaluate(evaluated, loader, accelerator, f"{run} eval") if loader is not None else None
        results["final"][run] = {"kind": "ptq" if n_bits else "float", "n_bits": n_bits, "accuracy": accuracy,
                                 "bytes": saved}
        atomic_write(out / "results.json", json.dumps(results, indent=1))

    finish("float", None, model, sum(t.numel() * t.element_size() for t in model.state_dict().values()))
    calibration = None
    if cfg.calibration_samples:
        source = cfg.calibration or cfg.image_folder or dataset
        if not source:
            raise SystemExit("error: --calibration-samples needs data: pass --calibration, --dataset or --image-folder")
        try:
            calibration = calibration_loader(source, model, cfg.calibration_samples, data_dir=cfg.data_dir or None)
        except (DatasetNotFoundError, ValueError) as error:
            raise SystemExit(f"error: --calibration {source}: {error}") from None
    for n_bits in cfg.bits:
        run = f"ptq-{n_bits}bit"
        bq = BitQuantizer(model, cfg.n_functions, n_bits, method=cfg.method, layers=("conv", "linear"), verbose=True)
        bq.train_hash_functions(n_iter=cfg.iters)
        if calibration is not None:  # layer by layer on the model's own inputs: see BitQuantizer.calibrate
            bq.calibrate(calibration, n_samples=cfg.calibration_samples)
        export = save_quantized(bq, out / run)
        print(f"{run}: weight error {bq.report().rel_error:.4f} (relative), export {export}")
        finish(run, n_bits, bq.get_hashed_model(), (export / "model.safetensors").stat().st_size)
    if loader is not None:
        print_table(results["final"], out)
        if len(cfg.bits) > 1:
            plot_accuracy_vs_bits(results["final"], out / "accuracy_vs_bits.png")
    return results


if __name__ == "__main__":
    main(parse_args(PTQConfig, doc=__doc__))
    sys.exit(0)
