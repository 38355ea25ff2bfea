"""BitQuantizer: the prototype's API, quality against reference k-means, and bad input."""
import copy
import json

import pytest
import torch
from torch import nn

from timm_qconv import BitQuantizer
from timm_qconv._groups import group_index


class MyModel(nn.Module):  # the prototype README's model, without the decorator
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, )
        self.encoder = nn.Sequential(
            nn.Conv2d(64, 64, kernel_size=3, ),
            nn.Conv2d(64, 64, kernel_size=3, )
        )


def test_prototype_snippet_verbatim():
    model = MyModel()
    n_fs = 32
    n_bits = 6
    n_iter = 50
    avoid =[]
    bit_quantizer = BitQuantizer(
                model,
                n_fs,
                n_bits,
                avoid=avoid
                        )
    bit_quantizer.train_hash_functions(n_iter = n_iter)
    hashed_model = bit_quantizer.get_hashed_model()
    assert hashed_model is not model and isinstance(hashed_model.encoder[0], nn.Conv2d)
    assert not torch.equal(hashed_model.encoder[0].weight, model.encoder[0].weight), "weights were not quantized"


def distinct_per_group(weight: torch.Tensor, n_groups: int) -> int:
    rows = weight.reshape(weight.shape[0], -1)
    gidx = group_index(rows.shape[0], min(n_groups, rows.shape[0]))
    return max(rows[gidx == g].unique().numel() for g in range(int(gidx.max()) + 1))


@pytest.mark.parametrize("method", ["hash", "kmeans"])
@pytest.mark.parametrize("n_bits", [1, 3, 5])
def test_model_untouched_and_levels_per_group(method, n_bits):
    model = MyModel()
    before = copy.deepcopy(model.state_dict())
    bq = BitQuantizer(model, 8, n_bits, method=method).train_hash_functions(5)
    hashed = bq.get_hashed_model()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{method}: the original model's {key} changed"
    for name, module in hashed.named_modules():
        if isinstance(module, nn.Conv2d):
            found = distinct_per_group(module.weight, 8)
            assert found <= 2**n_bits, f"{method} {n_bits} bits: {name} has {found} distinct values in a group"


def exact_kmeans_error(values: torch.Tensor, k: int) -> float:
    """Reference: exact 1-D k-means by dynamic programming over sorted values, O(k n^2)."""
    x = torch.sort(values.double().flatten()).values
    n = x.numel()
    c1 = torch.cat([x.new_zeros(1), x.cumsum(0)])
    c2 = torch.cat([x.new_zeros(1), (x * x).cumsum(0)])
    i = torch.arange(n + 1)
    j, e = i[:, None], i[None, :]
    cost = (c2[e] - c2[j]) - (c1[e] - c1[j]) ** 2 / (e - j).clamp_min(1)
    cost = torch.where(e > j, cost, torch.full_like(cost, float("inf")))
    best = cost[0].clone()
    for _ in range(k - 1):
        best = torch.minimum(best, (best[:, None] + cost).min(0).values)
    return float(best[n])


def lloyd_error(values: torch.Tensor, k: int, iters: int = 300) -> float:
    """Reference for many levels: plain Lloyd-Max from quantiles, with an (n x k) assignment."""
    x = values.double().flatten()
    levels = torch.quantile(x, (torch.arange(k, dtype=torch.float64) + 0.5) / k)
    for _ in range(iters):
        assign = (x[:, None] - levels[None, :]).abs().argmin(1)
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).double()
        levels = torch.where(counts > 0, sums / counts.clamp_min(1), levels)
    return float(((x - levels[(x[:, None] - levels[None, :]).abs().argmin(1)]) ** 2).sum())


def relative_error(bq: BitQuantizer, name: str, weight: torch.Tensor) -> float:
    return float((bq.quantized_weight(name).double() - weight.double()).pow(2).sum() / weight.double().pow(2).sum())


# (method, bits, allowed error relative to the reference)
BOUNDS = [("hash", 1, 1.01), ("hash", 2, 1.01), ("hash", 3, 1.20), ("hash", 4, 1.20)] + [
    ("kmeans", b, 1.01) for b in range(1, 9)]


@pytest.mark.parametrize("method,n_bits,bound", BOUNDS)
def test_quality_against_reference_kmeans(method, n_bits, bound):
    # Normal weights as timm initialises them, 4 groups of 2304. (On much smaller groups a sample's
    # asymmetry alone puts hash's symmetric levels more than 1% above the optimum.)
    layer = nn.Conv2d(32, 32, 3)
    nn.init.normal_(layer.weight, std=0.05)
    n_groups = 4
    weight = layer.weight.detach()
    bq = BitQuantizer(nn.Sequential(layer), n_groups, n_bits, method=method).train_hash_functions(50)
    rows = weight.reshape(weight.shape[0], -1)
    gidx = group_index(rows.shape[0], n_groups)
    reference = exact_kmeans_error if n_bits <= 4 else lloyd_error
    optimum = sum(reference(rows[gidx == g], 2**n_bits) for g in range(n_groups)) / float(weight.double().pow(2).sum())
    got = relative_error(bq, "0", weight)
    assert got <= bound * optimum, f"{method} {n_bits} bits: error {got:.6f} > {bound} x reference {optimum:.6f}"


def test_report_rows_and_table():
    model = MyModel()
    bq = BitQuantizer(model, 4, 2).train_hash_functions(3)
    report = bq.report()
    assert [r.name for r in report] == ["conv1", "encoder.0", "encoder.1"], [r.name for r in report]
    first = report[0]
    assert first.shape == (64, 3, 3, 3) and first.n_bits == 2 and first.groups == 4, first
    assert abs(first.rel_error - relative_error(bq, "conv1", model.conv1.weight.detach())) < 1e-6, "rel_error disagrees"
    assert first.sqnr_db == pytest.approx(-10 * torch.log10(torch.tensor(first.rel_error)).item(), rel=1e-6)
    table = str(report)
    assert "encoder.1" in table and "SQNR" in table and "total" in table, table


def test_report_as_dicts_survives_json():
    report = BitQuantizer(MyModel(), 4, 2).train_hash_functions(2).report()
    rows = json.loads(json.dumps(report.to_dicts()))
    assert [r["name"] for r in rows] == ["conv1", "encoder.0", "encoder.1"], rows
    first = rows[0]
    assert first["shape"] == [64, 3, 3, 3] and first["n_bits"] == 2 and first["groups"] == 4, first
    assert first["rel_error"] == pytest.approx(report[0].rel_error)
    assert first["sqnr_db"] == pytest.approx(report[0].sqnr_db)
    assert first["sq_error"] / first["sq_weight"] == pytest.approx(first["rel_error"]), first


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_are_written_back_in_their_dtype(dtype):
    model = MyModel().to(dtype)
    hashed = BitQuantizer(model, 4, 3).train_hash_functions(3).get_hashed_model()
    assert hashed.conv1.weight.dtype == dtype, hashed.conv1.weight.dtype
    assert distinct_per_group(hashed.conv1.weight.float(), 4) <= 8


def test_verbose_shows_a_progress_bar(capsys):
    BitQuantizer(MyModel(), 4, 2, verbose=True).train_hash_functions(2)
    assert "layer" in capsys.readouterr().err, "no tqdm progress bar on stderr"


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(n_bits=0), ValueError, r"n_bits=0"),
    (dict(n_bits=9), ValueError, r"n_bits=9"),
    (dict(n_fs=0), ValueError, r"n_functions=0"),
    (dict(avoid=["decoder"]), ValueError, r"avoid entry 'decoder' matches no module"),
    (dict(method="nope"), ValueError, r"method='nope'"),
])
def test_bad_arguments(kwargs, error, match):
    args = dict(n_fs=4, n_bits=2) | kwargs
    with pytest.raises(error, match=match):
        BitQuantizer(MyModel(), **args)


def test_bad_n_iter_and_nothing_to_quantize_and_nan():
    with pytest.raises(ValueError, match=r"n_iter=0"):
        BitQuantizer(MyModel(), 4, 2).train_hash_functions(n_iter=0)
    with pytest.raises(ValueError, match=r"no layer"):
        BitQuantizer(nn.Sequential(nn.ReLU()), 4, 2)
    model = MyModel()
    with torch.no_grad():
        model.encoder[1].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'encoder.1' has non-finite"):
        BitQuantizer(model, 4, 2)
    with pytest.raises(RuntimeError, match=r"train_hash_functions"):
        BitQuantizer(MyModel(), 4, 2).get_hashed_model()


@pytest.mark.parametrize("method", ["hash", "kmeans", "linear", "poly"])
def test_codes_are_recomputed_and_a_changed_weight_is_refused(method):
    """The fit keeps no codes (a quarter of the model's size); they are the weights' nearest levels
    when asked, and asking after the weight changed is an error, never codes of other weights."""
    model = MyModel()
    bq = BitQuantizer(model, 8, 2, method=method).train_hash_functions(5)
    assert bq.codes == {}
    rows = model.encoder[0].weight.detach().reshape(64, -1)
    codes = bq.layer_codes("encoder.0")
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), bq.quantizers["encoder.0"].encode(rows))
    small = bq.quantizers["encoder.0"].encode_uint8(rows, chunk_numel=100)  # 1 row (576 weights) at a time
    assert torch.equal(small, codes)
    with torch.no_grad():
        model.encoder[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="'encoder.0'.s weight changed after train_hash_functions"):
        bq.get_hashed_model()
    model.encoder[0].weight.data = torch.randn(64, 64, 3, 3)
    with pytest.raises(RuntimeError, match="train_hash_functions\\(\\) again"):
        bq.layer_codes("encoder.0")
    bq.train_hash_functions(5)
    assert bq.get_hashed_model().encoder[0].weight.reshape(64, -1).unique().numel() <= 8 * 4

