"""The kernel backends give the same quantized weights and gradients, per layer and batched."""
import copy
import os
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

import timm_qconv
from timm_qconv import QuantConv2d, QuantLinear, get_method, hash_loss, list_methods, quantize_model, set_kernel_backend
from timm_qconv import _kernels as kernels
from timm_qconv._batched import BatchedPath, batched_path
from timm_qconv._kernels import (
    _count_above_binned,
    compact_codes,
    compiler_works,
    get_backend,
    set_backend,
    threshold_codes,
)
from timm_qconv.layers import WeightOverride


def _plan(model: nn.Module) -> list:
    return batched_path(model).plan(model)


def require_compiler() -> None:
    """Skip the test where torch.compile cannot build a kernel on the CPU (no C++ compiler)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        works = compiler_works("cpu")
    if not works:
        pytest.skip("torch.compile does not work on this machine's CPU")


@pytest.fixture
def compiled_backend():
    require_compiler()
    previous = get_backend()
    set_backend("compiled")
    try:
        yield
    finally:
        set_backend(previous)


@pytest.fixture
def torch_ops(monkeypatch):
    """The PyTorch formulation of the eager kernels only."""
    monkeypatch.setattr(kernels, "_native_for", lambda *args, **kwargs: None)


def model_with_lazy_head() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 6, 1), nn.Flatten(), nn.LazyLinear(4))


def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def mixed_model() -> nn.Module:
    """Layers of several methods and widths: the batched path groups them by quantizer class and bits."""
    model = nn.Sequential(QuantConv2d(3, 8, 3, padding=1, method="hash", n_bits=2, n_functions=4), nn.ReLU(),
                          QuantConv2d(8, 8, 3, groups=8, padding=1, method="kmeans", n_bits=3, n_functions=2),
                          QuantConv2d(8, 8, 1, method="log", n_bits=2, n_functions=3), nn.ReLU(),
                          QuantConv2d(8, 6, 1, method="hash", n_bits=3, n_functions=5),
                          QuantConv2d(6, 6, 1, method="hash", n_bits=2, n_functions=2, mode="float"),
                          QuantConv2d(6, 6, 1, method="hash", n_bits=2, n_functions=1), nn.Flatten(),
                          QuantLinear(216, 4, method="linear", n_bits=2))  # not nearest: computes its own weight
    set_kernel_backend(get_backend(), model)
    return model


def quantized_model_with_lazy_head() -> nn.Module:
    model = model_with_lazy_head()
    model(torch.randn(1, 3, 6, 6))  # materialise the lazy layer
    return quantize_model(model, n_bits=2, n_functions=4, layers=("conv", "linear"))


@pytest.mark.parametrize("make_model", [quantized_model_with_lazy_head, mixed_model])
def test_compiled_backend_matches_eager_forward_and_gradients(compiled_backend, make_model):
    x = torch.randn(2, 3, 6, 6)
    model = make_model()
    eager_model = copy.deepcopy(model)
    out, grads = run(model, x)  # compiled backend: the model's pre-hook batches every layer
    set_kernel_backend("eager", eager_model)
    ref_out, ref_grads = run(eager_model, x)
    # Same levels, but the convolutions of the two runs may round their sums differently (seen:
    # 1e-7 with bit-equal quantized weights); a weight on another level would move the output 1e-2.
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6,
                               msg=lambda m: f"the batched compiled forward differs from the eager one: {m}")
    assert grads.keys() == ref_grads.keys(), f"gradients reached {sorted(grads)} vs {sorted(ref_grads)}"
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_weight_override_is_not_used_once_the_weight_changed(compiled_backend):
    model = quantize_model(model_with_lazy_head()[:3], n_bits=2, n_functions=2)
    conv = model[0]
    zeros = torch.zeros_like(conv.weight)
    conv.weight_override = WeightOverride.of(zeros, conv.weight)
    with torch.no_grad():
        conv.weight.add_(1.0)  # an optimizer step in between
    assert conv.quantized_weight() is not zeros, "a stale override was handed out"
    conv.weight_override = WeightOverride.of(zeros, conv.weight)
    assert conv.quantized_weight() is zeros and conv.quantized_weight() is not zeros, "an override must be used once"


@pytest.mark.parametrize("method", ["hash", "kmeans", "poly"])
def test_an_eager_model_computes_its_layers_weights_before_its_forward_as_each_layer_would(method):
    torch.manual_seed(0)
    model = quantize_model(model_with_lazy_head()[:5], method=method, n_bits=2, n_functions=2, kernels="eager")
    assert not {k for k in vars(model) if k.startswith("_timm_qconv")}, "hidden attributes left on the model"
    layers = [m for m in model.modules() if isinstance(m, QuantConv2d)]
    per_layer = copy.deepcopy(model)
    timm_qconv._batched.remove_hooks(per_layer)
    x = torch.randn(2, 3, 6, 6)
    computed, seen_by_first = [], []
    for layer in layers:
        layer.compute_weight = lambda _compute=layer.compute_weight: computed.append(1) or _compute()
    layers[0].register_forward_pre_hook(lambda module, args: seen_by_first.append(len(computed)))
    outputs, grads = [], []
    for m in (model, per_layer):
        out = m(x)
        (out.square().mean() + hash_loss(m)).backward()
        outputs.append(out)
        grads.append({name: p.grad for name, p in m.named_parameters() if p.grad is not None})
    assert seen_by_first == [len(layers)], f"the first layer ran after {seen_by_first} of {len(layers)} weights"
    assert all(layer.weight_override is None for layer in layers), "a weight outlived the forward"
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_up_front_weights_skip_large_frozen_float_mode_and_eval_layers_and_never_outlive_a_failed_forward(
        monkeypatch):
    model = quantize_model(model_with_lazy_head()[:3], n_bits=2, n_functions=2, kernels="eager")
    first, second = (m for m in model.modules() if isinstance(m, QuantConv2d))
    seen = []
    first.register_forward_pre_hook(lambda module, args: seen.append((first.weight_override is not None,
                                                                      second.weight_override is not None)))
    x = torch.randn(2, 3, 6, 6)
    model(x)
    second.weight.requires_grad_(False)  # frozen: the layer takes its cached weight itself
    model(x)
    second.weight.requires_grad_(True)
    second.mode = "float"  # trains on its float weight
    model(x)
    model.eval()
    model(x)
    model.train()
    second.mode = "ste"
    monkeypatch.setattr(timm_qconv._batched, "UP_FRONT_MAX_NUMEL", second.weight.numel())
    model(x)  # the first layer (216 weights) is too large: it computes its own when it runs
    monkeypatch.undo()
    assert seen == [(True, True), (True, False), (True, False), (False, False), (False, True)], seen
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5, 6, 6))  # the first conv refuses 5 channels: the second never runs
    assert seen[-1] == (True, True) and second.weight_override is None, "a weight outlived a forward that raised"


def test_an_up_front_weight_is_not_used_under_another_grad_mode_or_autocast_inside_the_forward():
    class Inside(nn.Module):
        def __init__(self, body, context):
            super().__init__()
            self.body, self.context = body, context

        def forward(self, x):
            with self.context():
                return self.body(x)

    x = torch.randn(2, 3, 6, 6)
    for context in (torch.no_grad, lambda: torch.autocast("cpu", dtype=torch.bfloat16)):
        torch.manual_seed(0)
        model = quantize_model(Inside(model_with_lazy_head()[:3], context), method="kmeans", n_bits=2,
                               n_functions=2)
        reference = copy.deepcopy(model.body)  # no hooks: its layers compute their own weights
        computed = []
        for layer in (m for m in model.modules() if isinstance(m, QuantConv2d)):
            layer.compute_weight = lambda _compute=layer.compute_weight: computed.append(1) or _compute()
        out = model(x)  # the pre-hook runs with grad and without autocast, the body under its context
        with context():
            expected = reference(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        assert len(computed) == 4, f"{len(computed)} weights computed for 2 layers: the layers took stale ones"
        assert all(m.weight_override is None for m in model.modules() if isinstance(m, QuantConv2d))


def test_a_bad_kernels_environment_fails_at_use_not_import(monkeypatch):
    monkeypatch.setenv("TIMM_QCONV_KERNELS", "fast")
    monkeypatch.setattr("timm_qconv._kernels._default", None)
    subprocess.run([sys.executable, "-c", "import timm_qconv"], check=True, env={**os.environ})
    with pytest.raises(ValueError, match="TIMM_QCONV_KERNELS='fast'.*auto.*eager.*compiled"):
        quantize_model(model_with_lazy_head()[:3], n_bits=2, n_functions=2)


def test_a_model_keeps_its_backend_when_the_default_changes(compiled_backend):
    model = quantized_model_with_lazy_head()
    set_backend("eager")
    assert timm_qconv.get_kernel_backend(model) == "compiled" and batched_path(model) is not None
    set_kernel_backend("eager", model)
    assert timm_qconv.get_kernel_backend(model) == "eager" and batched_path(model).backend == "eager"


def test_batches_group_layers_by_quantizer_class_and_bits():
    batches = BatchedPath("compiled").plan(mixed_model())
    kinds = sorted((type(b.layers[0].quantizer).__name__, b.layers[0].quant_config.n_bits, len(b.layers))
                   for b in batches)
    assert kinds == [("HashQuantizer", 2, 1), ("HashQuantizer", 2, 2), ("HashQuantizer", 3, 1),
                     ("KMeansQuantizer", 3, 1), ("LogQuantizer", 2, 1)], kinds  # the "float"-mode layer apart
    hash2 = next(b for b in batches if len(b.layers) == 2)
    assert hash2.row_group.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4, 4, 4], \
        "channels of the second layer follow the first's groups"


@pytest.mark.parametrize("make_model", [quantized_model_with_lazy_head, mixed_model])
def test_compiled_hash_loss_matches_eager_value_and_gradients(compiled_backend, make_model):
    model = make_model()
    with torch.no_grad():  # off the fitted optimum, where the levels' gradient would be ~0
        for name, p in model.named_parameters():
            if ".quantizer." in name:
                p.mul_(1.25)
    eager_model = copy.deepcopy(model)
    loss = hash_loss(model)  # the covered layers in one pass over the weights
    loss.backward()
    set_kernel_backend("eager", eager_model)
    ref = hash_loss(eager_model)
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=0.0)
    for (name, p), (_, ref_p) in zip(model.named_parameters(), eager_model.named_parameters()):
        assert (p.grad is None) == (ref_p.grad is None), f"{name}: gradient presence differs"
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_p.grad, rtol=1e-4, atol=1e-4 * float(ref_p.grad.abs().max()),
                                       msg=lambda m, n=name: f"{n}: {m}")


def train_step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    return out.detach()


def test_compiled_training_reuses_weight_buffers_and_keeps_them_for_live_graphs(compiled_backend):
    model = quantized_model_with_lazy_head()
    x, x2 = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    train_step(model, x)
    (batch,) = _plan(model)
    kept = [b.data_ptr() for b in batch.buffers]
    taken = []
    take = batch.take_buffers
    batch.take_buffers = lambda node, weights, graph: taken.append(take(node, weights, graph)) or taken[-1]
    train_step(model, x)
    assert taken[-1][1] and [b.data_ptr() for b in taken[-1][0]] == kept, "the kept buffers were not reused"
    # Two forwards before one backward: the second must not write into what the first graph holds.
    eager_model = copy.deepcopy(model)
    model.zero_grad(set_to_none=True)
    (model(x).square().sum() + model(x2).square().sum()).backward()
    assert taken[-2][1] and not taken[-1][1], "the second forward took the buffers the first still used"
    assert not {t.data_ptr() for t in taken[-1][0]} & set(kept)
    set_kernel_backend("eager", eager_model)
    (eager_model(x).square().sum() + eager_model(x2).square().sum()).backward()
    for (name, p), (_, ref) in zip(model.named_parameters(), eager_model.named_parameters()):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    # A forward whose graph is dropped without a backward leaves the buffers free for the next one.
    model(x)
    train_step(model, x)
    assert taken[-1][1], "a dropped graph kept the buffers"


def test_compiled_buffers_changed_under_a_retained_graph_raise(compiled_backend):
    model = quantized_model_with_lazy_head()
    x = torch.randn(2, 3, 6, 6)
    loss = model(x).square().sum()
    loss.backward(retain_graph=True)
    model(x).square().sum().backward()  # rewrites the buffers the first graph still holds
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_auto_backend_batches_training_up_to_three_bits_when_the_compiler_works():
    require_compiler()
    previous = get_backend()
    set_backend("auto")
    try:
        model = quantized_model_with_lazy_head()  # 2 bits
        train_step(model, torch.randn(2, 3, 6, 6))
        (batch,) = _plan(model)
        assert batch.buffers is not None, "auto did not take the batched compiled path"
        model = quantize_model(model_with_lazy_head()[:3], n_bits=4, n_functions=2)
        train_step(model, torch.randn(2, 3, 6, 6))
        (batch,) = _plan(model)
        assert batch.buffers is None, "auto compiled 16-level kernels"
    finally:
        set_backend(previous)


def test_auto_backend_falls_back_to_eager_with_a_warning(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler found\nmore detail")

    previous = get_backend()
    set_backend("auto")
    monkeypatch.setattr(torch, "compile", no_compiler)
    compiler_works.cache_clear()
    try:
        model = quantized_model_with_lazy_head()
        eager_model = copy.deepcopy(model)
        x = torch.randn(2, 3, 6, 6)
        with pytest.warns(RuntimeWarning, match="no C.. compiler found.*eager kernels"):
            out = train_step(model, x)
        assert _plan(model)[0].buffers is None, "the batched path ran without a compiler"
        set_kernel_backend("eager", eager_model)
        torch.testing.assert_close(out, train_step(eager_model, x))
        for (name, p), (_, ref) in zip(model.named_parameters(), eager_model.named_parameters()):
            torch.testing.assert_close(p.grad, ref.grad, msg=lambda m, n=name: f"{n}: {m}")
    finally:
        set_backend(previous)
        compiler_works.cache_clear()


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend.*'fast'.*auto.*eager.*compiled"):
        set_backend("fast")


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.used = nn.Conv2d(4, 2, 1)
        self.unused = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(self.body(x))


def test_compiled_layers_left_out_of_a_forward_get_no_gradient(compiled_backend):
    model = quantize_model(TwoHeads(), n_bits=2, n_functions=2)
    model(torch.randn(2, 3, 6, 6)).square().sum().backward()
    assert model.unused.weight.grad is None and model.used.weight.grad is not None


def test_compiled_model_pickles_after_a_forward_without_backward(compiled_backend, tmp_path):
    model = quantized_model_with_lazy_head()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x).detach()  # a graph that never runs backward
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert batched_path(loaded) is not None, "the loaded model lost its batched path"
    torch.testing.assert_close(train_step(loaded, x), expected,
                               msg=lambda m: f"the loaded model computes otherwise: {m}")
    missing = [n for n, p in loaded.named_parameters() if n.endswith("weight") and p.grad is None]
    assert not missing, f"no gradient reached {missing} after loading"


def test_compiled_backend_keeps_compiling_for_many_models_in_one_process(compiled_backend):
    # A sweep over bit widths trains several models in one process; past torch._dynamo's recompile
    # limit the kernels would run uncompiled from then on, silently. A limit of 1 makes the second
    # width the one past it.
    counters = torch._dynamo.utils.counters
    counters.clear()
    x = torch.randn(2, 3, 6, 6)
    with torch._dynamo.config.patch(recompile_limit=1):
        for n_bits in (1, 2):
            model = model_with_lazy_head()
            model(x)  # materialise the lazy layer
            model = quantize_model(model, n_bits=n_bits, n_functions=4, layers=("conv", "linear"))
            (model(x).square().sum() + hash_loss(model)).backward()
    limited = [reason.splitlines()[0] for reason in counters["unimplemented"] if "recompile limit" in reason.lower()]
    assert not limited, f"the compiled kernels ran uncompiled past the recompile limit: {limited}"


class CheckpointedBlocks(nn.Module):
    """Two convolutions, each under non-reentrant checkpointing or ``save_on_cpu``."""

    def __init__(self, outer: str) -> None:
        super().__init__()
        self.outer = outer
        self.first, self.second = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outer == "checkpoint":
            x = torch.utils.checkpoint.checkpoint(self.first, x, use_reentrant=False)
            return torch.utils.checkpoint.checkpoint(self.second, x.relu(), use_reentrant=False)
        with torch.autograd.graph.save_on_cpu():
            return self.second(self.first(x).relu())


@pytest.mark.parametrize("outer", ["checkpoint", "save_on_cpu"])
def test_compiled_backend_under_other_saved_tensor_hooks_matches_eager(compiled_backend, outer):
    x = torch.randn(2, 3, 6, 6)
    results = {}
    for backend in ("eager", "compiled"):
        torch.manual_seed(0)
        model = quantize_model(CheckpointedBlocks(outer), n_bits=2, n_functions=2, kernels=backend)
        results[backend] = run(model, x)
    (out, grads), (eager_out, eager_grads) = results["compiled"], results["eager"]
    torch.testing.assert_close(out, eager_out)
    assert grads.keys() == eager_grads.keys(), f"{outer}: gradients reached {sorted(grads)}"
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=lambda m: f"{outer}, {name}: {m}")


def test_compiled_backend_trains_under_autocast_and_in_bfloat16(compiled_backend):
    x = torch.randn(2, 3, 6, 6)
    model = quantized_model_with_lazy_head()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().square().sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n.endswith("weight"))
    half = quantized_model_with_lazy_head().bfloat16()  # not float32: the layers compute their own weights
    assert not batched_path(half).plan(half), "bfloat16 layers must not be batched"
    half(x.bfloat16()).float().square().sum().backward()
    missing = [n for n, p in half.named_parameters() if n.endswith("weight") and p.grad is None]
    assert not missing, f"bfloat16: no gradient reached {missing}"
    assert all(p.grad.dtype == torch.bfloat16 for n, p in half.named_parameters() if n.endswith("weight"))
    model.zero_grad(set_to_none=True)
    loss = hash_loss(half) + hash_loss(model)
    assert torch.isfinite(loss) and loss > 0, f"hash loss {loss}"
    loss.backward()
    levels = [p for n, p in [*half.named_parameters(), *model.named_parameters()] if ".quantizer." in n]
    assert levels and all(p.grad is not None and torch.isfinite(p.grad).all() for p in levels), \
        "the hash loss did not give every quantizer a finite gradient"


@pytest.mark.parametrize("kernels", ["eager", "compiled"])
def test_converted_model_traces_into_one_graph(kernels):
    model = quantize_model(model_with_lazy_head()[:3], n_bits=2, n_functions=2, kernels=kernels)
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 6, 6))
    assert explained.graph_break_count == 0, f"{kernels}: torch.compile breaks the graph: {explained.break_reasons}"


def reference_hash_loss(layer) -> torch.Tensor:
    return (layer.quantizer(layer.weight).float() - layer.weight.detach().float()).pow(2).mean()


@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).nearest])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_hash_loss_from_the_forward_codes_equals_the_reference(method, dtype):
    layer = QuantConv2d(4, 8, 3, method=method, n_bits=3, n_functions=2).to(dtype).train()
    x = torch.randn(2, 4, 6, 6, dtype=dtype)
    layer(x)
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is None, \
        f"{method}: the forward computed the squared error before the hash loss ever asked for it"
    out = layer(x)
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is not None, f"{method}: forward error not kept"
    params = [p for p in layer.quantizer.parameters()]
    fast = layer.hash_loss()
    fast_grads = torch.autograd.grad(fast, params, retain_graph=True)
    slow = reference_hash_loss(layer)
    slow_grads = torch.autograd.grad(slow, params)
    assert torch.allclose(fast, slow, rtol=1e-5, atol=0), f"{method} {dtype}: loss {fast} != reference {slow}"
    for a, b in zip(fast_grads, slow_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7), f"{method} {dtype}: level gradients differ"
    out.sum().backward()
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is None, "codes reused after the backward"


def test_hash_loss_is_recomputed_once_the_weight_changed_after_the_forward():
    layer = QuantConv2d(4, 8, 3, n_bits=2, n_functions=2).train()
    layer.hash_loss()  # from now on the forward computes the error
    layer(torch.randn(2, 4, 6, 6))
    with torch.no_grad():
        layer.weight.mul_(2.0)
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is None, "stale codes reused after a weight edit"
    assert torch.allclose(layer.hash_loss(), reference_hash_loss(layer)), "hash loss after the edit differs"


@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).thresholded])
@pytest.mark.parametrize("n_bits", [2, 8])
def test_hash_loss_without_a_forward_is_one_fused_lookup_equal_to_the_reference(method, n_bits, cpu_kernels,
                                                                               monkeypatch):
    # "float" mode trains on the float weights, so the hash loss finds no forward to reuse
    layer = QuantConv2d(4, 8, 3, method=method, n_bits=n_bits, n_functions=2, mode="float").train()
    layer(torch.randn(2, 4, 6, 6))
    fused = []
    original = kernels._Lookup.apply
    monkeypatch.setattr(kernels._Lookup, "apply", lambda *args: fused.append(args[-1]) or original(*args))
    params = list(layer.quantizer.parameters())
    loss = layer.hash_loss()
    grads = torch.autograd.grad(loss, params)
    assert fused == [True], f"{method}: the hash loss took {len(fused)} lookups, with_error={fused}"
    monkeypatch.setattr(kernels._Lookup, "apply", original)
    reference = reference_hash_loss(layer)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=0, msg=lambda m: f"{method}: loss {m}")
    for param, grad, expected in zip(params, grads, torch.autograd.grad(reference, params)):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{method}: gradient {m}")


@pytest.mark.parametrize("levels", ["spread", "repeated", "halving"])
@pytest.mark.parametrize("n_levels", [2, 3, 4, 7, 8, 16, 17, 32, 33, 64, 100, 255, 256, 300])
def test_codes_equal_a_binary_search_including_ties_and_repeated_levels(n_levels, levels, cpu_kernels, monkeypatch):
    generator = torch.Generator().manual_seed(n_levels)
    n_groups, n_rows = 3, 6
    if levels == "halving":  # log's: 0 and +-s * 2**-k, crowded around zero down to subnormals
        magnitudes = 2.0 ** -torch.arange((n_levels - 1) // 2, dtype=torch.float32)
        shape = torch.cat([-magnitudes, torch.zeros(n_levels - 2 * magnitudes.numel()), magnitudes.flip(0)])
        table = (0.05 + torch.rand(n_groups, 1, generator=generator)) * shape
    else:  # spread as fitted levels are (a sorted Gaussian sample would leave its tail levels far apart)
        spacing = 0.5 + torch.rand(n_groups, n_levels, generator=generator)
        table = (spacing.cumsum(1) - spacing.sum(1, keepdim=True) / 2) / n_levels
    if levels == "repeated":
        table[1, : n_levels // 2] = table[1, 0]  # several midpoints equal
    groups = torch.tensor([0, 1, 2, 2, 1, 0])
    mids = (table[:, 1:] + table[:, :-1]) / 2
    per_row = mids[groups]
    rows = torch.randn(n_rows, 2 * n_levels + 40, generator=generator) * table.abs().amax(1, keepdim=True)[groups]
    rows[:, :n_levels - 1] = per_row  # weights exactly on a midpoint go to the lower level
    rows[:, n_levels - 1 : 2 * n_levels - 2] = per_row.nextafter(torch.tensor(float("inf")))  # just above
    rows[:, -12:] = torch.tensor([float("inf"), float("-inf"), float("nan"), -float("nan"), 0.0, -0.0, 1e-45,
                                  -1e-45, 1e-39, -1e-39, 3e38, -3e38])
    rows[4, -13], rows[4, -14] = table[1, 0] - 1e-3, table[1, -1] + 1e-3  # outside the thresholds' range
    expected = torch.searchsorted(per_row.contiguous(), rows.contiguous())
    if n_levels <= 256:  # the comparisons: NaN is above no threshold (a binary search puts it last)
        expected[rows.isnan()] = 0
    if 8 < n_levels <= 256:  # by bins (equal in value, else by bit pattern), or in blocks; above 16 levels, always
        monkeypatch.setattr(torch, "searchsorted", None)
        by_value = _count_above_binned(rows, mids, groups)
        by_bits = _count_above_binned(rows, mids, groups, by_bits=True)
        expected_answers = {"spread": [by_value], "repeated": [], "halving": [by_bits]}[levels]
        assert all(binned is not None for binned in expected_answers), f"{n_levels} {levels} levels: not binned"
        if levels == "repeated":
            assert by_value is None and by_bits is None, f"{n_levels} repeated levels: binned search not declined"
        for binned in (by_value, by_bits):
            if binned is not None:
                assert torch.equal(binned.long(), expected), f"{n_levels} {levels} levels: binned codes differ"
    codes = compact_codes(table[groups], rows)
    expected_dtype = torch.uint8 if n_levels <= 256 else torch.int64
    assert codes.dtype == expected_dtype, f"{n_levels} levels: codes of dtype {codes.dtype}, expected {expected_dtype}"
    assert torch.equal(codes.long(), expected), f"{n_levels} {levels} levels: codes differ from torch.searchsorted"
    by_group = threshold_codes(mids, rows, groups)
    assert torch.equal(by_group.long(), expected), f"{n_levels} {levels} levels: codes by group differ"
    if cpu_kernels == "numba" and n_levels <= 256:
        codes = numba_codes(mids, rows, groups)
        assert torch.equal(codes.long(), expected), f"{n_levels} {levels} levels: the Numba forward's codes differ"


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
@pytest.mark.parametrize("n_levels", [255, 256])
def test_bit_pattern_bins_keep_one_threshold_each_down_to_subnormal_levels(n_levels, scale, monkeypatch):
    # log at 8 bits: levels s * 2**-k down to k = 126, subnormal for s < 1, whose bit patterns alone
    # would crowd up to 16 thresholds into one bin at s = 1e-3
    monkeypatch.setattr(kernels, "MAX_BIN_THRESHOLDS", 1)
    magnitudes = 2.0 ** -torch.arange((n_levels - 1) // 2, dtype=torch.float32)
    shape = torch.cat([-magnitudes, torch.zeros(n_levels - 2 * magnitudes.numel()), magnitudes.flip(0)])
    table = scale * torch.tensor([[0.6], [1.0], [1.4]]) * shape
    mids = (table[:, 1:] + table[:, :-1]) / 2
    rows = torch.randn(3, 2000, generator=torch.Generator().manual_seed(0)) * scale
    rows[:, :mids.shape[1]] = mids  # on every threshold, subnormal ones included
    codes = _count_above_binned(rows, mids, by_bits=True)
    assert codes is not None, f"scale {scale}: more than one threshold in a bin"
    assert torch.equal(codes.long(), torch.searchsorted(mids, rows)), f"scale {scale}: codes differ"


@pytest.mark.parametrize("n_levels, below, binned", [(16, 0, True), (16, 64, False), (8, 0, False)])
def test_large_layers_take_the_bins_above_8_levels(n_levels, below, binned, torch_ops, monkeypatch):
    numel = kernels.LARGE_LAYER_NUMEL - below
    calls = []
    monkeypatch.setattr(kernels, "_count_above_binned", lambda *args, **kwargs: calls.append(1) or None)
    generator = torch.Generator().manual_seed(n_levels)
    table = torch.sort(torch.randn(4, n_levels, generator=generator), dim=1).values
    groups = torch.arange(64) % 4
    rows = torch.randn(64, numel // 64, generator=generator)
    mids = (table[:, 1:] + table[:, :-1]) / 2
    codes = threshold_codes(mids, rows, groups)  # the blocks answer where the (spied) bins decline
    assert bool(calls) == binned, f"{n_levels} levels, {numel} weights: binned search tried: {bool(calls)}"
    assert torch.equal(codes.long(), torch.searchsorted(mids[groups], rows)), "codes differ from a binary search"


def test_reused_buffers_never_leak_into_results_kept_across_layers():
    # Two layers of different sizes, forwards then backwards in the reverse order: each layer's
    # weight and level gradients must equal those of the same layer run alone.
    torch.manual_seed(0)
    big, small = QuantConv2d(8, 16, 3, n_bits=4), QuantConv2d(4, 8, 3, n_bits=2)
    alone = [copy.deepcopy(big), copy.deepcopy(small)]
    for layer in (big, small, *alone):
        layer.hash_loss()  # the forwards compute the squared error too
    x_big, x_small = torch.randn(2, 8, 7, 7), torch.randn(2, 4, 7, 7)
    (big(x_big).square().sum() + big.hash_loss() + small(x_small).sum() + small.hash_loss()).backward()
    (alone[0](x_big).square().sum() + alone[0].hash_loss()).backward()
    (alone[1](x_small).sum() + alone[1].hash_loss()).backward()
    for shared, single in zip((big, small), alone):
        for (name, a), b in zip(shared.named_parameters(), single.parameters()):
            assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), f"{name}: gradient changed by another layer"


def test_binned_search_declines_tables_whose_flat_offsets_float32_cannot_hold():
    # one row of 16 thresholds per row of weights: 68 bins each, and more rows than 2**24 / 68
    n_rows = 2**24 // 68 + 1
    thresholds = torch.linspace(-1, 1, 16).expand(n_rows, -1).contiguous()
    rows = torch.rand(n_rows, 1) * 2 - 1
    assert _count_above_binned(rows, thresholds) is None, "binned search with offsets beyond float32's integers"
    assert _count_above_binned(rows[:1000], thresholds[:1000]) is not None, "binned search declined a small table"


def numba_codes(thresholds: torch.Tensor, rows: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The codes of the Numba forward, which with a level table of the codes themselves must also
    be its quantized weights."""
    table = torch.arange(thresholds.shape[1] + 1, dtype=torch.float32).expand(thresholds.shape[0], -1).contiguous()
    q, codes, _, _ = kernels._native_module().lookup_forward(thresholds, groups, table, rows, False)
    assert torch.equal(q, codes.float()), "the Numba forward's levels are not those of its codes"
    return codes


def spy_on_numba(monkeypatch) -> list:
    native, calls = kernels._native_module(), []
    for name in ("lookup_forward", "lookup_backward"):
        kernel = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *args, _kernel=kernel, _name=name, **kw: calls.append(_name)
                            or _kernel(*args, **kw))
    return calls


@pytest.mark.parametrize("n_bits", [1, 2, 3, 4, 7])  # up to 3: selects; 4: counting; 7: 128 levels, by bins
@pytest.mark.parametrize("method", [m for m in list_methods() if get_method(m).thresholded])
def test_numba_kernels_equal_the_pytorch_formulation_in_values_and_gradients(method, n_bits, monkeypatch):
    torch.manual_seed(n_bits)
    layer = QuantConv2d(8, 16, 3, method=method, n_bits=n_bits, n_functions=4).train()
    layer.hash_loss()  # from now on the forward computes the squared error too
    reference = copy.deepcopy(layer)
    x = torch.randn(2, 8, 7, 7)

    def step(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        out = model(x)
        loss = model.hash_loss()
        (out.square().sum() + loss).backward()
        return out.detach(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}

    calls = spy_on_numba(monkeypatch)
    out, loss, grads = step(layer)
    assert calls == ["lookup_forward", "lookup_backward"], f"{method} {n_bits} bits: Numba kernels ran: {calls}"
    monkeypatch.setattr(kernels, "_native_for", lambda *args, **kwargs: None)
    ref_out, ref_loss, ref_grads = step(reference)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6, msg=lambda m: f"{method} {n_bits}: output {m}")
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0, msg=lambda m: f"{method} {n_bits}: hash loss {m}")
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7,
                                   msg=lambda m, n=name: f"{method} {n_bits} bits, {n}: {m}")
    monkeypatch.undo()
    layer.eval()
    reference.eval()
    with torch.no_grad():
        quantized = layer.quantizer(layer.weight)
        monkeypatch.setattr(kernels, "_native_for", lambda *args, **kwargs: None)
        assert torch.equal(quantized, reference.quantizer(reference.weight)), f"{method} {n_bits}: weights differ"


def test_numba_kernels_give_the_squared_error_alone_its_gradient():
    table = torch.sort(torch.randn(6, 4), 1).values.requires_grad_()
    rows = torch.randn(6, 50)
    q, _, error = kernels.lookup_codes(table, rows, with_error=True)
    assert error is not None, "the squared error was not computed"
    (grad,) = torch.autograd.grad(error, table)  # the error alone: no gradient came through q
    codes = torch.searchsorted(kernels.midpoints(table.detach()), rows)
    reference = table.detach().gather(1, codes)
    assert torch.equal(q, reference), "quantized values differ from a binary search"
    expected = torch.zeros(6, 4).scatter_add_(1, codes, 2 * (reference - rows))
    torch.testing.assert_close(grad, expected, msg=lambda m: f"gradient of the squared error alone: {m}")


@pytest.mark.parametrize("n_levels", [2, 4, 8])  # up to 4 levels, masked sums per level; 8: one scatter pass
@pytest.mark.parametrize("error_coef", [0.0, 0.3])
def test_numba_backward_in_parts_sums_groups_split_between_parts(n_levels, error_coef, monkeypatch):
    native = kernels._native_module()
    monkeypatch.setattr(native, "_n_parts", lambda n_rows, numel: 3)  # parts end at rows 32 and 64, inside groups
    parts = []
    for name in ("_backward_parts", "_masked_backward_parts"):
        monkeypatch.setattr(native, name, lambda *args, _parts=getattr(native, name): parts.append(args[-1])
                            or _parts(*args))
    torch.manual_seed(0)
    table = torch.sort(torch.randn(4, n_levels), 1).values
    groups = torch.arange(96) * 4 // 96
    rows, grad = torch.randn(96, 100), torch.randn(96, 100)
    _, codes, _, deviations = native.lookup_forward(None, groups, table, rows, True)
    assert (deviations is not None) == (n_levels <= native.MAX_MASKED_LEVELS), "deviations computed or not"
    expected = kernels._torch_level_grad(codes, table, groups, rows, grad, torch.tensor(error_coef), 0.5)
    for given in ({"deviations": deviations}, {}):  # the weights' deviations from the forward, or read again
        for task_grad in (grad, None):  # the hash loss alone: no gradient from the task
            wanted = expected if task_grad is not None else kernels._torch_level_grad(
                codes, table, groups, rows, None, torch.tensor(error_coef), 0.5)
            found = native.lookup_backward(codes, groups, table, rows, task_grad, error_coef, 0.5, **given)
            torch.testing.assert_close(found, wanted, rtol=1e-5, atol=2e-5,  # float32 sums of 2,400 in another order
                                       msg=lambda m: f"{n_levels} levels, {given.keys()}: {m}")
    assert parts == [3] * 4, f"the rows were not split over threads: {parts}"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_numba_kernels_split_rows_over_threads_and_run_in_a_forked_child(monkeypatch):
    native = kernels._native_module()
    monkeypatch.setattr(native, "_n_parts", lambda n_rows, numel: 3)
    parts = []
    monkeypatch.setattr(native, "_forward_parts", lambda *args, _parts=native._forward_parts: parts.append(args[-1])
                        or _parts(*args))
    thresholds = torch.sort(torch.randn(4, 15), 1).values
    groups = torch.arange(96) % 4
    rows = torch.randn(96, 100)
    expected = torch.searchsorted(thresholds[groups], rows)
    threads = torch.get_num_threads()
    assert torch.equal(numba_codes(thresholds, rows, groups).long(), expected), "codes in three parts differ"
    assert parts == [3], f"the rows were not split over threads: {parts}"
    assert torch.get_num_threads() == threads, "starting Numba's threads changed torch's thread count"
    pid = os.fork()  # Numba's OpenMP layer would terminate a child that starts its threads again
    if pid == 0:
        try:
            os._exit(0 if torch.equal(numba_codes(thresholds, rows, groups).long(), expected) else 1)
        finally:
            os._exit(2)
    for _ in range(300):
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("a forked child hung in the kernels")
    assert os.waitstatus_to_exitcode(status) == 0, f"the forked child failed: status {status}"


def test_without_numba_the_kernels_warn_once_and_use_pytorch(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm_qconv._native", None)  # the import fails
    monkeypatch.delattr(timm_qconv, "_native", raising=False)
    kernels._native_module.cache_clear()
    try:
        table = torch.sort(torch.randn(3, 16), 1).values
        rows = torch.randn(3, 100)
        with pytest.warns(RuntimeWarning, match="Numba does not import"):
            q, codes, _ = kernels.lookup_codes(table, rows)
        expected = torch.searchsorted(kernels.midpoints(table), rows)
        assert torch.equal(codes, expected) and torch.equal(q, table.gather(1, expected)), "fallback lookup differs"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kernels.lookup_codes(table, rows)  # warned once, not at every layer
    finally:
        kernels._native_module.cache_clear()


def test_the_kernels_keep_the_torch_thread_count():
    # Starting Numba's OpenMP threads resets the count torch reads (to the number of cores): a fresh
    # process, with more threads than this machine has cores, and a layer large enough to split
    threads = os.cpu_count() + 1
    script = (f"import torch; torch.set_num_threads({threads}); from timm_qconv._kernels import lookup_codes; "
              "lookup_codes(torch.tensor([[0.0, 1.0]]).expand(64, -1), torch.rand(64, 1 << 14)); "
              "print(torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.split() == [str(threads)], f"torch.set_num_threads({threads}) became {out.strip()} once Numba started"


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-6])
def test_numba_bins_by_bit_pattern_serve_log_levels_down_to_subnormals(scale):
    # log at 8 bits: levels s * 2**-k down to k = 126, which equal bins in value would crowd near zero
    native = kernels._native_module()
    magnitudes = 2.0 ** -torch.arange(127, dtype=torch.float32)
    table = scale * torch.tensor([[0.6], [1.0], [1.4]]) * torch.cat([-magnitudes, torch.zeros(1), magnitudes.flip(0)])
    thresholds = (table[:, 1:] + table[:, :-1]) / 2
    by_bits, *_, depth = native._bin_tables(thresholds.numpy())
    assert by_bits.all() and depth.all(), f"scale {scale}: bins by bit pattern {by_bits}, comparisons per bin {depth}"
    groups = torch.tensor([0, 1, 2])
    rows = torch.randn(3, 2000, generator=torch.Generator().manual_seed(0)) * scale
    rows[:, : thresholds.shape[1]] = thresholds  # on every threshold, subnormal ones included
    rows[:, -3:] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    expected = torch.searchsorted(thresholds, rows)
    expected[rows.isnan()] = 0
    assert torch.equal(numba_codes(thresholds, rows, groups).long(), expected), f"scale {scale}: codes differ"


@pytest.mark.parametrize("n_bits", [6, 7])  # 63 and 127 thresholds (up to 31 are counted, not binned)
@pytest.mark.parametrize("zero", ["none", "+0", "-0"])
def test_numba_bit_pattern_bins_span_only_the_octaves_the_thresholds_use(n_bits, zero):
    # log at 6-7 bits: 31-63 octaves of levels, where the float32 magnitudes below them span about
    # a hundred more: the bins must cover the thresholds' octaves only, one threshold in each, and
    # stay exact for zeros of both signs, values between the two smallest thresholds, and the
    # neighbours of every threshold
    native = kernels._native_module()
    magnitudes = 2.0 ** -torch.arange(2 ** (n_bits - 1) - 1, dtype=torch.float32)
    table = torch.tensor([[1.0], [3e-3]]) * torch.cat([-magnitudes, torch.zeros(1), magnitudes.flip(0)])
    thresholds = (table[:, 1:] + table[:, :-1]) / 2
    if zero != "none":  # a threshold at zero itself, the smallest magnitude there is
        thresholds[:, thresholds.shape[1] // 2] = 0.0 if zero == "+0" else -0.0
    by_bits, *_, depth = native._bin_tables(thresholds.numpy())
    assert by_bits.all(), f"{n_bits} bits: bins by bit pattern not taken ({by_bits})"
    if zero == "none":
        assert (depth == 1).all(), f"{n_bits} bits: up to {depth.max()} thresholds in one bin, expected one"
    else:
        assert depth.all(), f"{n_bits} bits, a threshold at {zero}: bins declined"
    up, down = (torch.nextafter(thresholds, torch.tensor(v)) for v in (float("inf"), -float("inf")))
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-30, -1e-30, float("nan"), float("inf"), -float("inf")])
    rows = torch.cat([thresholds, up, down, special.expand(2, -1),
                      torch.randn(2, 500, generator=torch.Generator().manual_seed(n_bits)) * 1e-3], 1).contiguous()
    expected = torch.searchsorted(thresholds.contiguous(), rows)
    expected[rows.isnan()] = 0
    got = numba_codes(thresholds.contiguous(), rows, torch.tensor([0, 1])).long()
    assert torch.equal(got, expected), f"{n_bits} bits, {zero}: {int((got != expected).sum())} codes differ"


def test_numba_kernels_refuse_shapes_that_would_index_out_of_bounds():
    native = kernels._native_module()
    rows, table = torch.randn(8, 20), torch.sort(torch.randn(2, 4), 1).values
    thresholds, codes = kernels.midpoints(table), torch.zeros(8, 20, dtype=torch.uint8)
    groups = torch.arange(8) % 2
    bad_calls = {
        "groups beyond the table": lambda: native.lookup_forward(thresholds, torch.arange(8), table, rows, True),
        "groups beyond the table, nearest": lambda: native.lookup_forward(None, torch.arange(8), table, rows, True),
        "negative groups": lambda: native.lookup_forward(None, -groups, table, rows, True),
        "too few groups": lambda: native.lookup_forward(thresholds, groups[:4], table, rows, True),
        "thresholds of other rows": lambda: native.lookup_forward(thresholds[:1], groups, table, rows, True),
        "thresholds of another count": lambda: native.lookup_forward(thresholds[:, :2], groups, table, rows, True),
        "a gradient of another shape": lambda: native.lookup_backward(codes, groups, table, rows, torch.ones(8, 10),
                                                                      0.0, 1.0),
        "groups beyond the table, backward": lambda: native.lookup_backward(codes, groups, table[:1], rows, None,
                                                                            1.0, 1.0),
        "codes of another shape": lambda: native.lookup_backward(codes[:, :10], groups, table, rows, None, 1.0, 1.0),
        "groups beyond the table, decode": lambda: native.decoder(codes, groups + 1, table)(),
    }
    for what, call in bad_calls.items():
        with pytest.raises(ValueError, match="timm_qconv kernels"):
            call()
            pytest.fail(f"{what}: accepted")
