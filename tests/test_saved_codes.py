"""A training forward's graph keeps the quantized weight as its codes; the backward is unchanged."""
import contextlib
import weakref

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from timm_qconv import QuantConv2d, QuantLinear, _saved_codes, get_method, layers, list_methods
from timm_qconv import _kernels as kernels
from timm_qconv._kernels import codes_decoder, lookup_codes

THRESHOLDED = [m for m in list_methods() if get_method(m).thresholded]
LAYERS = {
    "conv": (lambda **kw: QuantConv2d(6, 8, 3, padding=1, **kw), (2, 6, 5, 5)),
    "linear": (lambda **kw: QuantLinear(12, 8, **kw), (3, 12)),
    "linear 3-d": (lambda **kw: QuantLinear(12, 8, **kw), (2, 3, 12)),
}


@pytest.fixture
def decodes(monkeypatch):
    """How many times a backward rebuilt a weight from its codes."""
    calls = []
    value = _saved_codes.CodedWeight.value
    monkeypatch.setattr(_saved_codes.CodedWeight, "value", lambda self: calls.append(1) or value(self))
    return calls


def gradients(layer, x, kept_as_codes, create_graph=False, with_hash_loss=False):
    """Output and every gradient of one training step, with or without the codes' hooks."""
    previous = layers.saved_as_codes
    if not kept_as_codes:
        layers.saved_as_codes = lambda weight: contextlib.nullcontext()
    try:
        layer.zero_grad(set_to_none=True)
        x = x.clone().requires_grad_()
        out = layer(x)
        loss = out.square().sum() + (layer.hash_loss() if with_hash_loss else 0)
        if create_graph:  # a gradient penalty: second order through the weight and the levels
            (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
            loss = grad_x.square().sum()
        loss.backward()
    finally:
        layers.saved_as_codes = previous
    return [out.detach(), x.grad, layer.weight.grad, *(p.grad for p in layer.quantizer.parameters())]


def assert_same(a, b, what):
    assert len(a) == len(b), f"{what}: {len(a)} tensors against {len(b)}"
    for i, (u, v) in enumerate(zip(a, b)):
        assert (u is None) == (v is None), f"{what}: gradient {i} present in one run only"
        if u is not None:
            assert torch.equal(u, v), f"{what}: tensor {i} differs by {(u - v).abs().max()}"


@pytest.mark.parametrize("method", THRESHOLDED)
@pytest.mark.parametrize("kind", list(LAYERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("create_graph", [False, True])
@pytest.mark.parametrize("moved", [False, True], ids=["built", "moved"])
def test_backward_from_the_codes_equals_the_kept_weight(method, kind, dtype, create_graph, moved, decodes,
                                                         cpu_kernels):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    if moved:  # .to(dtype) casts the quantizer's float32 levels too
        layer = make(method=method, n_bits=2, n_functions=2).to(dtype).train()
    else:
        layer = make(method=method, n_bits=2, n_functions=2, device="cpu", dtype=dtype).train()
    x = torch.randn(shape, dtype=dtype)
    kept = gradients(layer, x, kept_as_codes=False, create_graph=create_graph)
    assert not decodes, "decoded without the hooks"
    coded = gradients(layer, x, kept_as_codes=True, create_graph=create_graph)
    assert decodes, f"{method} {kind}: the graph kept the weight itself"
    assert_same(coded, kept, f"{method} {kind} {dtype} create_graph={create_graph}")


def test_the_forward_weight_is_freed_and_the_hash_loss_still_reuses_its_error(decodes):
    layer = QuantConv2d(6, 8, 3, n_bits=4, n_functions=2).train()
    x = torch.randn(2, 6, 5, 5, requires_grad=True)
    layer.hash_loss()  # from now on the forward computes the squared error
    weights = []
    compute = layer.compute_weight

    def computed():
        weight = compute()
        weights.append(weakref.ref(weight))
        return weight

    layer.compute_weight = computed
    out = layer(x)
    assert weights[-1]() is None, "the quantized weight outlived the forward"
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is not None, "hash loss would recompute"
    (out.sum() + layer.hash_loss()).backward()
    assert len(decodes) == 1, f"{len(decodes)} decodes for one layer's backward"
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is None, "error reused after the backward"


def test_a_linear_layer_now_reuses_the_forward_error_too():
    # F.linear keeps a transposed view of the weight, not the weight: its codes keep it alive
    layer = QuantLinear(12, 8, n_bits=2, n_functions=2).train()
    x = torch.randn(3, 12, requires_grad=True)
    layer.hash_loss()
    out = layer(x)
    reused = layer.quantizer.squared_error_of_last_forward(layer.weight)
    assert reused is not None, "the forward's squared error died with the transposed view"
    reference = (layer.quantizer(layer.weight).float() - layer.weight.detach()).pow(2).sum()
    torch.testing.assert_close(reused, reference)
    out.sum().backward()
    assert layer.quantizer.squared_error_of_last_forward(layer.weight) is None, "error reused after the backward"


@pytest.mark.parametrize("outer", ["checkpoint", "save_on_cpu"])
def test_other_saved_tensor_hooks_keep_their_plan(outer, decodes):
    torch.manual_seed(0)
    layer = QuantConv2d(6, 8, 3, padding=1, n_bits=2, n_functions=2).train()
    x = torch.randn(2, 6, 5, 5)
    reference = gradients(layer, x, kept_as_codes=False)

    class Outer(torch.nn.Module):
        def forward(self, x):
            if outer == "checkpoint":
                return checkpoint(layer, x, use_reentrant=False)
            with torch.autograd.graph.save_on_cpu():
                return layer(x)

    wrapped = Outer()
    wrapped.weight, wrapped.quantizer, wrapped.hash_loss = layer.weight, layer.quantizer, layer.hash_loss
    wrapped.zero_grad = layer.zero_grad
    assert_same(gradients(wrapped, x, kept_as_codes=True), reference, outer)
    assert not decodes, f"the codes' hooks replaced {outer}'s"


def test_no_hooks_without_grad_for_untagged_or_meta_weights():
    untagged = _saved_codes.saved_as_codes(torch.randn(4, 3))
    assert isinstance(untagged, contextlib.nullcontext), "hooks for a weight no quantizer tagged"
    layer = QuantLinear(3, 4, n_bits=2).train()
    tagged = layer.quantized_weight()
    assert not isinstance(_saved_codes.saved_as_codes(tagged), contextlib.nullcontext), "no hooks for a tagged weight"
    with torch.no_grad():
        assert isinstance(_saved_codes.saved_as_codes(tagged), contextlib.nullcontext), "hooks without grad"
    meta = torch.empty(4, 3, device="meta", requires_grad=True)
    _saved_codes.tag(meta, _saved_codes.CodedWeight(torch.zeros(4, 3, dtype=torch.uint8), torch.zeros(1, 2),
                                                    torch.zeros(4, dtype=torch.long), meta))
    # every meta tensor has address 0: the input would pass for the weight
    assert isinstance(_saved_codes.saved_as_codes(meta), contextlib.nullcontext), "hooks for a meta weight"


def test_only_contiguous_weights_at_offset_zero_are_tagged():
    codes = torch.zeros(4, 6, dtype=torch.uint8)
    coded = _saved_codes.CodedWeight(codes, torch.zeros(1, 2), torch.zeros(4, dtype=torch.long), codes.float())
    assert _saved_codes.tag(torch.zeros(4, 6), coded) is coded, "a contiguous weight was not tagged"
    assert _saved_codes.tag(torch.zeros(6, 4).t(), coded) is None, "a transposed weight would decode transposed"
    assert _saved_codes.tag(torch.zeros(30)[6:].view(4, 6), coded) is None, "an offset weight would decode shifted"


def test_an_in_place_edit_of_the_levels_before_the_backward_does_not_change_the_gradient():
    # linear's levels are its parameter itself: the codes must decode the levels of the forward
    torch.manual_seed(0)
    layer = QuantLinear(12, 8, method="linear", n_bits=2, n_functions=2).train()
    x = torch.randn(3, 12)
    reference = gradients(layer, x, kept_as_codes=False)[1]
    x = x.clone().requires_grad_()
    out = layer(x)
    with torch.no_grad():
        layer.quantizer.values.mul_(1.5)
    out.square().sum().backward()
    assert torch.equal(x.grad, reference), "the backward used levels edited after the forward"


@pytest.mark.parametrize("n_levels", [2, 16, 256])
def test_codes_decoder_returns_the_lookup_values(n_levels, cpu_kernels, monkeypatch):
    if cpu_kernels == "torch":
        monkeypatch.setattr(kernels, "_native_module", lambda: None)
    torch.manual_seed(0)
    table = torch.randn(3, n_levels).sort(dim=1).values
    groups = torch.tensor([0, 2, 1, 1, 2])
    rows = torch.randn(5, 70)
    q, codes, _ = lookup_codes(table, rows, groups=groups)
    assert torch.equal(codes_decoder(table, groups, codes.to(torch.uint8))(), q)


def test_decode_refuses_shapes_that_would_read_out_of_bounds():
    native = pytest.importorskip("timm_qconv._native")
    codes = torch.zeros(4, 5, dtype=torch.uint8)
    with pytest.raises(ValueError, match="group indexes below G"):
        native.decoder(codes, torch.tensor([0, 1, 2, 3]), torch.zeros(2, 4))()
    with pytest.raises(ValueError, match="uint8"):
        native.decoder(codes.long(), torch.zeros(4, dtype=torch.long), torch.zeros(2, 4))()


@pytest.mark.parametrize("method", ["hash", "linear"])
@pytest.mark.parametrize("kind", list(LAYERS))
def test_under_autocast_the_half_precision_copy_is_kept_as_codes_too(method, kind, decodes):
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make(method=method, n_bits=2, n_functions=2).train()
    x = torch.randn(shape)
    layer.hash_loss()  # from now on the forward computes the squared error
    results = {}
    for kept_as_codes, cast in ((False, contextlib.nullcontext), (True, _saved_codes.autocast_weight)):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(layers, "autocast_weight", cast if kept_as_codes else (lambda weight: weight))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                results[kept_as_codes] = gradients(layer, x, kept_as_codes)
                out = layer(x.clone().requires_grad_())
                reused = layer.quantizer.squared_error_of_last_forward(layer.weight) is not None
                assert out.dtype == torch.bfloat16, "autocast no longer ran the layer in bfloat16"
                assert reused or not kept_as_codes, "the hash loss recomputes under autocast"
    assert decodes, "the graph kept autocast's copy of the weight"
    assert_same(results[True], results[False], f"{method} {kind} under autocast")
