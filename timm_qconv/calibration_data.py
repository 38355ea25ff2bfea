"""Calibration inputs for :meth:`~timm_qconv.BitQuantizer.calibrate` from a dataset name or an image folder.

Used by ``timm-qconv quantize --calibration``. A random subset (fixed seed) of the training split
is taken rather than the first images, which in an image folder are all of the first class.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from ._errors import check_int
from .datasets import ImageTensors, list_datasets, load_dataset


def _subset(n_total: int, n_samples: int, seed: int) -> list[int]:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n_samples].tolist()


def calibration_loader(source: str | os.PathLike, model: nn.Module, n_samples: int = 512, batch_size: int = 64,
                       data_dir: str | os.PathLike | None = None, seed: int = 0) -> DataLoader:
    """Batches of ``(images, labels)``: ``n_samples`` random training images of ``source``.

    Args:
        source: ``"fashion-mnist"`` or ``"cifar10"`` (see :mod:`timm_qconv.datasets`; normalised with
            the dataset's statistics, at its own size), or a folder of images with one sub-folder per
            class, read by timm's ``create_dataset`` and transformed for ``model`` as timm evaluates
            it (``resolve_data_config`` + ``create_transform``).
        model: the model to calibrate (its pretrained config decides an image folder's transform).
        n_samples: images to take, >= 1.
        batch_size: images per batch, >= 1.
        data_dir: where a named dataset is (also ``$TIMM_QCONV_DATA``).
        seed: the random subset's seed.
    """
    check_int("n_samples", n_samples, 1)
    check_int("batch_size", batch_size, 1)
    names = list_datasets()
    if isinstance(source, str) and source in names:
        train, _ = load_dataset(source, data_dir)
        dataset = ImageTensors(train.images, train.labels, train.info, train=False)
    elif isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        from timm.data import create_dataset, create_transform, resolve_data_config

        dataset = create_dataset("", root=str(source), split="")
        if len(dataset) == 0:
            raise ValueError(f"calibration={str(source)!r} holds no images; "
                             "expected one sub-folder of images per class")
        dataset.transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    else:
        raise ValueError(f"calibration={str(source)!r} is neither a folder nor a dataset name; expected an image "
                         f"folder (one sub-folder per class) or one of {names}")
    subset = Subset(dataset, _subset(len(dataset), n_samples, seed))
    return DataLoader(subset, batch_size=batch_size, shuffle=False)
