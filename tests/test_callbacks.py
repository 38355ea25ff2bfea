"""Callbacks in a plain PyTorch loop: events, event order, checkpoint resume, settings checks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_qconv import QuantMixin, freeze_model, quantize_model, quantized_layers
from timm_qconv.callbacks import (
    EVENTS,
    BitQuantizerCallback,
    CallbackHandler,
    HashLossCallback,
    HashLossOptions,
    QuantCallback,
)
from timm_qconv.hookspecs import hookimpl
from timm_qconv.plugins import register_plugin, unregister_plugin

from conftest import batch


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def levels(model: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": v.detach().clone()
            for n, m in quantized_layers(model) for k, v in m.quantizer.state_dict().items()}


def train(handler: CallbackHandler, model: nn.Module, optimizer: torch.optim.Optimizer, steps: range) -> list[float]:
    losses = []
    for step in steps:
        handler.on_step_begin()
        x, y = batch(step)
        loss = handler.on_loss(F.cross_entropy(model(x), y))
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        handler.on_step_end()
    return losses


def setup(**options):
    torch.manual_seed(0)
    model = tiny_model()
    handler = CallbackHandler([HashLossCallback(n_bits=2, n_functions=2, layers=("conv", "linear"), **options)])
    model = handler.on_init(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    return handler, model, optimizer


def test_hash_loss_callback_drives_a_plain_loop():
    handler, model, optimizer = setup(warmup_steps=4, freeze_levels_after_step=3)
    cb = handler.callbacks[0]
    assert len(quantized_layers(model)) == 3, "on_init must convert both convs and the linear layer"
    handler.on_train_begin(optimizer=optimizer)
    handler.on_epoch_begin()
    x, y = batch(0)
    plain = F.cross_entropy(model(x), y)
    assert handler.on_loss(plain) > plain, "on_loss must add the hash loss"
    assert handler.state.logs["hash_loss_weight"] == pytest.approx(0.25), "warm-up: step 0 of 4 weighs 1/4"
    train(handler, model, optimizer, range(3))
    assert cb.levels_frozen and all(not p.requires_grad for p in cb.quantizer_parameters()), \
        "levels freeze after step 3"
    frozen = levels(model)
    train(handler, model, optimizer, range(3, 5))
    assert all(torch.equal(frozen[k], v) for k, v in levels(model).items()), "frozen levels must not move"
    handler.on_epoch_end()
    final = handler.on_train_end()
    assert handler.state.global_step == 5 and handler.state.epoch == 1
    assert final is model and not any(isinstance(m, QuantMixin) for m in model.modules()), "train end freezes the model"


def test_poly_temperature_anneals():
    handler, model, optimizer = setup(method="poly", final_temperature=0.01, anneal_steps=2)
    train(handler, model, optimizer, range(3))
    temperatures = [float(m.quantizer.temperature) for _, m in quantized_layers(model)]
    assert temperatures == pytest.approx([0.01] * 3), f"temperature after annealing: {temperatures}"


def test_optimizer_made_before_on_init_is_rejected():
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handler = CallbackHandler([HashLossCallback(n_bits=2, n_functions=2)])
    handler.on_init(model)
    with pytest.raises(RuntimeError, match="create the optimizer after handler.on_init"):
        handler.on_train_begin(optimizer=optimizer)


@pytest.mark.parametrize("calls, message", [
    (["on_loss"], "on_loss called before on_init"),
    (["on_step_end"], "on_step_end called before on_init"),
    (["on_train_begin"], "on_train_begin called before on_init"),
    (["on_init", "on_init"], "on_init called twice"),
    (["on_init", "on_epoch_end"], "on_epoch_end called before on_epoch_begin"),
    (["on_init", "on_epoch_begin", "on_epoch_begin"], "on_epoch_begin called twice without on_epoch_end"),
    (["on_init", "on_step_begin", "on_step_begin"], "on_step_begin called twice without on_step_end"),
    (["on_init", "on_train_end", "on_loss"], "on_loss called after on_train_end"),
])
def test_events_out_of_order_name_the_missing_event(calls, message):
    model = tiny_model()
    handler = CallbackHandler([HashLossCallback(n_bits=2, n_functions=2, freeze_model_at_end=False)])
    args = {"on_init": (model,), "on_loss": (torch.tensor(1.0),)}
    with pytest.raises(RuntimeError, match=message):
        for name in calls:
            getattr(handler, name)(*args.get(name, ()))


def test_every_event_has_a_handler_method_and_a_noop_default():
    for event in EVENTS:
        assert callable(getattr(CallbackHandler, event, None)), f"CallbackHandler lacks {event}"
        assert callable(getattr(QuantCallback, event, None)), f"QuantCallback lacks {event}"
    loss = torch.tensor(2.0)
    assert QuantCallback().on_loss(None, None, loss=loss, unknown_future_argument=1) is loss


def test_events_reach_plugins():
    seen = []

    class Recorder:
        @hookimpl
        def training_event(self, event, state, payload):
            seen.append((event, state.global_step, sorted(payload)))

    plugin = Recorder()
    register_plugin(plugin, name="recorder")
    try:
        handler, model, optimizer = setup()
        train(handler, model, optimizer, range(1))
    finally:
        unregister_plugin(plugin)
    assert [e for e, _, _ in seen] == ["on_init", "on_step_begin", "on_loss", "on_step_end"], seen
    assert seen[-1][1] == 1 and "loss" in seen[2][2] and "model" in seen[0][2], seen


def test_resume_from_a_checkpoint_dict_gives_the_same_next_loss(tmp_path):
    options = dict(warmup_steps=6, freeze_levels_after_step=2)  # both depend on the restored state
    handler, model, optimizer = setup(**options)
    train(handler, model, optimizer, range(3))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "callbacks": handler.on_save()},
               tmp_path / "ckpt.pt")
    expected = train(handler, model, optimizer, range(3, 4))

    handler, model, optimizer = setup(**options)
    checkpoint = torch.load(tmp_path / "ckpt.pt")
    handler.on_load(state_dict=checkpoint["callbacks"])  # before the weights
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    assert handler.state.global_step == 3 and handler.callbacks[0].levels_frozen
    assert train(handler, model, optimizer, range(3, 4)) == expected, \
        "the resumed step must equal the uninterrupted one"


def test_a_checkpoint_saved_after_train_end_loads_into_plain_layers():
    handler, model, optimizer = setup()
    train(handler, model, optimizer, range(1))
    handler.on_train_end()
    checkpoint = {"model": model.state_dict(), "callbacks": handler.on_save()}
    handler, model, _ = setup()
    handler.on_load(state_dict=checkpoint["callbacks"])  # freezes the fresh model before the weights load
    model.load_state_dict(checkpoint["model"])
    assert not quantized_layers(model) and handler.callbacks[0].model_frozen


@pytest.mark.parametrize("setting, value", [("n_bits", 3), ("n_functions", 4), ("method", "kmeans"), ("mode", "float"),
                                            ("skip_first_last", True)])
def test_loading_a_checkpoint_with_other_settings_names_the_setting(setting, value):
    handler, model, _ = setup()
    saved = handler.on_save()
    options = {"n_bits": 2, "n_functions": 2, "layers": ("conv", "linear"), setting: value}
    other = CallbackHandler([HashLossCallback(**options)])
    other.on_init(tiny_model())
    with pytest.raises(ValueError, match=f"{setting}=.* in the checkpoint but {setting}=.* here"):
        other.on_load(state_dict=saved)


@pytest.mark.parametrize("options, name", [({"n_bits": 0}, "n_bits"), ({"warmup_steps": -1}, "warmup_steps"),
                                           ({"mode": "fast"}, "mode"), ({"layers": "attention"}, "layers"),
                                           ({"final_temperature": 0.1, "anneal_steps": 5}, "final_temperature"),
                                           ({"freeze_levels_after_epoch": 0}, "freeze_levels_after_epoch")])
def test_bad_options_name_the_argument(options, name):
    with pytest.raises((TypeError, ValueError), match=name):
        HashLossOptions(**options)


def test_bit_quantizer_callback_quantizes_a_copy_and_compares_metrics(capsys):
    torch.manual_seed(0)
    model = tiny_model()
    loader = [batch(100 + i) for i in range(2)]
    cb = BitQuantizerCallback(n_bits=2, n_functions=2, n_iter=5, every_n_epochs=1, eval_dataloader=loader)
    handler = CallbackHandler([cb])
    handler.on_init(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    handler.on_epoch_begin()
    train(handler, model, optimizer, range(2))
    handler.on_epoch_end()
    before = [p.detach().clone() for p in model.parameters()]
    handler.on_train_end()  # same step as the epoch's pass: not repeated
    assert len(cb.history) == 1 and set(cb.history[0]["float"]) == {"accuracy"}, cb.history
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in model.modules() if hasattr(m, "weight")), \
        "training stays float"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the callback must not touch the model"
    assert cb.quantized_model is not model and len(torch.unique(cb.quantized_model[0].weight[0])) <= 4
    out = capsys.readouterr().out
    assert "float" in out and "quantized" in out and "accuracy" in out, out
    with pytest.raises(ValueError, match="never run"):
        BitQuantizerCallback(at_train_end=False)


def test_bit_quantizer_callback_with_an_eval_function():
    seen = []

    def eval_fn(model):
        seen.append(model.training)
        return {"mean_output": model(batch(7)[0]).mean()}

    cb = BitQuantizerCallback(n_bits=3, n_functions=1, n_iter=3, eval_fn=eval_fn)
    handler = CallbackHandler([cb])
    handler.on_init(tiny_model())
    handler.on_train_end()
    assert seen == [False, False] and set(cb.history[0]["quantized"]) == {"mean_output"}


def test_on_init_rejects_an_already_quantized_model():
    model = quantize_model(tiny_model(), n_bits=2, n_functions=2)
    with pytest.raises(ValueError, match="already has quantized layers"):
        CallbackHandler([HashLossCallback()]).on_init(model)
    freeze_model(model)
