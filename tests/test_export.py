"""save_quantized / load_quantized: bit-exact round trips, size, integrity checks and atomic writes."""
import copy
import gc
import json
import os
import shutil
import weakref
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from torch import nn

import timm_qconv.export as export
from timm_qconv import (
    BitQuantizer,
    QuantMixin,
    freeze_model,
    list_methods,
    load_quantized,
    quantize_model,
    save_quantized,
)
from timm_qconv._packing import unpack_bits
from timm_qconv.export import CONFIG_FILE, WEIGHTS_FILE, read_config

ALL = ("conv", "linear")  # the head too: export covers both layer kinds
TINY = "test_resnet"  # timm's smallest ResNet (0.37 M weights): fits in well under a second


def tiny(num_classes: int = 5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(TINY, num_classes=num_classes)


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_bits(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes (so -0.0 vs 0.0 or NaN payloads would count as different)."""
    assert got.keys() == want.keys(), f"keys differ: {sorted(set(got) ^ set(want))[:5]}"
    for key in want:
        a, b = got[key], want[key]
        assert a.dtype == b.dtype and a.shape == b.shape, \
            f"{key}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), f"{key} differs"


def dir_snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[BitQuantizer, Path]:
    """A 3-bit hash fit of the tiny model, saved once; tests that damage it work on a copy."""
    bq = BitQuantizer(tiny(), 8, 3, layers=ALL).train_hash_functions(2)
    return bq, save_quantized(bq, tmp_path_factory.mktemp("saved") / "q")


@pytest.fixture
def saved_copy(saved: tuple[BitQuantizer, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved[1], tmp_path / "copy"))


# ---------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("method,n_bits", [("hash", 1), ("hash", 3), ("hash", 5), ("kmeans", 2), ("kmeans", 3),
                                           ("kmeans", 5), ("kmeans", 8)])
def test_round_trip_equals_hashed_model(method: str, n_bits: int, tmp_path: Path) -> None:
    bq = BitQuantizer(tiny(), 8, n_bits, method=method, layers=ALL).train_hash_functions(2)
    path = save_quantized(bq, tmp_path / "q")
    loaded = load_quantized(path)  # created by timm from the config
    assert type(loaded) is type(bq.model)
    assert not any(isinstance(m, QuantMixin) for m in loaded.modules()), "load_quantized must return plain layers"
    assert_same_bits(loaded.state_dict(), bq.get_hashed_model().state_dict())


def test_load_into_given_model_in_place(saved: tuple[BitQuantizer, Path]) -> None:
    bq, path = saved
    target = tiny(seed=1)
    assert load_quantized(path, model=target) is target, "a given model is loaded in place and returned"
    assert_same_bits(target.state_dict(), bq.get_hashed_model().state_dict())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_keep_their_dtype(dtype: torch.dtype, tmp_path: Path) -> None:
    bq = BitQuantizer(tiny().to(dtype), 8, 4, method="kmeans", layers=ALL).train_hash_functions(2)
    path = save_quantized(bq, tmp_path / "q")
    assert read_config(path)["layers"]["fc"]["dtype"] == str(dtype).removeprefix("torch.")
    assert_same_bits(load_quantized(path).state_dict(), bq.get_hashed_model().state_dict())


def _small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5))


@pytest.mark.parametrize("method", list_methods())
def test_quantized_model_round_trip_equals_freeze(method: str, tmp_path: Path) -> None:
    model = quantize_model(_small_net(), method=method, n_bits=3, n_functions=4, layers=("conv", "linear"))
    model.train()
    before = state_of(model)
    want = freeze_model(copy.deepcopy(model)).state_dict()
    path = save_quantized(model, tmp_path / "q")
    assert_same_bits(state_of(model), before)  # saving changes nothing
    assert all(m.quantizer.training for _, m in model.named_modules() if isinstance(m, QuantMixin)), \
        "train mode restored"
    plain = _small_net()
    assert_same_bits(load_quantized(path, model=plain).state_dict(), want)
    # a model that still has quantized layers gets plain ones
    loaded = load_quantized(path, model=copy.deepcopy(model))
    assert not any(isinstance(m, QuantMixin) for m in loaded.modules())
    assert_same_bits(loaded.state_dict(), want)


def test_export_streams_one_layer_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Saving computes one layer's codes at a time and loading decodes one layer at a time: neither
    holds a second copy of the model, so the largest timm models need memory for one copy only."""
    bq = BitQuantizer(tiny(), 8, 3, layers=ALL).train_hash_functions(2)
    made = []

    def one_at_a_time(function):
        def wrapper(*args, **kwargs):
            gc.collect()
            held = [i for i, ref in enumerate(made) if ref() is not None]
            assert not held, f"{function.__name__}: the tensors of calls {held} are still held"
            out = function(*args, **kwargs)
            made.append(weakref.ref(out))
            return out
        return wrapper

    monkeypatch.setattr(BitQuantizer, "layer_codes", one_at_a_time(BitQuantizer.layer_codes))
    path = save_quantized(bq, tmp_path / "q")
    assert len(made) == len(bq.layer_names)
    made.clear()
    monkeypatch.setattr(export, "_decode_layer", one_at_a_time(export._decode_layer))
    target = tiny(seed=1)
    load_quantized(path, model=target)
    assert len(made) == len(bq.layer_names)
    monkeypatch.undo()
    assert_same_bits(target.state_dict(), bq.get_hashed_model().state_dict())


def test_weights_file_is_a_safetensors_file(saved: tuple[BitQuantizer, Path]) -> None:
    """Written a tensor at a time, the file is still one the safetensors library reads as it is."""
    bq, path = saved
    tensors = safetensors.torch.load_file(path / WEIGHTS_FILE)
    layers = read_config(path)["layers"]
    for name in bq.layer_names:
        codes = bq.layer_codes(name)
        unpacked = unpack_bits(tensors.pop(name + ".weight.codes"), layers[name]["code_bits"], codes.numel())
        assert torch.equal(unpacked.view_as(codes), codes), name
        assert torch.equal(tensors.pop(name + ".weight.levels"), bq.quantizers[name].levels().detach()), name
    state = {k: v for k, v in bq.model.state_dict().items() if k.removesuffix(".weight") not in bq.layer_names}
    assert_same_bits(tensors, state)


def test_size_at_4_bits_is_at_most_13_percent_of_float32(tmp_path: Path) -> None:
    # resnet10t has resnet34's layer mix at a quarter of the size; the ratio logic is the same.
    torch.manual_seed(0)
    model = timm.create_model("resnet10t")
    bq = BitQuantizer(model, 32, 4, method="kmeans", layers=ALL).train_hash_functions(1)
    path = save_quantized(bq, tmp_path / "q")
    reference = tmp_path / "float32.pth"
    torch.save(model.state_dict(), reference)
    ratio = (path / WEIGHTS_FILE).stat().st_size / reference.stat().st_size
    assert ratio <= 0.13, f"4-bit file is {ratio:.1%} of the float32 state dict; must be at most 13%"


def test_config_describes_the_model(saved: tuple[BitQuantizer, Path]) -> None:
    bq, path = saved
    config = json.loads((path / CONFIG_FILE).read_text())
    assert config["architecture"] == TINY and config["model_kwargs"] == {"num_classes": 5, "in_chans": 3}
    assert (config["method"], config["n_bits"], config["n_functions"]) == ("hash", 3, 8)
    assert config["format_version"] == export.FORMAT_VERSION
    assert list(config["layers"]) == bq.layer_names
    fc = config["layers"]["fc"]
    expected = ([5, bq.modules["fc"].in_features], "float32", 3, 5)
    assert (fc["shape"], fc["dtype"], fc["code_bits"], fc["groups"]) == expected
    assert config["weights_bytes"] == (path / WEIGHTS_FILE).stat().st_size
    assert sorted(p.name for p in path.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE], "no temporary files left"


# ---------------------------------------------------------------------------------- damaged files
def _expect_untouched_after(error: type, match: str, path: Path) -> None:
    target = tiny(seed=2)
    before = state_of(target)
    with pytest.raises(error, match=match):
        load_quantized(path, model=target)
    assert_same_bits(target.state_dict(), before)


def test_truncated_file_is_detected(saved_copy: Path) -> None:
    file = saved_copy / WEIGHTS_FILE
    file.write_bytes(file.read_bytes()[:-1000])
    _expect_untouched_after(ValueError, "truncated", saved_copy)
    with pytest.raises(ValueError, match="truncated"):
        read_config(saved_copy)


def test_tampered_byte_is_detected(saved_copy: Path) -> None:
    file = saved_copy / WEIGHTS_FILE
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))
    _expect_untouched_after(ValueError, "changed after saving", saved_copy)


def test_tampered_config_is_detected(saved_copy: Path) -> None:
    file = saved_copy / CONFIG_FILE
    config = json.loads(file.read_text())
    config["layers"]["fc"]["shape"] = [7, 8]
    file.write_text(json.dumps(config))
    _expect_untouched_after(ValueError, "config.json was changed after saving", saved_copy)
    file.write_text("{not json")
    _expect_untouched_after(ValueError, "not valid JSON", saved_copy)


def test_missing_files(saved_copy: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_quantized(tmp_path / "nowhere")
    (saved_copy / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_quantized(saved_copy)
    (saved_copy / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=CONFIG_FILE):
        load_quantized(saved_copy)


def test_wrong_architecture_is_rejected(saved: tuple[BitQuantizer, Path]) -> None:
    _, path = saved
    for other in (tiny(num_classes=7), timm.create_model("test_efficientnet", num_classes=5)):
        before = state_of(other)
        with pytest.raises(ValueError, match="does not match the saved architecture 'test_resnet'"):
            load_quantized(path, model=other)
        assert_same_bits(other.state_dict(), before)


def test_non_timm_model_needs_a_module(tmp_path: Path) -> None:
    model = quantize_model(_small_net(), n_bits=2, n_functions=2)
    path = save_quantized(model, tmp_path / "q")
    with pytest.raises(ValueError, match="pass model="):
        load_quantized(path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="train_hash_functions"):
        save_quantized(BitQuantizer(tiny(), 4, 2, layers=ALL), tmp_path / "a")
    with pytest.raises(ValueError, match="no quantized layer"):
        save_quantized(tiny(), tmp_path / "b")
    with pytest.raises(TypeError, match="model_or_quantizer"):
        save_quantized("resnet18", tmp_path / "c")
    with pytest.raises(TypeError, match="model="):
        load_quantized(tmp_path, model="resnet18")
    assert list(tmp_path.iterdir()) == [], "failed saves must create nothing"


# ---------------------------------------------------------------------------------- writing
def test_unwritable_path_leaves_nothing(saved: tuple[BitQuantizer, Path], tmp_path: Path) -> None:
    bq, _ = saved
    blocker = tmp_path / "file.txt"
    blocker.write_text("user data")
    with pytest.raises(OSError, match="cannot be written"):
        save_quantized(bq, blocker / "sub" / "q")
    with pytest.raises(ValueError, match="existing file"):
        save_quantized(bq, blocker)
    assert blocker.read_text() == "user data" and [p.name for p in tmp_path.iterdir()] == ["file.txt"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write to read-only directories")
def test_read_only_directory(saved: tuple[BitQuantizer, Path], tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OSError, match="cannot be written"):
            save_quantized(saved[0], locked / "q")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_failed_overwrite_keeps_old_files(saved: tuple[BitQuantizer, Path], saved_copy: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    (saved_copy / "notes.txt").write_text("mine")
    before = dir_snapshot(saved_copy)
    other = BitQuantizer(tiny(seed=3), 4, 2, method="kmeans", layers=ALL).train_hash_functions(1)

    def fail(*args, **kwargs):
        raise OSError(5, "Input/output error")

    real_pack, packed = export.pack_bits, []

    def pack_once_then_fail(*args):
        packed.append(args)
        if len(packed) > 1:
            fail()
        return real_pack(*args)

    for failing in ("weights", "config"):  # halfway through the weights (after the first layer), then the config
        if failing == "weights":
            monkeypatch.setattr(export, "pack_bits", pack_once_then_fail)
        else:
            monkeypatch.setattr(Path, "write_bytes", fail)
        with pytest.raises(OSError, match="Input/output error"):
            save_quantized(other, saved_copy)
        monkeypatch.undo()
        assert dir_snapshot(saved_copy) == before, "old files must be untouched"
        assert [p.name for p in saved_copy.parent.iterdir() if p.name.startswith(".")] == [], "temporary folder left"

    import timm_qconv.atomic as atomic

    monkeypatch.setattr(atomic, "_swap_in", lambda new, path: (_ for _ in ()).throw(OSError(28, "No space left")))
    with pytest.raises(OSError, match="No space left"):
        save_quantized(other, saved_copy)
    new = saved_copy.parent / "new" / "deeper"
    with pytest.raises(OSError):
        save_quantized(other, new)
    assert not (saved_copy.parent / "new").exists(), "directories made by a failed save are removed"
    monkeypatch.undo()
    assert dir_snapshot(saved_copy) == before

    save_quantized(other, saved_copy)  # a successful overwrite replaces both files and keeps the others
    assert (saved_copy / "notes.txt").read_text() == "mine"
    assert_same_bits(load_quantized(saved_copy).state_dict(), other.get_hashed_model().state_dict())
