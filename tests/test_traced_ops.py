"""Models the user compiles call the CPU kernels as custom operators: same values and gradients as eager."""
import copy

import pytest
import torch
from torch import nn

from timm_qconv import QuantConv2d, QuantLinear, _kernels, _native, _traced_ops, get_method, hash_loss, list_methods

THRESHOLDED = [name for name in list_methods() if get_method(name).thresholded]


@pytest.fixture(params=["numba", "torch"])
def op_kernels(request, monkeypatch):
    """The operators' two implementations: the Numba kernels, and PyTorch's where Numba does not import."""
    if request.param == "torch":
        monkeypatch.setattr(_kernels, "_native_module", lambda: None)
    return request.param


def operator_inputs(n_levels: int) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    levels = torch.sort(torch.randn(3, n_levels), 1).values
    groups = torch.arange(6) * 3 // 6
    thresholds = (levels[:, 1:] + levels[:, :-1]) / 2
    table = levels.requires_grad_()
    rows = torch.randn(6, 40, requires_grad=True)
    return thresholds, groups, table, rows


@pytest.mark.parametrize("n_levels", [2, 4, 256])
@pytest.mark.parametrize("with_error", [False, True])
def test_operators_pass_opcheck(op_kernels, n_levels, with_error):
    thresholds, groups, table, rows = operator_inputs(n_levels)
    torch.library.opcheck(_traced_ops.lookup, (thresholds, groups, table, rows, True, 0.5, with_error))
    _, codes, _ = _traced_ops.lookup(thresholds, groups, table, rows, True, 0.5, with_error)
    grad = torch.randn_like(rows)
    torch.library.opcheck(_traced_ops.lookup_backward, (codes, groups, table.detach(), rows.detach(), grad,
                                                        torch.tensor(0.25), 0.5))


@pytest.mark.parametrize("with_error", [False, True])
def test_operator_gradient_is_the_eager_kernels(op_kernels, with_error):
    thresholds, groups, table, rows = operator_inputs(4)
    q, codes, error = _traced_ops.lookup(thresholds, groups, table, rows, True, 0.5, with_error)
    weight = torch.randn_like(q)
    ((q * weight).sum() + 3 * error).backward()
    eager_table, eager_rows = table.detach().clone().requires_grad_(), rows.detach().clone().requires_grad_()
    eager_q, eager_codes, eager_error = _kernels.lookup_codes(eager_table, eager_rows, thresholds, ste=True,
                                                              grad_scale=0.5, with_error=with_error, groups=groups)
    ((eager_q * weight).sum() + (3 * eager_error if with_error else 0)).backward()
    assert torch.equal(q, eager_q) and torch.equal(codes.long(), eager_codes.long())
    torch.testing.assert_close(table.grad, eager_table.grad, msg=lambda m: f"levels' gradient: {m}")
    assert torch.equal(rows.grad, eager_rows.grad), "the straight-through gradient is not the incoming one"


def all_methods_model(n_bits: int) -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for method in THRESHOLDED:
        layers += [QuantConv2d(channels, 6, 3, padding=1, method=method, n_bits=n_bits, n_functions=2), nn.ReLU()]
        channels = 6
    layers += [nn.Flatten(), QuantLinear(6 * 5 * 5, 4, method=THRESHOLDED[0], n_bits=n_bits, n_functions=2)]
    return nn.Sequential(*layers).train()


def training_loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).square().mean() + hash_loss(model)


def gradients(model: nn.Module, x: torch.Tensor, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = loss_fn(model, x)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("n_bits", [2, 8])
def test_compiled_model_calls_the_kernels_and_matches_eager(op_kernels, n_bits, monkeypatch):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = all_methods_model(n_bits)
    eager = copy.deepcopy(model)
    x = torch.randn(4, 3, 5, 5)
    calls = {"forward": 0, "backward": 0}
    for name in calls:
        kernel = getattr(_native, f"lookup_{name}")

        def spy(*args, _kernel=kernel, _name=name):
            calls[_name] += 1
            return _kernel(*args)

        monkeypatch.setattr(_native, f"lookup_{name}", spy)
    eager_loss, eager_grads = gradients(eager, x, training_loss)
    calls.update(forward=0, backward=0)
    compiled_loss = torch.compile(training_loss, fullgraph=True)  # fullgraph: no break, the hash loss included
    loss, grads = gradients(model, x, compiled_loss)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    n_layers = len(THRESHOLDED) + 1
    if op_kernels == "numba":
        # the model's forward and the hash loss's own lookup, per layer; one backward kernel per lookup
        assert calls["forward"] >= n_layers and calls["backward"] >= n_layers, \
            f"the compiled model did not run the Numba kernels: {calls}"


def test_exported_program_needs_no_timm_qconv():
    model = all_methods_model(2).eval()
    x = torch.randn(2, 3, 5, 5)
    exported = torch.export.export(model, (x,))
    ops = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not [op for op in ops if "timm_qconv" in op], f"torch.export kept timm_qconv operators: {sorted(ops)}"
    torch.testing.assert_close(exported.module()(x), model(x))
