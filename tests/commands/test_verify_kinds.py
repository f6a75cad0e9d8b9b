r"""`hfprune.verify(folder)` and `hfprune verify folder` give the same answer on every kind of checkpoint, intact or
broken: the command prints the library's `VerificationResult.to_dict()` and exits 0 exactly when it is ok."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfprune
from hfprune import PruningConfig
from hfprune.commands import main


def dense(tmp_path, model, tokenizer):
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    return hfprune.save_pruned(model, tmp_path / "dense", config, report, tokenizer)


def compact(tmp_path, model, tokenizer):
    config = PruningConfig(method="magnitude", sparsity="0.5")
    report = hfprune.prune(model, config, progress=False)
    return hfprune.save_pruned(model, tmp_path / "compact", config, report, tokenizer, format="compact")


def structured(tmp_path, model, tokenizer):
    config = PruningConfig(method="magnitude", structure="mlp=0.5,heads=0.5")
    report = hfprune.prune_structured(model, config, progress=False, device="cpu")
    return hfprune.save_structured(model, tmp_path / "structured", config, report, tokenizer)


def break_a_weight(folder):
    r"""Refills a pruned weight (its pattern breaks) and rewrites the record's checksum so only the pattern check can
    tell."""
    from hfprune.utils.files import file_info

    record_file = Path(folder) / "pruning_config.json"
    record = json.loads(record_file.read_text())
    weights = load_file(f"{folder}/model.safetensors")
    weights["model.layers.0.mlp.up_proj.weight"] = torch.ones_like(weights["model.layers.0.mlp.up_proj.weight"])
    save_file(weights, f"{folder}/model.safetensors", metadata={"format": "pt"})
    record["files"]["model.safetensors"] = file_info(f"{folder}/model.safetensors")
    record_file.write_text(json.dumps(record))


def shrink_the_record(folder):
    r"""A structured record that keeps more MLP channels in block 0 than the weights have."""
    record_file = Path(folder) / "pruning_config.json"
    record = json.loads(record_file.read_text())
    record["structured"]["layers"]["0"]["mlp_channels"] = list(range(100))
    record_file.write_text(json.dumps(record))


def truncate_weights(folder):
    with open(f"{folder}/model.safetensors", "r+b") as f:
        f.truncate(100)


CASES = [
    (dense, None, True),
    (dense, break_a_weight, False),
    (dense, truncate_weights, False),
    (compact, None, True),
    (structured, None, True),
    (structured, shrink_the_record, False),
    (structured, truncate_weights, False),
]


@pytest.mark.parametrize(
    ("write", "damage", "ok"), CASES, ids=[f"{w.__name__}-{d.__name__ if d else 'intact'}" for w, d, _ in CASES]
)
def test_the_library_and_the_command_agree(tmp_path, tiny_model, char_tokenizer, capsys, write, damage, ok):
    folder = write(tmp_path, tiny_model("llama"), char_tokenizer)
    if damage is not None:
        damage(folder)
    result = hfprune.verify(folder)
    assert result.ok is ok
    code = main(["verify", str(folder), "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == result.to_dict()
    assert code == (0 if ok else 1)
    if write is structured:  # a damaged file is reported without loading the model; a shape problem by block
        expected = ["block 0: 64 MLP channels, the record keeps 100"] if damage is shrink_the_record else []
        assert printed["structure"] == expected
        assert bool(printed["files"]) is (damage is truncate_weights)
    else:
        assert "structure" not in printed
    main(["verify", str(folder)])
    text = capsys.readouterr().out.strip()
    assert text == str(result) and text.startswith("OK" if ok else "FAILED")
