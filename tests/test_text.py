"""The shared text table and the shared state-dict fit check."""
import pytest
import torch

from timm_qconv._table import render_table
from timm_qconv.state_dict import state_dict_mismatch


def test_table_pads_aligns_and_rules():
    text = render_table([("a", "1.5"), ("long name", "10.25"), ("total", "11.75")], header=("layer", "error"),
                        align="lr", rule_before=[2])
    assert text.splitlines() == [
        "layer      error",
        "----------------",
        "a            1.5",
        "long name  10.25",
        "----------------",
        "total      11.75",
    ], text


def test_table_rejects_ragged_rows():
    with pytest.raises(ValueError, match="must have 2 cells"):
        render_table([("a", "b"), ("c",)])


def test_state_dict_mismatch_names_each_kind_of_key():
    expected = {"w": torch.Size([2, 3]), "b": torch.Size([2]), "gone": torch.Size([1])}
    state = {"w": torch.zeros(3, 2), "b": torch.zeros(2), "extra": torch.zeros(1)}
    found = state_dict_mismatch(expected, state)
    assert found == ("missing from the file: ['gone'] (1); not in the model: ['extra'] (1); "
                     "different shapes: ['w: file (3, 2), model (2, 3)'] (1)"), found
    assert state_dict_mismatch({"b": torch.Size([2])}, {"b": torch.ones(2)}) is None
