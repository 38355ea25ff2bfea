"""Small image-classification datasets for the recipes, the CLI's calibration and the tests.

Fashion-MNIST and CIFAR-10 are read from their original on-disk formats into uint8 tensors
(``(N, C, H, W)`` images, int64 labels), which fit in memory (47 MB and 184 MB) and make a whole
epoch a matter of indexing. Where they are looked for, in order:

* Fashion-MNIST: ``data_dir``, ``$TIMM_QCONV_DATA``, Debian's ``dataset-fashion-mnist`` package
  (``/usr/share/datasets/fashion-mnist``), each also with torchvision's ``FashionMNIST/raw``
  layout; then torchvision's download into ``data_dir`` (or ``./data``).
* CIFAR-10: ``cifar-10-batches-py/`` under ``data_dir`` or ``$TIMM_QCONV_DATA``; then
  torchvision's download.

CIFAR-10's python batches are pickles. They are read by an unpickler that accepts only the few
numpy constructors those files use, so a crafted file cannot run code. When nothing is found and
the download fails, :class:`DatasetNotFoundError` names every place looked at and how to get the
data, and no folder created for the download is left behind.
"""
from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
ENV_DATA_DIR = "TIMM_QCONV_DATA"


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is neither on disk where it was looked for nor downloadable."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: its channels, image size, classes and statistics."""

    name: str
    channels: int
    size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class ImageTensors(Dataset):
    """uint8 images ``(N, C, H, W)`` with labels, normalised; augmented when ``train``.

    The augmentation of an image depends only on ``(seed, epoch, index)``, never on a global RNG or
    on which batch or process reads it, so a resumed or distributed run sees the same crops as an
    uninterrupted one-process run. ``__getitems__`` augments a whole batch with tensor operations
    (the DataLoader calls it instead of one ``__getitem__`` per image).

    Args:
        images: uint8 tensor ``(N, C, H, W)``.
        labels: integer labels ``(N,)``.
        info: the dataset's statistics (:class:`DatasetInfo`).
        train: augment: a horizontal flip, and a pad-4 random crop unless ``crop=False``.
        seed: with the epoch (:meth:`set_epoch`, which Accelerate's prepared loaders also call),
            what chooses the augmentation.
        crop: also crop when ``train``.
    """

    def __init__(self, images: Tensor, labels: Tensor, info: DatasetInfo, train: bool, seed: int = 0,
                 crop: bool = True) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(f"images must be uint8 (N, C, H, W) with one label each; got {images.dtype} "
                             f"{tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels, self.info, self.train = images, labels.long(), info, train
        self.mean = torch.tensor(info.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std).view(1, -1, 1, 1)
        self.seed, self.crop = seed, crop
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's crops and flips (call on every process before iterating)."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        self.epoch = epoch
        self.shifts = torch.randint(0, 9, (len(self), 3), generator=g)  # top, left, flip (odd: flip)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: list[int]) -> list[tuple[Tensor, Tensor]]:
        index = torch.as_tensor(indices, dtype=torch.long)
        x = (self.images[index].float() / 255 - self.mean) / self.std
        if self.train:
            n, _, h, w = x.shape
            top, left, flip = self.shifts[index].unbind(1)
            if not self.crop:
                top = left = torch.full_like(top, 4)  # the unshifted window of the padded image
            rows = (top[:, None] + torch.arange(h))[:, :, None]  # (n, h, 1)
            cols = left[:, None] + torch.arange(w)  # (n, w)
            cols = torch.where((flip % 2 == 1)[:, None], cols.flip(1), cols)[:, None, :]  # (n, 1, w)
            x = F.pad(x, (4, 4, 4, 4))[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
        return list(zip(x.contiguous(), self.labels[index]))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.__getitems__([index])[0]

    def subset(self, n: int) -> "ImageTensors":
        """The first ``n`` images (a cheap copy that shares nothing mutable with this one)."""
        return ImageTensors(self.images[:n], self.labels[:n], self.info, self.train, self.seed, self.crop)


# ----------------------------------------------------------------------------- Fashion-MNIST
def read_idx(path: str | os.PathLike) -> Tensor:
    """An IDX file of unsigned bytes (the MNIST format), gzipped or not, as a uint8 tensor."""
    path = str(path)
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:3] != b"\0\0\x08" or not 1 <= data[3] <= 4:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes (magic {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else ()
    if len(shape) != ndim or len(data) - header != int(np.prod(shape)):
        raise ValueError(f"{path}: the header says shape {shape} but the file holds {len(data) - header} bytes")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


_FASHION_FILES = {(split, kind): f"{split}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
                  for split in ("train", "t10k") for kind in ("images", "labels")}


def _fashion_folder(root: Path) -> Path | None:
    for folder in (root, root / "fashion-mnist", root / "FashionMNIST" / "raw"):
        if all(any((folder / (stem + ext)).exists() for ext in ("", ".gz")) for stem in _FASHION_FILES.values()):
            return folder
    return None


def _read_fashion(folder: Path) -> tuple[Tensor, ...]:
    def read(stem: str) -> Tensor:
        return read_idx(folder / stem if (folder / stem).exists() else folder / (stem + ".gz"))

    parts = [read(_FASHION_FILES[split, kind]) for split in ("train", "t10k") for kind in ("images", "labels")]
    return parts[0][:, None], parts[1], parts[2][:, None], parts[3]


# ----------------------------------------------------------------------------- CIFAR-10
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: any other global is refused, so no code runs."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays")
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[Tensor, Tensor]:
    """One CIFAR-10 python batch: uint8 images ``(N, 3, 32, 32)`` and labels, read without running code."""
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="latin1").load()
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (a dict with 'data' and 'labels')")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = torch.tensor(batch["labels"], dtype=torch.long)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise ValueError(f"{path}: expected (N, 3072) bytes and N labels, got {data.shape} and {len(labels)}")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), labels


def _cifar_folder(root: Path) -> Path | None:
    for folder in (root / "cifar-10-batches-py", root):
        if (folder / "test_batch").exists() and (folder / "data_batch_1").exists():
            return folder
    return None


def _read_cifar(folder: Path) -> tuple[Tensor, ...]:
    train = [read_cifar_batch(folder / f"data_batch_{i}") for i in range(1, 6) if (folder / f"data_batch_{i}").exists()]
    test_images, test_labels = read_cifar_batch(folder / "test_batch")
    return torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), test_images, test_labels


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Source:
    info: DatasetInfo
    find: Callable[[Path], Path | None]
    read: Callable[[Path], tuple[Tensor, ...]]
    system_dirs: tuple[str, ...]
    download: Callable[[str], None]
    how_to_get: str


def _download_fashion(root: str) -> None:
    from torchvision.datasets import FashionMNIST

    FashionMNIST(root, train=True, download=True)
    FashionMNIST(root, train=False, download=True)


def _download_cifar(root: str) -> None:
    from torchvision.datasets import CIFAR10

    CIFAR10(root, train=True, download=True)


_SOURCES: dict[str, _Source] = {
    "fashion-mnist": _Source(
        DatasetInfo("fashion-mnist", 1, 28, 10, (0.2860,), (0.3530,)), _fashion_folder, _read_fashion,
        (DEBIAN_FASHION_MNIST,), _download_fashion,
        "apt-get install dataset-fashion-mnist (Debian), or put the four *-ubyte[.gz] files in --data-dir"),
    "cifar10": _Source(
        DatasetInfo("cifar10", 3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)), _cifar_folder,
        _read_cifar, (), _download_cifar,
        "put cifar-10-batches-py/ (the python version from the CIFAR-10 page) in --data-dir"),
}


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_SOURCES)


def dataset_info(name: str) -> DatasetInfo:
    """Channels, image size, classes and normalisation of dataset ``name``."""
    if name not in _SOURCES:
        raise ValueError(f"dataset={name!r} is not known; expected one of {list_datasets()}")
    return _SOURCES[name].info


def _remove_new_dirs(root: Path, existed: set[Path]) -> None:
    """Remove the empty folders under ``root``, ``root`` and its parents that are not in ``existed``."""
    inside = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) if root.exists() else []
    for folder in [*inside, root, *root.parents]:
        if folder in existed:
            break
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _download(source: _Source, root: Path) -> tuple[Path | None, str]:
    """Download into ``root``; on failure remove the folders this created and return the reason."""
    existed = {p.absolute() for p in [root, *root.parents] if p.exists()}
    root = root.absolute()
    if root.exists():
        existed |= {p for p in root.rglob("*") if p.is_dir()}
    try:
        source.download(str(root))
    except Exception as error:  # noqa: BLE001 - urllib, torchvision and OS errors all mean "not reachable"
        _remove_new_dirs(root, existed)
        return None, (str(error).splitlines() or [type(error).__name__])[0]
    return source.find(root), ""


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 ) -> tuple[ImageTensors, ImageTensors]:
    """The train and test splits of ``name`` (see :func:`list_datasets`).

    Args:
        name: ``"fashion-mnist"`` or ``"cifar10"``.
        data_dir: a folder to look in first, and to download into (default ``./data``).
        download: try torchvision's download when the files are nowhere on disk.
    Raises:
        DatasetNotFoundError: naming every place looked at and how to get the data.
    """
    info = dataset_info(name)
    source = _SOURCES[name]
    roots = [Path(p) for p in (data_dir, os.environ.get(ENV_DATA_DIR)) if p] + [Path(p) for p in source.system_dirs]
    folder = next((f for f in map(source.find, roots) if f is not None), None)
    looked = [str(r) for r in roots]
    if folder is None and download:
        target = Path(data_dir or "data")
        folder, reason = _download(source, target)
        looked.append(f"torchvision's download into {target} ({reason or 'no files after it'})")
    if folder is None:
        raise DatasetNotFoundError(f"{name} not found; looked in: {'; '.join(looked)}. To get it: "
                                   f"{source.how_to_get}, or set ${ENV_DATA_DIR} to its folder")
    train_x, train_y, test_x, test_y = source.read(folder)
    return ImageTensors(train_x, train_y, info, train=True), ImageTensors(test_x, test_y, info, train=False)
