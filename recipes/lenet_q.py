"""LeNet-5 on Fashion-MNIST: float vs 4-bit post-training vs 2-bit quantization-aware training.

    python recipes/lenet_q.py                                      # one process, about 3 minutes on 2 CPU cores
    accelerate launch --multi_gpu --num_processes 2 recipes/lenet_q.py        # two processes (GPUs, or gloo on CPU)
    python recipes/lenet_q.py --bits 1 2 4 --output-dir runs/lenet_bits       # one PTQ and one QAT run per width
    python recipes/lenet_q.py --dataset cifar10 --mode qat --qat-from-scratch

The classic LeNet-5 (LeCun et al., 1998: two 5x5 convolutions with pooling, three fully connected
layers; ReLU and max-pooling as in today's versions), every Conv2d and Linear layer quantized. The
training, quantization and outputs are those of ``recipes/resnet34_q.py``: see its docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from resnet34_q import Config, option, parse_args, run_all
from torch import nn

from timm_qconv.datasets import DatasetInfo


class LeNet5(nn.Module):
    """LeNet-5 for ``channels`` x 28 or 32 pixel images (28-pixel ones are padded by 2, as in the paper)."""

    def __init__(self, channels: int = 1, num_classes: int = 10, size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, 5, padding=2 if size == 28 else 0), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@dataclass
class LeNetConfig(Config):
    """LeNet's defaults; every other option is the ResNet recipe's."""

    dataset: str = option("fashion-mnist", "dataset", choices=("fashion-mnist", "cifar10"))
    bits: list[int] = option([4, 2], "bits per weight of the quantized runs (several: one run each)")
    n_functions: int = option(128, "channel groups per layer, each with its own levels (128: one per channel)")
    crop: bool = option(False, "augment with pad-4 random crops (flips always; LeNet underfits with crops)")
    epochs: int = option(20, "float training epochs (also QAT's with --qat-from-scratch)")
    qat_epochs: int = option(5, "QAT fine-tuning epochs from the float weights")
    lr: float = option(0.05, "peak SGD learning rate of float training, cosine-decayed to 0")
    qat_lr: float = option(0.03, "peak learning rate of QAT fine-tuning")
    # RESULTS.md: at 2 bits the hash loss's pull on the weights adds 0.4 pt at qat_lr 0.01 and
    # 1.0 pt at 0.03, where it is best (0.05 is worse); without the pull the higher lr loses.
    hash_wrt_weights: bool = option(True, "the hash loss also pulls the float weights towards their levels")
    # 300 steps met both QAT targets of RESULTS.md in one run; 100 (2 bits) and 500 (1 bit) only one each.
    warmup_steps: int = option(300, "steps of linear warm-up of the hash loss's weight")
    output_dir: str = option("runs/lenet_q", "where results, models, checkpoints and charts go")
    num_workers: int = option(0, "dataloader workers per process (the images are in memory)")


def create_model(cfg: LeNetConfig, info: DatasetInfo) -> nn.Module:
    if info.size not in (28, 32):
        raise SystemExit(f"error: LeNet-5 takes 28 or 32 pixel images; {info.name} has {info.size}")
    return LeNet5(info.channels, info.num_classes, info.size)


if __name__ == "__main__":
    run_all(parse_args(LeNetConfig, doc=__doc__), create_model)
