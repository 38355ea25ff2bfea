"""recipes/resnet34_q.py: a two-step run with resume, and its data readers on small files written
here in the real on-disk formats (CIFAR-10 python batches, Fashion-MNIST IDX)."""
import dataclasses
import gzip
import importlib.util
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "resnet34_q.py"


@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("resnet34_q", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def run_recipe(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(RECIPE), "--dataset", "synthetic", "--batch-size", "4",
                           "--num-workers", "0", "--log-every", "1", *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_recipe_runs_from_the_command_line(tmp_path):
    first = run_recipe("--max-steps", "2", "--output-dir", str(tmp_path))
    assert "layers quantized" in first and "epoch 0 step 2 loss" in first and "stopped at step 2" in first, first
    assert (tmp_path / "checkpoint" / "timm_qconv_callbacks.json").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model"] == "resnet34"
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "model.safetensors")
    assert not any("quantizer" in k for k in weights), "the saved model must be frozen into plain layers"
    assert len(torch.unique(weights["layer1.0.conv1.weight"][0])) <= 16, "4-bit weights: at most 16 levels per group"


def step_losses(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"step (\d+) loss (\S+)", text)}


def test_recipe_resumes_with_the_same_next_loss(recipe, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    cfg = recipe.Config(model="test_resnet", dataset="synthetic", batch_size=4, num_workers=0, log_every=1,
                        warmup_steps=3, output_dir=str(tmp_path / "a"))
    try:
        for run in (dataclasses.replace(cfg, max_steps=3, output_dir=str(tmp_path / "full")),
                    dataclasses.replace(cfg, max_steps=2),
                    dataclasses.replace(cfg, max_steps=3, resume=str(tmp_path / "a" / "checkpoint"))):
            AcceleratorState._reset_state(True)
            recipe.main(run)
    finally:
        AcceleratorState._reset_state(True)
    full, _, resumed = capsys.readouterr().out.split("layers quantized")[1:]
    assert "at step 2" in resumed and step_losses(resumed) == {3: step_losses(full)[3]}, (full, resumed)


def write_cifar(root: Path, per_batch: int = 3) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"batch_label": name, "labels": rng.integers(0, 10, per_batch).tolist(),
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8), "filenames": ["x.png"] * per_batch}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_reader_reads_python_batches(recipe, tmp_path):
    write_cifar(tmp_path)
    train, test, channels = recipe.load_data(recipe.Config(dataset="cifar10", data_dir=str(tmp_path)))
    assert (len(train), len(test), channels) == (15, 3, 3)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    assert torch.equal(train.images[3], torch.from_numpy(raw["data"][0].reshape(3, 32, 32))), "channel-major 32x32"
    assert train.labels[3] == raw["labels"][0] and train[0][0].shape == (3, 32, 32)


def test_cifar10_download_failure_is_one_clear_line(recipe, tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as error:
        recipe.load_data(recipe.Config(dataset="cifar10", data_dir=str(tmp_path)))
    message = str(error.value)
    assert "could not download CIFAR-10" in message and "unreachable" in message and "\n" not in message, message


def write_idx(path: Path, array: np.ndarray, gzipped: bool) -> None:
    data = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data) if gzipped else data)


@pytest.mark.parametrize("gzipped", [True, False])
def test_fashion_mnist_reader_reads_idx_files(recipe, tmp_path, gzipped):
    rng = np.random.default_rng(0)
    arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "train-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
              "t10k-images-idx3-ubyte": rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
              "t10k-labels-idx1-ubyte": rng.integers(0, 10, 2, dtype=np.uint8)}
    for name, array in arrays.items():
        write_idx(tmp_path / (name + (".gz" if gzipped else "")), array, gzipped)
    train, test, channels = recipe.load_data(recipe.Config(dataset="fashion-mnist", data_dir=str(tmp_path)))
    assert (len(train), len(test), channels) == (5, 2, 1)
    assert torch.equal(train.images[4, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"][4]))
    assert test.labels.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist() and train[0][0].shape == (1, 28, 28)


def test_fashion_mnist_missing_files_say_how_to_install(recipe, tmp_path):
    with pytest.raises(SystemExit, match="apt-get install dataset-fashion-mnist"):
        recipe.load_data(recipe.Config(dataset="fashion-mnist", data_dir=str(tmp_path)))
