r"""FSDP2: row-shard mask math on hand-made shards, GradientFlow on a `fully_shard` CPU gloo mesh of 2 ranks against
one unsharded process, and PruningTrainer + FSDP2 on 2 accelerators (`multi_gpu`)."""

import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from hfprune import PruningConfig, PruningTrainer
from hfprune.sparsity import SparsityTarget, magnitude_keep_mask
from hfprune.training.sharding import shard_keep_mask


SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")


@dataclass
class HandShard:
    r"""A [`RowShard`] without a mesh: `gather` hands back the scores of the whole weight, given up front."""

    whole_scores: torch.Tensor
    offset: int
    rows: int
    chunk: int

    def rows_of(self, whole):
        return whole[self.offset : self.offset + self.rows]

    def gather(self, local):
        assert torch.equal(local, self.rows_of(self.whole_scores)), "gathered scores must be built from local rows"
        return self.whole_scores


def shards(weight: torch.Tensor, world: int, previous: torch.Tensor | None = None) -> list[HandShard]:
    scores = weight.abs()
    if previous is not None:
        scores = scores.masked_fill(~previous, -1.0)
    rows = weight.shape[0]
    chunk = -(-rows // world)
    return [
        HandShard(scores, min(r * chunk, rows), min(chunk, rows - min(r * chunk, rows)), chunk) for r in range(world)
    ]


def sharded_mask(weight, pattern, world, transposed, previous=None) -> torch.Tensor:
    parts = []
    for shard in shards(weight, world, previous):
        local_prev = shard.rows_of(previous) if previous is not None else None
        parts.append(shard_keep_mask(shard.rows_of(weight), pattern, shard, transposed, local_prev))
    return torch.cat(parts)


def whole_mask(weight, pattern, transposed, previous=None) -> torch.Tensor:
    def t(x):
        return x.t() if transposed else x

    return t(magnitude_keep_mask(t(weight), pattern, t(previous) if previous is not None else None))


def test_linear_rows_hold_whole_groups():
    # (out 3, in 8), 2 ranks: rows 0-1 and 2; 2:4 keeps the 2 largest of each 4 along the row
    weight = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1], [1, -9, 3, 0, 0, 0, 2, -2]])
    keep = sharded_mask(weight, SparsityTarget.parse("2:4"), 2, transposed=False)
    assert keep.int().tolist() == [[0, 0, 1, 1, 0, 0, 1, 1], [1, 1, 0, 0, 1, 1, 0, 0], [0, 1, 1, 0, 0, 0, 1, 1]]


@pytest.mark.parametrize("rows, world", [(16, 2), (12, 2), (12, 3), (20, 3), (8, 3)])
@pytest.mark.parametrize("pattern", ["1:4", "2:4", "0.5", "0.3"])
def test_conv1d_and_uneven_shards_match_the_whole_weight(rows, world, pattern):
    # Conv1D stores (in, out): a shard's rows are inputs, so N:M groups cross shards unless ceil(in / world) % m == 0
    torch.manual_seed(rows * world)
    pattern = SparsityTarget.parse(pattern)
    for transposed in (True, False):
        shape = (rows, 6) if transposed else (5, rows)
        if not transposed and world > 1:
            shape = (rows - 1, 8)  # nn.Linear: rows are outputs, uneven on purpose
        weight = torch.randint(-3, 4, shape).float()  # few values: many ties
        expected = whole_mask(weight, pattern, transposed)
        assert torch.equal(sharded_mask(weight, pattern, world, transposed), expected)
        previous = whole_mask(weight.flip(0), pattern, transposed)  # an older mask: gradual (monotone) pruning
        expected = whole_mask(weight, pattern, transposed, previous)
        assert torch.equal(sharded_mask(weight, pattern, world, transposed, previous), expected)


def test_unstructured_is_one_global_count_with_the_global_tie_rule():
    # 2 shards of 2 rows; 0.5 of 8 prunes exactly 4: the 0.5, then 3 of the four tied 1s (flat indices 1, 2 on rank
    # 0; 4, 6 on rank 1): those of the highest global flat index, so rank 0 keeps index 1 and prunes index 2
    weight = torch.tensor([[5.0, 1.0], [1.0, 6.0], [1.0, 7.0], [1.0, 0.5]])
    keep = sharded_mask(weight, SparsityTarget.parse("0.5"), 2, transposed=False)
    assert keep.int().tolist() == [[1, 1], [0, 1], [0, 1], [0, 0]]
    assert int((~keep).sum()) == 4


def test_a_rank_without_rows():
    weight = torch.arange(24.0).view(3, 8)  # 3 rows over 4 ranks: chunk 1, rank 3 holds none
    for pattern in ("2:4", "0.5"):
        target = SparsityTarget.parse(pattern)
        assert torch.equal(sharded_mask(weight, target, 4, False), whole_mask(weight, target, False))


def tiny_llama():
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=64,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize(
    "sharding",
    [{"fsdp": "full_shard", "fsdp_config": {"version": 1}}, {"deepspeed": {"zero_optimization": {"stage": 3}}}],
    ids=["fsdp1", "deepspeed"],
)
def test_fsdp1_and_deepspeed_are_refused(tmp_path, sharding):
    model = tiny_llama()  # before TrainingArguments(deepspeed=...) registers its config (conftest drops it after)
    try:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], **sharding)
    except (ImportError, ValueError) as error:  # transformers refuses DeepSpeed itself when it is not installed
        pytest.skip(f"TrainingArguments refuses it already: {error}")
    with pytest.raises(ValueError, match="not FSDP1 or DeepSpeed") as error:
        PruningTrainer(model, args, pruning_config=PruningConfig(sparsity="2:4"))
    assert "fsdp_version: 2" in str(error.value) and "launch with DDP" in str(error.value)


def run(command: list[str], cwd: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "sparsity, flow",
    [("2:4", "mdgf_exp"), ("2:4", "srste"), ("0.5", "ste"), ("0.5", "none")],
    ids=["2:4-mdgf_exp", "2:4-srste", "0.5-ste", "0.5-none"],
)
def test_fully_shard_on_two_cpu_ranks_equals_one_process(tmp_path, sparsity, flow):
    script = os.path.join(SCRIPTS, "fsdp2_gradient_flow.py")
    run([*TORCHRUN, script, str(tmp_path), "--sparsity", sparsity, "--gradient-flow", flow], cwd=str(tmp_path))
    records = []
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json", encoding="utf-8") as f:
            records.append(json.load(f))
    # the toy model's shards: Conv1D b local, Conv1D c gathered, nn.Linear a uneven (6 + 5 rows)
    assert records[1]["shard_rows"] == {"b": [8, 8], "c": [6, 6], "a": [6, 5]}
    for record in records:
        results = record["results"]
        assert len(results) == 8 * 6 + 3 + 3 + 6 + 6  # 8 states, final masks and weights, resume, late binding
        masks = {k: v for k, v in results.items() if "keep_mask" in k}
        assert masks and all(v == 0 for v in masks.values()), masks  # bit-identical masks
        assert max(results.values()) < 1e-12, results  # float64 weights, up to the order of the reductions
        # FSDP keeps about 1 / world of every per-rank state; one unsharded process holds what each DDP rank holds
        for key, whole in record["ref_bytes"].items():
            assert record["bytes"][key] <= 0.6 * whole, (key, record["bytes"], record["ref_bytes"])


@pytest.mark.multi_gpu
@pytest.mark.slow
def test_pruning_trainer_fsdp2_saves_exact_sparsity_resumes_and_matches_ddp(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 accelerators: accelerate enables FSDP only there")
    script = os.path.join(SCRIPTS, "train_fsdp2.py")
    run([*TORCHRUN, script, str(tmp_path / "fsdp")], cwd=str(tmp_path))
    run([*TORCHRUN, script, str(tmp_path / "ddp"), "--ddp"], cwd=str(tmp_path))
    results = {}
    for kind in ("fsdp", "ddp"):
        with open(tmp_path / kind / "result.json", encoding="utf-8") as f:
            results[kind] = json.load(f)
    assert results["fsdp"]["fsdp"] and not results["ddp"]["fsdp"]
    for result in results.values():
        assert result["world_size"] == 2 and result["violations"] == 0 and result["sparsity"] == 0.5
        assert result["masks_equal_after_resume"] and result["resume_max_diff"] < 1e-5
    fsdp, ddp = torch.load(tmp_path / "fsdp" / "final.pt"), torch.load(tmp_path / "ddp" / "final.pt")
    for name, weight in ddp.items():
        assert torch.equal(fsdp[name] != 0, weight != 0), name
        torch.testing.assert_close(fsdp[name], weight, atol=1e-5, rtol=1e-4)
