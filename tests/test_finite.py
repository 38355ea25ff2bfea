"""Finite in, finite out: outlier weights keep the levels and the reported error finite."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from timm_qconv import BitQuantizer, hash_loss, list_methods, quantize_model, quantized_layers


def _net(outlier: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    with torch.no_grad():
        model[0].weight[0, 0, 0, 0] = outlier
    return model


@pytest.mark.parametrize("method", list_methods())
def test_qat_with_an_outlier_weight_keeps_levels_finite(method: str) -> None:
    model = quantize_model(_net(1e4), method=method, n_bits=2, n_functions=1, layers=("conv", "linear"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(10):
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        loss = F.cross_entropy(model(x), torch.arange(4)) + hash_loss(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        for name, layer in quantized_layers(model):
            finite = bool(torch.isfinite(layer.quantizer.levels()).all())
            assert finite, f"{method}: {name} levels not finite at step {step}"


@pytest.mark.parametrize("method", ["hash", "kmeans", "log"])
@pytest.mark.parametrize("outlier", [1e20, 1e30])
def test_report_of_huge_weights_is_exact_in_float64(method: str, outlier: float) -> None:
    model = _net(outlier)
    bq = BitQuantizer(model, 2, 3, method=method, layers=("conv", "linear")).train_hash_functions(3)
    hashed = dict(bq.get_hashed_model().named_modules())
    for report in bq.report():
        w = dict(model.named_modules())[report.name].weight.detach().double()
        q = hashed[report.name].weight.detach().double()
        want = float((q - w).pow(2).sum() / w.pow(2).sum())
        assert math.isfinite(report.rel_error), f"{method} {report.name}: rel_error {report.rel_error}"
        assert report.rel_error == pytest.approx(want, rel=1e-6, abs=1e-300), \
            f"{method} {report.name}: reported {report.rel_error}, float64 gives {want}"
    assert math.isfinite(bq.report().rel_error), "the total must be finite too"
