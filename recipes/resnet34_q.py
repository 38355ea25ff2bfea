"""Hash-loss quantization-aware training of a timm ResNet-34 on CIFAR-10, with Accelerate.

    python recipes/resnet34_q.py                                                     # one process: CPU or one GPU
    accelerate launch --multi_gpu --num_processes 2 recipes/resnet34_q.py            # two processes (GPUs, or gloo on CPU)
    python recipes/resnet34_q.py --dataset fashion-mnist                             # apt-get install dataset-fashion-mnist
    python recipes/resnet34_q.py --dataset synthetic --max-steps 2 --batch-size 4    # smoke test, no data needed
    python recipes/resnet34_q.py --resume runs/resnet34_q/checkpoint                 # go on from the last checkpoint

Every field of ``Config`` is a flag (``max_steps`` -> ``--max-steps``). CIFAR-10 is downloaded into
``--data-dir`` (default ``data``) unless ``cifar-10-batches-py/`` is already there; Fashion-MNIST
is read from the IDX files of Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``).

QAT is the five statements marked ``# QAT``: a :class:`~timm_qconv.callbacks.CallbackHandler` with a
:class:`~timm_qconv.callbacks.HashLossCallback` converts the model before the optimizer exists,
adds the hash loss to every step's loss, and freezes the model into plain layers at the end. A
checkpoint (``accelerator.save_state``) is written after every epoch and when ``--max-steps``
stops the run; it holds the quantizer state, so ``--resume`` continues exactly.
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import pickle
import struct
from dataclasses import asdict, dataclass, fields

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset
from torchmetrics.classification import MulticlassAccuracy

from timm_qconv.callbacks import CallbackHandler, HashLossCallback

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("cifar10", "fashion-mnist", "synthetic")


@dataclass
class Config:
    model: str = "resnet34"          # any timm model name
    pretrained: bool = False         # start from timm's ImageNet weights (downloads them)
    dataset: str = "cifar10"         # cifar10 | fashion-mnist | synthetic
    data_dir: str = ""               # "" = data/ for CIFAR-10, /usr/share/datasets/fashion-mnist for Fashion-MNIST
    epochs: int = 30
    max_steps: int = 0               # stop after this many steps (0: run all epochs); the lr schedule still spans --epochs
    batch_size: int = 128            # per process
    lr: float = 0.05                 # SGD peak learning rate, cosine-decayed to 0 over the run
    weight_decay: float = 5e-4       # not applied to the quantizer's levels
    method: str = "hash"             # quantization method (timm_qconv.list_methods())
    n_bits: int = 4                  # bits per weight
    n_functions: int = 32            # groups of output channels with their own levels
    hash_weight: float = 1.0         # weight of the hash loss after warm-up
    warmup_steps: int = 200          # steps of linear warm-up of the hash-loss weight
    freeze_levels_epoch: int = 0     # freeze the quantizer's levels after this epoch (0: never)
    output_dir: str = "runs/resnet34_q"
    resume: str = ""                 # a checkpoint folder to continue from
    seed: int = 0
    num_workers: int = 2             # dataloader workers per process
    log_every: int = 50              # print the loss every this many steps


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            parser.add_argument(flag, action="store_true")
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default,
                                choices=DATASETS if f.name == "dataset" else None)
    return Config(**vars(parser.parse_args(argv)))


# ----------------------------------------------------------------------------- data
class Images(Dataset):
    """uint8 images (N, C, H, W) and labels; normalised, with random crop and flip for training.

    The augmentation of an image depends only on (seed, epoch, index), not on the global RNG, so a
    resumed run sees the same crops as an uninterrupted one, whatever the number of workers.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple, std: tuple, train: bool) -> None:
        self.images, self.labels, self.train = images, labels.long(), train
        self.mean, self.std = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        self.seed = self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = (self.images[index].float() / 255 - self.mean) / self.std
        if self.train:
            g = torch.Generator().manual_seed((self.seed * 1_000 + self.epoch) * len(self) + index)
            h, w = x.shape[-2:]
            top, left, flip = torch.randint(0, 9, (3,), generator=g).tolist()
            x = F.pad(x, (4, 4, 4, 4))[:, top:top + h, left:left + w]
            if flip % 2:
                x = x.flip(-1)
        return x, self.labels[index]


def read_cifar10(root: str) -> tuple[torch.Tensor, ...]:
    """CIFAR-10's python batches under ``root/cifar-10-batches-py`` (downloaded when missing)."""
    folder = os.path.join(root, "cifar-10-batches-py")
    if not os.path.isdir(folder):
        from torchvision.datasets import CIFAR10

        try:
            CIFAR10(root, train=True, download=True)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise SystemExit(f"error: could not download CIFAR-10 into {root!r} ({reason}); the network may be "
                             "unreachable: put cifar-10-batches-py/ there, or use --dataset fashion-mnist or synthetic")

    def load(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        with open(os.path.join(folder, name), "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        return images, torch.tensor(batch["labels"])

    train = [load(f"data_batch_{i}") for i in range(1, 6)]
    test_images, test_labels = load("test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels


def read_idx(path: str) -> torch.Tensor:
    """An IDX file of unsigned bytes (MNIST's format), gzipped or not."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\0\0\x08":
        raise SystemExit(f"error: {path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return torch.frombuffer(bytearray(data[4 + 4 * ndim:]), dtype=torch.uint8).reshape(shape)


def read_fashion_mnist(root: str) -> tuple[torch.Tensor, ...]:
    def find(stem: str) -> str:
        for name in (stem, stem + ".gz"):
            if os.path.exists(os.path.join(root, name)):
                return os.path.join(root, name)
        raise SystemExit(f"error: {stem}[.gz] not found in {root!r}: apt-get install dataset-fashion-mnist, or pass --data-dir")

    parts = [read_idx(find(f"{split}-{kind}-idx{dims}-ubyte")) for split in ("train", "t10k")
             for kind, dims in (("images", 3), ("labels", 1))]
    return parts[0][:, None], parts[1], parts[2][:, None], parts[3]


def load_data(cfg: Config) -> tuple[Dataset, Dataset, int]:
    """Train set, test set and the number of input channels."""
    if cfg.dataset == "cifar10":
        stats = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        parts = read_cifar10(cfg.data_dir or "data")
    elif cfg.dataset == "fashion-mnist":
        stats = (0.2860,), (0.3530,)
        parts = read_fashion_mnist(cfg.data_dir or FASHION_MNIST_DIR)
    else:
        g = torch.Generator().manual_seed(0)
        stats = (0.5,) * 3, (0.25,) * 3
        parts = (torch.randint(0, 256, (64, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (64,), generator=g),
                 torch.randint(0, 256, (16, 3, 32, 32), generator=g, dtype=torch.uint8), torch.randint(0, 10, (16,), generator=g))
    train_x, train_y, test_x, test_y = parts
    return Images(train_x, train_y, *stats, train=True), Images(test_x, test_y, *stats, train=False), train_x.shape[1]


# ----------------------------------------------------------------------------- training
@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Top-1 accuracy; torchmetrics gathers every process's counts, so all processes get the same value."""
    model.eval()
    accuracy = MulticlassAccuracy(num_classes=10).to(device)
    for images, labels in loader:
        accuracy.update(model(images), labels)
    model.train()
    return float(accuracy.compute())


def main(cfg: Config) -> None:
    # Without a GPU, cpu=True lets `accelerate launch --multi_gpu` run DDP over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    set_seed(cfg.seed)
    with accelerator.main_process_first():  # the main process downloads, the others then read
        train_set, test_set, in_chans = load_data(cfg)
    model = timm.create_model(cfg.model, pretrained=cfg.pretrained, num_classes=10, in_chans=in_chans)

    qat = CallbackHandler([HashLossCallback(  # QAT
        method=cfg.method, n_bits=cfg.n_bits, n_functions=cfg.n_functions, skip_first_last=True,
        loss_weight=cfg.hash_weight, warmup_steps=cfg.warmup_steps,
        freeze_levels_after_epoch=cfg.freeze_levels_epoch or None)], accelerator, max_steps=cfg.max_steps or None)
    model = qat.on_init(model)  # QAT: before the optimizer, so that it holds the quantizer's parameters

    levels = {id(p) for p in qat.callbacks[0].quantizer_parameters()}
    optimizer = torch.optim.SGD([
        {"params": [p for p in model.parameters() if id(p) not in levels], "weight_decay": cfg.weight_decay},
        {"params": [p for p in model.parameters() if id(p) in levels], "weight_decay": 0.0},
    ], lr=cfg.lr, momentum=0.9, nesterov=True)
    train_loader = DataLoader(train_set, cfg.batch_size, shuffle=True, drop_last=True, num_workers=cfg.num_workers)
    test_loader = DataLoader(test_set, cfg.batch_size, num_workers=cfg.num_workers)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    checkpoint = os.path.join(cfg.output_dir, "checkpoint")
    if cfg.resume:
        accelerator.load_state(cfg.resume)  # on_load runs first and checks the quantization settings
        qat.print(f"resumed from {cfg.resume} at step {qat.state.global_step}")

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch-size {cfg.batch_size} x {accelerator.num_processes} processes is more than "
                         f"the {len(train_set)} training images")
    total_steps = cfg.epochs * steps_per_epoch  # the schedule's length; --max-steps only stops early
    start_epoch, skip = divmod(qat.state.global_step, steps_per_epoch)
    qat.on_train_begin(optimizer=optimizer)
    for epoch in range(start_epoch, cfg.epochs):
        train_loader.set_epoch(epoch)  # the seedable sampler's order depends only on (seed, epoch)
        train_set.seed, train_set.epoch = cfg.seed, epoch
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        skip = 0
        qat.on_epoch_begin()
        for images, labels in loader:
            lr = 0.5 * cfg.lr * (1 + math.cos(math.pi * qat.state.global_step / total_steps))
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = qat.on_loss(F.cross_entropy(model(images), labels))  # QAT: adds the weighted hash loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            control = qat.on_step_end()  # QAT: counts the step (warm-up, level freezing, --max-steps)
            if qat.state.global_step % cfg.log_every == 0 or qat.state.global_step == 1:
                qat.print(f"epoch {epoch} step {qat.state.global_step} loss {loss.item():.4f} "
                          f"hash loss {float(qat.state.logs.get('hash_loss', math.nan)):.3g} lr {lr:.4f}")
            if control.should_stop:
                break
        if qat.state.global_step % steps_per_epoch:
            break  # --max-steps stopped the run inside the epoch: checkpoint below, no epoch end
        accuracy = evaluate(model, test_loader, accelerator.device)
        qat.on_evaluate({"accuracy": accuracy})
        qat.print(f"epoch {epoch}: test accuracy {accuracy:.4f} ({cfg.n_bits}-bit weights)")
        qat.on_epoch_end()
        accelerator.save_state(checkpoint)
        if qat.control.should_stop:
            break

    if qat.state.global_step % steps_per_epoch:
        accelerator.save_state(checkpoint)
        qat.print(f"stopped at step {qat.state.global_step}: test accuracy "
                  f"{evaluate(model, test_loader, accelerator.device):.4f} ({cfg.n_bits}-bit weights)")
    frozen = qat.on_train_end()  # QAT: plain Conv2d layers holding the quantized weights
    accelerator.wait_for_everyone()
    accelerator.save_model(frozen, cfg.output_dir)  # model.safetensors, loads without timm_qconv
    if accelerator.is_main_process:  # atomically: a temporary file, then a rename
        path = os.path.join(cfg.output_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(asdict(cfg), f, indent=1)
        os.replace(path + ".tmp", path)
    qat.print(f"saved {cfg.output_dir}/model.safetensors and the last checkpoint in {checkpoint}")
    accelerator.end_training()  # every process leaves the process group together


if __name__ == "__main__":
    main(parse_args())
