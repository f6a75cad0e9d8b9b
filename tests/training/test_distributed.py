r"""DDP on CPU: two real ranks (torchrun, gloo) hold identical masks, and match one process at the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch


SCRIPT = os.path.join(os.path.dirname(__file__), "scripts", "train_distributed.py")


def run(command: list[str], cwd: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    two, one = root / "two", root / "one"
    two.mkdir()
    one.mkdir()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run([*torchrun, SCRIPT, str(two), "--per-device-batch", "2", "--check-fsdp"], cwd=str(root))
    run([sys.executable, SCRIPT, str(one), "--per-device-batch", "4"], cwd=str(root))
    return two, one


def read(folder, rank):
    with open(folder / f"rank{rank}.json", encoding="utf-8") as f:
        return json.load(f)


def test_two_ranks_really_ran_and_agree(runs):
    two, _ = runs
    records = [read(two, rank) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["distributed"], r["backend"]) for r in records] == [
        (0, 2, True, "gloo"),
        (1, 2, True, "gloo"),
    ]
    assert records[0]["masks_sha256"] == records[1]["masks_sha256"]
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]


def test_ddp_equals_one_process_at_the_same_global_batch(runs):
    two, one = runs
    single = read(one, 0)
    assert single["world_size"] == 1 and not single["distributed"]
    assert read(two, 0)["losses"] == pytest.approx(single["losses"], abs=1e-5)
    ddp, reference = torch.load(two / "rank0.pt"), torch.load(one / "rank0.pt")
    flipped = sum(int((ddp["masks"][n] != reference["masks"][n]).sum()) for n in reference["masks"])
    total = sum(mask.numel() for mask in reference["masks"].values())
    assert flipped <= total * 1e-3  # only a float near-tie of |W| may flip a bit; in practice none do
    for name, weight in reference["weights"].items():
        both = ddp["masks"][name] & reference["masks"][name]
        torch.testing.assert_close(ddp["weights"][name][both], weight[both], atol=1e-5, rtol=1e-4)


def test_fsdp1_is_refused_on_every_rank(runs):
    two, _ = runs
    for rank in (0, 1):
        error = read(two, rank)["fsdp_error"]
        assert error is not None and "not FSDP1 or DeepSpeed" in error and "launch with DDP" in error


@pytest.mark.slow
def test_accelerate_launch_with_the_recipe_config_starts_two_ranks(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    config = os.path.join(repo, "recipes", "accelerate")
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        os.path.join(config, "ddp_cpu.yaml"),
    ]
    launch += ["--main_process_port", "0"]
    run([*launch, SCRIPT, str(tmp_path), "--per-device-batch", "2", "--steps", "2"], cwd=str(tmp_path))
    records = [read(tmp_path, rank) for rank in (0, 1)]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in records] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert records[0]["masks_sha256"] == records[1]["masks_sha256"]
