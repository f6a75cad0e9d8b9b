import copy
import json
import math
import os
import re

import pytest
import torch
import torch.nn.functional as F

from hfprune import PruningConfig, perplexity, prune
from hfprune.analysis import compare, compare_models, linear_cka, token_cosine_similarity


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEQ_LEN = 32


def window_losses(model, ids: torch.Tensor) -> torch.Tensor:
    r"""Per-token NLL `(windows, SEQ_LEN - 1)` of every window, one window at a time, in float64."""
    windows = ids[: ids.numel() // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN)
    out = []
    with torch.no_grad():
        for window in windows:
            logits = model(input_ids=window[None]).logits[0].double()  # (SEQ_LEN, vocab)
            out.append(F.cross_entropy(logits[:-1], window[1:], reduction="none"))
    return torch.stack(out)


@pytest.fixture
def text_ids(char_tokenizer, calibration_text):
    return torch.tensor(char_tokenizer("\n\n".join(calibration_text))["input_ids"])


def test_identical_models_give_similarity_one_and_no_loss_change(tiny_model, char_tokenizer, calibration_text):
    dense = tiny_model("llama")
    report = compare(dense, copy.deepcopy(dense), char_tokenizer, calibration_text, seq_len=SEQ_LEN, batch_size=4)
    assert report.num_windows == len(char_tokenizer("\n\n".join(calibration_text))["input_ids"]) // SEQ_LEN
    assert report.num_tokens == report.num_windows * (SEQ_LEN - 1)
    assert [b.name for b in report.blocks] == ["block 0", "block 1", "final hidden state"]
    for block in report.blocks:
        assert block.cosine == pytest.approx(1.0, abs=1e-6)
        assert block.cka == pytest.approx(1.0, abs=1e-6)
    assert report.loss_increase.mean == 0.0
    assert report.loss_increase.fraction_increased == 0.0
    assert set(report.loss_increase.quantiles.values()) == {0.0}
    assert sum(report.loss_increase.histogram_counts) == report.num_tokens
    assert report.window_increases == [0.0] * report.num_windows
    assert report.dense_perplexity == report.pruned_perplexity
    # The same protocol as hfprune.perplexity.
    expected = perplexity(dense, char_tokenizer, calibration_text, seq_len=SEQ_LEN, progress=False)
    assert report.dense_perplexity == pytest.approx(expected, rel=1e-6)
    assert all(layer.sparsity == 0.0 and layer.error is None for layer in report.layers)


def test_pruned_model_numbers_match_a_recomputation(tiny_model, char_tokenizer, calibration_text, text_ids):
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    config = PruningConfig(method="magnitude", sparsity="0.6")
    pruning_report = prune(pruned, config, progress=False)
    report = compare(
        dense,
        pruned,
        char_tokenizer,
        calibration_text,
        seq_len=SEQ_LEN,
        batch_size=3,
        cka_tokens=10_000,
        record=pruning_report,
    )
    # Per-token loss increases, window by window, recomputed independently.
    increase = window_losses(pruned, text_ids) - window_losses(dense, text_ids)  # (windows, SEQ_LEN - 1)
    assert report.window_increases == pytest.approx(increase.mean(1).tolist(), abs=1e-5)
    assert report.most_damaged[0].index == int(increase.mean(1).argmax())
    assert report.least_damaged[0].index == int(increase.mean(1).argmin())
    ranked = sorted(report.window_increases, reverse=True)
    assert [w.mean_increase for w in report.most_damaged] == pytest.approx(ranked[:3])
    assert [w.mean_increase for w in report.least_damaged] == pytest.approx(ranked[::-1][:3])
    assert report.loss_increase.mean == pytest.approx(float(increase.mean()), abs=1e-5)
    assert report.loss_increase.quantiles["0.5"] == pytest.approx(float(increase.median()), abs=1e-4)
    assert report.loss_increase.fraction_increased == pytest.approx(float((increase > 0).double().mean()), abs=0.01)
    # The shown text is the decoded window, whitespace collapsed.
    worst = report.most_damaged[0].index
    decoded = char_tokenizer.decode(text_ids[worst * SEQ_LEN : (worst + 1) * SEQ_LEN].tolist())
    assert report.most_damaged[0].text == re.sub(r"\s+", " ", decoded).strip()
    # Perplexities are hfprune.perplexity's.
    assert report.dense_perplexity == pytest.approx(
        perplexity(dense, data=text_ids, seq_len=SEQ_LEN, progress=False), rel=1e-6
    )
    assert report.pruned_perplexity == pytest.approx(
        perplexity(pruned, data=text_ids, seq_len=SEQ_LEN, progress=False), rel=1e-6
    )
    assert report.pruned_perplexity != report.dense_perplexity
    # The final hidden state's cosine and CKA (every token in the CKA sample), recomputed.
    windows = text_ids[: report.num_windows * SEQ_LEN].view(-1, SEQ_LEN)
    with torch.no_grad():
        h_dense = dense(input_ids=windows, output_hidden_states=True).hidden_states[-1]
        h_pruned = pruned(input_ids=windows, output_hidden_states=True).hidden_states[-1]
    final = report.blocks[-1]
    assert report.cka_tokens == windows.numel()
    assert final.cosine == pytest.approx(float(token_cosine_similarity(h_dense, h_pruned).mean()), abs=1e-6)
    assert final.cka == pytest.approx(linear_cka(h_dense.reshape(-1, 64), h_pruned.reshape(-1, 64)), abs=1e-6)
    for block in report.blocks:
        assert 0.0 < block.cka < 1.0 - 1e-4 and block.cosine < 1.0 - 1e-4
    # Per-layer sparsity of every Linear (lm_head included, unpruned), with the recorded patterns.
    layers = {layer.name: layer for layer in report.layers}
    assert layers["lm_head"].sparsity == 0.0 and layers["lm_head"].pattern is None
    assert len(layers) == 2 * 7 + 1
    for name, module_report in pruning_report.modules.items():
        assert layers[name].sparsity == pytest.approx(module_report.sparsity)
        assert layers[name].pattern == "0.6"


def test_cka_uses_the_requested_token_sample(tiny_model, text_ids):
    dense = tiny_model("gpt2")
    pruned = copy.deepcopy(dense)
    prune(pruned, PruningConfig(method="magnitude", sparsity="2:4"), progress=False)
    report = compare(dense, pruned, data=text_ids, seq_len=SEQ_LEN, cka_tokens=40, num_windows_shown=2)
    assert report.cka_tokens == 40
    assert len(report.most_damaged) == 2 and len(report.least_damaged) == 2
    assert report.most_damaged[0].text.split(" ")[:3] == [
        str(i) for i in text_ids[report.most_damaged[0].index * SEQ_LEN :][:3].tolist()
    ]
    layers = {layer.name: layer for layer in report.layers}
    assert layers["transformer.h.0.attn.c_attn"].sparsity == 0.5  # Conv1D, read as (out, in)


def test_recorded_reconstruction_errors_are_reported(tiny_model, calibration_ids, text_ids):
    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    config = PruningConfig(method="sparsegpt", sparsity="0.5", num_calibration_samples=8, calibration_seq_len=32)
    pruning_report = prune(pruned, config, calibration_ids, progress=False)
    errors = {name: m.error for name, m in pruning_report.modules.items()}
    assert all(e is not None and e > 0 for e in errors.values())
    from_report = compare(dense, pruned, data=text_ids, seq_len=SEQ_LEN, record=pruning_report)
    record = {"modules": {name: {"pattern": "0.5", "error": e} for name, e in errors.items()}}
    pruned.pruning_record = record  # what load_pretrained attaches
    from_record = compare(dense, pruned, data=text_ids, seq_len=SEQ_LEN)
    for report in (from_report, from_record):
        got = {layer.name: layer.error for layer in report.layers if layer.error is not None}
        assert got == pytest.approx(errors)


def test_output_folder_has_the_report_and_valid_pngs(tiny_model, char_tokenizer, calibration_text, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    dense = tiny_model("llama")
    pruned = copy.deepcopy(dense)
    config = PruningConfig(method="magnitude", sparsity="0.5")
    pruning_report = prune(pruned, config, progress=False)
    out = tmp_path / "report"
    report = compare(
        dense, pruned, char_tokenizer, calibration_text, seq_len=SEQ_LEN, output_dir=out, record=pruning_report
    )
    names = sorted(p.name for p in out.iterdir())
    plots = ["blocks.png", "geometry.png", "layers.png", "loss_increase.png"]  # one pruned model: no similarity.png
    assert names == [*plots, "report.json", "report.md"]  # no temporaries
    for name in plots:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_SIGNATURE
        with Image.open(out / name) as image:
            image.verify()
            assert image.size[0] > 100 and image.size[1] > 100
    saved = json.loads((out / "report.json").read_text())
    assert sorted(saved["files"].values()) == names  # named relative to the report's folder, which can move
    assert report.files["json"] == os.path.abspath(out / "report.json")  # the API returns absolute paths
    assert saved["dense_perplexity"] == pytest.approx(report.dense_perplexity)
    assert saved["pruned_perplexity"] == pytest.approx(report.pruned_perplexity)
    assert [b["cka"] for b in saved["blocks"]] == pytest.approx([b.cka for b in report.blocks])
    assert saved["most_damaged"][0]["index"] == report.most_damaged[0].index
    assert len(saved["layers"]) == len(report.layers)
    markdown = (out / "report.md").read_text()
    for needle in (
        "![per-block similarity](blocks.png)",
        "## Most damaged windows",
        "| block 1 |",
        f"{report.pruned_perplexity:.4f}",
    ):
        assert needle in markdown
    assert report.files["markdown"] == str(out / "report.md")
    # Writing again replaces the files in place.
    compare_models(dense, [pruned], char_tokenizer, calibration_text, seq_len=SEQ_LEN, max_windows=2).save(
        out, plots=False
    )
    assert "blocks.png" not in (out / "report.md").read_text()
    assert json.loads((out / "report.json").read_text())["num_windows"] == 2


def test_compare_rejects_bad_input(tiny_model, text_ids):
    dense = tiny_model("llama")
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ValueError, match="decoder blocks"):
        compare(dense, other, data=text_ids, seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="fewer than one window"):
        compare(dense, dense, data=text_ids[:10], seq_len=SEQ_LEN)
    with pytest.raises(ValueError, match="`data` is required"):
        compare(dense, dense, seq_len=SEQ_LEN)
    assert not math.isnan(compare(dense, dense, data=text_ids, seq_len=SEQ_LEN, max_windows=1).dense_perplexity)
