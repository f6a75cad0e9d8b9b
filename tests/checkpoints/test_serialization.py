r"""Dense sparse checkpoints: what plain transformers loads, the record, verify, atomic writes and bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfprune
from hfprune import PruningConfig
from hfprune.checkpoints import KEEP_MASKS_NAME
from hfprune.sparsity import check_weight
from hfprune.utils.files import file_info as _file_info


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name].view(torch.int32), sb[name].view(torch.int32)), name  # bit-exact, -0.0 included


@pytest.fixture
def pruned(tiny_model):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False, return_masks=True)
    return model, config, report


# --- the dense format ------------------------------------------------------------------------------------------


def test_plain_transformers_loads_the_dense_checkpoint(pruned, tmp_path, char_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, config, report = pruned
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report, char_tokenizer)
    assert path == str(tmp_path / "ckpt")
    assert {"model.safetensors", "config.json", "pruning_config.json", "README.md", "tokenizer.json"} <= set(
        os.listdir(path)
    )
    assert_same_state(model, AutoModelForCausalLM.from_pretrained(path))
    assert AutoTokenizer.from_pretrained(path)("ab")["input_ids"] == char_tokenizer("ab")["input_ids"]
    assert_same_state(model, hfprune.load_pretrained(path))


def test_record_holds_the_config_and_exact_per_module_counts(pruned, tmp_path):
    model, config, report = pruned
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    record = read_json(os.path.join(path, "pruning_config.json"))
    assert record["method"] == "magnitude" and record["sparsity"] == "2:4"
    assert record["hfprune_version"] == hfprune.__version__ and record["format"] == "dense"
    assert PruningConfig.from_dict(record).to_dict() == config.to_dict()
    # 2 blocks x (q, k, v, o, gate, up, down); hidden 64, intermediate 128, 2 of 4 KV heads of 16
    numel = {"q_proj": 64 * 64, "k_proj": 32 * 64, "v_proj": 32 * 64, "o_proj": 64 * 64}
    numel |= {"gate_proj": 128 * 64, "up_proj": 128 * 64, "down_proj": 64 * 128}
    assert len(record["modules"]) == 14
    for name, entry in record["modules"].items():
        kind = name.rsplit(".", 1)[-1]
        assert entry == {
            "pattern": "2:4",
            "sparsity": 0.5,
            "num_zeros": numel[kind] // 2,
            "numel": numel[kind],
            "transposed": False,
        }
    files = record["files"]
    assert set(files) == {"model.safetensors", KEEP_MASKS_NAME}
    assert files["model.safetensors"] == _file_info(os.path.join(path, "model.safetensors"))


def test_keep_masks_round_trip_and_must_match_the_weights(pruned, tmp_path):
    model, config, report = pruned
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    masks = hfprune.load_keep_masks(path)
    assert masks.keys() == report.keep_masks.keys()
    assert all(torch.equal(masks[k], report.keep_masks[k]) for k in masks)
    # 14 masks of 2.5 k to 8 k weights at 1 bit each: far below the 221 kB of dense float32 weights
    assert os.path.getsize(os.path.join(path, KEEP_MASKS_NAME)) < 12_000
    wrong = {k: ~v for k, v in report.keep_masks.items()}
    with pytest.raises(ValueError, match="nonzero weights where its keep mask prunes them"):
        hfprune.save_pruned(model, tmp_path / "other", config, report, keep_masks=wrong)
    assert not (tmp_path / "other").exists()
    no_masks = hfprune.save_pruned(model, tmp_path / "no-masks", config)  # no report: config targets, no masks
    assert hfprune.load_keep_masks(no_masks) is None
    assert len(read_json(os.path.join(no_masks, "pruning_config.json"))["modules"]) == 14


def test_gpt2_conv1d_checkpoint_records_the_transposed_layout(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    config = PruningConfig(method="magnitude", sparsity="2:4")
    report = hfprune.prune(model, config, progress=False)
    path = hfprune.save_pruned(model, tmp_path / "gpt2", config, report)
    record = read_json(os.path.join(path, "pruning_config.json"))
    assert record["modules"]["transformer.h.0.mlp.c_fc"]["transposed"] is True
    result = hfprune.verify(path)
    assert result.ok and result.checked == 8
    assert_same_state(model, hfprune.load_pretrained(path))


# --- verify ----------------------------------------------------------------------------------------------------


def test_check_weight_by_hand():
    assert check_weight(torch.tensor([[0.0, 0.0, 3.0, 4.0, 0.0, 6.0, 0.0, 8.0]]), "2:4") is None
    assert check_weight(torch.tensor([[1.0, 0.0, 3.0, 4.0, 0.0, 6.0, 0.0, 8.0]]), "2:4") == (
        "1 of 2 groups of 4 hold more than 2 nonzeros"
    )
    # 1:4 keeps one of four: a 2:4 row breaks it (the "N pruned" reading would accept it)
    assert check_weight(torch.tensor([[0.0, 0.0, 3.0, 4.0]]), "1:4") == "1 of 1 groups of 4 hold more than 1 nonzeros"
    row = torch.tensor([[0.0, 2.0, 0.0, 4.0, 5.0, 6.0]])
    assert check_weight(row, "0.5") == "2 zeros, fewer than the 3 recorded for sparsity 0.5"  # floor(0.5 * 6) = 3
    assert check_weight(row, "0.5", min_zeros=2) is None


def test_verify_model_against_report_config_and_attached_record(pruned, tmp_path):
    model, config, report = pruned
    assert hfprune.verify(model, report).ok and hfprune.verify(model, config).checked == 14
    with pytest.raises(ValueError, match="pass `record=`"):
        hfprune.verify(model)
    loaded = hfprune.load_pretrained(hfprune.save_pruned(model, tmp_path / "ckpt", config, report))
    assert loaded.pruning_record["sparsity"] == "2:4" and hfprune.verify(loaded).ok
    with torch.no_grad():
        loaded.model.layers[1].mlp.up_proj.weight[3, :4] = 1.0  # a full group of 4
    result = hfprune.verify(loaded)
    assert not result.ok and result.checked == 14
    assert result.modules == {"model.layers.1.mlp.up_proj": "1 of 2048 groups of 4 hold more than 2 nonzeros"}
    assert result.to_dict()["ok"] is False and "model.layers.1.mlp.up_proj" in str(result)


def test_verify_names_modules_whose_weights_no_longer_match(pruned, tmp_path):
    model, config, report = pruned
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    assert hfprune.verify(path).ok
    weights_file = os.path.join(path, "model.safetensors")
    state_dict = load_file(weights_file)
    state_dict["model.layers.0.self_attn.k_proj.weight"][:, :4] = 0.5  # every row's first group: 32 bad groups
    save_file(state_dict, weights_file, metadata={"format": "pt"})
    result = hfprune.verify(path)
    assert result.modules == {"model.layers.0.self_attn.k_proj": "32 of 512 groups of 4 hold more than 2 nonzeros"}
    assert result.files == {"model.safetensors": "sha256 does not match the recorded checksum (corrupt or modified)"}
    with pytest.raises(ValueError, match="damaged, nothing was loaded"):
        hfprune.load_pretrained(path)
    # someone re-recorded the checksum: the file is "intact", the pattern still is not
    record = read_json(os.path.join(path, "pruning_config.json"))
    record["files"]["model.safetensors"] = _file_info(weights_file)
    with open(os.path.join(path, "pruning_config.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)
    result = hfprune.verify(path)
    assert list(result.modules) == ["model.layers.0.self_attn.k_proj"] and not result.files
    with pytest.raises(ValueError, match="(?s)break their recorded pattern:.*k_proj: 32 of 512"):
        hfprune.load_pretrained(path)
    assert hfprune.load_pretrained(path, verify_on_load=False) is not None


def test_unstructured_record_catches_filled_zeros(tiny_model, tmp_path):
    model = tiny_model("llama")
    config = PruningConfig(method="magnitude", sparsity="0.5")
    report = hfprune.prune(model, config, progress=False)
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    record = read_json(os.path.join(path, "pruning_config.json"))
    assert record["modules"]["model.layers.0.mlp.down_proj"]["num_zeros"] == 64 * 128 // 2
    loaded = hfprune.load_pretrained(path)
    with torch.no_grad():
        weight = loaded.model.layers[0].mlp.down_proj.weight
        weight[weight == 0] = 1e-3  # "fine-tuned" without the mask
    result = hfprune.verify(loaded)
    assert result.modules == {"model.layers.0.mlp.down_proj": "0 zeros, fewer than the 4096 recorded for sparsity 0.5"}


def test_folder_with_only_a_pruning_config_is_verified_from_the_config(pruned, tmp_path):
    model, config, _ = pruned
    folder = tmp_path / "trainer-output"
    model.save_pretrained(folder)  # what a Trainer writes, plus the config alone
    config.save_pretrained(folder)
    result = hfprune.verify(str(folder))
    assert result.ok and result.checked == 14


def test_save_refuses_a_model_that_breaks_its_pattern(pruned, tmp_path):
    model, config, report = pruned
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight[0, :4] = 1.0
    with pytest.raises(ValueError, match="model.layers.0.self_attn.o_proj: 1 of 1024 groups"):
        hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    assert not (tmp_path / "ckpt").exists()


# --- atomic writes and bad input -------------------------------------------------------------------------------


def test_existing_folder_is_refused_unless_overwrite(pruned, tmp_path):
    model, config, report = pruned
    target = tmp_path / "ckpt"
    target.mkdir()
    hfprune.save_pruned(model, target, config, report)  # an empty folder is fine
    (target / "keep-me.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty; pass `overwrite=True`"):
        hfprune.save_pruned(model, target, config, report)
    assert (target / "keep-me.txt").exists()
    hfprune.save_pruned(model, target, config, report, overwrite=True, format="compact")
    assert not (target / "keep-me.txt").exists() and (target / "hfprune_compact.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary or old folders left


def test_failure_midway_leaves_no_checkpoint_and_keeps_the_old_one(pruned, tmp_path):
    model, config, report = pruned

    class BrokenTokenizer:
        def save_pretrained(self, folder):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        hfprune.save_pruned(model, tmp_path / "new", config, report, BrokenTokenizer())
    assert list(tmp_path.iterdir()) == []
    old = hfprune.save_pruned(model, tmp_path / "old", config, report)
    before = {name: _file_info(os.path.join(old, name)) for name in ("model.safetensors", "pruning_config.json")}
    with pytest.raises(OSError, match="disk full"):
        hfprune.save_pruned(model, old, config, report, BrokenTokenizer(), overwrite=True, format="compact")
    assert before == {name: _file_info(os.path.join(old, name)) for name in before}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_pickled_weights_are_never_loaded(pruned, tmp_path):
    model, config, report = pruned
    path = hfprune.save_pruned(model, tmp_path / "ckpt", config, report)
    os.remove(os.path.join(path, "model.safetensors"))
    torch.save(model.state_dict(), os.path.join(path, "pytorch_model.bin"))
    with pytest.raises(ValueError, match=r"only pickled ones \(pytorch_model.bin\), which hfprune never loads"):
        hfprune.load_pretrained(path, verify_on_load=False)


def test_bad_arguments(pruned, tmp_path):
    model, config, report = pruned
    with pytest.raises(ValueError, match="`format`='zip' is unknown"):
        hfprune.save_pruned(model, tmp_path / "x", config, report, format="zip")
    with pytest.raises(FileNotFoundError, match="no pruning_config.json"):
        hfprune.verify(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="neither a checkpoint folder nor a Hub repo id"):
        hfprune.load_pretrained(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "pruning_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        hfprune.verify(str(tmp_path / "bad"))
