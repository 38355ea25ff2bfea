"""The README's five-line loop (on_init, on_loss, on_step_end only) still gets its checks:
an optimizer made before on_init, and epoch-based options without epoch events."""
from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from timm_qconv.callbacks import BitQuantizerCallback, CallbackHandler, HashLossCallback

from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def short_loop(callbacks: list, optimizer_first: bool, accelerate: bool, steps: int = 2,
               optimizer_class: type = torch.optim.SGD) -> list[warnings.WarningMessage]:
    """The five added lines, nothing else: on_init, on_loss, on_step_end."""
    accelerator = Accelerator(cpu=True) if accelerate else None
    qat = CallbackHandler(callbacks, accelerator)
    model = tiny_model()
    if optimizer_first:
        optimizer = optimizer_class(model.parameters(), lr=0.1)
    model = qat.on_init(model)
    if not optimizer_first:
        optimizer = optimizer_class(model.parameters(), lr=0.1)
    if accelerator is not None:
        model, optimizer = accelerator.prepare(model, optimizer)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(steps):
            g = torch.Generator().manual_seed(step)
            loss = qat.on_loss(F.cross_entropy(model(torch.randn(4, 3, 8, 8, generator=g)), torch.arange(4)))
            (accelerator.backward(loss) if accelerator is not None else loss.backward())
            optimizer.step()
            optimizer.zero_grad()
            qat.on_step_end()
    return list(caught)


def _messages(caught: list[warnings.WarningMessage], text: str) -> list[str]:
    return [str(w.message) for w in caught if text in str(w.message)]


def test_an_optimizer_made_before_on_init_is_refused_under_accelerate() -> None:
    with pytest.raises(RuntimeError, match="create the optimizer after handler.on_init"):
        short_loop([HashLossCallback(n_bits=2, n_functions=2)], optimizer_first=True, accelerate=True)


@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.Adam])
def test_an_optimizer_made_before_on_init_warns_in_a_plain_loop(optimizer_class: type) -> None:
    caught = short_loop([HashLossCallback(n_bits=2, n_functions=2)], optimizer_first=True, accelerate=False,
                        optimizer_class=optimizer_class)
    found = _messages(caught, "the optimizer does not hold them")
    assert len(found) == 1, f"expected one warning about the optimizer, got {[str(w.message) for w in caught]}"


@pytest.mark.parametrize("accelerate", [False, True])
def test_a_correct_short_loop_warns_nothing(accelerate: bool) -> None:
    caught = short_loop([HashLossCallback(n_bits=2, n_functions=2)], optimizer_first=False, accelerate=accelerate)
    mine = [str(w.message) for w in caught if "on_init" in str(w.message) or "epoch" in str(w.message)]
    assert mine == [], f"a correct loop must not be warned: {mine}"


@pytest.mark.parametrize("callback,option", [
    (lambda: HashLossCallback(n_bits=2, n_functions=2, freeze_levels_after_epoch=1), "freeze_levels_after_epoch=1"),
    (lambda: BitQuantizerCallback(n_bits=2, n_functions=2, every_n_epochs=1), "every_n_epochs=1"),
])
def test_epoch_options_without_epoch_events_warn_once(callback: Any, option: str) -> None:
    callbacks = [callback()]
    if option.startswith("every"):  # the BitQuantizerCallback runs beside the QAT callback
        callbacks.insert(0, HashLossCallback(n_bits=2, n_functions=2))
    caught = short_loop(callbacks, optimizer_first=False, accelerate=False, steps=3)
    found = _messages(caught, option)
    assert len(found) == 1 and "on_epoch_begin" in found[0], f"expected one warning naming {option}, got {found}"


def test_epoch_options_with_epoch_events_do_not_warn() -> None:
    qat = CallbackHandler([HashLossCallback(n_bits=2, n_functions=2, freeze_levels_after_epoch=1)])
    model = qat.on_init(tiny_model())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qat.on_epoch_begin()
        loss = qat.on_loss(F.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.arange(4)))
        loss.backward()
        optimizer.step()
        qat.on_step_end()
        qat.on_epoch_end()
    assert not _messages(caught, "epoch events"), [str(w.message) for w in caught]
    assert qat.callbacks[0].levels_frozen, "the levels freeze after the first epoch"
