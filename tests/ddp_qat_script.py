"""Two-process hash-loss QAT, launched by tests/test_accelerate.py:

    accelerate launch --multi_gpu --num_processes 2 tests/ddp_qat_script.py OUT_DIR

On a machine without GPUs Accelerate runs it as MULTI_CPU (DDP over gloo). For each method it
trains a tiny model on different data per rank, saves at step 4, runs on to step 6, then resumes
from the checkpoint in fresh objects. The main process writes OUT_DIR/result.json with every rank's
losses and quantizer state (parameters and buffers) for the test to compare.
"""
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from timm_qconv import quantized_layers
from timm_qconv.callbacks import CallbackHandler, HashLossCallback

STEPS, SAVE_AT, FREEZE_AT = 6, 4, 3


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)  # every rank sees different data
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def quantizer_state(model: nn.Module, params_only: bool = False) -> dict[str, list[float]]:
    """Every quantizer's parameters (the levels) and, unless ``params_only``, its buffers."""
    items = (lambda q: q.named_parameters()) if params_only else (lambda q: q.state_dict().items())
    return {f"{n}.{k}": v.flatten().tolist() for n, m in quantized_layers(model) for k, v in items(m.quantizer)}


def run(method: str, checkpoint: str, resume: bool) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4))
    accelerator = Accelerator(cpu=not torch.cuda.is_available())  # on CPU: DDP over gloo
    qat = CallbackHandler([HashLossCallback(method=method, n_bits=2, n_functions=2, layers=("conv", "linear"),
                                            warmup_steps=5, freeze_levels_after_step=FREEZE_AT)], accelerator)
    model = qat.on_init(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    if resume:
        accelerator.load_state(checkpoint)
    out = {"losses": {}, "type": type(model).__name__, "initial": quantizer_state(model, params_only=True)}
    for step in range(qat.state.global_step, STEPS):
        x, y = batch(step, accelerator.process_index)
        loss = qat.on_loss(F.cross_entropy(model(x), y))
        out["losses"][step] = loss.item()
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        qat.on_step_end()
        if qat.state.global_step == FREEZE_AT:
            out["at_freeze"] = quantizer_state(accelerator.unwrap_model(model), params_only=True)
        if qat.state.global_step == SAVE_AT and not resume:
            accelerator.save_state(checkpoint)
    out["final"] = quantizer_state(accelerator.unwrap_model(model))
    out["final_params"] = quantizer_state(accelerator.unwrap_model(model), params_only=True)
    return out


def main() -> None:
    torch.set_num_threads(1)
    out_dir = sys.argv[1]
    result = {}
    for method in ("hash", "linear"):
        checkpoint = os.path.join(out_dir, f"checkpoint_{method}")
        mine = {"full": run(method, checkpoint, resume=False), "resumed": run(method, checkpoint, resume=True)}
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
        result[method] = ranks
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w") as f:
            json.dump({"world_size": dist.get_world_size(), "backend": dist.get_backend(), "methods": result}, f)
    # Leave together: a rank that exits while the other still holds gloo connections can abort.
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
