"""Float vs post-training vs quantization-aware training of a timm model, with Accelerate.

    python recipes/resnet34_q.py                                              # one process: CPU or one GPU
    accelerate launch --multi_gpu --num_processes 2 recipes/resnet34_q.py     # two processes (GPUs, or gloo on CPU)
    python recipes/resnet34_q.py --model resnet18 --dataset fashion-mnist --bits 4 2
    python recipes/resnet34_q.py --mixed-precision bf16                       # GPUs, and CPUs with AVX-512 BF16
    python recipes/resnet34_q.py --config my_run.yaml                         # same keys as the flags
    python recipes/resnet34_q.py --output-dir runs/resnet34_q --resume        # continue every run exactly

One invocation trains the model in float (``--mode float``), quantizes the float weights after
training with ``BitQuantizer`` (``ptq``), fine-tunes them with the hash loss (``qat``; from random
weights with ``--qat-from-scratch``), or all three (``all``, the default) at every width of
``--bits``, and compares them. ``--output-dir`` then holds ``results.json``, the float weights and
one packed export per quantized run (``save_quantized``), a checkpoint per training run
(``checkpoints/RUN``), and PNG charts. ``recipes/lenet_q.py`` is the same recipe for LeNet-5.

QAT is the lines marked ``# QAT``: a ``CallbackHandler`` with a ``HashLossCallback`` converts the
model before the optimizer exists and adds the hash loss to every step's loss; the rest is a plain
Accelerate loop. ``--batch-size`` is the global batch, split over the processes, so that one and
two processes train the same way.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from timm_qconv import BitQuantizer, CallbackHandler, HashLossCallback, list_methods, quantized_layers, save_quantized
from timm_qconv.atomic import atomic_directory, atomic_write
from timm_qconv.datasets import DatasetInfo, DatasetNotFoundError, ImageTensors, list_datasets, load_dataset
from timm_qconv.plots import plot_accuracy_per_epoch, plot_accuracy_vs_bits, plot_levels_over_weights

MODES = ("all", "float", "ptq", "qat")
PRECISIONS = ("", "no", "bf16", "fp16")  # "": accelerate's own setting


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with its --help text."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, **kwargs})


@dataclass
class Config:
    """Options of every recipe run; each is a flag (``max_steps`` -> ``--max-steps``)."""

    dataset: str = option("cifar10", "dataset", choices=list_datasets())
    data_dir: str = option("", "folder to look in first and download into (also $TIMM_QCONV_DATA)")
    train_subset: int = option(0, "train on the first N training images only (0: all)")
    crop: bool = option(True, "augment with pad-4 random crops (flips always)")
    mode: str = option("all", "what to run: float training, ptq of it, qat from it, or all", choices=MODES)
    bits: list[int] = option([4, 2], "bits per weight of the quantized runs (several: one run each)")
    ptq_bits: list[int] = option([], "bits of the PTQ runs only (default: --bits)")
    qat_bits: list[int] = option([], "bits of the QAT runs only (default: --bits)")
    method: str = option("hash", "QAT's quantization method", choices=list_methods())
    ptq_method: str = option("kmeans", "PTQ's method (kmeans: free levels, the lowest weight error)",
                             choices=list_methods())
    n_functions: int = option(32, "channel groups per layer, each with its own levels")
    layers: str = option("conv,linear", "layer kinds to quantize")
    skip_first_last: bool = option(False, "keep the first conv and the classifier in float")
    epochs: int = option(30, "float training epochs (also QAT's with --qat-from-scratch)")
    qat_epochs: int = option(10, "QAT fine-tuning epochs from the float weights")
    max_steps: int = option(0, "stop every training run after this many steps (0: no limit); "
                               "the lr schedule still spans the epochs")
    batch_size: int = option(128, "global batch size, split over the processes")
    lr: float = option(0.05, "peak SGD learning rate of float training, cosine-decayed to 0")
    qat_lr: float = option(0.01, "peak learning rate of QAT fine-tuning")
    weight_decay: float = option(5e-4, "weight decay (never on the quantizer's levels)")
    label_smoothing: float = option(0.0, "label smoothing of the task loss's cross-entropy (timm's train.py: 0.1)")
    level_lr_scale: float = option(1.0, "QAT: the quantizer levels' learning rate, as a multiple of the weights'")
    hash_weight: float = option(1.0, "weight of the hash loss after warm-up")
    warmup_steps: int = option(200, "steps of linear warm-up of the hash loss's weight")
    hash_wrt_weights: bool = option(False, "the hash loss also pulls the float weights towards their levels")
    distill_weight: float = option(0.0, "QAT: weight a of distillation from the float model, "
                                        "loss = (1-a) CE + a T^2 KL(teacher/T || student/T); 0: none")
    distill_temperature: float = option(1.0, "QAT: temperature T of the distillation")
    ptq_iters: int = option(50, "BitQuantizer fitting iterations")
    qat_from_scratch: bool = option(False, "QAT from random weights instead of the float run's")
    output_dir: str = option("runs/resnet34_q", "where results, models, checkpoints and charts go")
    resume: bool = option(False, "continue every run from its checkpoint in --output-dir")
    seed: int = option(0, "random seed (weights, data order, augmentation)")
    num_workers: int = option(2, "dataloader workers per process")
    channels_last: bool = option(False, "keep images and weights channels-last (faster convolutions)")
    mixed_precision: str = option("", "autocast of training and evaluation: no, bf16 or fp16 (GPUs only) "
                                      "(default: accelerate launch's --mixed_precision, else no)")
    keep_freed_memory: bool = option(True, "have glibc's malloc keep large freed blocks for reuse instead of "
                                           "faulting them in again every step (faster CPU training)")

    def __post_init__(self) -> None:
        self.ptq_bits, self.qat_bits = self.ptq_bits or list(self.bits), self.qat_bits or list(self.bits)
        widths = self.bits + self.ptq_bits + self.qat_bits
        checks = {"bits": all(isinstance(b, int) and 1 <= b <= 8 for b in widths) and len(self.bits) > 0,
                  "n_functions": self.n_functions >= 1, "epochs": self.epochs >= 1, "qat_epochs": self.qat_epochs >= 1,
                  "max_steps": self.max_steps >= 0, "batch_size": self.batch_size >= 1, "lr": self.lr > 0,
                  "qat_lr": self.qat_lr > 0, "train_subset": self.train_subset >= 0, "ptq_iters": self.ptq_iters >= 1,
                  "num_workers": self.num_workers >= 0, "layers": set(self.layers.split(",")) <= {"conv", "linear"},
                  "level_lr_scale": self.level_lr_scale >= 0, "distill_weight": 0 <= self.distill_weight <= 1,
                  "distill_temperature": self.distill_temperature > 0, "label_smoothing": 0 <= self.label_smoothing < 1,
                  "mixed_precision": self.mixed_precision in PRECISIONS}
        allowed = {"bits": "1..8 (one or more)", "layers": "conv, linear or conv,linear", "distill_weight": "0..1",
                   "label_smoothing": ">= 0 and < 1",
                   "level_lr_scale": ">= 0", "mixed_precision": "no, bf16 or fp16"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not allowed; expected "
                                 + allowed.get(name, "a positive number" if name != "max_steps" else ">= 0"))


@dataclass
class TimmConfig(Config):
    """The options above, for a timm model."""

    model: str = option("resnet34", "any timm model name")
    pretrained: bool = option(False, "start from timm's pretrained weights (downloads them)")
    small_stem: bool | None = option(None, "3x3 stride-1 first conv, no max-pool (default: on for <=32-pixel data)")
    # A resnet18 training step on 28x28 images: 2.67 s contiguous, 2.32 s channels-last (2 CPU cores).
    channels_last: bool = option(True, "keep images and weights channels-last (faster convolutions)")


def parse_args(config_class: type = TimmConfig, argv: list[str] | None = None, doc: str = __doc__) -> Any:
    """Flags from the config's fields; ``--config FILE`` (YAML or JSON, same keys) sets their defaults."""
    title, commands = doc.split("\n\n")[:2]
    parser = argparse.ArgumentParser(description=title, epilog="launch commands:\n" + commands,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or JSON file of options (flags given here win)")
    defaults = {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
                for f in fields(config_class)}
    for f in fields(config_class):
        flag, meta = "--" + f.name.replace("_", "-"), f.metadata
        shown = "" if "default" in meta["help"] else f" (default: {defaults[f.name]})"
        help_text = (meta["help"] + shown).replace("%", "%%")
        if isinstance(defaults[f.name], bool) or defaults[f.name] is None:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=defaults[f.name], help=help_text)
        elif isinstance(defaults[f.name], list):
            parser.add_argument(flag, type=int, nargs="+", default=defaults[f.name], help=help_text, metavar="N")
        else:
            parser.add_argument(flag, type=type(defaults[f.name]), default=defaults[f.name],
                                choices=meta.get("choices"), help=help_text)
    args = parser.parse_args(argv)
    if args.config:
        try:
            loaded = yaml.safe_load(Path(args.config).read_text())  # JSON is YAML too
        except (OSError, yaml.YAMLError) as error:
            parser.error(f"--config {args.config}: {error}")
        if not isinstance(loaded, dict):
            parser.error(f"--config {args.config}: expected a mapping of option names to values")
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - set(defaults))
        if unknown:
            parser.error(f"--config {args.config}: unknown keys {unknown}; allowed: {sorted(defaults)}")
        parser.set_defaults(**{k.replace("-", "_"): v for k, v in loaded.items()})
        args = parser.parse_args(argv)  # flags given on the command line override the file
    options = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        return config_class(**options)
    except (ValueError, TypeError) as error:
        parser.error(str(error))


# ----------------------------------------------------------------------------- model
def create_model(cfg: TimmConfig, info: DatasetInfo) -> nn.Module:
    """The timm model for ``info``'s images; with the small-image stem for <=32-pixel data."""
    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=info.num_classes,
                              in_chans=info.channels)
    small = cfg.small_stem if cfg.small_stem is not None else info.size <= 32
    if small:
        if not (isinstance(getattr(model, "conv1", None), nn.Conv2d) and hasattr(model, "maxpool")):
            raise SystemExit(f"error: --small-stem needs a ResNet-style model (conv1 + maxpool); {cfg.model} has none: "
                             "pass --no-small-stem")
        model.conv1 = nn.Conv2d(info.channels, model.conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    return model


# ----------------------------------------------------------------------------- training and evaluation
def keep_freed_memory() -> bool:
    """Have glibc's malloc reuse large freed blocks instead of returning them to the system.

    By default glibc maps each block above a threshold (128 KiB at first, raised as such blocks are
    freed, up to 32 MiB) afresh and unmaps it when freed, and gives back the heap's free top beyond
    twice that threshold. A CPU training step then faults much of its activations in again, page
    by page: 30,000-60,000 page faults a step of resnet18 on 28x28 images (batch 128), 8-10% of its
    time on this project's 2-core machine. Here blocks of up to 32 MiB come from the heap, which is
    trimmed only when 1 GiB lies free at its top. Process-wide, like
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824``.
    Returns False, changing nothing, where the C library has no ``mallopt`` (not glibc).
    """
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library to load by that name (Windows)
        return False
    trim_threshold, mmap_threshold = -1, -3  # glibc's M_TRIM_THRESHOLD and M_MMAP_THRESHOLD
    return mallopt is not None and bool(mallopt(mmap_threshold, 32 << 20)) and bool(mallopt(trim_threshold, 1 << 30))


def new_accelerator(mixed_precision: str = "") -> Accelerator:
    # One per training run, so that each checkpoint holds that run's model and optimizer only.
    # Without a GPU, cpu=True lets `accelerate launch --multi_gpu` run DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision or None,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":  # else float32, silently
        raise SystemExit("error: --mixed-precision fp16 (or accelerate launch --mixed_precision fp16) needs a GPU: "
                         "on a CPU Accelerate autocasts to bfloat16 only; use bf16")
    return accelerator


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Accelerator, desc: str) -> float:
    """Top-1 accuracy over the whole test set, the same on every process (no padded duplicates);
    under the run's autocast, for prepared models and the others (PTQ's) alike."""
    model.eval()
    correct = total = 0
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        with accelerator.autocast():
            logits = model(images)
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    model.train()
    return correct / total


def settings_of(cfg: Config, run: str) -> dict[str, Any]:
    """What a checkpoint of ``run`` must agree on to be resumed (QAT's options only for QAT runs)."""
    keys = ("model", "small_stem", "dataset", "train_subset", "crop", "batch_size", "seed")
    if run != "float":
        keys += ("method", "n_functions", "layers", "skip_first_last", "qat_from_scratch", "hash_weight",
                 "warmup_steps", "hash_wrt_weights", "distill_weight", "distill_temperature",
                 "level_lr_scale")
    return {"run": run, **{k: getattr(cfg, k, None) for k in keys}}


def distillation_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor, weight: float,
                      temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """``(1 - weight) * CE + weight * T^2 * KL(teacher || student)`` at temperature T (Hinton et al., 2015)."""
    soft = F.kl_div(F.log_softmax(logits / temperature, -1), F.log_softmax(teacher_logits / temperature, -1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    return (1 - weight) * hard + weight * temperature**2 * soft


def save_checkpoint(accelerator: Accelerator, path: Path, meta: dict[str, Any]) -> None:
    """``accelerator.save_state`` into a staging folder, then swapped in whole (old or new, never half)."""
    staged = path.with_name(path.name + ".staged")
    accelerator.save_state(str(staged))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write(staged / "run.json", json.dumps(meta, indent=1))
        with atomic_directory(path, keep_other_files=False) as new:
            for entry in staged.iterdir():
                entry.rename(new / entry.name)
        staged.rmdir()
    accelerator.wait_for_everyone()


def train(cfg: Config, run: str, model: nn.Module, data: tuple[ImageTensors, ImageTensors], epochs: int, lr: float,
          n_bits: int | None, history: list[dict[str, Any]], teacher: nn.Module | None = None,
          ) -> tuple[nn.Module, float, Accelerator, DataLoader]:
    """Train ``model`` (in float, or with the hash loss when ``n_bits`` is set); checkpoint every epoch.

    With a ``teacher`` (QAT with ``--distill-weight``), the task loss is :func:`distillation_loss` from its outputs.

    Returns the trained model (unwrapped), its test accuracy, and the run's accelerator and test loader.
    """
    accelerator = new_accelerator(cfg.mixed_precision)
    callbacks = [] if n_bits is None else [HashLossCallback(  # QAT
        method=cfg.method, n_bits=n_bits, n_functions=cfg.n_functions, layers=tuple(cfg.layers.split(",")),
        skip_first_last=cfg.skip_first_last, loss_weight=cfg.hash_weight, warmup_steps=cfg.warmup_steps,
        wrt_weights=cfg.hash_wrt_weights)]
    handler = CallbackHandler(callbacks, accelerator, max_steps=cfg.max_steps or None)
    model = handler.on_init(model)  # QAT: converts the layers before the optimizer exists
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    levels = {id(p) for c in callbacks for p in c.quantizer_parameters()}
    optimizer = torch.optim.SGD([
        {"params": [p for p in model.parameters() if id(p) not in levels], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if id(p) in levels], "weight_decay": 0.0,
         "lr_scale": cfg.level_lr_scale},
    ], lr=lr, momentum=0.9, nesterov=True)
    train_set, test_set = data
    per_process = cfg.batch_size // accelerator.num_processes
    train_loader = DataLoader(train_set, per_process, shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    test_loader = DataLoader(test_set, max(per_process, 256), num_workers=cfg.num_workers)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()

    checkpoint = Path(cfg.output_dir) / "checkpoints" / run
    settings = settings_of(cfg, run)
    if cfg.resume and checkpoint.exists():
        meta = json.loads((checkpoint / "run.json").read_text())
        if meta.get("settings") != settings:
            diff = {k: (meta.get("settings", {}).get(k), v) for k, v in settings.items()
                    if meta.get("settings", {}).get(k) != v}
            raise SystemExit(f"error: checkpoint {checkpoint} was made with other settings (checkpoint, now): {diff}; "
                             "use the same settings or another --output-dir")
        accelerator.load_state(str(checkpoint))  # the callbacks check their quantization settings first
        history[:] = [row for row in history if row["run"] != run] + meta["epochs"]
    steps_per_epoch = len(train_loader)
    total_steps = epochs * steps_per_epoch
    limit = min(total_steps, cfg.max_steps or total_steps)
    start_epoch, skip = divmod(handler.state.global_step, steps_per_epoch)
    if handler.state.global_step >= limit:
        accelerator.print(f"{run}: checkpoint at step {handler.state.global_step}, nothing left to train")
    handler.on_train_begin(optimizer=optimizer)
    main = accelerator.is_local_main_process
    for epoch in range(start_epoch, epochs):
        if handler.state.global_step >= limit:
            break
        train_loader.set_epoch(epoch)  # the seedable sampler's order depends only on (seed, epoch)
        train_set.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        bar = tqdm(loader, desc=f"{run} epoch {epoch + 1}/{epochs}", initial=skip, total=steps_per_epoch,
                   disable=not main, dynamic_ncols=True, leave=False)
        skip = 0
        handler.on_epoch_begin()
        for images, labels in bar:
            images = images.contiguous(memory_format=memory_format)
            step_lr = 0.5 * lr * (1 + math.cos(math.pi * handler.state.global_step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = step_lr * group.get("lr_scale", 1.0)
            logits = model(images)
            if teacher is None:
                task_loss = F.cross_entropy(logits, labels, label_smoothing=cfg.label_smoothing)
            else:
                with torch.no_grad():
                    taught = teacher(images)
                task_loss = distillation_loss(logits, taught, labels, cfg.distill_weight, cfg.distill_temperature,
                                              cfg.label_smoothing)
            loss = handler.on_loss(task_loss)  # QAT: adds the weighted hash loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            handler.on_step_end()  # counts the step (warm-up, --max-steps)
            bar.set_postfix(loss=f"{task_loss.item():.3f}", hash=f"{float(handler.state.logs.get('hash_loss', 0)):.2g}",
                            lr=f"{step_lr:.4f}", refresh=False)
            if handler.state.global_step >= limit:
                break
        bar.close()
        finished = handler.state.global_step % steps_per_epoch == 0
        accuracy = evaluate(model, test_loader, accelerator, f"{run} eval")
        history.append({"run": run, "epoch": epoch + (1 if finished else handler.state.global_step % steps_per_epoch
                                                      / steps_per_epoch), "step": handler.state.global_step,
                        "loss": round(task_loss.item(), 5), "accuracy": accuracy})
        accelerator.print(f"{run} epoch {epoch + 1}/{epochs} step {handler.state.global_step}: loss "
                          f"{task_loss.item():.4f}, test accuracy {100 * accuracy:.2f}%")
        if finished:
            handler.on_epoch_end()
        save_checkpoint(accelerator, checkpoint,
                        {"settings": settings, "epochs": [r for r in history if r["run"] == run]})
    if callbacks and accelerator.num_processes > 1:  # DDP keeps the levels in step; check that it did
        levels = torch.cat([p.detach().flatten() for p in callbacks[0].quantizer_parameters()]).double()
        sums = accelerator.gather(torch.stack([levels.sum(), levels.square().sum()])[None]).cpu()
        if not bool((sums == sums[:1]).all()):
            raise RuntimeError(f"{run}: the quantizer's levels differ between processes: {sums.tolist()}")
        accelerator.print(f"{run}: levels identical on all {accelerator.num_processes} processes")
    last = [row for row in history if row["run"] == run]
    accuracy = last[-1]["accuracy"] if last and last[-1]["step"] == handler.state.global_step else None
    if accuracy is None:
        accuracy = evaluate(model, test_loader, accelerator, f"{run} eval")
    return accelerator.unwrap_model(model), accuracy, accelerator, test_loader


# ----------------------------------------------------------------------------- runs
def first_groups(layers: list[tuple[str, torch.Tensor, Any]]) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """For ``(name, float weight, quantizer)``: the first channel group's weights and levels (for the chart)."""
    return [(name, weight.detach().reshape(weight.shape[0], -1)[quantizer.group_index == 0], quantizer.levels()[0])
            for name, weight, quantizer in layers]


def run_all(cfg: Config, build_model: Callable[[Config, DatasetInfo], nn.Module]) -> dict[str, Any]:
    """Every run ``cfg.mode`` asks for; writes the outputs; returns the results."""
    set_seed(cfg.seed)
    if cfg.keep_freed_memory:
        keep_freed_memory()
    accelerator = new_accelerator(cfg.mixed_precision)
    cfg.mixed_precision = accelerator.mixed_precision  # the setting in force (flag or launcher), as results.json says
    with accelerator.main_process_first():  # the main process downloads, the others then read
        try:
            train_set, test_set = load_dataset(cfg.dataset, cfg.data_dir or None)
        except DatasetNotFoundError as error:
            raise SystemExit(f"error: {error}") from None
    if cfg.train_subset:
        train_set = train_set.subset(cfg.train_subset)
    train_set.seed, train_set.crop = cfg.seed, cfg.crop  # with the epoch, they choose every image's augmentation
    if cfg.batch_size % accelerator.num_processes or cfg.batch_size > len(train_set):
        raise SystemExit(f"error: --batch-size {cfg.batch_size} must split evenly over {accelerator.num_processes} "
                         f"processes and be at most the {len(train_set)} training images")
    data, out, main = (train_set, test_set), Path(cfg.output_dir), accelerator.is_main_process
    results: dict[str, Any] = {"config": asdict(cfg), "final": {}, "epochs": []}

    clock = [time.perf_counter(), time.process_time()]

    def finish(run: str, kind: str, n_bits: int | None, accuracy: float, saved: Path) -> None:
        now = [time.perf_counter(), time.process_time()]  # this invocation's time on the run, main process
        results["final"][run] = {"kind": kind, "n_bits": n_bits, "accuracy": accuracy, "bytes": saved.stat().st_size,
                                 "wall_s": round(now[0] - clock[0], 1), "cpu_s": round(now[1] - clock[1], 1)}
        clock[:] = now
        if main:
            atomic_write(out / "results.json", json.dumps(results, indent=1))

    float_model = None
    if cfg.mode in ("all", "float", "ptq") or (cfg.mode == "qat" and not cfg.qat_from_scratch):
        set_seed(cfg.seed)
        float_model, accuracy, acc, loader = train(cfg, "float", build_model(cfg, train_set.info), data, cfg.epochs,
                                                   cfg.lr, None, results["epochs"])
        if main:
            with atomic_directory(out / "float") as folder:
                acc.save_model(float_model, folder)  # model.safetensors
        acc.wait_for_everyone()
        finish("float", "float", None, accuracy, out / "float" / "model.safetensors")
    for n_bits in cfg.ptq_bits if cfg.mode in ("all", "ptq") else ():
        run = f"ptq-{n_bits}bit"
        bq = BitQuantizer(float_model, cfg.n_functions, n_bits, method=cfg.ptq_method, verbose=main,
                          layers=tuple({"conv": nn.Conv2d, "linear": nn.Linear}[k] for k in cfg.layers.split(",")))
        bq.train_hash_functions(n_iter=cfg.ptq_iters)
        accuracy = evaluate(bq.get_hashed_model(), loader, acc, f"{run} eval")
        if main:
            save_quantized(bq, out / run)
            layers = [(name, bq.modules[name].weight, bq.quantizers[name]) for name in bq.layer_names]
            plot_levels_over_weights(first_groups(layers), out / f"levels_{run}.png", title=run)
        accelerator.wait_for_everyone()
        finish(run, "ptq", n_bits, accuracy, out / run / "model.safetensors")
    # The float model, frozen in eval mode, teaches the QAT runs when --distill-weight is set.
    teacher = copy.deepcopy(float_model).eval() if cfg.distill_weight and float_model is not None else None
    for n_bits in cfg.qat_bits if cfg.mode in ("all", "qat") else ():
        run = f"qat-{n_bits}bit"
        set_seed(cfg.seed)
        start = build_model(cfg, train_set.info) if cfg.qat_from_scratch else copy.deepcopy(float_model)
        epochs, lr = (cfg.epochs, cfg.lr) if cfg.qat_from_scratch else (cfg.qat_epochs, cfg.qat_lr)
        model, accuracy, acc, _ = train(cfg, run, start, data, epochs, lr, n_bits, results["epochs"], teacher)
        if main:
            save_quantized(model, out / run)
            layers = [(name, layer.weight, layer.quantizer) for name, layer in quantized_layers(model)]
            plot_levels_over_weights(first_groups(layers), out / f"levels_{run}.png", title=run)
        acc.wait_for_everyone()
        finish(run, "qat", n_bits, accuracy, out / run / "model.safetensors")

    if main:
        final = results["final"]
        plot_accuracy_per_epoch(results["epochs"], out / "accuracy_per_epoch.png",
                                reference={r: v["accuracy"] for r, v in final.items() if v["kind"] == "ptq"})
        if len({row["n_bits"] for row in final.values() if row["n_bits"]}) > 1:
            plot_accuracy_vs_bits(final, out / "accuracy_vs_bits.png")
        print_table(final, out)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # every process leaves the process group together
    return results


def print_table(final: dict[str, dict[str, Any]], out: Path) -> None:
    """The comparison: run, bits, top-1 accuracy, change against float, size of the saved weights, time."""
    float_accuracy = final.get("float", {}).get("accuracy")
    lines = [f"{'run':<12} {'bits':>4} {'accuracy':>9} {'vs float':>9} {'size':>10} {'time':>8}"]
    for run, row in final.items():
        drop = "" if float_accuracy is None or run == "float" else f"{100 * (row['accuracy'] - float_accuracy):+.2f} pt"
        bits = "32" if row["n_bits"] is None else str(row["n_bits"])
        took = f"{row['wall_s'] / 60:.1f} min" if "wall_s" in row else ""
        lines.append(f"{run:<12} {bits:>4} {100 * row['accuracy']:>8.2f}% {drop:>9} {row['bytes'] / 1024:>6.1f} KiB "
                     f"{took:>8}")
    print("\n".join(lines))
    print(f"results: {out / 'results.json'}; charts: {', '.join(str(p) for p in sorted(out.glob('*.png')))}")


if __name__ == "__main__":
    run_all(parse_args(), create_model)
    sys.exit(0)
