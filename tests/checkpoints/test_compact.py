r"""The compact format: bit packing, the three encodings, bit-exact round trips, sizes, and damaged files."""

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import hfprune
from hfprune import PruningConfig
from hfprune.checkpoints.codec import CompactFormatError, decode_tensor, encode_tensor
from hfprune.checkpoints.compact import COMPACT_NOTE_NAME, COMPACT_WEIGHTS_NAME, load_compact, save_compact
from hfprune.sparsity import nm_keep_mask, unpack_bits


def bits(tensor: torch.Tensor) -> torch.Tensor:
    r"""The raw bits of a float tensor, so that `-0.0 != 0.0` and NaN == NaN in comparisons."""
    return tensor.contiguous().view(
        {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()]
    )


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def stored_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --- encodings -------------------------------------------------------------------------------------------------


def test_two_four_row_encodes_as_nm_with_hand_computed_positions():
    weight = torch.tensor([[0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0, 8.0]])
    layout, tensors = encode_tensor("w", weight, 2, 4)
    # dense 32 bytes; bitmask 4 * 4 + 1 = 17; nm 4 * 4 + ceil(4 * 2 / 8) = 17: the tie goes to nm
    assert layout == {"encoding": "nm", "shape": [1, 8], "dtype": "float32", "n": 2, "m": 4, "transposed": False}
    assert tensors["w:values"].tolist() == [[3.0, 4.0, 5.0, 8.0]]
    # positions 2 3 | 0 3 -> 10 11 00 11 = 0b10110011 = 179
    assert tensors["w:indices"].tolist() == [179]
    assert torch.equal(decode_tensor("w", layout, tensors), weight)


def test_group_with_fewer_than_n_nonzeros_fills_with_the_lowest_zero_position():
    weight = torch.zeros(8, 64)
    weight[:, 5::8] = 2.0  # 1:8, the kept weight at position 5 of every group
    weight[3, 13] = 0.0  # ... except one empty group: 63 nonzeros
    # bitmask 63 * 4 + 64 = 316 bytes; nm 64 * 4 + ceil(64 * 3 / 8) = 280 bytes
    layout, tensors = encode_tensor("w", weight, 1, 8)
    assert layout["encoding"] == "nm"
    positions = unpack_bits(tensors["w:indices"], 3, 64).view(8, 8)
    assert positions[3, 1] == 0  # the empty group stores its lowest position, holding +0.0
    assert (positions.flatten()[torch.arange(64) != 25] == 5).all()
    assert tensors["w:values"][3, 1] == 0.0
    assert torch.equal(decode_tensor("w", layout, tensors), weight)


def test_encoding_choice_follows_the_byte_counts():
    dense = torch.arange(1.0, 17.0).view(2, 8)
    assert encode_tensor("w", dense, 2, 4)[0]["encoding"] == "dense"  # 4 nonzeros per group: not 2:4
    one_in_eight = torch.zeros(8, 64)
    one_in_eight[:, ::8] = 1.5  # 1:8
    # bitmask 64 * 4 + 64 = 320 bytes; nm 64 * 4 + ceil(64 * 3 / 8) = 280 bytes
    layout, tensors = encode_tensor("w", one_in_eight, 1, 8)
    assert layout["encoding"] == "nm" and stored_bytes(tensors) == 280
    layout, tensors = encode_tensor("w", one_in_eight)  # no pattern given: bitmask
    assert layout["encoding"] == "bitmask" and stored_bytes(tensors) == 320
    vector = torch.zeros(64)
    assert encode_tensor("b", vector)[0]["encoding"] == "dense"  # only matrices are sparse-encoded


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("pattern", [(2, 4), (1, 8), (4, 8), None])
def test_round_trip_is_bit_exact(dtype, pattern):
    weight = torch.randn(32, 64)
    if pattern is not None:
        weight = weight * nm_keep_mask(weight.abs(), *pattern)  # pruned negatives become -0.0
    else:
        weight = weight * (weight.abs() > 0.7)
    weight = weight.to(dtype)
    weight[0, 1] = float("nan")  # NaN is nonzero and must survive too
    weight[1, :4] = torch.tensor([-0.0, 0.0, -0.0, 0.0], dtype=dtype)
    n, m = pattern if pattern is not None else (None, None)
    layout, tensors = encode_tensor("w", weight, n, m)
    decoded = decode_tensor("w", layout, tensors)
    assert decoded.dtype == dtype and torch.equal(bits(decoded), bits(weight))


def test_negative_zeros_need_the_sign_mask_only_when_present():
    weight = torch.randn(16, 32)
    keep_mask = nm_keep_mask(weight.abs(), 2, 4)
    signed = weight * keep_mask  # -0.0 where a negative weight was pruned
    clean = weight.masked_fill(~keep_mask, 0.0)  # +0.0 everywhere
    layout, tensors = encode_tensor("w", signed, 2, 4)
    assert layout["zero_signs"] is True and torch.equal(bits(decode_tensor("w", layout, tensors)), bits(signed))
    layout, tensors = encode_tensor("w", clean, 2, 4)
    assert "zero_signs" not in layout and "w:zero_signs" not in tensors


def test_conv1d_layout_groups_along_the_first_dimension():
    weight_out_in = torch.randn(8, 16)
    weight_out_in = weight_out_in * nm_keep_mask(weight_out_in.abs(), 2, 4)
    stored = weight_out_in.t().contiguous()  # (in, out), as GPT-2's Conv1D stores it
    layout, tensors = encode_tensor("w", stored, 2, 4, transposed=True)
    assert layout["encoding"] == "nm" and layout["transposed"] is True
    assert tensors["w:values"].shape == (8, 8)  # (out, in / 4 * 2)
    assert torch.equal(bits(decode_tensor("w", layout, tensors)), bits(stored))
    # read along the stored rows (the output dimension) the groups are not 2:4: only the bitmask applies
    assert encode_tensor("w", stored, 2, 4)[0]["encoding"] == "bitmask"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_four_modules_take_at_most_0_6_of_their_dense_bytes(dtype):
    weight = torch.randn(256, 512)
    weight = (weight * nm_keep_mask(weight.abs(), 2, 4)).to(dtype)
    _, tensors = encode_tensor("w", weight, 2, 4)
    ratio = stored_bytes(tensors) / (weight.numel() * weight.element_size())
    # float32: (2 + 0.125 + 0.0625 zero signs) / 4 = 0.546875; bfloat16: (1 + 0.125 + 0.0625) / 2 = 0.59375
    assert ratio == {torch.float32: 0.546875, torch.bfloat16: 0.59375}[dtype]
    assert ratio <= 0.6


def test_decode_rejects_inconsistent_tensors():
    weight = torch.tensor([[0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0, 8.0]])
    layout, tensors = encode_tensor("w", weight, 2, 4)
    with pytest.raises(CompactFormatError, match="no tensor 'w:indices'"):
        decode_tensor("w", layout, {"w:values": tensors["w:values"]})
    with pytest.raises(CompactFormatError, match="values stored"):
        decode_tensor("w", layout, {**tensors, "w:values": torch.zeros(1, 3)})
    with pytest.raises(CompactFormatError, match="strictly increasing"):
        decode_tensor("w", layout, {**tensors, "w:indices": torch.tensor([0b10100011], dtype=torch.uint8)})
    with pytest.raises(CompactFormatError, match="is torch.float16"):
        decode_tensor("w", layout, {**tensors, "w:values": tensors["w:values"].half()})
    layout, tensors = encode_tensor("w", weight)
    with pytest.raises(CompactFormatError, match="the bitmask marks 4 entries but 3 values"):
        decode_tensor("w", layout, {**tensors, "w:values": tensors["w:values"][:3]})
    with pytest.raises(CompactFormatError, match="unknown encoding"):
        decode_tensor("w", {**layout, "encoding": "zstd"}, tensors)


# --- files -----------------------------------------------------------------------------------------------------


def test_compact_file_round_trip_and_header(tmp_path):
    weight = torch.randn(8, 16)
    state_dict = {"a.weight": weight * nm_keep_mask(weight.abs(), 2, 4), "a.bias": torch.randn(8)}
    layout = save_compact(state_dict, tmp_path / "c.safetensors", {"a.weight": (2, 4, False)})
    assert layout["a.weight"]["encoding"] == "nm" and layout["a.bias"]["encoding"] == "dense"
    loaded = load_compact(tmp_path / "c.safetensors")
    assert loaded.keys() == state_dict.keys()
    assert all(torch.equal(bits(loaded[k]), bits(state_dict[k])) for k in state_dict)
    save_file({"x": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CompactFormatError, match="not a compact file"):
        load_compact(tmp_path / "plain.safetensors")


def test_truncated_compact_file_is_a_clear_error(tmp_path):
    save_compact({"a": torch.randn(64, 64)}, tmp_path / "c.safetensors")
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "c.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CompactFormatError, match="corrupt or truncated"):
        load_compact(tmp_path / "c.safetensors")


# --- checkpoint folders ----------------------------------------------------------------------------------------


@pytest.fixture
def pruned_llama(tiny_model):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    return model, config, report


def test_compact_checkpoint_loads_bit_exact_and_is_smaller(pruned_llama, tmp_path):
    model, config, report = pruned_llama
    dense = hfprune.save_pruned(model, tmp_path / "dense", config, report)
    compact = hfprune.save_pruned(model, tmp_path / "compact", config, report, format="compact")
    assert sorted(os.listdir(compact)) == [
        COMPACT_NOTE_NAME,
        "README.md",
        "config.json",
        "generation_config.json",
        COMPACT_WEIGHTS_NAME,
        "masks",
        "pruning_config.json",
    ]
    loaded = hfprune.load_pretrained(compact)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    ids = torch.randint(0, 128, (2, 16))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # the pruned modules' tensors in the compact file against their dense bytes
    stored = load_file(os.path.join(compact, COMPACT_WEIGHTS_NAME))
    for name in report.modules:
        parts = [t for key, t in stored.items() if key.startswith(f"{name}.weight:")]
        dense_bytes = model.get_submodule(name).weight.numel() * 4
        assert sum(t.numel() * t.element_size() for t in parts) <= 0.6 * dense_bytes, name
    dense_size = os.path.getsize(os.path.join(dense, "model.safetensors"))
    assert os.path.getsize(os.path.join(compact, COMPACT_WEIGHTS_NAME)) < dense_size


def test_plain_transformers_on_a_compact_folder_fails_with_directions(pruned_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, config, report = pruned_llama
    path = hfprune.save_pruned(model, tmp_path / "compact", config, report, format="compact")
    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(path)
    note = read_text(os.path.join(path, COMPACT_NOTE_NAME))
    assert "hfprune.load_pretrained" in note and COMPACT_WEIGHTS_NAME in note
    assert "hfprune.load_pretrained" in read_text(os.path.join(path, "README.md"))


def test_corrupt_compact_file_is_refused_before_anything_loads(pruned_llama, tmp_path):
    model, config, report = pruned_llama
    path = hfprune.save_pruned(model, tmp_path / "compact", config, report, format="compact")
    file = os.path.join(path, COMPACT_WEIGHTS_NAME)
    with open(file, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the tensor data: still a valid safetensors file
    with open(file, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ValueError, match=f"{COMPACT_WEIGHTS_NAME}: sha256 does not match"):
        hfprune.load_pretrained(path)
    assert not hfprune.verify(path).ok
    with open(file, "wb") as f:
        f.write(bytes(data[:1000]))  # truncated
    with pytest.raises(ValueError, match="bytes, .* recorded \\(truncated or replaced\\)"):
        hfprune.load_pretrained(path)
    result = hfprune.verify(path)
    assert COMPACT_WEIGHTS_NAME in result.files and "truncated" in result.files[COMPACT_WEIGHTS_NAME]


def test_compact_gpt2_conv1d_round_trip(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False)
    path = hfprune.save_pruned(model, tmp_path / "gpt2", config, report, format="compact")
    record = json.loads(read_text(os.path.join(path, "pruning_config.json")))
    assert record["modules"]["transformer.h.0.attn.c_attn"]["transposed"] is True
    loaded = hfprune.load_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(bits(a), bits(b)), name
    with safe_open(os.path.join(path, COMPACT_WEIGHTS_NAME), "pt") as f:
        layout = json.loads(f.metadata()["hfprune_compact"])["tensors"]
    assert layout["transformer.h.0.attn.c_attn.weight"]["encoding"] == "nm"


def test_compact_round_trip_on_every_architecture(arch, tiny_model, tmp_path):
    model = tiny_model(arch)
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False)
    path = hfprune.save_pruned(model, tmp_path / arch, config, report, format="compact")
    loaded = hfprune.load_pretrained(path)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(bits(actual[name]), bits(tensor)), name
