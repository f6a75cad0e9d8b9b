import math

import pytest
import torch
import torch.nn.functional as F

from hfprune import perplexity, sparsity_report


def reference_perplexity(model, ids: torch.Tensor, seq_len: int) -> float:
    r"""The protocol written out window by window: non-overlapping windows, tail dropped, mean NLL, exp."""
    total_nll, predicted = 0.0, 0
    with torch.no_grad():
        for start in range(0, ids.numel() - seq_len + 1, seq_len):
            window = ids[start : start + seq_len]  # (seq_len,)
            logits = model(input_ids=window[None]).logits[0]  # (seq_len, vocab)
            for position in range(seq_len - 1):  # the next token of every position but the last
                total_nll -= float(F.log_softmax(logits[position].double(), dim=-1)[window[position + 1]])
                predicted += 1
    return math.exp(total_nll / predicted)


def test_perplexity_matches_the_protocol(tiny_model):
    model = tiny_model("llama")
    ids = torch.randint(0, 128, (5 * 16 + 7,))  # 5 windows of 16 and a tail of 7 that is dropped
    expected = reference_perplexity(model, ids, 16)
    # Batches of 2 over 5 windows leave a last batch of 1: the result must not depend on batching.
    for batch_size in (1, 2, 8):
        assert perplexity(model, data=ids, seq_len=16, batch_size=batch_size, progress=False) == pytest.approx(
            expected, rel=1e-5
        )
    # A random model is close to uniform over the vocabulary: perplexity near 128, and never below 1.
    assert 64 < expected < 256


def test_perplexity_max_windows_and_2d_ids(tiny_model):
    model = tiny_model("gpt2")
    ids = torch.randint(0, 128, (4, 32))  # a 2D tensor is flattened: 8 windows of 16
    first_three = reference_perplexity(model, ids.reshape(-1)[: 3 * 16], 16)
    assert perplexity(model, data=ids, seq_len=16, max_windows=3, progress=False) == pytest.approx(
        first_three, rel=1e-5
    )
    assert perplexity(model, data=ids, seq_len=16, progress=False) == pytest.approx(
        reference_perplexity(model, ids.reshape(-1), 16), rel=1e-5
    )


def test_perplexity_of_text_and_default_window(tiny_model, char_tokenizer, calibration_text):
    model = tiny_model("llama")
    model.train()
    ids = torch.tensor(char_tokenizer("\n\n".join(calibration_text))["input_ids"])
    expected = reference_perplexity(model.eval(), ids, 64)  # default window: the model's 64 positions
    model.train()
    assert perplexity(model, char_tokenizer, calibration_text, progress=False) == pytest.approx(expected, rel=1e-5)
    assert model.training  # the mode is restored


def test_perplexity_falls_when_the_model_knows_the_text(tiny_model):
    # A few optimizer steps on a repeating sequence must make it much less surprising.
    model = tiny_model("llama")
    ids = torch.arange(64).repeat(4) % 128  # 0, 1, ..., 63, 0, 1, ...
    before = perplexity(model, data=ids, seq_len=32, progress=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    windows = ids.view(8, 32)
    for _ in range(20):
        loss = model(input_ids=windows, labels=windows).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = perplexity(model, data=ids, seq_len=32, progress=False)
    assert after < before / 4


def test_windows_that_do_not_fit_raise(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="evaluation data has 15 tokens, fewer than one window of 16"):
        perplexity(model, data=torch.randint(0, 128, (15,)), seq_len=16, progress=False)
    with pytest.raises(ValueError, match="sequence length 65 is beyond the model's 64 positions"):
        perplexity(model, data=torch.randint(0, 128, (200,)), seq_len=65, progress=False)


def test_sparsity_report(tiny_model):
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[0].attn.c_attn.weight[:16] = 0  # (in, out): 16 of 64 input rows
    report = sparsity_report(model)
    assert report["transformer.h.0.attn.c_attn"] == 0.25
    assert report["transformer.h.1.attn.c_attn"] == 0.0
    assert set(report) == {
        f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    } | {"lm_head"}


def test_chunked_upcast_equals_one_cross_entropy(tiny_model, monkeypatch):
    import hfprune.evaluation

    model = tiny_model("llama")
    ids = torch.randint(0, 128, (3, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = float(
        F.cross_entropy(logits[:, :-1].reshape(-1, 128).float(), ids[:, 1:].reshape(-1), reduction="sum")
    )
    monkeypatch.setattr(hfprune.evaluation, "NLL_CHUNK_TOKENS", 7)  # 39 predictions a row: chunks of 7 and a tail
    assert hfprune.evaluation.next_token_nll(logits, ids) == pytest.approx(reference, rel=1e-6)


def test_perplexity_moves_the_model_to_the_device_it_runs_on_and_back(tiny_model, monkeypatch):
    model = tiny_model("llama")
    moves = []
    original_to = model.to

    def spy_to(*args, **kwargs):
        moves.append(torch.device(args[0]))
        return original_to(*args, **kwargs)

    monkeypatch.setattr(model, "to", spy_to)
    ids = torch.randint(0, 128, (64,), generator=torch.Generator().manual_seed(3))
    # "cpu:0" is the same memory as "cpu" but another device name, so it goes through the move and the return
    assert perplexity(model, data=ids, seq_len=32, device="cpu:0", progress=False) == pytest.approx(
        perplexity(model, data=ids, seq_len=32, progress=False)
    )
    assert moves == [torch.device("cpu", 0), torch.device("cpu")]


def test_perplexity_of_a_model_whose_embeddings_are_offloaded_to_disk(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_model("llama").save_pretrained(tmp_path / "dense")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    device_map = {"model.embed_tokens": "disk", "model.layers": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "dense", device_map={**device_map, "lm_head": "disk"}, offload_folder=tmp_path / "offload"
    )
    assert model.model.embed_tokens.weight.device.type == "meta"  # the inputs go where its hook runs it: the CPU
    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    assert perplexity(model, data=ids, progress=False) == pytest.approx(
        perplexity(reference, data=ids, progress=False)
    )
