"""Bit packing of n-bit codes into bytes (timm_qconv._packing)."""
import pytest
import torch

from timm_qconv._packing import pack_bits, packed_size, unpack_bits

BITS = list(range(1, 9))
LENGTHS = [0, 1, 7, 8, 9, 13, 64, 1001]  # many not divisible by 8


@pytest.mark.parametrize("n_bits", BITS)
@pytest.mark.parametrize("length", LENGTHS)
def test_round_trip(n_bits: int, length: int) -> None:
    codes = torch.randint(0, 2**n_bits, (length,), dtype=torch.uint8)
    packed = pack_bits(codes, n_bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(length, n_bits) == (length * n_bits + 7) // 8, \
        "packed size must be ceil(N*n/8)"
    back = unpack_bits(packed, n_bits, length)
    assert torch.equal(back, codes), f"round trip changed codes at n_bits={n_bits}, length={length}"


@pytest.mark.parametrize("n_bits", BITS)
def test_extreme_codes_and_2d_input(n_bits: int) -> None:
    top = 2**n_bits - 1
    codes = torch.tensor([[0, top, top, 0, top], [top, 0, 1 % (top + 1), top, 0]], dtype=torch.long)
    back = unpack_bits(pack_bits(codes, n_bits), n_bits, codes.numel())
    assert torch.equal(back.long().view_as(codes), codes), "2-D int64 input must pack in row-major order"


def test_layout_is_lsb_first() -> None:
    # codes 1, 2, 3 at 2 bits: 0b01 | 0b10 << 2 | 0b11 << 4 = 57; the unused top bits are zero.
    assert pack_bits(torch.tensor([1, 2, 3]), 2).tolist() == [57]
    assert pack_bits(torch.tensor([1] * 9), 1).tolist() == [255, 1]
    # The third code spans bytes 0 and 1.
    assert pack_bits(torch.tensor([5, 7, 1]), 3).tolist() == [5 | 7 << 3 | 1 << 6, 0]


def test_padding_bits_are_zero() -> None:
    packed = pack_bits(torch.full((3,), 7), 3)  # 9 bits used of 16
    assert packed.tolist() == [255, 1], "bits past the last code must be zero"


@pytest.mark.parametrize("n_bits", [0, 9])
def test_rejects_bad_bits(n_bits: int) -> None:
    with pytest.raises(ValueError, match="n_bits"):
        pack_bits(torch.zeros(4, dtype=torch.uint8), n_bits)


def test_rejects_codes_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="n_bits=2"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="n_bits=3"):
        pack_bits(torch.tensor([-1, 0]), 3)
    with pytest.raises(TypeError, match="integer"):
        pack_bits(torch.zeros(3), 3)


def test_unpack_rejects_wrong_length() -> None:
    packed = pack_bits(torch.arange(10) % 8, 3)  # 4 bytes
    with pytest.raises(ValueError, match="need exactly 4"):
        unpack_bits(packed[:-1], 3, 10)
    with pytest.raises(ValueError, match="need exactly"):
        unpack_bits(torch.cat([packed, packed[:1]]), 3, 10)
    with pytest.raises(TypeError, match="uint8"):
        unpack_bits(packed.long(), 3, 10)
