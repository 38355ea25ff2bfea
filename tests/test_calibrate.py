"""BitQuantizer.calibrate: lower output error than data-free, every method, dtypes, hooks, export, CLI, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from timm_qconv import BitQuantizer, hookimpl, list_methods, load_quantized, save_quantized
from timm_qconv._stepped_forward import SteppedForwards
from timm_qconv.calibrate import CalibrationConfig, collect_inputs
from timm_qconv.plugins import get_plugin_manager


def small_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose label is the brightest of four quadrants' mean colour mix: learnable by small_net."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 8, 8, generator=g)
    quadrants = torch.stack([x[:, :, :4, :4], x[:, :, :4, 4:], x[:, :, 4:, :4], x[:, :, 4:, 4:]], 1)
    return x, quadrants.mean((2, 3, 4)).argmax(1)


_TRAINED: dict[str, dict] = {}


def trained_net() -> nn.Sequential:
    """small_net trained for a few hundred steps (once per session; a fresh copy each call)."""
    if not _TRAINED:
        torch.manual_seed(0)
        model = small_net()
        x, y = task(512, 0)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for step in range(150):
            idx = torch.arange(step * 64, step * 64 + 64) % 512
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        _TRAINED.update(copy.deepcopy(model.eval().state_dict()))
    model = small_net().eval()
    model.load_state_dict(_TRAINED)
    return model


def batches(n: int = 128, seed: int = 1, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = task(n, seed)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@torch.no_grad()
def logits_error(model: nn.Module, reference: nn.Module, x: torch.Tensor) -> float:
    return float((model(x) - reference(x)).pow(2).mean())


def snapshot(bq: BitQuantizer) -> tuple:
    codes = {n: bq.layer_codes(n).clone() for n in bq.layer_names}
    return (codes, {n: copy.deepcopy(q.state_dict()) for n, q in bq.quantizers.items()},
            dict(bq.overrides), bq.report())


def same_snapshot(a: tuple, b: tuple) -> bool:
    codes = a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    states = all(torch.equal(a[1][n][k], b[1][n][k]) for n in a[1] for k in a[1][n])
    return codes and states and a[2].keys() == b[2].keys() and a[3] is b[3]


@pytest.mark.parametrize("n_bits", [1, 2])
def test_calibrated_output_error_is_lower_than_data_free(n_bits):
    model = trained_net()
    bq = BitQuantizer(model, 4, n_bits, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(20)
    data_free = bq.get_hashed_model().eval()
    bq.calibrate(batches(), n_samples=128)
    calibrated = bq.get_hashed_model().eval()
    held_out, _ = task(256, 7)
    before, after = logits_error(data_free, model, held_out), logits_error(calibrated, model, held_out)
    assert after < 0.8 * before, \
        f"{n_bits} bits: held-out logits MSE {after:.4g} is not below 0.8 x data-free {before:.4g}"
    for layer in bq.report():
        assert layer.out_error <= layer.data_free_out_error + 1e-9, \
            f"layer {layer.name}: calibrated output error {layer.out_error} > data-free {layer.data_free_out_error}"


def test_original_model_untouched_and_prototype_flow():
    model = trained_net()
    state = copy.deepcopy(model.state_dict())
    bq = BitQuantizer(model, 4, 2, layers=(nn.Conv2d, nn.Linear))
    bq.train_hash_functions(n_iter=5)
    assert bq.calibrate(batches(), n_samples=64, bn_reestimate="always") is bq, "calibrate should return itself"
    hashed = bq.get_hashed_model()
    assert hashed is not model, "get_hashed_model should return a copy"
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"calibrate changed the original model's {key}"
    assert "1.running_mean" in bq.overrides, \
        f"BatchNorm statistics should be re-estimated; overrides: {list(bq.overrides)}"


@pytest.mark.parametrize("method", list_methods())
def test_every_method_keeps_its_family_and_does_not_get_worse(method):
    model = trained_net()
    n_bits = 2
    bq = BitQuantizer(model, 4, n_bits, layers=(nn.Conv2d, nn.Linear), method=method).train_hash_functions(5)
    bq.calibrate(batches(64), n_samples=64)
    hashed = dict(bq.get_hashed_model().named_modules())
    for name in bq.layer_names:
        quantizer, codes = bq.quantizers[name], bq.layer_codes(name).long()
        rows = hashed[name].weight.detach().reshape(codes.shape)
        expected = quantizer.levels().detach()[quantizer.group_index].gather(1, codes)
        assert torch.equal(rows, expected), f"{method}: {name}'s weights are not its levels at its codes"
        for g in range(quantizer.n_groups):
            distinct = rows[quantizer.group_index == g].unique().numel()
            assert distinct <= 2**n_bits, f"{method}: {name} group {g} has {distinct} values > {2**n_bits}"
    for layer in bq.report():
        assert layer.out_error <= layer.data_free_out_error + 1e-9, f"{method}: layer {layer.name} got worse"


def test_log_calibration_also_starts_from_other_scales_and_keeps_the_best(monkeypatch):
    from timm_qconv.methods.scaled_shape import ScaledShapeQuantizer

    bq = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear), method="log").train_hash_functions(10)
    quantizer = next(iter(bq.quantizers.values()))
    levels = quantizer.levels().detach().clone()
    starts = quantizer.calibration_starts()
    assert [float((s.levels().detach() / levels).nanmean()) for s in starts] == pytest.approx(
        list(ScaledShapeQuantizer.CALIBRATION_SCALES), rel=1e-5), "starts should be the fitted levels rescaled"
    assert torch.equal(quantizer.levels(), levels), "making the starts changed the quantizer"
    errors = {}
    for scales in ((), ScaledShapeQuantizer.CALIBRATION_SCALES):
        monkeypatch.setattr(ScaledShapeQuantizer, "CALIBRATION_SCALES", scales)
        fitted = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear), method="log")
        fitted.train_hash_functions(10).calibrate(batches(), n_samples=128)
        errors[scales] = [r.out_error for r in fitted.report()]
    for one, several in zip(errors[()], errors[ScaledShapeQuantizer.CALIBRATION_SCALES]):
        assert several <= one, "more starting scales gave a higher output error"


def test_hash_levels_stay_plus_minus_basis_combinations():
    bq = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
    bq.calibrate(batches(64), n_samples=64)
    for name, quantizer in bq.quantizers.items():
        combos = torch.sort(quantizer.basis.detach() @ quantizer.signs.T, dim=1).values
        assert torch.allclose(quantizer.levels().detach(), combos), f"{name}: levels are not the ±basis sums"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_are_written_back_in_their_dtype(dtype):
    model = trained_net().to(dtype)
    bq = BitQuantizer(model, 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
    bq.calibrate([x.to(dtype) for x, _ in batches(64)], n_samples=64)
    hashed = bq.get_hashed_model()
    for name, param in hashed.named_parameters():
        assert param.dtype == dtype, f"{name} became {param.dtype}, expected {dtype}"
    assert all(math.isfinite(r.out_error) for r in bq.report()), "output errors should be finite numbers"


def test_report_hook_and_export_see_the_calibrated_state(tmp_path):
    seen = []

    class Listener:
        @hookimpl
        def after_bit_quantizer(self, quantizer, report):
            seen.append(report)

    pm = get_plugin_manager()
    listener = Listener()
    pm.register(listener)
    try:
        bq = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
        bq.calibrate(batches(64), n_samples=64)
    finally:
        pm.unregister(listener)
    assert len(seen) == 2 and seen[-1] is bq.report(), "after_bit_quantizer should see the calibrated report last"
    table = str(bq.report())
    assert "out. error" in table and "data-free" in table, f"the table should show output errors before/after:\n{table}"
    save_quantized(bq, tmp_path / "q")
    restored = load_quantized(tmp_path / "q", model=small_net())
    expected = bq.get_hashed_model().state_dict()
    for key, value in restored.state_dict().items():
        assert torch.equal(value, expected[key]), f"saved {key} differs from get_hashed_model()'s"


def test_unused_layer_stays_data_free():
    class WithUnused(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = trained_net()
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.net(x)

    bq = BitQuantizer(WithUnused(), 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
    codes = bq.layer_codes("unused").clone()
    bq.calibrate(batches(64), n_samples=64)
    row = next(r for r in bq.report() if r.name == "unused")
    assert row.out_error is None and torch.equal(bq.layer_codes("unused"), codes), \
        "a layer never called should keep its fit"


class Branching(nn.Module):
    """A residual block, a layer called twice, and a branch taken by some batches only."""

    def __init__(self, shared: bool, branch: bool) -> None:
        super().__init__()
        self.shared, self.branch = shared, branch
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.side = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        if self.branch and x.shape[0] == 16:  # the last batch takes the side layer first
            x = self.side(x)
        x = x + self.body(x)
        if self.shared:
            x = self.body(x)
        x = self.side(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("shared, branch", [(False, False), (True, False), (False, True)])
def test_stepped_forwards_give_what_running_again_gives(shared, branch):
    # Stepping each batch's forward through the layers must equal running it again up to each
    # layer, bit for bit: also where a layer is called twice or a batch calls the layers in another order.
    torch.manual_seed(0)
    model = Branching(shared, branch).eval()
    data = [torch.randn(32, 3, 8, 8), torch.randn(32, 3, 8, 8), torch.randn(16, 3, 8, 8)]
    results = []
    for step in (True, False):
        bq = BitQuantizer(model, 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
        bq.calibrate(data, n_samples=80, step_forwards=step)
        results.append(snapshot(bq))
    (codes, states, overrides, report), (codes2, states2, overrides2, report2) = results
    assert all(torch.equal(codes[n], codes2[n]) for n in codes), "codes differ between stepped and re-run forwards"
    assert all(torch.equal(states[n][k], states2[n][k]) for n in states for k in states[n]), "levels differ"
    assert overrides.keys() == overrides2.keys() and all(torch.equal(overrides[k], overrides2[k]) for k in overrides)
    assert [r.out_error for r in report] == [r.out_error for r in report2], "output errors differ"


class SwitchesModes(nn.Module):
    """A forward that runs one layer under bfloat16 autocast and the head with grad mode on."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.a(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x = torch.relu(self.b(x))
        with torch.enable_grad():
            return self.head(x.float().mean((2, 3)))


def test_calibration_runs_forwards_again_when_paused_ones_would_not_fit_in_memory(monkeypatch):
    import timm_qconv.calibrate as calibration

    made = []
    monkeypatch.setattr(calibration, "SteppedForwards", lambda *args: made.append(args) or SteppedForwards(*args))
    results = []
    for free in (float("inf"), 0.0):  # plenty of memory, then none: the same result, without pausing
        monkeypatch.setattr(calibration, "_free_memory", lambda device, free=free: free)
        made.clear()
        bq = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
        bq.calibrate(batches(64), n_samples=64)
        results.append((snapshot(bq), len(made)))
    (stepped, n_stepped), (again, n_again) = results
    assert n_stepped > 0 and n_again == 0, "forwards should pause only when their activations fit in memory"
    assert all(torch.equal(stepped[0][n], again[0][n]) for n in stepped[0]), "codes differ"
    assert [r.out_error for r in stepped[3]] == [r.out_error for r in again[3]], "output errors differ"


def test_settings_a_forward_changes_do_not_leak_out_of_a_paused_forward():
    # Paused inside its autocast block, a stepped forward must not leave autocast on for the
    # calibration's own arithmetic (nor for the other batches' forwards).
    torch.manual_seed(0)
    model = SwitchesModes().eval()
    data = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    results = []
    for step in (True, False):
        bq = BitQuantizer(model, 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(5)
        bq.calibrate(data, n_samples=48, step_forwards=step)
        results.append(snapshot(bq))
    assert all(torch.equal(results[0][0][n], results[1][0][n]) for n in results[0][0]), "codes differ"
    assert [r.out_error for r in results[0][3]] == [r.out_error for r in results[1][3]], "output errors differ"
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu"), "the caller's settings changed"


def test_an_error_in_a_stepped_forward_reaches_the_caller_and_changes_nothing():
    class FailsOnSmallBatches(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = trained_net()

        def forward(self, x):
            x = self.net[0](x)
            if x.shape[0] < 32:
                raise RuntimeError("this model needs batches of 32")
            return self.net[1:](x)

    model = FailsOnSmallBatches()
    bq = BitQuantizer(model, 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(3)
    before = snapshot(bq)
    data = [torch.randn(32, 3, 8, 8), torch.randn(8, 3, 8, 8)]
    with pytest.raises(RuntimeError, match="batches of 32"):  # no BatchNorm pass: the stepped forward fails
        bq.calibrate(data, n_samples=40, bn_reestimate="never")
    assert same_snapshot(before, snapshot(bq)), "a failed calibrate must leave the BitQuantizer as it was"
    assert not any(m._forward_pre_hooks for m in model.modules()), "hooks left on the model"


def _exhausted():
    it = iter(batches(64))
    list(it)
    return it


@pytest.mark.parametrize("loader, n_samples, error, match", [
    ([], 8, ValueError, "no batch"),
    ("exhausted", 8, ValueError, "no batch"),
    ([torch.randn(4, 3, 5)], 4, ValueError, "does not fit"),
    ([torch.randint(0, 4, (8,))], 8, TypeError, "labels only"),
    ([torch.full((4, 3, 8, 8), float("nan"))], 8, ValueError, "NaN"),
    ([(torch.randn(4, 3, 8, 8),), (torch.randn(4, 3, 9, 9),)], 8, ValueError, "earlier batches"),
    ([[]], 8, TypeError, "tuple/list"),
    (5, 8, TypeError, "not iterable"),
    ([torch.randn(4, 3, 8, 8)], 0, ValueError, "n_samples"),
    ([torch.randn(4, 3, 8, 8)], -3, ValueError, "n_samples"),
])
def test_bad_input_raises_and_leaves_the_quantizer_unchanged(loader, n_samples, error, match):
    bq = BitQuantizer(trained_net(), 4, 2, layers=(nn.Conv2d, nn.Linear)).train_hash_functions(3)
    before = snapshot(bq)
    with pytest.raises(error, match=match):
        bq.calibrate(_exhausted() if loader == "exhausted" else loader, n_samples=n_samples)
    assert same_snapshot(before, snapshot(bq)), "a failed calibrate must leave the BitQuantizer as it was"


def test_calibrate_before_fit_and_bad_options():
    with pytest.raises(RuntimeError, match="train_hash_functions"):
        BitQuantizer(trained_net(), 4, 2).calibrate(batches(32), 32)
    for options, match in [(dict(rounds=0), "rounds"), (dict(bn_reestimate="maybe"), "bn_reestimate"),
                           (dict(gptq="yes"), "gptq")]:
        with pytest.raises((TypeError, ValueError), match=match):
            CalibrationConfig(**options)


def test_collect_inputs_takes_exactly_n_samples_and_warns_when_short():
    got = collect_inputs(batches(64, batch=24), 50)
    assert sum(x.shape[0] for x in got) == 50, "the first n_samples inputs should be taken, no more"
    with pytest.warns(RuntimeWarning, match="fewer than"):
        collect_inputs(batches(32), 100)


def test_cli_quantize_with_calibration_folder(tmp_path):
    from PIL import Image

    from timm_qconv.cli import main

    folder = tmp_path / "images"
    for c in range(2):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(3):
            Image.fromarray((torch.rand(20, 20, 3) * 255).byte().numpy()).save(folder / f"class{c}" / f"{i}.png")
    out = tmp_path / "out"
    code = main(["quantize", "--model", "test_resnet", "--num-classes", "2", "--bits", "2", "--functions", "2",
                 "--iters", "3", "--calibration", str(folder), "--calibration-samples", "4", "--out", str(out)])
    assert code == 0 and (out / "config.json").is_file(), "quantize --calibration should save the model"
    missing = str(tmp_path / "missing")
    assert main(["quantize", "--model", "test_resnet", "--calibration", missing, "--out", str(out)]) == 2, \
        "a calibration source that is neither a folder nor a dataset should be a usage error"


def test_bit_quantizer_callback_calibrates_with_a_dataloader():
    from timm_qconv.callbacks import BitQuantizerCallback
    from timm_qconv.callbacks.base import TrainState

    model = trained_net()
    cb = BitQuantizerCallback(n_bits=2, n_functions=4, n_iter=5, calibration_dataloader=batches(64),
                              calibration_samples=64)
    cb.run(model, TrainState())
    assert cb.report.calibrated, "the callback's report should come from the calibrated fit"
    plain = BitQuantizerCallback(n_bits=2, n_functions=4, n_iter=5)
    plain.run(model, TrainState())
    held_out, _ = task(256, 7)
    assert logits_error(cb.quantized_model, model, held_out) < logits_error(plain.quantized_model, model, held_out), \
        "the calibrated copy should be closer to the float model than the data-free one"
    with pytest.raises(ValueError, match="calibration_samples"):
        BitQuantizerCallback(calibration_samples=0)
