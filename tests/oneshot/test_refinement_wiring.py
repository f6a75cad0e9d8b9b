r"""DSnoT wired into one-shot pruning: `PruningConfig(mask_refinement="dsnot")`, the statistics it reads, the weights
each method ends with, the command-line flag, and end-to-end runs on a tiny Llama (one and two processes)."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hfprune import PruningConfig, prune, save_pruned
from hfprune.calibration.statistics import (
    STATISTIC_TYPES,
    HessianMomentsStatistic,
    HessianStatistic,
    InputNormMomentsStatistic,
    InputNormStatistic,
)
from hfprune.commands import build_parser, main
from hfprune.commands.prune import config_from_args
from hfprune.oneshot.methods import METHODS, PruneResult, PruningMethod
from hfprune.oneshot.refinement import RefinementInputs, prune_and_refine
from hfprune.sparsity import SparsityTarget, nm_violations


CALIBRATED = ("wanda", "sparsegpt", "admm")


# --- config and command line -------------------------------------------------------------------------------------


def test_default_is_no_refinement_and_dsnot_is_accepted_after_every_calibrated_method():
    assert PruningConfig().mask_refinement is None
    for method in CALIBRATED:
        assert PruningConfig(method=method, mask_refinement="DSnoT").mask_refinement == "dsnot"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": "magnitude", "mask_refinement": "dsnot"},
            r"^`mask_refinement`='dsnot' needs calibration statistics .* `method`='magnitude' does not collect; "
            + r"use `method`='wanda', 'sparsegpt' or 'admm'",
        ),
        ({"mask_refinement": "dsnot"}, r"^`mask_refinement`='dsnot' needs calibration statistics .* `method`=None"),
        ({"method": "wanda", "mask_refinement": "owl"}, r"^`mask_refinement`='owl' is unknown; choose one of dsnot"),
        (
            {"method": "wanda", "structure": "mlp=0.5", "mask_refinement": "dsnot"},
            r"^`mask_refinement`='dsnot' refines sparsity masks; `structure`",
        ),
    ],
)
def test_invalid_combinations_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningConfig(**kwargs)


def test_the_field_round_trips_through_the_saved_config(tmp_path):
    config = PruningConfig(method="sparsegpt", sparsity="2:4", mask_refinement="dsnot")
    assert config.to_dict()["mask_refinement"] == "dsnot"
    config.save_pretrained(tmp_path)
    assert PruningConfig.from_pretrained(tmp_path).mask_refinement == "dsnot"


def test_cli_flag_reaches_the_config():
    parser = build_parser()
    args = parser.parse_args(["prune", "m", "--method", "wanda", "--mask-refinement", "dsnot", "--output", "o"])
    assert config_from_args(args).mask_refinement == "dsnot"
    assert (
        config_from_args(parser.parse_args(["prune", "m", "--method", "wanda", "--output", "o"])).mask_refinement
        is None
    )


def test_cli_rejects_unknown_refinements_and_magnitude(capsys, tmp_path):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["prune", "m", "--method", "wanda", "--mask-refinement", "owl", "--output", "o"])
    capsys.readouterr()
    output = tmp_path / "out"
    argv = ["prune", str(tmp_path / "missing"), "--method", "magnitude", "--mask-refinement", "dsnot"]
    assert main([*argv, "--output", str(output)]) == 2  # refused before any model is loaded
    assert "`mask_refinement`='dsnot' needs calibration statistics" in capsys.readouterr().err
    assert not output.exists()


# --- statistics ----------------------------------------------------------------------------------------------------


def test_moments_of_a_hand_computed_input():
    X = torch.tensor([[3.0, 0.0, 1.0], [4.0, 2.0, -1.0]])  # (tokens, in)
    for statistic_type in STATISTIC_TYPES.values():
        statistic = statistic_type(3, torch.device("cpu"))
        statistic.update(X[:1])
        statistic.update(X[1:])
        moments = statistic.moments()
        assert moments.mean.tolist() == [3.5, 1.0, 0.0]
        assert moments.second_moment.tolist() == [12.5, 2.0, 1.0]
        assert moments.variance.tolist() == [0.25, 1.0, 1.0]


def test_moment_statistics_give_the_method_the_same_result():
    X = torch.randn(2, 5, 8)  # (batch, seq, in)
    for moments_type, plain_type in (
        (HessianMomentsStatistic, HessianStatistic),
        (InputNormMomentsStatistic, InputNormStatistic),
    ):
        with_moments, plain = moments_type(8, torch.device("cpu")), plain_type(8, torch.device("cpu"))
        for x in X:
            with_moments.update(x)
            plain.update(x)
        with_moments.moments()  # does not consume the accumulator
        torch.testing.assert_close(with_moments.result(), plain.result(), rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["hessian", "input_norm"])
def test_summing_the_accumulators_of_two_ranks_gives_the_moments_of_all_tokens(kind):
    # `Ranks.reduce_statistic` all-reduces `sum` (and `tokens`): the per-input sums and the token count live in that
    # one buffer, so summing two ranks' buffers must give the statistic of the union, whatever the split.
    X = 3 + torch.randn(50, 6)
    rank0, rank1, whole = (STATISTIC_TYPES[kind](6, torch.device("cpu")) for _ in range(3))
    rank0.update(X[:13])
    rank1.update(X[13:])
    whole.update(X)
    rank0.sum += rank1.sum  # what the all-reduce does
    merged, expected = rank0.moments(), whole.moments()
    torch.testing.assert_close(merged.mean, X.mean(0))
    torch.testing.assert_close(merged.variance, X.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged.second_moment, expected.second_moment)


# --- one layer: the refined mask and the weights each method ends with ---------------------------------------------


def correlated_inputs(tokens: int = 2048, features: int = 64, seed: int = 0) -> torch.Tensor:
    r"""`X` `(tokens, in)`: correlated features (a random mixing of 8 factors plus noise) with large, varied means."""
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(tokens, 8, generator=generator) @ torch.randn(8, features, generator=generator)
    return (
        2 * torch.randn(features, generator=generator)
        + factors
        + 0.3 * torch.randn(tokens, features, generator=generator)
    )


def layer_inputs(method: str, X: torch.Tensor):
    r"""What the driver hands the kernel for input `X`: the prepared statistic, wrapped with the input's moments."""
    spec = METHODS[method]
    statistic = STATISTIC_TYPES[spec.statistic](X.shape[1], torch.device("cpu"))
    statistic.update(X)
    moments = statistic.moments()
    raw = statistic.result()
    return RefinementInputs(spec.prepare(raw, None) if spec.prepare else raw, moments)


def expected_error(weight, keep_mask, mean) -> torch.Tensor:
    return (weight * ~keep_mask) @ mean  # (out,): eps_i of a mask, with the dense weight


def output_error(weight, pruned, X) -> float:
    return float(((weight - pruned) @ X.t()).square().sum())  # ||(W - W_hat) X||^2


@pytest.mark.parametrize("sparsity", ["0.5", "0.7", "2:4", "4:8"])
@pytest.mark.parametrize("method", CALIBRATED)
def test_refined_mask_keeps_the_pattern_and_never_grows_the_expected_error(method, sparsity):
    X = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    target = SparsityTarget.parse(sparsity)
    inputs = layer_inputs(method, X)
    plain = prune_and_refine(METHODS[method], weight, inputs.stats, target)  # no moments: the method alone
    refined = prune_and_refine(METHODS[method], weight, inputs, target)
    assert refined.keep_mask.dtype == torch.bool and not torch.equal(refined.keep_mask, plain.keep_mask)
    if target.is_nm:
        groups = refined.keep_mask.view(32, -1, target.m).sum(-1)
        assert (groups == target.n).all()
        assert nm_violations(refined.weight, target.n, target.m) == 0
    else:  # the method's own count in every row (SparseGPT and ADMM choose per block / per matrix, not per row)
        assert torch.equal(refined.keep_mask.sum(1), plain.keep_mask.sum(1))
    assert (refined.weight[~refined.keep_mask] == 0).all()
    mean = X.mean(0)
    before, after = expected_error(weight, plain.keep_mask, mean), expected_error(weight, refined.keep_mask, mean)
    assert (after.abs() <= before.abs() + 1e-4).all()
    assert float(after.abs().sum()) < 0.8 * float(before.abs().sum())


@pytest.mark.parametrize("sparsity", ["0.5", "0.7"])
def test_wanda_keeps_the_dense_weights_of_the_refined_mask_and_its_output_error_falls(sparsity):
    X = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    target = SparsityTarget.parse(sparsity)
    inputs = layer_inputs("wanda", X)
    plain = prune_and_refine(METHODS["wanda"], weight, inputs.stats, target)
    refined = prune_and_refine(METHODS["wanda"], weight, inputs, target)
    assert torch.equal(refined.weight, weight * refined.keep_mask)
    assert output_error(weight, refined.weight, X) < 0.95 * output_error(weight, plain.weight, X)


@pytest.mark.parametrize("sparsity", ["0.5", "2:4"])
@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_updating_methods_re_solve_the_kept_weights_on_the_refined_mask(method, sparsity):
    X = correlated_inputs()
    weight = torch.randn(32, 64, generator=torch.Generator().manual_seed(3))
    target = SparsityTarget.parse(sparsity)
    inputs = layer_inputs(method, X)
    refined = prune_and_refine(METHODS[method], weight, inputs, target)
    again = METHODS[method].reconstruct(weight, inputs.stats, refined.keep_mask, None)
    assert torch.equal(refined.keep_mask, again.keep_mask)
    torch.testing.assert_close(refined.weight, again.weight)
    assert refined.error == pytest.approx(again.error)
    # The update compensates: far below keeping the dense weights under the same mask, and below the method's
    # weights where still kept with dense ones where grown back (the update had compensated for the grown weights).
    error = output_error(weight, refined.weight, X)
    assert error < 0.5 * output_error(weight, weight * refined.keep_mask, X)
    mixed = prune_and_refine(dataclasses.replace(METHODS[method], reconstruct=None), weight, inputs, target)
    assert torch.equal(mixed.keep_mask, refined.keep_mask)
    assert error < 0.7 * output_error(weight, mixed.weight, X)


def test_sparsegpt_reconstruction_of_its_own_mask_is_its_own_result():
    X = correlated_inputs(features=32)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(4))
    factor = layer_inputs("sparsegpt", X).stats
    for sparsity in ("0.5", "2:4"):
        result = METHODS["sparsegpt"].prune_weight(weight, factor, SparsityTarget.parse(sparsity))
        again = METHODS["sparsegpt"].reconstruct(weight, factor, result.keep_mask)
        assert torch.equal(again.keep_mask, result.keep_mask)
        torch.testing.assert_close(again.weight, result.weight)


def test_a_method_without_weight_update_keeps_its_weights_and_grows_back_dense_ones():
    # A method that scales its kept weights by 2 and has no `reconstruct`: after refinement its weights stay where
    # still kept, grown weights take the dense value, pruned ones are zero.
    def prune_weight(weight, stats, target, config=None):
        keep = torch.tensor([[False, True, True, False]])
        return PruneResult(2 * weight * keep, keep, 1.0)

    method = PruningMethod(name="doubling", statistic="input_norm", prune_weight=prune_weight)
    W = torch.tensor([[2.0, -0.5, 1.0, 1.5]])  # eps = 2 + 1.5 = 3.5: grow 2.0, prune -0.5 (see test_dsnot)
    moments = STATISTIC_TYPES["input_norm"](4, torch.device("cpu"))
    moments.update(torch.ones(2, 4))
    result = prune_and_refine(method, W, RefinementInputs(None, moments.moments()), SparsityTarget.parse("0.5"))
    assert result.keep_mask.tolist() == [[True, False, True, False]]
    assert result.weight.tolist() == [[2.0, 0.0, 2.0, 0.0]]  # grown: dense 2.0; still kept: the method's 2 * 1.0
    assert result.error is None  # the method's error was for its own mask


# --- end to end on a tiny Llama -------------------------------------------------------------------------------------


def biased_tiny_llama(tiny_model) -> nn.Module:
    r"""A tiny Llama whose token embeddings share an offset, so block inputs have non-zero means as in trained LLMs.
    (In a freshly initialised model the inputs average to about zero: the expected error DSnoT corrects is then
    noise, and refining it does not pay.)"""
    model = tiny_model("llama")
    with torch.no_grad():
        embedding = model.model.embed_tokens.weight  # (vocab, hidden)
        embedding += embedding.std() * torch.randn(embedding.shape[1], generator=torch.Generator().manual_seed(9))
    return model


def block0_inputs(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    r"""The calibration inputs `(tokens, in)` of every linear layer of block 0, from the dense model: the data every
    method saw for that block."""
    inputs, handles = {}, []

    def hook(name):
        return lambda _, args: inputs.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    for name, module in model.model.layers[0].named_modules():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(name)))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(x) for name, x in inputs.items()}


def relative_block0_error(dense, pruned, inputs) -> float:
    r"""Sum over block 0's linear layers of `||(W - W_hat) X||^2 / ||W X||^2` on the calibration inputs."""
    total = 0.0
    for name, X in inputs.items():
        W = dense.model.layers[0].get_submodule(name).weight.detach()
        W_hat = pruned.model.layers[0].get_submodule(name).weight.detach()
        total += output_error(W, W_hat, X) / float((W @ X.t()).square().sum())
    return total


def small_config(method, sparsity="2:4", **kwargs) -> PruningConfig:
    kwargs = {"num_calibration_samples": 8, "calibration_seq_len": 32, "calibration_batch_size": 4, **kwargs}
    return PruningConfig(method=method, sparsity=sparsity, pruning_device="cpu", **kwargs)


def test_wanda_with_dsnot_on_a_tiny_llama_is_exact_2_4_with_a_lower_layer_error(tiny_model, calibration_ids, tmp_path):
    dense = biased_tiny_llama(tiny_model)
    inputs = block0_inputs(dense, calibration_ids)
    plain, refined = copy.deepcopy(dense), copy.deepcopy(dense)
    prune(plain, small_config("wanda"), calibration_ids, progress=False, return_masks=True)
    config = small_config("wanda", mask_refinement="dsnot")
    report = prune(refined, config, calibration_ids, progress=False, return_masks=True)
    assert len(report.modules) == 14  # 2 blocks x 7 linear layers
    changed = 0
    for name in report.modules:
        weight = refined.get_submodule(name).weight
        assert nm_violations(weight, 2, 4) == 0, name
        assert (report.keep_masks[name].view(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert torch.equal(weight != 0, report.keep_masks[name]), name
        changed += int((report.keep_masks[name] != (plain.get_submodule(name).weight != 0)).sum())
    assert changed > 0
    before, after = relative_block0_error(dense, plain, inputs), relative_block0_error(dense, refined, inputs)
    assert after < 0.95 * before, (before, after)
    # the refinement is on record with the config
    save_pruned(refined, tmp_path / "out", config, report)
    record = json.loads((tmp_path / "out" / "pruning_config.json").read_text())
    assert record["mask_refinement"] == "dsnot" and record["method"] == "wanda"


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_updating_methods_with_dsnot_on_a_tiny_llama_stay_exact_and_report_their_error(
    method, tiny_model, calibration_ids
):
    model = biased_tiny_llama(tiny_model)
    report = prune(model, small_config(method, mask_refinement="dsnot"), calibration_ids, progress=False)
    for name, entry in report.modules.items():
        assert nm_violations(model.get_submodule(name).weight, 2, 4) == 0, name
        assert entry.sparsity == 0.5 and entry.error is not None and entry.error > 0, name


# --- two processes -------------------------------------------------------------------------------------------------


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_two_processes_refine_like_one(tmp_path, tiny_model, char_tokenizer, calibration_text):
    # Each rank sees half the windows; the moments DSnoT reads must be those of all of them.
    folder = tmp_path / "tiny-llama"
    biased_tiny_llama(tiny_model).save_pretrained(folder)
    char_tokenizer.save_pretrained(folder)
    (tmp_path / "calib.txt").write_text("\n\n".join(calibration_text * 3))
    argv = [
        "-m", "hfprune", "prune", str(folder), "--method", "wanda", "--sparsity", "2:4", "--mask-refinement", "dsnot",
        "--calibration", str(tmp_path / "calib.txt"), "--num-samples", "8", "--seq-len", "32",
        "--calibration-batch-size", "2", "--max-shard-size", "5GB", "--json", "--quiet",
    ]  # fmt: skip
    weights = {}
    for label, prefix in (("two", TORCHRUN), ("one", [sys.executable])):
        command = [*prefix, *argv, "--output", str(tmp_path / label)]
        result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert json.loads(result.stdout)["world_size"] == (2 if label == "two" else 1)
        weights[label] = load_file(tmp_path / label / "model.safetensors")
    record = json.loads((tmp_path / "two" / "pruning_config.json").read_text())
    assert record["mask_refinement"] == "dsnot"
    for name in record["modules"]:
        two, one = weights["two"][f"{name}.weight"], weights["one"][f"{name}.weight"]
        assert nm_violations(two, 2, 4) == 0, name
        assert torch.equal(two != 0, one != 0), name  # the same refined mask
        torch.testing.assert_close(two, one, rtol=0, atol=0)
