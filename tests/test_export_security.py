"""An export may come from a stranger: its config cannot steer model building, and the two files are bound."""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from export_helpers import resign, set_entry
from torch import nn

from timm_qconv import BitQuantizer, load_quantized, quantize_model, save_quantized
from timm_qconv.export import CONFIG_FILE, WEIGHTS_FILE, read_config


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_resnet", num_classes=5)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bq = BitQuantizer(_tiny(), 4, 2, layers=("conv", "linear")).train_hash_functions(1)
    return save_quantized(bq, tmp_path_factory.mktemp("sec") / "q")


@pytest.fixture
def copy(export_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(export_dir, tmp_path / "copy"))


CRAFTED = {
    "hf-hub": (set_entry("architecture", value="hf-hub:attacker/model"), "architecture"),
    "local-dir": (set_entry("architecture", value="local-dir:/tmp/elsewhere"), "architecture"),
    "path": (set_entry("architecture", value="../../resnet18"), "architecture"),
    "checkpoint_path": (set_entry("model_kwargs", "checkpoint_path", value="/etc/passwd"),
                        "model_kwargs.checkpoint_path"),
    "pretrained_cfg_overlay": (set_entry("model_kwargs", "pretrained_cfg_overlay", value={"file": "/x"}),
                               "model_kwargs"),
    "act_layer": (set_entry("model_kwargs", "act_layer", value="tanh"), "model_kwargs.act_layer"),
    "huge num_classes": (set_entry("model_kwargs", "num_classes", value=10**8), "model_kwargs.num_classes"),
    "num_classes not int": (set_entry("model_kwargs", "num_classes", value="5"), "model_kwargs.num_classes"),
    "kwargs not a dict": (set_entry("model_kwargs", value=[1]), "model_kwargs"),
    "bool dtype": (set_entry("layers", "fc", "dtype", value="bool"), "dtype"),
    "negative shape": (set_entry("layers", "fc", "shape", value=[-5, 8]), "shape"),
    "huge shape": (set_entry("layers", "fc", "shape", value=[2**40, 2**40]), "codes or levels do not match"),
    "other levels": (set_entry("layers", "fc", "levels", value=3), "codes or levels do not match"),
    "no layers": (set_entry("layers", value=[]), "layers"),
    "groups missing": (lambda c: c["layers"]["fc"].pop("groups"), "layers"),
    "zero float32_bytes": (set_entry("float32_bytes", value=0), "float32_bytes"),
    "other weights file": (set_entry("weights_file", value="/etc/passwd"), "weights_file"),
    "version 1": (set_entry("format_version", value=1), "format_version"),
}


@pytest.mark.parametrize("name", list(CRAFTED))
def test_crafted_config_is_refused_before_building(name: str, copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    edit, match = CRAFTED[name]
    resign(copy, edit)
    built = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: built.append((a, k)))
    with pytest.raises(ValueError, match=match):
        load_quantized(copy)
    with pytest.raises(ValueError, match=match):
        read_config(copy)
    assert built == [], f"timm.create_model must not be called for a crafted config, got {built}"


def test_classifier_size_is_checked_on_meta_before_allocating(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resign(copy, set_entry("model_kwargs", "num_classes", value=999_999))  # allowed range, wrong for the weights
    devices = []
    real = timm.create_model

    def spy(*args: Any, **kwargs: Any) -> nn.Module:
        devices.append(str(torch.empty(0).device))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    with pytest.raises(ValueError, match="does not match the saved architecture"):
        load_quantized(copy)
    assert devices == ["meta"], f"the model must be built only on the meta device until its shapes match: {devices}"


def test_config_edited_alone_is_detected(copy: Path) -> None:
    config = json.loads((copy / CONFIG_FILE).read_text())
    config["model_kwargs"]["num_classes"] = 7  # an allowed value, but not the one the weights were saved with
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json was changed after saving"):
        load_quantized(copy)


def test_weights_of_another_export_are_detected(copy: Path, tmp_path: Path) -> None:
    other = save_quantized(BitQuantizer(_tiny(), 4, 3, layers=("conv", "linear")).train_hash_functions(1),
                           tmp_path / "other")
    config = json.loads((copy / CONFIG_FILE).read_text())
    data = (other / WEIGHTS_FILE).read_bytes()
    config.update(weights_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (copy / WEIGHTS_FILE).write_bytes(data)
    (copy / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="belongs to other weights"):
        load_quantized(copy)


def test_oversized_weights_file_is_not_read(copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(copy / WEIGHTS_FILE, "ab") as f:
        f.write(b"\0" * 4096)
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes",
                        lambda self: pytest.fail("weights read") if self.name == WEIGHTS_FILE else real(self))
    with pytest.raises(ValueError, match="truncated or was changed"):
        load_quantized(copy)


def _nan_model() -> nn.Module:
    model = quantize_model(_tiny(), n_bits=2, n_functions=2)
    with torch.no_grad():
        model.layer1[0].conv1.weight[0, 0, 0, 0] = float("nan")
    return model


def test_nan_weights_are_refused_by_save(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layer 'layer1.0.conv1' has non-finite weights"):
        save_quantized(_nan_model(), tmp_path / "q")
    assert list(tmp_path.iterdir()) == [], "a refused save writes nothing"


def test_nan_weights_are_refused_by_bit_quantizer_fit() -> None:
    model = _tiny()
    bq = BitQuantizer(model, 4, 2, layers=("conv", "linear"))
    with torch.no_grad():
        model.fc.weight[0, 0] = float("inf")  # became non-finite after the constructor
    with pytest.raises(ValueError, match="layer 'fc' has non-finite weights"):
        bq.train_hash_functions(1)
