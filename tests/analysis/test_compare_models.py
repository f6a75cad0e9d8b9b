r"""Several pruned models against one dense model: token geometry, corrupted input, method similarity, fragility."""

import copy
import importlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hfprune import PruningConfig, prune
from hfprune.analysis import compare, compare_models
from hfprune.analysis.corruptions import char_drop, token_dropout
from hfprune.analysis.damage import average_ranks, fragility, jaccard, method_similarity, pearson, spearman
from hfprune.analysis.geometry import TokenGeometry
from hfprune.analysis.model_pass import TokenOutputs, run_models
from hfprune.analysis.robustness import corrupted_windows, top1_kept
from hfprune.evaluation import evaluation_windows


SEQ_LEN = 32
LN2 = math.log(2)


def direct(model, inputs, targets):
    r"""Per-token NLL, angle, norm, margin and top-1 computed the long way in float64 from the model's own outputs."""
    with torch.no_grad():
        outputs = model(inputs, output_hidden_states=True)
        row = model.get_output_embeddings().weight.double()[targets[:, 1:]]  # (w, s-1, d)
    logits = outputs.logits[:, :-1].double()  # (w, s-1, vocab)
    y = targets[:, 1:]
    h = outputs.hidden_states[-1][:, :-1].double()  # (w, s-1, d)
    cosine = (h * row).sum(-1) / (h.norm(dim=-1) * row.norm(dim=-1))
    target_logit = logits.gather(-1, y[..., None])[..., 0]
    other = logits.scatter(-1, y[..., None], -math.inf).amax(-1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none").view(y.shape)
    return {
        "nll": nll,
        "angle": torch.rad2deg(torch.acos(cosine)),
        "norm": h.norm(dim=-1),
        "margin": target_logit - other,
        "top1": logits.argmax(-1),
    }


@pytest.fixture
def models(tiny_model):
    dense = tiny_model("llama")
    pruned = {}
    for method, sparsity in (("magnitude", "0.6"), ("magnitude", "2:4")):
        model = copy.deepcopy(dense)
        model.pruning_record = prune(model, PruningConfig(method=method, sparsity=sparsity), progress=False)
        pruned[f"{method} {sparsity}"] = model
    return dense, pruned


@pytest.fixture
def windows(char_tokenizer, calibration_text):
    return evaluation_windows(calibration_text, char_tokenizer, SEQ_LEN)  # (windows, SEQ_LEN)


def test_token_geometry_and_losses_match_a_direct_computation(models, windows):
    dense, pruned = models
    a = pruned["magnitude 0.6"]
    outputs = run_models([dense, a], windows, windows, batch_size=3)
    for model, out in zip((dense, a), outputs, strict=True):
        expected = direct(model, windows, windows)
        torch.testing.assert_close(out.nll.double(), expected["nll"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.geometry.angle.double(), expected["angle"], atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(out.geometry.norm.double(), expected["norm"], atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(out.geometry.margin.double(), expected["margin"], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.geometry.top1, expected["top1"])
        assert torch.equal(out.geometry.target, windows[:, 1:])

    # The report's summaries of the same tokens.
    report = compare(dense, a, data=windows.reshape(-1), seq_len=SEQ_LEN, batch_size=3)
    d, p = direct(dense, windows, windows), direct(a, windows, windows)
    g = report.geometry
    assert g.dense.angle.quantiles["0.5"] == pytest.approx(float(np.median(d["angle"].numpy())), abs=2e-3)
    assert g.pruned.norm.quantiles["0.5"] == pytest.approx(float(np.median(p["norm"].numpy())), rel=1e-5)
    assert g.pruned.margin.quantiles["0.95"] == pytest.approx(float(np.quantile(p["margin"].numpy(), 0.95)), abs=1e-4)
    y = windows[:, 1:]
    right_d, right_p = d["top1"] == y, p["top1"] == y
    assert g.dense.top1_accuracy == pytest.approx(float(right_d.double().mean()))
    assert g.flips == pytest.approx(float((d["top1"] != p["top1"]).double().mean()))
    assert g.flips > 0
    assert g.correct_to_wrong == pytest.approx(float((right_d & ~right_p).double().mean()))
    assert g.wrong_to_correct == pytest.approx(float((~right_d & right_p).double().mean()))
    assert g.mean_angle_change == pytest.approx(float((p["angle"] - d["angle"]).mean()), abs=1e-4)
    assert g.median_norm_ratio == pytest.approx(float(np.median((p["norm"] / d["norm"]).numpy())), rel=1e-5)
    assert g.mean_margin_change == pytest.approx(float((p["margin"] - d["margin"]).mean()), abs=1e-4)
    assert sum(g.dense.angle.histogram_counts) == sum(g.margin_change.histogram_counts) == y.numel()


def test_several_models_are_each_reported_as_if_compared_alone(models, windows):
    dense, pruned = models
    report = compare_models(dense, pruned, data=windows.reshape(-1), seq_len=SEQ_LEN, batch_size=4)
    assert report.names == ["magnitude 0.6", "magnitude 2:4"]
    for name, model in pruned.items():
        alone = compare(dense, model, data=windows.reshape(-1), seq_len=SEQ_LEN, batch_size=4, name=name)
        together = report.models[report.names.index(name)]
        assert together.name == name
        assert together.pruned_perplexity == pytest.approx(alone.pruned_perplexity, rel=1e-6)
        assert together.window_increases == pytest.approx(alone.window_increases, abs=1e-6)
        assert [b.cka for b in together.blocks] == pytest.approx([b.cka for b in alone.blocks], abs=1e-6)
        assert together.geometry.flips == alone.geometry.flips
        assert [m.index for m in together.most_damaged] == [m.index for m in alone.most_damaged]
        assert {layer.pattern for layer in together.layers if layer.block is not None} == {name.split()[1]}
    # Shared bins, so that the plots overlay.
    edges = [m.loss_increase.histogram_edges for m in report.models]
    assert edges[0] == edges[1]
    assert report.models[0].pruned_perplexity != report.models[1].pruned_perplexity
    # The similarity matrices are the pure functions on the models' per-token increases.
    increases = []
    for model in pruned.values():
        nll = run_models([dense, model], windows, windows, batch_size=8)
        increases.append((nll[1].nll.double() - nll[0].nll.double()).reshape(-1))
    assert report.similarity.pearson[0][1] == pytest.approx(pearson(*increases), abs=1e-6)
    assert report.similarity.spearman[1][0] == pytest.approx(spearman(*increases), abs=1e-6)
    assert report.similarity.jaccard[0][1] == jaccard(increases[0] >= LN2, increases[1] >= LN2)
    assert report.similarity.pearson[0][0] == pytest.approx(1.0)
    # Layers know their block and kind; lm_head is outside the blocks.
    layers = {layer.name: layer for layer in report.models[0].layers}
    assert (layers["model.layers.1.mlp.down_proj"].block, layers["model.layers.1.mlp.down_proj"].kind) == (
        1,
        "mlp.down_proj",
    )
    assert layers["lm_head"].block is None and layers["lm_head"].kind is None
    # JSON: every model under "models"; with one model its fields are also at the top level, as before.
    saved = report.to_dict()
    assert [m["name"] for m in saved["models"]] == report.names and "pruned_perplexity" not in saved
    single = compare_models(dense, [pruned["magnitude 0.6"]], data=windows.reshape(-1), seq_len=SEQ_LEN).to_dict()
    assert single["pruned_perplexity"] == single["models"][0]["pruned_perplexity"]
    assert single["name"] == "pruned" and single["similarity"] is None
    assert {"layers", "blocks", "loss_increase", "window_increases", "most_damaged", "geometry"} <= set(single)


def test_similarity_functions_on_hand_computed_values():
    x, y = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 2.0, 4.0])
    assert spearman(x, y) == pytest.approx(0.8)  # 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15)
    assert pearson(x, y) == pytest.approx(0.8)  # (2.25 - 0.25 - 0.25 + 2.25) / (sqrt(5) sqrt(5))
    assert pearson(x, torch.ones(4)) is None
    assert average_ranks(torch.tensor([0.5, 0.1, 0.5, 0.3])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(torch.tensor([0.0, 0.0, 1.0, 2.0]), torch.tensor([5.0, 6.0, 7.0, 8.0])) == pytest.approx(
        pearson(torch.tensor([1.5, 1.5, 3.0, 4.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    )
    assert jaccard(torch.tensor([True, True, False]), torch.tensor([True, False, True])) == pytest.approx(1 / 3)
    assert jaccard(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)) is None
    similarity = method_similarity(["a", "b"], [x, y], threshold=2.5)
    assert similarity.jaccard == [[1.0, 1 / 3], [1 / 3, 1.0]]  # damaged: a {3, 4}, b {3 at index 1, 4}


def test_fragile_and_robust_tokens_and_windows_by_hand():
    # Two windows of 13 tokens: targets alternate 7, 9. Window 0: both models damage the targets at indices 0, 2, 4
    # (all 7s), model a also index 6; window 1: small increases everywhere.
    ids = torch.tensor([[1] + [7, 9] * 6, [2] + [7, 9] * 6])
    increase_a = torch.tensor([[1.0, 0, 1.2, 0, 0.9, 0, 2.0, 0, 0, 0, 0, 0], [0.1] * 12])
    increase_b = torch.tensor([[0.8, 0, 1.5, 0, 0.7, 0, 0, 0, 0, 0, 0, 0], [0.3] * 12])
    margin = torch.arange(24.0).view(2, 12)
    top1 = ids[:, 1:].clone()
    top1[0, 0] = 3  # the dense model is wrong on one fragile token
    dense_geometry = TokenGeometry(10 * margin, torch.ones(2, 12), margin, top1, ids[:, 1:])
    dense = TokenOutputs(torch.ones(2, 12), dense_geometry)
    pruned = [TokenOutputs(1.0 + increase, dense_geometry) for increase in (increase_a, increase_b)]
    f = fragility(
        ["a", "b"], dense, pruned, ids, None, LN2, num_tokens_shown=5, num_windows_shown=2, max_text_chars=80
    )
    assert f.damaged_fraction == pytest.approx({"a": 4 / 24, "b": 3 / 24})
    assert f.fragile_fraction == pytest.approx(3 / 24)
    assert f.independent_fraction == pytest.approx(4 / 24 * 3 / 24)
    assert f.robust_fraction == pytest.approx(20 / 24)
    # Ranked by the smallest increase over the models: index 2 (1.2), 0 (0.8), 4 (0.7); positions are index + 1.
    assert [(t.window, t.position) for t in f.tokens] == [(0, 3), (0, 1), (0, 5)]
    assert f.tokens[0].increases == pytest.approx({"a": 1.2, "b": 1.5})
    assert (f.tokens[0].context, f.tokens[0].target) == ("1 7 9", "7")  # no tokenizer: the ids
    groups = {g.group: g for g in f.geometry}
    assert groups["fragile"].tokens == 3 and groups["fragile"].margin == 2.0 and groups["fragile"].angle == 20.0
    assert groups["fragile"].dense_top1_accuracy == pytest.approx(2 / 3)
    assert groups["damaged by some"].tokens == 1 and groups["robust"].tokens == 20 and groups["all"].tokens == 24
    # Vocabulary entries: 7 is fragile in 3 of its 12 occurrences; 9 is never damaged.
    assert [(e.token_id, e.count) for e in f.fragile_types] == [(7, 12)]
    assert f.fragile_types[0].fragile_fraction == 0.25
    assert f.fragile_types[0].damaged_fraction == pytest.approx({"a": 4 / 12, "b": 3 / 12})
    assert [e.token_id for e in f.robust_types] == [9, 7]
    # Windows: fragile by the smallest mean increase (w0: 0.25, w1: 0.1), robust by the largest (w1: 0.3, w0: 0.425).
    assert [w.index for w in f.fragile_windows] == [0, 1] and [w.index for w in f.robust_windows] == [1, 0]
    assert f.fragile_windows[0].increases == pytest.approx({"a": 5.1 / 12, "b": 3.0 / 12})


def test_corruptions_are_reproducible_and_token_dropout_keeps_the_targets(char_tokenizer, calibration_text, windows):
    text = "\n\n".join(calibration_text)
    inputs, targets = corrupted_windows("token_dropout", None, windows, char_tokenizer, 0.3, 5, None)
    assert targets is windows
    assert torch.equal(inputs, token_dropout(windows, 0.3, 5, fill_id=char_tokenizer.unk_token_id))
    assert 0.2 < float((inputs != windows).double().mean()) < 0.4
    again, _ = corrupted_windows("token_dropout", None, windows, char_tokenizer, 0.3, 5, None)
    other, _ = corrupted_windows("token_dropout", None, windows, char_tokenizer, 0.3, 6, None)
    assert torch.equal(inputs, again) and not torch.equal(inputs, other)
    inputs, targets = corrupted_windows("char_drop", text, windows, char_tokenizer, 0.2, 1, 3)
    assert inputs is targets and inputs.shape == (3, SEQ_LEN)
    assert torch.equal(inputs, evaluation_windows([char_drop(text, 0.2, 1)], char_tokenizer, SEQ_LEN, 3))


def test_corrupted_input_results_match_a_direct_computation(models, char_tokenizer, calibration_text, windows):
    dense, pruned = models
    a = pruned["magnitude 2:4"]
    options = {"seq_len": SEQ_LEN, "corruptions": ["token_dropout", "case_change"], "severity": 0.3}
    report = compare(dense, a, char_tokenizer, calibration_text, corruption_seed=7, **options)
    assert [r.name for r in report.corruptions] == ["token_dropout", "case_change"]
    noisy = token_dropout(windows, 0.3, 7, fill_id=0)
    d_clean, d, p = direct(dense, windows, windows), direct(dense, noisy, windows), direct(a, noisy, windows)
    p_clean = direct(a, windows, windows)
    result = report.corruptions[0]
    assert result.num_windows == windows.shape[0] and result.num_tokens == windows[:, 1:].numel()
    assert math.log(result.dense_perplexity) == pytest.approx(float(d["nll"].mean()), abs=1e-5)
    assert math.log(result.pruned_perplexity) == pytest.approx(float(p["nll"].mean()), abs=1e-5)
    assert result.dense_nll_increase == pytest.approx(float(d["nll"].mean() - d_clean["nll"].mean()), abs=1e-5)
    extra = (p["nll"].mean() - p_clean["nll"].mean()) - (d["nll"].mean() - d_clean["nll"].mean())
    assert result.extra_nll_increase == pytest.approx(float(extra), abs=1e-5)
    assert result.flips == pytest.approx(float((p["top1"] != d["top1"]).double().mean()))
    assert result.pruned_top1_accuracy == pytest.approx(float((p["top1"] == windows[:, 1:]).double().mean()))
    assert report.corruptions[1].dense_nll_increase > 0  # case changes cost the dense model too
    # The same seed gives the same numbers; another seed other ones.
    again = compare(dense, a, char_tokenizer, calibration_text, corruption_seed=7, **options)
    assert [r.extra_nll_increase for r in again.corruptions] == [r.extra_nll_increase for r in report.corruptions]
    other = compare(dense, a, char_tokenizer, calibration_text, corruption_seed=8, **options)
    assert other.corruptions[1].pruned_perplexity != report.corruptions[1].pruned_perplexity


def test_top1_kept_by_hand():
    def model(name, clean, corrupted):
        geometry = SimpleNamespace(
            dense=SimpleNamespace(top1_accuracy=0.5), pruned=SimpleNamespace(top1_accuracy=clean)
        )
        results = [SimpleNamespace(dense_top1_accuracy=d, pruned_top1_accuracy=p) for d, p in corrupted]
        return SimpleNamespace(name=name, geometry=geometry, corruptions=results)

    report = SimpleNamespace(models=[model("a", 0.4, [(0.25, 0.3), (0.5, 0.1)]), model("b", 0.0, [(0.25, 0.0)] * 2)])
    kept = top1_kept(report)
    assert kept["dense"] == [0.5, 1.0] and kept["a"] == pytest.approx([0.75, 0.25]) and kept["b"] == [None, None]


def test_report_files_name_every_model(models, char_tokenizer, calibration_text, tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    dense, pruned = models
    out = tmp_path / "report"
    report = compare_models(
        dense, pruned, char_tokenizer, calibration_text, seq_len=SEQ_LEN, output_dir=out, corruptions=["char_swap"]
    )
    plots = ["blocks.png", "corruptions.png", "geometry.png", "layers.png", "loss_increase.png", "similarity.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*plots, "report.json", "report.md"])
    for name in plots:
        with Image.open(out / name) as image:
            # Line and bar plots get a 256-colour palette; heatmaps keep every colour of their scale.
            assert image.mode == ("RGB" if name in ("layers.png", "similarity.png") else "P"), name
            image.verify()
    assert report.files["similarity"] == str(out / "similarity.png")
    markdown = (out / "report.md").read_text()
    for needle in (
        "# Dense vs 2 pruned models",
        "| magnitude 0.6 | ",
        "| magnitude 2:4 | ",
        "## Which methods damage the same tokens",
        "| `char_swap` | dense |",
        "| top-1 accuracy | top-1 kept | flips (clean -> noisy) |",
        "## Fragile and robust tokens",
        "![method similarity matrices](similarity.png)",
        "| block 0 | ",
    ):
        assert needle in markdown, needle
    extra = {m.name: m.corruptions[0].extra_nll_increase for m in report.models}
    worst = max(extra, key=extra.get)
    verdict = "By loss, the most brittle is" if extra[worst] > 0 else "By loss, no pruned model loses more"
    assert verdict in markdown and f"**{worst}** (" in markdown and f"{extra[worst]:+.4f} nats" in markdown
    saved = json.loads((out / "report.json").read_text())
    assert saved["models"][1]["corruptions"][0]["name"] == "char_swap"
    assert saved["fragility"]["damage_threshold"] == pytest.approx(LN2)


def test_bad_input_is_refused_before_anything_runs(models, windows):
    dense, pruned = models
    a = pruned["magnitude 0.6"]
    ids = windows.reshape(-1)
    cases = [
        ({"pruned_models": {"x": a, "dense": a}}, "not 'dense'"),
        ({"pruned_models": [a], "records": [None, None]}, "2 `records` for 1"),
        ({"pruned_models": []}, "empty"),
        ({"corruptions": ["typo"]}, "unknown corruption 'typo'"),
        ({"corruptions": ["char_swap"]}, "need evaluation text, not token ids"),
        ({"corruptions": ["token_dropout"], "severity": 0.0}, "`severity`=0.0 must be in"),
        ({"corruptions": ["token_dropout", "token_dropout"]}, "twice"),
        ({"damage_threshold": 0.0}, "`damage_threshold`"),
        ({"max_windows": 0}, "`max_windows`=0"),
        ({"batch_size": 0}, "`batch_size`=0"),
    ]
    for options, message in cases:
        kwargs = {"pruned_models": [a], "data": ids, "seq_len": SEQ_LEN, **options}
        with pytest.raises(ValueError, match=message):
            compare_models(dense, **kwargs)
    with pytest.raises(TypeError, match="use `compare` for one model"):
        compare_models(dense, a, data=ids, seq_len=SEQ_LEN)


def test_a_corruption_that_leaves_no_window_fails_before_any_model_runs(models, char_tokenizer, monkeypatch):
    module = importlib.import_module("hfprune.analysis.compare")  # the attribute `compare` is the function
    dense, pruned = models

    def fail(*args, **kwargs):
        raise AssertionError("a model ran")

    monkeypatch.setattr(module, "run_models", fail)
    text = ["abcde " * 20]  # 120 characters: 3 windows; without its letters, 20 spaces: not one
    with pytest.raises(ValueError, match="fewer than one window of 32"):
        compare_models(dense, pruned, char_tokenizer, text, seq_len=SEQ_LEN, corruptions=["char_drop"], severity=1.0)
