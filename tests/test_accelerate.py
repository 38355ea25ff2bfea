"""Callbacks under Accelerate: a single-process loop with save_state/load_state, and a real
two-process DDP run (gloo on CPU) launched with ``accelerate launch``."""
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from timm_qconv import quantized_layers
from timm_qconv.callbacks import CallbackHandler, HashLossCallback
from timm_qconv.callbacks.handler import STATE_FILE

from conftest import batch, run_distributed

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def run(checkpoint: Path, steps: range, save_at: int | None = None, resume: bool = False,
        **options) -> dict[int, float]:
    """The README's loop: five lines added for QAT."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    accelerator = Accelerator(cpu=True)
    options = {"n_bits": 2, "n_functions": 2, "warmup_steps": 4, "freeze_levels_after_step": 2, **options}
    qat = CallbackHandler([HashLossCallback(**options)], accelerator)
    model = qat.on_init(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume:
        accelerator.load_state(checkpoint)
    losses = {}
    for step in steps:
        x, y = batch(step)
        loss = qat.on_loss(F.cross_entropy(model(x), y))
        losses[step] = loss.item()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        qat.on_step_end()
        if qat.state.global_step == save_at:
            accelerator.save_state(checkpoint)
    return losses


def test_accelerate_loop_resumes_with_the_same_next_loss(tmp_path):
    full = run(tmp_path / "ckpt", range(5), save_at=3)
    saved = json.loads((tmp_path / "ckpt" / STATE_FILE).read_text())
    assert saved["state"]["global_step"] == 3 and saved["callbacks"]["HashLossCallback"]["levels_frozen"], saved
    resumed = run(tmp_path / "ckpt", range(3, 5), resume=True)
    assert resumed == {3: full[3], 4: full[4]}, f"resumed {resumed} vs uninterrupted {full}"


def test_load_state_with_other_settings_fails_before_the_weights_load(tmp_path):
    run(tmp_path / "ckpt", range(1), save_at=1)
    # With 3 bits the hash basis has another shape: had the weights loaded first, torch would
    # raise its size-mismatch error instead of naming the setting.
    with pytest.raises(ValueError, match="n_bits=2 in the checkpoint but n_bits=3 here"):
        run(tmp_path / "ckpt", range(0), resume=True, n_bits=3)


def test_on_init_unwraps_a_compiled_model():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten())
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    qat = CallbackHandler([HashLossCallback(n_bits=2, n_functions=1)], Accelerator(cpu=True))
    assert qat.on_init(compiled) is compiled
    assert qat.model is model and len(quantized_layers(model)) == 1


def test_two_processes_keep_identical_levels_and_resume_exactly(tmp_path):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not installed")
    with socket.socket() as s:  # a free port: other test runs may share the machine
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", port, str(ROOT / "tests" / "ddp_qat_script.py"),
           str(tmp_path)]
    proc = run_distributed(cmd, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2 and result["backend"] == "gloo", result
    for method, (rank0, rank1) in result["methods"].items():
        assert rank0["full"]["type"] == "DistributedDataParallel", f"{method}: the model was not wrapped in DDP"
        assert rank0["full"]["losses"] != rank1["full"]["losses"], f"{method}: ranks must see different data"
        assert rank0["full"]["at_freeze"] != rank0["full"]["initial"], f"{method}: levels must have trained"
        for run_ in ("full", "resumed"):
            assert rank0[run_]["final"] == rank1[run_]["final"], \
                f"{method} {run_}: quantizer state differs across ranks"
        assert rank0["full"]["final_params"] == rank0["full"]["at_freeze"], f"{method}: frozen levels moved under DDP"
        for rank in (rank0, rank1):
            assert rank["resumed"]["losses"] == {k: rank["full"]["losses"][k] for k in ("4", "5")}, f"{method}: resume"
            assert rank["resumed"]["final"] == rank["full"]["final"], f"{method}: resumed run ends elsewhere"
    printed = proc.stdout.count("layers quantized")
    assert printed == 4, f"only the main process prints: expected 4 lines (2 methods x 2 runs), got {printed}"


def test_on_init_rejects_a_model_already_wrapped_in_ddp(tmp_path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Conv2d(3, 4, 3)))
        with pytest.raises(RuntimeError, match="call on_init before accelerator.prepare"):
            CallbackHandler([HashLossCallback(n_bits=2, n_functions=1)]).on_init(wrapped)
    finally:
        torch.distributed.destroy_process_group()
