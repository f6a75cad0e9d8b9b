r"""Bit packing of keep bits and N:M positions: hand-computed bytes, round trips, malformed input."""

import pytest
import torch

from hfprune.sparsity import PackedBitsError, index_bits, pack_bits, unpack_bits


def test_pack_bits_by_hand():
    # 1 0 1 1 0 0 0 0 | 1 (+ 7 zero padding bits) -> 0b10110000 = 176, 0b10000000 = 128
    assert pack_bits(torch.tensor([1, 0, 1, 1, 0, 0, 0, 0, 1]), 1).tolist() == [176, 128]
    # 2-bit codes 2 3 0 1 -> 10 11 00 01 = 0b10110001 = 177
    assert pack_bits(torch.tensor([2, 3, 0, 1]), 2).tolist() == [177]
    # 3-bit codes 7 0 5 -> 111 000 10|1 (+7 padding) -> 0b11100010 = 226, 0b10000000 = 128
    assert pack_bits(torch.tensor([7, 0, 5]), 3).tolist() == [226, 128]
    assert index_bits(4) == 2 and index_bits(8) == 3 and index_bits(2) == 1 and index_bits(16) == 4


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 8])
def test_unpack_inverts_pack(nbits):
    codes = torch.randint(0, 2**nbits, (37,), dtype=torch.uint8)
    assert torch.equal(unpack_bits(pack_bits(codes, nbits), nbits, 37), codes)


def test_unpack_rejects_wrong_length_and_dirty_padding():
    with pytest.raises(PackedBitsError, match="expected 2 uint8 bytes"):
        unpack_bits(torch.tensor([1, 2, 3], dtype=torch.uint8), 1, 9)
    with pytest.raises(PackedBitsError, match="padding"):
        unpack_bits(torch.tensor([0, 0b11000000], dtype=torch.uint8), 1, 9)  # 10th bit set, only 9 codes
