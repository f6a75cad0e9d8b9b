r"""Structured pruning of models that do not fit: blocks offloaded to disk (a `device_map`, or `hfprune prune DIR`
streamed from its safetensors folder) and several processes (torchrun, gloo on CPU). The oracle is the same model
pruned in memory by one process: the same kept heads, channels, experts and blocks, and the same weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hfprune
from hfprune import PruningConfig
from hfprune.models.offload import is_offloaded, read_parameter


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
STRUCTURE = "mlp=0.5,heads=0.5,blocks=1"


def config(structure=STRUCTURE, method="sparsegpt"):
    return PruningConfig(
        method=method, structure=structure, num_calibration_samples=8, calibration_batch_size=4, pruning_device="cpu"
    )


@pytest.fixture
def saved(tiny_model, tmp_path):
    folder = tmp_path / "dense"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(folder)
    return folder


def disk_map(on_disk):
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in on_disk else "cpu" for i in range(3)})
    return device_map


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_disk_offloaded_blocks_shrink_exactly_like_in_memory(saved, tmp_path, calibration_ids, method):
    reference = AutoModelForCausalLM.from_pretrained(saved).eval()
    expected = hfprune.prune_structured(reference, config(method=method), calibration_ids, progress=False)
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=disk_map({0, 2})).eval()
    assert is_offloaded(model.model.layers[0])
    report = hfprune.prune_structured(
        model, config(method=method), calibration_ids, progress=False, offload_folder=tmp_path / "offload"
    )
    assert report.layers == expected.layers and report.removed_blocks == expected.removed_blocks
    assert report.block_distances == expected.block_distances  # the same ShortGPT distances, blocks on disk or not
    assert report.config == expected.config
    offloaded = next(i for i, block in enumerate(model.model.layers) if is_offloaded(block))
    assert model.model.layers[offloaded].mlp.down_proj.weight.device.type == "meta"  # back in its offload map
    assert model.model.layers[offloaded].mlp.down_proj.weight.shape == (64, 64)  # shrunk there: 128 -> 64 channels
    for name, param in reference.named_parameters():
        torch.testing.assert_close(read_parameter(model, name), param.detach(), rtol=0, atol=0, msg=name)
    out = hfprune.save_structured(model, tmp_path / "smaller", config(method=method), report)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = calibration_ids[:2]
    torch.testing.assert_close(reloaded(ids).logits, reference(ids).logits, rtol=0, atol=0)
    assert hfprune.verify(out).ok
    assert AutoModelForCausalLM.from_pretrained(saved).model.layers[0].mlp.down_proj.weight.shape[1] == 128


def test_offloaded_models_refuse_what_needs_the_whole_model(saved, calibration_ids):
    model = AutoModelForCausalLM.from_pretrained(saved, device_map=disk_map({1})).eval()
    before = read_parameter(model, "model.layers.1.mlp.down_proj.weight").clone()
    with pytest.raises(ValueError, match=r"`hidden` narrows every module of the model at once"):
        hfprune.prune_structured(model, config("hidden=0.25"), calibration_ids, progress=False)
    with pytest.raises(ValueError, match=r"'taylor' runs one backward pass through the whole model"):
        hfprune.prune_structured(model, config("mlp=0.5", "taylor"), calibration_ids, progress=False)
    with pytest.raises(ValueError, match=r"model.layers.1.* pass `offload_folder=`"):
        hfprune.prune_structured(model, config(), calibration_ids, progress=False)
    assert torch.equal(read_parameter(model, "model.layers.1.mlp.down_proj.weight"), before)  # nothing changed


@pytest.fixture
def model_dir(tmp_path, tiny_model, char_tokenizer, calibration_text):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n\n".join(calibration_text * 3))
    return folder


def prune_cli(prefix, model_dir, output, structure, *extra):
    argv = [
        "-m", "hfprune", "prune", str(model_dir), "--structure", structure, "--method", "sparsegpt",
        "--calibration", str(model_dir.parent / "calib.txt"), "--num-samples", "8", "--seq-len", "32",
        "--calibration-batch-size", "2", "--output", str(output), "--json", "--quiet", *extra,
    ]  # fmt: skip
    result = subprocess.run([*prefix, *argv], env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


def test_a_local_folder_streams_a_structure_like_in_memory(model_dir, tmp_path, monkeypatch):
    streamed = prune_cli([sys.executable], model_dir, tmp_path / "streamed", STRUCTURE)
    in_memory = prune_cli([sys.executable], model_dir, tmp_path / "in-memory", STRUCTURE, "--no-stream")
    assert streamed["report"]["layers"] == in_memory["report"]["layers"]
    weights, expected = (
        load_file(tmp_path / "streamed" / "model.safetensors"),
        load_file(tmp_path / "in-memory" / "model.safetensors"),
    )
    assert weights.keys() == expected.keys() and all(torch.equal(weights[k], expected[k]) for k in weights)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no offload folder left behind


@pytest.mark.parametrize("structure", [STRUCTURE, "hidden=0.25,mlp=0.25"])
def test_two_processes_prune_a_structure_like_one(model_dir, tmp_path, structure):
    two = prune_cli(TORCHRUN, model_dir, tmp_path / "two", structure, "--no-stream")
    one = prune_cli([sys.executable], model_dir, tmp_path / "one", structure, "--no-stream")
    assert two["world_size"] == 2 and one["world_size"] == 1  # two ranks really ran
    # the statistics are summed in another order: the same choices, weights equal up to float rounding
    assert two["report"]["layers"] == one["report"]["layers"]
    assert two["report"]["removed_blocks"] == one["report"]["removed_blocks"]
    assert two["report"]["hidden_channels"] == one["report"]["hidden_channels"]
    assert two["report"]["block_distances"] == pytest.approx(one["report"]["block_distances"], rel=1e-5)
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-3, atol=1e-4, msg=name)
