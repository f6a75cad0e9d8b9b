r"""The model card: Hub metadata and tags, loading instructions, pruning details, sparsity and perplexity tables."""

import os

import pytest
from huggingface_hub import ModelCard

import hfprune
from hfprune import PruningConfig, create_model_card
from hfprune.checkpoints.model_card import card_tags


def record_for(sparsity="2:4", method="sparsegpt", fmt="dense", **fields):
    modules = {
        f"model.layers.{i}.{kind}": {
            "pattern": sparsity,
            "sparsity": s,
            "num_zeros": z,
            "numel": 100,
            "transposed": False,
        }
        for i in range(2)
        for kind, s, z in (("self_attn.q_proj", 0.5, 50), ("mlp.down_proj", 0.5 + 0.1 * i, 50 + 10 * i))
    }
    return {**PruningConfig(method=method, sparsity=sparsity, **fields).to_dict(), "format": fmt, "modules": modules}


def test_tags_by_pattern():
    assert card_tags(record_for("2:4")) == [
        "hfprune",
        "sparse",
        "pruned",
        "sparsegpt",
        "2:4",
        "n:m-sparsity",
        "semi-structured-sparsity",
    ]
    assert card_tags(record_for("0.7", method="wanda")) == [
        "hfprune",
        "sparse",
        "pruned",
        "wanda",
        "unstructured-sparsity",
    ]
    mixed = record_for("2:4", sparsity_overrides={"down_proj": "1:8"})
    mixed["modules"]["model.layers.0.mlp.down_proj"]["pattern"] = "1:8"
    assert card_tags(mixed)[3:] == ["sparsegpt", "1:8", "2:4", "n:m-sparsity", "semi-structured-sparsity"]


def test_card_metadata_parses_back_with_huggingface_hub():
    info = {"base_model": "meta-llama/Llama-3.2-1B", "license": "llama3.2", "datasets": ["allenai/c4"]}
    card = ModelCard(str(create_model_card(record_for(), info, path="me/llama-2of4")))
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert card.data.to_dict()["library_name"] == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "llama3.2" and card.data.datasets == ["allenai/c4"]
    assert "2:4" in card.data.tags and "hfprune" in card.data.tags
    assert card.text.startswith("\n# llama-2of4\n")
    assert 'AutoModelForCausalLM.from_pretrained("me/llama-2of4")' in card.text


def test_local_base_model_stays_out_of_the_metadata(tmp_path):
    local = str(tmp_path / "my-model")
    os.makedirs(local)
    card = create_model_card(record_for(), {"base_model": local})
    assert card.data.base_model is None
    assert f"derived from `{local}`" in card.text


def test_body_sections_hold_the_numbers():
    info = {
        "calibration": "128 x 2048 tokens of C4 (en, train shard 0)",
        "perplexity": {"dense": 12.3456, "pruned": 15.5, "data": "wikitext-2 test", "seq_len": 2048},
        "command": "hfprune prune meta-llama/Llama-3.2-1B --method sparsegpt --sparsity 2:4",
    }
    text = create_model_card(record_for(num_calibration_samples=64, calibration_seq_len=512), info).text
    assert "4 weight matrices are pruned: 210 of their 400 weights are zero (52.5%)." in text
    assert "| method | sparsegpt |" in text
    assert "| sparsity | 2:4 (at most 2 nonzeros in every 4 consecutive weights along the input dimension) |" in text
    assert "| calibration data | 128 x 2048 tokens of C4 (en, train shard 0) |" in text
    assert "| calibration samples | 64 x 512 tokens |" in text
    # per module kind: q_proj both 0.5; down_proj 0.5 and 0.6 -> mean 110 / 200 = 0.55
    assert "| q_proj | 2 | 2:4 | 0.5000 / 0.5000 / 0.5000 |" in text
    assert "| down_proj | 2 | 2:4 | 0.5000 / 0.5500 / 0.6000 |" in text
    assert "Perplexity (data wikitext-2 test, seq_len 2048), lower is better:" in text
    assert "| dense (before pruning) | 12.35 |" in text and "| this model | 15.50 |" in text
    assert "```bash\nhfprune prune meta-llama/Llama-3.2-1B --method sparsegpt --sparsity 2:4\n```" in text
    assert (
        'config = PruningConfig(method="sparsegpt", sparsity="2:4", num_calibration_samples=64, '
        "calibration_seq_len=512)" in text
    )


def test_compact_card_says_how_to_load_and_no_perplexity_section_without_numbers():
    text = create_model_card(record_for(fmt="compact", method="magnitude"), path="me/x").text
    assert 'hfprune.load_pretrained("me/x")' in text and "no file named model.safetensors" in text
    assert "| calibration data | none (magnitude pruning) |" in text
    assert "## Evaluation" not in text


@pytest.mark.parametrize("fmt", ["dense", "compact"])
def test_every_save_writes_the_card(tiny_model, tmp_path, fmt):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="0.5")
    report = hfprune.prune(model, config, progress=False)
    info = {"base_model": "org/tiny", "perplexity": {"dense": 100.0, "pruned": 120.0}}
    path = hfprune.save_pruned(model, tmp_path / "tiny-50", config, report, format=fmt, model_card_info=info)
    card = ModelCard.load(os.path.join(path, "README.md"))
    assert card.data.base_model == "org/tiny" and "unstructured-sparsity" in card.data.tags
    assert "| this model | 120.00 |" in card.text
    assert "14 weight matrices are pruned: 36,864 of their 73,728 weights are zero (50.0%)." in card.text
