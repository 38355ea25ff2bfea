"""Shared test setup: one CPU thread and a fixed seed for every test.

One thread because the CI machine has two cores shared with other jobs: with torch's default
(one thread per core) small convolutions spend most of their time waiting on each other, and the
suite runs an order of magnitude slower.
"""
import subprocess
from collections import OrderedDict

import pytest
import torch
from torch import nn

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


# No installed plugin loads unless a test asks for it (TIMM_QCONV_PLUGINS empty), so that results
# do not depend on what happens to be installed. Set here, before test modules are collected,
# because they read the method registry at import. An explicit value is kept:
# `TIMM_QCONV_PLUGINS=apot make test` runs the registry-parametrized tests on the apot plugin too.
import os  # noqa: E402

os.environ.setdefault("TIMM_QCONV_PLUGINS", "")
# The eager kernels (the default) unless a test asks for others: compiling for every model shape
# the suite trains takes long (tests/test_kernels.py covers the compiled and auto backends). An
# explicit value is kept: `TIMM_QCONV_KERNELS=compiled pytest tests/test_accelerate.py` runs the
# two-process test on the compiled path.
os.environ.setdefault("TIMM_QCONV_KERNELS", "eager")


# ----------------------------------------------------------------------------- shared helpers
# Test modules import these with ``from conftest import ...`` (pytest puts tests/ on sys.path).


def small_model() -> nn.Sequential:
    """Three convs and a linear head with named parts: stem, layer1.conv1, layer1.conv2, head."""
    return nn.Sequential(OrderedDict(
        stem=nn.Conv2d(3, 8, 3, padding=1),
        layer1=nn.Sequential(OrderedDict(conv1=nn.Conv2d(8, 8, 3, padding=1), conv2=nn.Conv2d(8, 8, 1))),
        pool=nn.AdaptiveAvgPool2d(1),
        flatten=nn.Flatten(),
        head=nn.Linear(8, 4),
    ))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``(4, 3, 8, 8)`` and 4-class targets, the same for the same ``step``."""
    g = torch.Generator().manual_seed(step)
    return torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)


def snapshot(model: nn.Module) -> tuple[list, dict]:
    """The model's modules (names, identities, types) and a copy of its state dict."""
    modules = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    return modules, {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: tuple[list, dict], what: str) -> None:
    """Fail, saying ``what`` was called, if ``model`` differs from its :func:`snapshot` ``before``."""
    modules, state = before
    now = [(name, id(m), type(m)) for name, m in model.named_modules(remove_duplicate=False)]
    assert now == modules, f"{what}: the model's modules changed although the call failed"
    after = model.state_dict()
    assert after.keys() == state.keys(), f"{what}: state dict keys changed: {set(after) ^ set(state)}"
    for key, value in state.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m, key=key: f"{what}: {key} changed although the call failed: {m}")


# gloo on a loaded CPU sometimes aborts a rank from C++ ("terminate called without an active
# exception", SIGABRT) while the other waits; seen 1 run in 3-4 under a load average of 10, never
# on a quiet machine. That is the transport, not the code under test: such a launch is retried
# once. Any other failure, and a second abort, fail the test.
GLOO_ABORT = "terminate called without an active exception"


def run_distributed(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True, **kwargs)`` for an ``accelerate launch``."""
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0 and GLOO_ABORT in proc.stderr:
        proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    return proc


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's process-wide state reset before and after a test that builds Accelerators."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def tiny_model() -> nn.Module:
    """A conv, a pool and a classifier: the least a callback test needs."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


@pytest.fixture(params=["numba", "torch"])
def cpu_kernels(request, monkeypatch):
    """Both CPU formulations of the eager kernels: Numba's (the default) and PyTorch's (where Numba
    does not import)."""
    if request.param == "torch":
        from timm_qconv import _kernels

        monkeypatch.setattr(_kernels, "_native_for", lambda *args, **kwargs: None)
    return request.param
