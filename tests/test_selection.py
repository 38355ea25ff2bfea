"""Layer selection: one dataclass, one default and one normal form for every entry point."""
import pytest
from torch import nn

from timm_qconv import BitQuantizer, plan_quantization
from timm_qconv.callbacks import BitQuantizerOptions, HashLossOptions
from timm_qconv.selection import LayerSelection

from conftest import small_model


@pytest.mark.parametrize("layers, normal", [
    (None, ("conv",)),
    ("linear", ("linear",)),
    ((nn.Linear, "Conv2d"), ("conv", "linear")),
    (["conv", nn.Conv2d, "linear"], ("conv", "linear")),
])
def test_layers_have_one_normal_form(layers, normal):
    assert LayerSelection(layers).layers == normal, f"layers={layers!r} normalised to {LayerSelection(layers).layers}"


def test_every_entry_point_has_the_same_default_selection():
    default = LayerSelection()
    found = {
        "HashLossOptions": HashLossOptions().selection,
        "BitQuantizerOptions": BitQuantizerOptions().selection,
        "BitQuantizer": BitQuantizer(small_model(), 2, 2).selection,
    }
    for where, selection in found.items():
        assert selection == default, f"{where} selects {selection} by default, not {default}"
    convs = ["stem", "layer1.conv1", "layer1.conv2"]
    assert plan_quantization(small_model()) == default.select(small_model()) == convs, "the default is every plain conv"
