"""The recipes end to end, on tiny datasets written here in their real on-disk formats.

Fashion-MNIST as gzipped IDX files, CIFAR-10 as python-pickle batches, and an image folder of PNGs;
one process and two (``accelerate launch``, gloo on CPU); resume; bad flags and missing data.
"""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from timm_qconv.datasets import DatasetInfo, ImageTensors, load_dataset, read_cifar_batch

from conftest import run_distributed

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"
TINY = ["--batch-size", "16", "--num-workers", "0", "--seed", "1"]


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">4B", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def labelled_images(n: int, channels: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness encodes the label, so that a few steps already learn something."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 60, (n, channels, size, size)) + labels[:, None, None, None] * 19
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def fashion_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fashion")
    for split, n in (("train", 64), ("t10k", 30)):  # 30: not a multiple of the batch, nor of two processes
        images, labels = labelled_images(n, 1, 28, seed=n)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:, 0])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cifar") / "cifar-10-batches-py"
    folder.mkdir()
    for name, n in [(f"data_batch_{i}", 8) for i in range(1, 6)] + [("test_batch", 10)]:
        images, labels = labelled_images(n, 3, 32, seed=len(name) + n)
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": images.reshape(n, -1), "labels": labels.tolist(),
                         "filenames": [f"{i}.png" for i in range(n)]}, f, protocol=2)
    return folder.parent


def run(script: str, *args: str, processes: int = 1, expect_ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "TIMM_QCONV_PLUGINS": ""}
    env.pop("TIMM_QCONV_DATA", None)
    if processes == 1:
        proc = subprocess.run([sys.executable, str(RECIPES / script), *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=600)
    else:
        with socket.socket() as s:  # a free port: other test runs may share the machine
            s.bind(("127.0.0.1", 0))
            port = str(s.getsockname()[1])
        proc = run_distributed([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend",
                                "no", "--main_process_port", port, str(RECIPES / script), *args],
                               env=env, cwd=ROOT, timeout=600)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def results(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


@pytest.fixture(scope="module")
def lenet_run(fashion_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lenet")
    proc = run("lenet_q.py", "--data-dir", str(fashion_dir), "--epochs", "2", "--qat-epochs", "1", "--bits", "4", "2",
               "--output-dir", str(out), *TINY)
    (out / "stdout.txt").write_text(proc.stdout)
    return out


def test_lenet_runs_float_ptq_and_qat_with_every_output(lenet_run):
    data = results(lenet_run)
    assert set(data["final"]) == {"float", "ptq-4bit", "ptq-2bit", "qat-4bit", "qat-2bit"}, data["final"]
    assert data["config"]["bits"] == [4, 2] and data["config"]["dataset"] == "fashion-mnist"
    for run_name, row in data["final"].items():
        assert 0.0 <= row["accuracy"] <= 1.0, (run_name, row)
        folder = "float" if run_name == "float" else run_name
        assert row["bytes"] == (lenet_run / folder / "model.safetensors").stat().st_size, (run_name, row)
        assert row["n_bits"] == (None if run_name == "float" else int(run_name.split("-")[1][0])), row
    assert data["final"]["ptq-2bit"]["bytes"] < data["final"]["ptq-4bit"]["bytes"] < data["final"]["float"]["bytes"]
    assert {(r["run"], r["epoch"]) for r in data["epochs"]} == {("float", 1), ("float", 2), ("qat-4bit", 1),
                                                                ("qat-2bit", 1)}, data["epochs"]
    for chart in ("accuracy_per_epoch", "accuracy_vs_bits", "levels_ptq-2bit", "levels_qat-4bit"):
        assert (lenet_run / f"{chart}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", chart
    assert not [p for p in lenet_run.rglob(".*") if p.name != ".gitignore"], "temporary files left behind"
    table = (lenet_run / "stdout.txt").read_text()
    assert "vs float" in table and "qat-2bit" in table and "KiB" in table, table


def test_exported_quantized_lenet_loads_with_few_levels(lenet_run):
    sys.path.insert(0, str(RECIPES))
    try:
        from lenet_q import LeNet5
    finally:
        sys.path.remove(str(RECIPES))
    from timm_qconv import load_quantized

    model = load_quantized(lenet_run / "qat-2bit", model=LeNet5(1, 10, 28))
    weight = model.features[3].weight
    assert len(torch.unique(weight[0])) <= 4, "2-bit weights: at most 4 values per channel group"


def test_resume_continues_exactly_and_stops_at_max_steps(fashion_dir, tmp_path):
    args = ["--data-dir", str(fashion_dir), "--mode", "float", "--epochs", "2", *TINY]
    whole, split = tmp_path / "whole", tmp_path / "split"
    run("lenet_q.py", *args, "--output-dir", str(whole))
    run("lenet_q.py", *args, "--output-dir", str(split), "--max-steps", "3")  # stops inside epoch 1 (4 steps each)
    assert [r["step"] for r in results(split)["epochs"]] == [3]
    run("lenet_q.py", *args, "--output-dir", str(split), "--resume")
    a, b = load_file(whole / "float" / "model.safetensors"), load_file(split / "float" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a), "a resumed run must end with the uninterrupted run's weights"
    assert results(split)["final"]["float"]["accuracy"] == results(whole)["final"]["float"]["accuracy"]
    again = run("lenet_q.py", *args, "--output-dir", str(split), "--resume")
    assert "nothing left to train" in again.stdout, again.stdout
    c = load_file(split / "float" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a), "resuming a finished run must train nothing more"


def test_resume_with_other_settings_is_one_clear_error(fashion_dir, tmp_path):
    args = ["--data-dir", str(fashion_dir), "--mode", "float", "--epochs", "1", "--output-dir", str(tmp_path), *TINY]
    run("lenet_q.py", *args, "--max-steps", "1")
    proc = run("lenet_q.py", *args[:-2], "--batch-size", "8", "--seed", "1", "--resume", expect_ok=False)
    assert proc.returncode != 0 and "other settings" in proc.stderr and "batch_size" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_two_processes_reach_the_one_process_results(lenet_run, fashion_dir, tmp_path):
    out = tmp_path / "ddp"
    proc = run("lenet_q.py", "--data-dir", str(fashion_dir), "--epochs", "2", "--qat-epochs", "1", "--bits", "4", "2",
        "--output-dir", str(out), *TINY, processes=2)
    one, two = results(lenet_run)["final"], results(out)["final"]
    assert set(one) == set(two)
    for name in one:  # same global batch and seed: the same training up to float rounding
        assert abs(one[name]["accuracy"] - two[name]["accuracy"]) <= 1 / 30 + 1e-9, (name, one[name], two[name])
    assert len(results(out)["epochs"]) == len(results(lenet_run)["epochs"]), "one copy of every record"
    a, b = load_file(lenet_run / "float" / "model.safetensors"), load_file(out / "float" / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), "two processes must train like one"
    assert proc.stdout.count("levels identical on all 2 processes") == 2, proc.stdout[-2000:]


def test_distillation_loss_is_cross_entropy_at_weight_0_and_matches_the_teacher_at_weight_1():
    sys.path.insert(0, str(RECIPES))
    try:
        from resnet34_q import distillation_loss
    finally:
        sys.path.remove(str(RECIPES))
    torch.manual_seed(0)
    logits, teacher, labels = torch.randn(8, 10, requires_grad=True), torch.randn(8, 10), torch.randint(0, 10, (8,))
    ce = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.allclose(distillation_loss(logits, teacher, labels, 0.0, 4.0), ce), "weight 0: plain cross-entropy"
    assert float(distillation_loss(teacher, teacher, labels, 1.0, 4.0)) < 1e-6, "weight 1: zero at the teacher's logits"
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits / 2, -1), torch.softmax(teacher / 2, -1),
                                    reduction="batchmean")
    assert torch.allclose(distillation_loss(logits, teacher, labels, 0.25, 2.0), 0.75 * ce + 0.25 * 4 * kl)
    smooth = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    assert not torch.allclose(smooth, ce) and torch.allclose(distillation_loss(logits, teacher, labels, 0.0, 4.0, 0.1),
                                                             smooth), "--label-smoothing reaches the hard term"
    distillation_loss(logits, teacher, labels, 1.0, 2.0).backward()
    gap = [(x.softmax(-1) - teacher.softmax(-1)).abs().sum() for x in (logits.detach(), logits.detach() - logits.grad)]
    assert gap[1] < gap[0], f"a gradient step must move the student's probabilities towards the teacher's: {gap}"


@pytest.mark.parametrize("flags, recorded", [
    (["--distill-weight", "0.7", "--distill-temperature", "3"], {"distill_weight": 0.7, "distill_temperature": 3.0}),
    (["--no-hash-wrt-weights"], {"hash_wrt_weights": False}),  # on by default for LeNet
    (["--level-lr-scale", "10"], {"level_lr_scale": 10.0}),
])
def test_each_qat_option_changes_the_qat_run_and_binds_its_checkpoint(flags, recorded, lenet_run, fashion_dir,
                                                                      tmp_path):
    out = tmp_path / "variant"
    shutil.copytree(lenet_run, out)
    shutil.rmtree(out / "checkpoints" / "qat-2bit")
    args = ["--data-dir", str(fashion_dir), "--mode", "qat", "--resume", "--epochs", "2", "--qat-epochs", "1",
            "--qat-bits", "2", "--output-dir", str(out), *TINY]
    proc = run("lenet_q.py", *args, *flags)
    assert "nothing left to train" in proc.stdout, "the float run is reused, not trained again"
    # The checkpoints hold the float weights and the levels (a few steps need not change the export's codes).
    plain, variant = (load_file(d / "checkpoints" / "qat-2bit" / "model.safetensors") for d in (lenet_run, out))
    assert any(not torch.equal(plain[k], variant[k]) for k in plain), f"{flags} must change the QAT run"
    settings = json.loads((out / "checkpoints" / "qat-2bit" / "run.json").read_text())["settings"]
    assert {k: settings[k] for k in recorded} == recorded, settings
    proc = run("lenet_q.py", *args, expect_ok=False)
    assert proc.returncode != 0 and all(k in proc.stderr for k in recorded), \
        f"resuming without {flags} must refuse, naming the option: {proc.stderr[-1000:]}"


def test_mixed_precision_trains_and_evaluates_under_autocast(lenet_run, fashion_dir, tmp_path):
    out = tmp_path / "bf16"
    run("lenet_q.py", "--data-dir", str(fashion_dir), "--epochs", "2", "--qat-epochs", "1", "--bits", "4", "2",
        "--mixed-precision", "bf16", "--output-dir", str(out), *TINY)
    final = results(out)["final"]
    assert [results(d)["config"]["mixed_precision"] for d in (out, lenet_run)] == ["bf16", "no"], \
        "results.json records the precision in force"
    assert set(final) == set(results(lenet_run)["final"]) and all(0 <= r["accuracy"] <= 1 for r in final.values())
    plain, autocast = (load_file(d / "float" / "model.safetensors") for d in (lenet_run, out))
    assert any(not torch.equal(plain[k], autocast[k]) for k in plain), \
        "the same run in bfloat16 autocast must train other float weights than in float32"
    if not torch.cuda.is_available():  # Accelerate has no float16 autocast on a CPU: refused, not ignored
        proc = run("lenet_q.py", "--data-dir", str(fashion_dir), "--mixed-precision", "fp16",
                   "--output-dir", str(tmp_path / "fp16"), *TINY, expect_ok=False)
        assert proc.returncode != 0 and "--mixed-precision fp16" in proc.stderr and "needs a GPU" in proc.stderr, \
            proc.stderr[-1000:]
        assert not (tmp_path / "fp16").exists()


def test_resnet_recipe_on_cifar_then_ptq_recipe_from_its_output(cifar_dir, tmp_path):
    import timm

    from timm_qconv import load_quantized

    trained = tmp_path / "resnet"
    # Channels-last by default: QAT converts, trains and exports channels-last weights.
    run("resnet34_q.py", "--model", "resnet18", "--data-dir", str(cifar_dir), "--mode", "qat", "--epochs", "1",
        "--qat-epochs", "1", "--bits", "2", "--n-functions", "4", "--output-dir", str(trained), *TINY[:2],
        "--num-workers", "0")
    weights = load_file(trained / "float" / "model.safetensors")
    assert weights["conv1.weight"].shape[-2:] == (3, 3), "the small-image stem: a 3x3 first conv for 32-pixel data"
    assert set(results(trained)["final"]) == {"float", "qat-2bit"}
    model = timm.create_model("resnet18", num_classes=10)
    model.conv1, model.maxpool = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False), torch.nn.Identity()
    loaded = load_quantized(trained / "qat-2bit", model)
    assert loaded.layer4[1].conv2.weight.unique().numel() <= 4 * 4, "4 groups of 2-bit levels"
    ptq = tmp_path / "ptq"
    proc = run("ptq_timm.py", "--from-run", str(trained), "--data-dir", str(cifar_dir), "--bits", "4", "2",
               "--n-functions", "4", "--output-dir", str(ptq))
    final = results(ptq)["final"]
    assert set(final) == {"float", "ptq-4bit", "ptq-2bit"} and all(0 <= r["accuracy"] <= 1 for r in final.values())
    assert (ptq / "ptq-2bit" / "model.safetensors").exists() and "vs float" in proc.stdout


def test_ptq_recipe_on_an_image_folder_calibrated(tmp_path):
    import timm
    from PIL import Image
    from safetensors.torch import save_file

    folder = tmp_path / "images"
    for label in ("cat", "dog"):
        (folder / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 40 * i + (100 if label == "dog" else 0), np.uint8)).save(
                folder / label / f"{i}.png")
    checkpoint = tmp_path / "model.safetensors"
    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), checkpoint)
    proc = run("ptq_timm.py", "--model", "test_resnet", "--checkpoint", str(checkpoint), "--num-classes", "2",
               "--image-folder", str(folder), "--bits", "2", "--n-functions", "4", "--calibration-samples", "4",
               "--output-dir", str(tmp_path / "out"))
    final = results(tmp_path / "out")["final"]
    assert set(final) == {"float", "ptq-2bit"} and final["float"]["accuracy"] in {i / 6 for i in range(7)}, final
    assert "calibrat" in proc.stdout + proc.stderr, "the calibration pass must run and show its progress"


_PAGE_FAULTS_OF_TWO_STEPS = """
import resource, sys, torch
sys.path.insert(0, sys.argv[1])
from resnet34_q import keep_freed_memory
if sys.argv[2] == "keep" and not keep_freed_memory():
    sys.exit(3)
counts = []
for _ in range(2):  # a step's activations: three blocks of 8 MiB alive together, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(8 << 18) for _ in range(3)]
    del blocks
    counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(counts)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_stops_the_next_step_from_faulting_its_memory_in_again():
    # glibc's default maps blocks this large and unmaps them when freed (raising its threshold
    # only then), so the second step faults all 6,144 pages in again; kept, it reuses them (where
    # a small allocation lands among the freed blocks, all but one).
    counts = {}
    for mode in ("default", "keep"):
        proc = subprocess.run([sys.executable, "-c", _PAGE_FAULTS_OF_TWO_STEPS, str(RECIPES), mode],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode == 3:
            pytest.skip("the C library has no mallopt (not glibc)")
        assert proc.returncode == 0, proc.stderr[-2000:]
        counts[mode] = json.loads(proc.stdout)
    assert counts["default"][1] > 5_000 and counts["keep"][1] < counts["default"][1] / 2, counts


@pytest.mark.parametrize("flags, message", [
    (["--bits", "9"], "--bits"),
    (["--mode", "both"], "--mode"),
    (["--batch-size", "0"], "--batch-size"),
    (["--layers", "conv,attention"], "--layers"),
    (["--distill-weight", "1.5"], "--distill-weight"),
    (["--distill-temperature", "0"], "--distill-temperature"),
    (["--level-lr-scale", "-1"], "--level-lr-scale"),
    (["--mixed-precision", "fp8"], "--mixed-precision"),
    (["--label-smoothing", "1"], "--label-smoothing"),
])
def test_bad_flags_are_one_clear_error(flags, message, capsys):
    sys.path.insert(0, str(RECIPES))
    try:
        from lenet_q import LeNetConfig, parse_args

        with pytest.raises(SystemExit) as exit_info:
            parse_args(LeNetConfig, flags)
    finally:
        sys.path.remove(str(RECIPES))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_config_file_sets_defaults_and_flags_win(tmp_path, capsys):
    sys.path.insert(0, str(RECIPES))
    try:
        from lenet_q import LeNetConfig, parse_args

        config = tmp_path / "run.yaml"
        config.write_text("epochs: 3\nbits: [1, 2]\nqat-lr: 0.002\n")
        cfg = parse_args(LeNetConfig, ["--config", str(config), "--epochs", "7"])
        assert (cfg.epochs, cfg.bits, cfg.qat_lr) == (7, [1, 2], 0.002), cfg
        config.write_text('{"epochz": 3}')
        with pytest.raises(SystemExit):
            parse_args(LeNetConfig, ["--config", str(config)])
        assert "unknown keys ['epochz']" in capsys.readouterr().err
    finally:
        sys.path.remove(str(RECIPES))


def test_missing_dataset_says_where_it_looked_and_leaves_no_folder(tmp_path):
    target = tmp_path / "new" / "data"
    proc = run("lenet_q.py", "--dataset", "cifar10", "--data-dir", str(target), "--output-dir", str(tmp_path / "out"),
               expect_ok=False)
    assert proc.returncode == 1 and "cifar10 not found" in proc.stderr and str(target) in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "new").exists() and not (tmp_path / "out").exists()


def test_cifar_reader_runs_no_code_from_a_crafted_batch(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "batch").write_bytes(pickle.dumps({"data": Payload(), "labels": [0]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        read_cifar_batch(tmp_path / "batch")
    assert not (tmp_path / "pwned").exists()


def test_readers_load_the_real_formats(fashion_dir, cifar_dir):
    train, test = load_dataset("fashion-mnist", fashion_dir, download=False)
    assert train.images.shape == (64, 1, 28, 28) and len(test) == 30 and train.info.channels == 1
    train, test = load_dataset("cifar10", cifar_dir, download=False)
    assert train.images.shape == (40, 3, 32, 32) and test.labels.dtype == torch.long


def test_augmentation_depends_only_on_seed_epoch_and_index():
    info = DatasetInfo("t", 1, 8, 10, (0.5,), (0.25,))
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8)
    data = ImageTensors(images, torch.arange(20) % 10, info, train=True, seed=2)
    data.set_epoch(3)
    batch = data.__getitems__([5, 0, 7])
    assert torch.equal(batch[2][0], data[7][0]), "an image's crop must not depend on its batch"
    other = ImageTensors(images, torch.arange(20) % 10, info, train=True, seed=2)
    other.set_epoch(3)
    assert all(torch.equal(data[i][0], other[i][0]) for i in range(20)), "same seed and epoch, same crops"
    other.set_epoch(4)
    assert any(not torch.equal(data[i][0], other[i][0]) for i in range(20)), "another epoch, other crops"
