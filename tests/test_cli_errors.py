"""The command line never shows a traceback: damaged exports, closed pipes, missing GPUs, pickled
models, classifiers that do not fit, and an existing --out each get one line saying what to do."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from export_helpers import resign, set_entry

from timm_qconv import BitQuantizer, save_quantized
from timm_qconv.cli import main
from timm_qconv.export import CONFIG_FILE

MODEL = "test_resnet"


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=5)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bq = BitQuantizer(_tiny(), 4, 2, layers=("conv", "linear")).train_hash_functions(1)
    return save_quantized(bq, tmp_path_factory.mktemp("cli") / "q")


def one_line(capsys: pytest.CaptureFixture, code: int, got: int) -> str:
    err = capsys.readouterr().err
    assert got == code, f"exit {got}, expected {code}: {err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("timm-qconv: error:"), f"expected one error line, got:\n{err}"
    return lines[0]


DAMAGED = {
    "float32_bytes 0": set_entry("float32_bytes", value=0),
    "layers empty list": set_entry("layers", value=[]),
    "layers empty object": set_entry("layers", value={}),
    "groups missing": lambda c: c["layers"]["fc"].pop("groups"),
    "shape missing": lambda c: c["layers"]["fc"].pop("shape"),
    "shape not a list": set_entry("layers", "fc", "shape", value=5),
    "model_kwargs list": set_entry("model_kwargs", value=[1]),
    "layers not an object": set_entry("layers", value=3),
    "config a list": lambda c: (c.clear()),
}


@pytest.mark.parametrize("resigned", [True, False], ids=["consistent", "config-only"])
@pytest.mark.parametrize("name", list(DAMAGED))
def test_info_on_a_damaged_config_is_one_line(name: str, resigned: bool, export_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    copy = Path(shutil.copytree(export_dir, tmp_path / "q"))
    if resigned:
        resign(copy, DAMAGED[name])
    else:
        import json

        config = json.loads((copy / CONFIG_FILE).read_text())
        DAMAGED[name](config)
        (copy / CONFIG_FILE).write_text(json.dumps(config))
    one_line(capsys, 2, main(["info", str(copy)]))


def test_info_into_a_closed_pipe_is_quiet(export_dir: Path) -> None:
    env = {**os.environ, "TIMM_QCONV_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "timm_qconv", "info", str(export_dir)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # like `timm-qconv info DIR | head -0`: the reader is gone before anything is written
    err = proc.stderr.read().decode()
    proc.wait(timeout=300)
    assert "Traceback" not in err and "Exception ignored" not in err, f"a closed pipe printed:\n{err}"
    assert proc.returncode == 141, f"exit {proc.returncode}; expected 141 (SIGPIPE, like other tools)"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device,message", [("cuda", "not available"), ("cuda:3", "not available"),
                                            ("bogus", "not a device")])
def test_a_missing_device_fails_before_the_fit(device: str, message: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    line = one_line(capsys, 2, main(["quantize", "--model", MODEL, "--device", device, "--out", str(tmp_path / "q")]))
    assert "--device" in line and message in line, line
    assert not (tmp_path / "q").exists()


def test_a_pickled_model_checkpoint_says_what_is_expected(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "whole_model.pth"
    torch.save(_tiny(), checkpoint)  # the whole module, not its state dict
    line = one_line(capsys, 2, main(["quantize", "--model", MODEL, "--checkpoint", str(checkpoint),
                                     "--out", str(tmp_path / "q")]))
    assert "pickled Python objects" in line and "state_dict()" in line, line


def test_a_classifier_that_does_not_fit_suggests_num_classes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    checkpoint = tmp_path / "model.pth"
    torch.save(_tiny().state_dict(), checkpoint)  # 5 classes; the model defaults to 1000
    line = one_line(capsys, 2, main(["quantize", "--model", MODEL, "--checkpoint", str(checkpoint),
                                     "--out", str(tmp_path / "q")]))
    assert "does not fit" in line and "--num-classes 5" in line, line


def test_an_existing_out_needs_overwrite(export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = Path(shutil.copytree(export_dir, tmp_path / "q"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    args = ["quantize", "--model", MODEL, "--num-classes", "5", "--bits", "3", "--functions", "2", "--iters", "1",
            "--out", str(out)]
    line = one_line(capsys, 2, main(args))
    assert "--overwrite" in line and "already exists" in line, line
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the existing export must be untouched"
    assert main([*args, "--overwrite"]) == 0, capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before, "--overwrite replaces the export"


def test_an_unexpected_error_is_still_one_line(export_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    import timm_qconv.cli as cli

    def broken(args: Any) -> int:
        raise KeyError("surprise")

    monkeypatch.setitem(cli.COMMANDS, "info", broken)
    line = one_line(capsys, 1, main(["info", str(export_dir)]))
    assert "KeyError" in line and "--traceback" in line, line
