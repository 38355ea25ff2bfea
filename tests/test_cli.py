"""The ``timm-qconv`` command line: real runs through ``subprocess``, error paths through ``main()``.

Subprocesses run with ``TIMM_QCONV_PLUGINS=""`` (built-in methods only: installed plugins are not
under test here) and one thread, on timm's ``test_resnet`` (0.37 M weights) to stay fast.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from timm_qconv import BitQuantizer, load_quantized
from timm_qconv.cli import main
from timm_qconv.export import CONFIG_FILE, WEIGHTS_FILE

MODEL = "test_resnet"
PROXIES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def run_cli(*args: str, env: dict | None = None, exe: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k not in PROXIES}
    full_env.update({"TIMM_QCONV_PLUGINS": "", "OMP_NUM_THREADS": "1", **(env or {})})
    command = (exe or [sys.executable, "-m", "timm_qconv"]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=300)


def one_line_error(result: subprocess.CompletedProcess, code: int) -> str:
    assert result.returncode == code, f"exit {result.returncode}, expected {code}; stderr: {result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, f"a traceback leaked: {result.stderr[-2000:]}"
    return result.stderr


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(MODEL, num_classes=5)


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path, Path]:
    """One real ``python -m timm_qconv quantize`` run from a checkpoint, shared by the tests below."""
    root = tmp_path_factory.mktemp("cli")
    checkpoint = root / "model.pth"
    torch.save(tiny_model().state_dict(), checkpoint)
    out = root / "out" / "q3"
    result = run_cli("quantize", "--model", MODEL, "--num-classes", "5", "--checkpoint", str(checkpoint),
                     "--bits", "3", "--functions", "4", "--iters", "2", "--out", str(out))
    return result, checkpoint, out


def test_quantize_writes_table_sizes_and_files(quantized) -> None:
    result, _, out = quantized
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rel. error" in result.stdout and "SQNR dB" in result.stdout and "\ntotal" in result.stdout, result.stdout
    assert "size:" in result.stdout and "(float32 state dict) ->" in result.stdout, result.stdout
    assert "layer" in result.stderr and "100%" in result.stderr, "a tqdm progress bar over layers goes to stderr"
    assert sorted(p.name for p in out.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


def test_quantize_output_equals_the_library(quantized) -> None:
    _, _, out = quantized
    config = json.loads((out / CONFIG_FILE).read_text())
    assert (config["architecture"], config["method"], config["n_bits"], config["n_functions"]) == (MODEL, "hash", 3, 4)
    fitted = BitQuantizer(tiny_model(), 4, 3, layers=("conv", "linear")).train_hash_functions(2)
    want = fitted.get_hashed_model().state_dict()
    got = load_quantized(out).state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), "the CLI must save what BitQuantizer computes"


def test_info_describes_the_saved_model(quantized) -> None:
    _, _, out = quantized
    result = run_cli("info", str(out))
    assert result.returncode == 0, result.stderr
    for expected in (MODEL, "num_classes=5", "hash", "compression", "sha256 ok", "quantized layers"):
        assert expected in result.stdout, f"{expected!r} missing from info output:\n{result.stdout}"
    console = Path(sys.executable).parent / "timm-qconv"
    if console.exists():  # the console script is the same tool
        assert run_cli("info", str(out), exe=[str(console)]).stdout == result.stdout


def test_info_reports_a_damaged_file(quantized, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, out = quantized
    copy = Path(shutil.copytree(out, tmp_path / "q"))
    (copy / WEIGHTS_FILE).write_bytes((copy / WEIGHTS_FILE).read_bytes()[:-10])
    assert main(["info", str(copy)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("timm-qconv: error:") and "truncated" in err and len(err.strip().splitlines()) == 1, err


def test_pretrained_with_unreachable_hub_says_so(tmp_path: Path) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch")}
    env.pop("HF_HUB_OFFLINE", None)
    result = run_cli("quantize", "--model", MODEL, "--pretrained", "--out", str(tmp_path / "q"), env=env)
    err = one_line_error(result, 1)
    assert "--pretrained" in err and "unreachable" in err and "127.0.0.1:9" in err, err
    assert len(err.strip().splitlines()) == 1, f"expected one line, got:\n{err}"
    assert not (tmp_path / "q").exists()


def test_unknown_model_suggests_close_names(tmp_path: Path) -> None:
    err = one_line_error(run_cli("quantize", "--model", "resnt18", "--out", str(tmp_path / "q")), 2)
    assert "unknown timm model 'resnt18'" in err and "resnet18" in err, err


def test_unknown_flag_is_an_argparse_error(tmp_path: Path) -> None:
    err = one_line_error(run_cli("quantize", "--model", MODEL, "--bogus", "1", "--out", str(tmp_path / "q")), 2)
    assert "unrecognized arguments: --bogus" in err, err


def test_plugins_lists_the_builtin_methods() -> None:
    result = run_cli("plugins")
    assert result.returncode == 0, result.stderr
    assert "timm_qconv.methods" in result.stdout and "register_methods" in result.stdout, result.stdout
    assert "kmeans" in result.stdout, result.stdout


# ------------------------------------------------------------------------- in-process error paths
@pytest.mark.parametrize("flag,value,allowed", [("--bits", "9", "1..8"), ("--bits", "0", "1..8"),
                                                ("--bits", "x", "1..8"), ("--iters", "0", ">= 1"),
                                                ("--functions", "0", ">= 1")])
def test_out_of_range_numbers_name_the_flag(flag: str, value: str, allowed: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "--model", MODEL, flag, value, "--out", str(tmp_path / "q")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}:" in err and allowed in err, err
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args,code,message", [
    (["--avoid", "nothing"], 2, "avoid entry 'nothing' matches no module"),
    (["--method", "bogus"], 2, "method='bogus' is unknown"),
    (["--checkpoint", "missing.pth"], 2, "argument --checkpoint: 'missing.pth' is not a file"),
])
def test_bad_input_is_one_line(args: list, code: int, message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", "--model", MODEL, "--iters", "1", *args, "--out", str(tmp_path / "q")]) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("timm-qconv: error:") and message in err[-1], err
    assert not (tmp_path / "q").exists(), "a failed run writes nothing"


def test_unwritable_out_fails_before_fitting(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "file.txt"
    blocker.write_text("user data")
    assert main(["quantize", "--model", MODEL, "--out", str(blocker / "q")]) == 1
    assert main(["quantize", "--model", MODEL, "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert err.count("argument --out:") == 2 and "layer/s" not in err, err
    assert blocker.read_text() == "user data"


def test_checkpoint_formats(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import safetensors.torch

    model = tiny_model()
    wrapped = tmp_path / "train.pth"  # a training checkpoint saved from DataParallel
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, wrapped)
    flat = tmp_path / "model.safetensors"
    safetensors.torch.save_file(model.state_dict(), flat)
    fitted = BitQuantizer(model, 2, 2, method="kmeans", layers=("conv", "linear")).train_hash_functions(1)
    want = fitted.get_hashed_model().state_dict()
    for checkpoint in (wrapped, flat):
        out = tmp_path / f"q_{checkpoint.stem}"
        argv = ["quantize", "--model", MODEL, "--num-classes", "5", "--checkpoint", str(checkpoint),
                "--method", "kmeans", "--bits", "2", "--functions", "2", "--iters", "1", "--out", str(out)]
        assert main(argv) == 0, capsys.readouterr().err
        got = load_quantized(out).state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want), f"{checkpoint.name} was not the model quantized"
    # the same checkpoint for a model with another head does not fit
    assert main(["quantize", "--model", MODEL, "--checkpoint", str(flat), "--out", str(tmp_path / "bad")]) == 2
    assert "does not fit" in capsys.readouterr().err
