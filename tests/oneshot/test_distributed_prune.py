r"""One-shot pruning in two processes (torchrun, gloo on CPU): the same model as one process, and failures that stop
every rank."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hfprune.sparsity import nm_violations


SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def model_dir(tmp_path, tiny_model, char_tokenizer, calibration_text):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n\n".join(calibration_text * 3))
    return folder


def prune_cli(prefix, model_dir, output, *extra):
    argv = [
        "-m", "hfprune", "prune", str(model_dir), "--method", "sparsegpt", "--sparsity", "2:4",
        "--calibration", str(model_dir.parent / "calib.txt"), "--num-samples", "8", "--seq-len", "32",
        "--calibration-batch-size", "2", "--eval", str(model_dir.parent / "calib.txt"), "--output", str(output),
        "--max-shard-size", "5GB", "--json", "--quiet", *extra,
    ]  # fmt: skip
    result = subprocess.run([*prefix, *argv], env=ENV, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("extra", [(), ("--true-sequential",)], ids=["one-pass", "true-sequential"])
def test_two_processes_prune_like_one(model_dir, tmp_path, extra):
    two = prune_cli(TORCHRUN, model_dir, tmp_path / "two", *extra)
    one = prune_cli([sys.executable], model_dir, tmp_path / "one", *extra)
    assert two["world_size"] == 2 and two["report"]["world_size"] == 2  # two ranks really ran
    assert one["world_size"] == 1
    assert two["report"]["modules"].keys() == one["report"]["modules"].keys()
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    for name in two["report"]["modules"]:
        assert nm_violations(weights_two[f"{name}.weight"], 2, 4) == 0, name
        # the Hessians are summed in another order: equal up to float rounding
        torch.testing.assert_close(weights_two[f"{name}.weight"], weights_one[f"{name}.weight"], rtol=1e-3, atol=1e-3)
        # the reconstruction error is measured on the Hessian of all tokens, divided by their count once
        error_two, error_one = two["report"]["modules"][name]["error"], one["report"]["modules"][name]["error"]
        assert error_two == pytest.approx(error_one, rel=1e-3), name
    ppl_two, ppl_one = two["perplexity"]["pruned"], one["perplexity"]["pruned"]
    assert abs(ppl_two / ppl_one - 1) < 1e-3, (ppl_two, ppl_one)


def test_a_rank_that_fails_stops_the_others_and_leaves_no_output(tmp_path):
    output = tmp_path / "out"
    script = os.path.join(SCRIPTS, "prune_failing_rank.py")
    result = subprocess.run(
        [*TORCHRUN, script, str(output)], env=ENV, capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode != 0
    assert re.search(r"rank 1 stopped: pruning failed in decoder block \d.*a kernel failed on purpose", result.stderr)
    # rank 0 did nothing wrong: it stops at the next synchronisation point, saying which rank failed and why
    assert re.search(r"rank 0 stopped: .*rank 1 of 2 failed while pruning .*a kernel failed on purpose", result.stderr)
    assert not output.exists() and os.listdir(tmp_path) == []
