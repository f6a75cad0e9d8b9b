r"""The `hfprune` command line on a tiny local model folder: prune, eval, verify, report, and bad input."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hfprune.commands import main
from hfprune.sparsity import nm_violations


@pytest.fixture
def model_dir(tmp_path, tiny_model, char_tokenizer):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def text_file(tmp_path, calibration_text):
    path = tmp_path / "calib.txt"
    path.write_text("\n\n".join(calibration_text * 3))
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prune_writes_a_checkpoint_that_plain_transformers_loads(capsys, tmp_path, model_dir, text_file):
    out_dir = tmp_path / "pruned"
    code, out, _ = run(
        capsys, "prune", model_dir, "--method", "sparsegpt", "--sparsity", "2:4", "--calibration", text_file,
        "--num-samples", 4, "--seq-len", 32, "--output", out_dir, "--eval", text_file, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    assert result["output"] == str(out_dir)
    assert set(result["perplexity"]) == {"dense", "pruned"}
    assert result["report"]["method"] == "sparsegpt" and result["report"]["pattern"] == "2:4"
    assert len(result["report"]["modules"]) == 14  # 2 blocks x (q, k, v, o, gate, up, down)

    record = json.loads((out_dir / "pruning_config.json").read_text())
    assert record["method"] == "sparsegpt" and record["sparsity"] == "2:4"
    assert record["num_calibration_samples"] == 4 and record["calibration_seq_len"] == 32
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    for name in result["report"]["modules"]:
        weight = model.get_submodule(name).weight
        assert nm_violations(weight, 2, 4) == 0
        assert (weight == 0).sum().item() == weight.numel() // 2
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left behind


def test_eval_prints_the_same_perplexity_as_prune(capsys, tmp_path, model_dir, text_file):
    out_dir = tmp_path / "pruned"
    code, out, _ = run(
        capsys, "prune", model_dir, "--method", "magnitude", "--sparsity", "0.5", "--output", out_dir,
        "--eval", text_file, "--seq-len", 32, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    pruned_ppl = json.loads(out)["perplexity"]["pruned"]
    code, out, _ = run(capsys, "eval", out_dir, "--data", text_file, "--seq-len", 32, "--json", "--quiet")
    assert code == 0
    assert json.loads(out)["perplexity"] == pytest.approx(pruned_ppl, rel=1e-5)


def test_verify_exit_status_follows_the_recorded_pattern(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "pruned"
    one_file = ("--max-shard-size", "5GB")  # one weights file to tamper with (streamed outputs are sharded by block)
    argv = ("prune", model_dir, "--method", "magnitude", "--sparsity", "2:4", "--output", out_dir, *one_file)
    assert run(capsys, *argv)[0] == 0
    code, out, _ = run(capsys, "verify", out_dir, "--json")
    assert code == 0 and json.loads(out)["ok"] is True

    # Fill one pruned weight of one module: verify names that module and exits 1.
    weights_file = out_dir / "model.safetensors"
    tensors = load_file(weights_file)
    name = "model.layers.1.mlp.down_proj"
    weight = tensors[f"{name}.weight"].clone()
    row = weight[0]
    row[(row == 0).nonzero()[0, 0]] = 1.0
    tensors[f"{name}.weight"] = weight
    save_file(tensors, weights_file, metadata={"format": "pt"})
    code, out, _ = run(capsys, "verify", out_dir)
    assert code == 1
    assert name in out


def test_report_lists_every_linear(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "pruned"
    assert run(capsys, "prune", model_dir, "--method", "magnitude", "--sparsity", "0.25", "--output", out_dir)[0] == 0
    code, out, _ = run(capsys, "report", out_dir, "--json", "--quiet")
    assert code == 0
    report = json.loads(out)
    assert report["model.layers.0.self_attn.q_proj"] == pytest.approx(0.25)
    assert report["lm_head"] == 0.0


def test_existing_output_is_refused_unless_overwrite(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "pruned"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("user data")
    code, _, err = run(capsys, "prune", model_dir, "--method", "magnitude", "--output", out_dir)
    assert code == 2 and "--overwrite" in err
    assert (out_dir / "keep.txt").read_text() == "user data"
    code, _, _ = run(capsys, "prune", model_dir, "--method", "magnitude", "--output", out_dir, "--overwrite")
    assert code == 0 and not (out_dir / "keep.txt").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "magnitude", "--sparsity", "5:4"], "N (5) is larger than M (4)"),
        (["--method", "magnitude", "--sparsity", "1.5"], "`sparsity` must be in [0, 1)"),
        (["--method", "wanda"], "needs --calibration"),
        (["--method", "sparsegpt", "--sparsity", "2:4", "--block-size", "126"], "`block_size`=126"),
        (["--method", "magnitude", "--sparsity", "1:3"], "not a multiple of M=3"),
    ],
)
def test_bad_input_is_one_clear_line_and_writes_nothing(capsys, tmp_path, model_dir, extra, message):
    out_dir = tmp_path / "pruned"
    code, _, err = run(capsys, "prune", model_dir, *extra, "--output", out_dir)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert not out_dir.exists()


def test_calibration_too_short_names_the_fix(capsys, tmp_path, model_dir, text_file):
    code, out, err = run(
        capsys, "prune", model_dir, "--method", "wanda", "--calibration", text_file, "--num-samples", 1000,
        "--seq-len", 64, "--output", tmp_path / "pruned", "--json",
    )  # fmt: skip
    assert code == 2
    assert "--num-samples" in err and "--seq-len" in err
    assert "--num-samples" in json.loads(out)["error"]


def test_unknown_method_is_rejected_by_the_parser(capsys, model_dir, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        main(["prune", str(model_dir), "--method", "obs", "--output", str(tmp_path / "x")])
    assert excinfo.value.code == 2
    assert "invalid choice: 'obs'" in capsys.readouterr().err


def test_prune_help_shows_config_help_text(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    out = capsys.readouterr().out
    assert "--num-samples" in out and "--block-size" in out and "at most N nonzeros" in out


def test_compact_format_round_trips_through_the_cli(capsys, tmp_path, model_dir, text_file):
    out_dir = tmp_path / "compact"
    code, _, _ = run(
        capsys, "prune", model_dir, "--method", "magnitude", "--sparsity", "2:4", "--format", "compact",
        "--output", out_dir, "--quiet",
    )  # fmt: skip
    assert code == 0
    assert run(capsys, "verify", out_dir)[0] == 0
    code, out, _ = run(capsys, "report", out_dir, "--json", "--quiet")
    assert code == 0 and json.loads(out)["model.layers.0.mlp.up_proj"] == pytest.approx(0.5)


def test_bfloat16_load(capsys, tmp_path, model_dir):
    out_dir = tmp_path / "bf16"
    code, _, _ = run(
        capsys, "prune", model_dir, "--method", "magnitude", "--sparsity", "2:4", "--dtype", "bfloat16",
        "--output", out_dir, "--quiet",
    )  # fmt: skip
    assert code == 0
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    assert nm_violations(model.model.layers[0].mlp.down_proj.weight, 2, 4) == 0


def test_a_local_folder_streams_and_gives_the_in_memory_result(capsys, tmp_path, model_dir, text_file, monkeypatch):
    import warnings

    import hfprune.calibration.context

    seen = []
    original = hfprune.calibration.context.onloaded

    def spy(block, device, offload_folder=None, write_back=True):
        seen.append(block.mlp.down_proj.weight.device.type)  # where the block's weights are before it is pruned
        return original(block, device, offload_folder, write_back)

    monkeypatch.setattr(hfprune.calibration.context, "onloaded", spy)
    common = (
        "--method",
        "wanda",
        "--sparsity",
        "2:4",
        "--calibration",
        text_file,
        "--num-samples",
        4,
        "--seq-len",
        32,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, "prune", model_dir, *common, "--output", tmp_path / "streamed", "--quiet")
    assert code == 0
    assert seen == ["meta", "meta"]  # every block stayed on disk until its turn
    assert not [w for w in caught if "offload" in str(w.message)]
    assert "meta device" not in err and "offloaded" not in err
    assert out.count("\n") == 1 and out.startswith(f"saved to {tmp_path / 'streamed'}: wanda 2:4, sparsity 0.5000")
    seen.clear()
    assert (
        run(capsys, "prune", model_dir, *common, "--output", tmp_path / "in-memory", "--no-stream", "--quiet")[0] == 0
    )
    assert seen == ["cpu", "cpu"]
    in_memory = load_file(tmp_path / "in-memory" / "model.safetensors")
    # a model that fits in memory is written in one file, streamed or not
    assert sorted(p.name for p in (tmp_path / "streamed").glob("*.safetensors")) == ["model.safetensors"]
    streamed = load_file(tmp_path / "streamed" / "model.safetensors")
    assert streamed.keys() == in_memory.keys()
    assert all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    assert sorted(os.listdir(tmp_path)) == [
        "calib.txt",
        "in-memory",
        "streamed",
        "tiny-llama",
    ]  # no offload folder left


def test_a_streamed_model_larger_than_memory_is_written_a_block_per_shard(capsys, tmp_path, model_dir, monkeypatch):
    import hfprune.commands.prune

    out_dir = tmp_path / "streamed"
    argv = ("prune", model_dir, "--method", "magnitude", "--sparsity", "2:4", "--output", out_dir, "--quiet")
    weights = load_file(model_dir / "model.safetensors")
    total = sum(t.numel() * t.element_size() for t in weights.values())
    monkeypatch.setattr(hfprune.commands.prune, "available_memory", lambda: total)  # the weights take all of it
    assert run(capsys, *argv)[0] == 0
    shards = sorted(out_dir.glob("*.safetensors"))
    # a shard is in memory while it is written: each holds about one decoder block (or one larger tensor)
    assert len(shards) > 2 and (out_dir / "model.safetensors.index.json").is_file()
    block_bytes = sum(t.numel() * t.element_size() for k, t in weights.items() if k.startswith("model.layers.0."))
    largest = max(t.numel() * t.element_size() for t in weights.values())
    for shard in shards:
        assert sum(t.numel() * t.element_size() for t in load_file(shard).values()) <= max(block_bytes, largest)
    assert run(capsys, "verify", out_dir)[0] == 0


def test_structure_gives_a_smaller_standard_model(capsys, tmp_path, model_dir, text_file):
    out_dir = tmp_path / "smaller"
    code, out, _ = run(
        capsys, "prune", model_dir, "--structure", "mlp=0.5,blocks=1", "--method", "sparsegpt", "--calibration",
        text_file, "--num-samples", 4, "--seq-len", 32, "--output", out_dir, "--json", "--quiet",
    )  # fmt: skip
    assert code == 0
    result = json.loads(out)
    model = AutoModelForCausalLM.from_pretrained(out_dir)  # plain transformers, a standard config
    assert model.config.intermediate_size == 64 and model.config.num_hidden_layers == 1
    assert sum(p.numel() for p in model.parameters()) == result["parameters"]
    record = json.loads((out_dir / "pruning_config.json").read_text())
    assert record["format"] == "structured" and len(record["structured"]["removed_blocks"]) == 1
    assert "structured-pruning" in (out_dir / "README.md").read_text()
    assert run(capsys, "verify", out_dir)[0] == 0
    # a checkpoint whose weights no longer match the record fails verification
    config = json.loads((out_dir / "config.json").read_text())
    weights = load_file(out_dir / "model.safetensors")
    key = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[key] = torch.cat([weights[key], weights[key]])
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    config["intermediate_size"] = 128
    (out_dir / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "verify", out_dir)
    assert code == 1 and "FAILED" in out


def test_one_shot_prune_refuses_a_structure_config(tiny_model):
    import hfprune

    with pytest.raises(ValueError, match="use `hfprune.prune_structured"):
        hfprune.prune(tiny_model("llama"), hfprune.PruningConfig(method="magnitude", structure="mlp=0.5"))
