import copy
import dataclasses
import json
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from hfprune import PruningConfig, prune
from hfprune.calibration.capture import place_outside_blocks
from hfprune.calibration.data import calibration_windows, load_text, tokenize_text
from hfprune.calibration.statistics import STATISTIC_TYPES
from hfprune.models import find_decoder_blocks, weight_view
from hfprune.oneshot.methods import METHODS
from hfprune.sparsity import nm_violations, sparsity_of


METHOD_NAMES = ("sparsegpt", "wanda", "magnitude")

# Distinct inputs per decoder block = statistics (SparseGPT: factorisations) per block. Modules called on the same
# tensor share one: q/k/v, gate/up; Phi and Falcon run attention and MLP in parallel on one normed input.
DISTINCT_INPUTS_PER_BLOCK = {
    "llama": 4,  # q/k/v, o, gate/up, down
    "qwen2": 4,
    "mistral": 4,
    "gemma": 4,
    "opt": 4,  # q/k/v, out_proj, fc1, fc2
    "gpt2": 4,  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    "gpt_neox": 4,  # query_key_value, dense, dense_h_to_4h, dense_4h_to_h
    "phi": 3,  # q/k/v/fc1, dense, fc2
    "falcon": 3,  # query_key_value/dense_h_to_4h, dense, dense_4h_to_h
}


def small_config(method: str, sparsity: str = "2:4", **kwargs) -> PruningConfig:
    kwargs = {
        "num_calibration_samples": 8,
        "calibration_seq_len": 32,
        "calibration_batch_size": 4,
        "pruning_device": "cpu",
        **kwargs,
    }
    return PruningConfig(method=method, sparsity=sparsity, **kwargs)


def linear_modules(model: nn.Module) -> dict[str, nn.Module]:
    r"""Every `nn.Linear` / `Conv1D` but the output embedding: what one-shot pruning should reach in these models."""
    output = model.get_output_embeddings()
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and m is not output}


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def spy(monkeypatch):
    r"""`spy(method)` wraps the registered method; returns the raw statistics and the `prune_weight` calls it saw."""

    def install(name: str):
        spec = METHODS[name]
        seen = {"raw": [], "calls": []}

        def prepare(raw, config=None):
            seen["raw"].append(raw.clone())  # SparseGPT factorises in place
            return spec.prepare(raw, config)

        def prune_weight(weight, stats, target, config=None):
            seen["calls"].append((weight.shape, stats))
            return spec.prune_weight(weight, stats, target, config)

        monkeypatch.setitem(
            METHODS,
            name,
            dataclasses.replace(spec, prepare=prepare if spec.prepare else None, prune_weight=prune_weight),
        )
        return seen

    return install


# --- end to end on every architecture --------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_prune_save_reload(arch, method, tiny_model, calibration_ids, tmp_path):
    model = tiny_model(arch)
    expected_targets = linear_modules(model)
    before = clone_state(model)
    input_embeddings = model.get_input_embeddings().weight.detach().clone()
    output_embeddings = model.get_output_embeddings().weight.detach().clone()

    report = prune(model, small_config(method), calibration_ids, progress=False)

    assert set(report.modules) == set(expected_targets)
    assert report.sparsity == 0.5
    pruned_weights = {f"{name}.weight" for name in expected_targets}
    for name, module in expected_targets.items():
        weight = weight_view(module)  # (out, in)
        assert nm_violations(weight, 2, 4) == 0, name
        assert sparsity_of(weight) == 0.5, name
        assert report.modules[name].sparsity == 0.5 and report.modules[name].pattern == "2:4"
    after = model.state_dict()
    unchanged = [k for k in before if k not in pruned_weights]
    assert [k for k in unchanged if not torch.equal(before[k], after[k])] == []  # embeddings, lm_head, norms, biases
    assert torch.equal(model.get_input_embeddings().weight, input_embeddings)
    assert torch.equal(model.get_output_embeddings().weight, output_embeddings)
    assert not model.training

    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    reloaded_modules = dict(reloaded.named_modules())
    for name, module in expected_targets.items():
        assert torch.equal(reloaded_modules[name].weight, module.weight), name
        assert nm_violations(weight_view(reloaded_modules[name]), 2, 4) == 0, name
    assert torch.equal(reloaded.get_input_embeddings().weight, input_embeddings)
    assert torch.equal(reloaded.get_output_embeddings().weight, output_embeddings)
    with torch.no_grad():
        logits = reloaded(calibration_ids[:2]).logits
        assert torch.isfinite(logits).all()
        torch.testing.assert_close(logits, model(calibration_ids[:2]).logits)


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2"])
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_prune_unstructured_half(arch, method, tiny_model, calibration_ids):
    model = tiny_model(arch)
    report = prune(model, small_config(method, "0.5"), calibration_ids, progress=False)
    assert report.pattern == "0.5"
    for name, module in linear_modules(model).items():
        weight = weight_view(module)  # (out, in)
        # Magnitude: one threshold per matrix; SparseGPT: per 128-column block; Wanda: per output row.
        assert report.modules[name].num_zeros == weight.numel() // 2, name
        if method == "wanda":
            assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name
    with torch.no_grad():
        assert torch.isfinite(model(calibration_ids[:2]).logits).all()


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_gpt2_conv1d_groups_run_along_the_stored_input_dimension(method, tiny_model, calibration_ids):
    # Conv1D stores its weight as (in, out): N:M groups must run along dim 0 of the stored tensor.
    model = tiny_model("gpt2")
    prune(model, small_config(method), calibration_ids, progress=False)
    c_attn = model.transformer.h[0].attn.c_attn
    stored = c_attn.weight  # (in, out)
    assert stored.shape == (64, 192)
    groups = (stored != 0).reshape(16, 4, 192)  # (in/4, 4, out): four consecutive inputs of one output
    assert (groups.sum(1) == 2).all()
    # Along the output dimension (dim 1 of the stored tensor), groups of 4 are not 2:4.
    assert nm_violations(stored, 2, 4) > 0
    assert nm_violations(stored.t(), 2, 4) == 0


def test_text_calibration_with_a_tokenizer(tiny_model, char_tokenizer, calibration_text, tmp_path):
    file = tmp_path / "calib.txt"
    file.write_text("\n\n".join(calibration_text), encoding="utf-8")
    for source in (calibration_text, str(file)):
        model = tiny_model("llama")
        report = prune(
            model, small_config("sparsegpt", num_calibration_samples=16), source, char_tokenizer, progress=False
        )
        assert len(report.modules) == 14
        assert all(nm_violations(weight_view(m), 2, 4) == 0 for m in linear_modules(model).values())


def test_tensor_calibration_keeps_its_length_by_default(tiny_model, calibration_ids):
    model = tiny_model("llama")
    config = small_config("wanda", calibration_seq_len=None)
    report = prune(model, config, calibration_ids, progress=False)  # (8, 32) on a model with 64 positions
    assert len(report.modules) == 14
    with pytest.raises(ValueError, match="sequence length 80 is beyond the model's 64 positions"):
        prune(tiny_model("llama"), config, torch.randint(0, 128, (8, 80)), progress=False)


def test_sparsity_overrides_and_targets(tiny_model, calibration_ids):
    model = tiny_model("llama")
    config = small_config(
        "magnitude",
        "2:4",
        targets=["mlp.down_proj", "mlp.up_proj", r".*\.self_attn\.[qk]_proj"],
        ignore=[r"model\.layers\.1\.self_attn\..*"],
        sparsity_overrides={"down_proj": "1:4", "up_proj": "0.75"},
    )
    before = clone_state(model)
    report = prune(model, config, progress=False)
    assert set(report.modules) == {
        "model.layers.0.self_attn.q_proj",
        "model.layers.0.self_attn.k_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
        "model.layers.1.mlp.up_proj",
        "model.layers.1.mlp.down_proj",
    }
    modules = dict(model.named_modules())
    for name, entry in report.modules.items():
        weight = weight_view(modules[name])
        if name.endswith("down_proj"):
            assert entry.pattern == "1:4" and nm_violations(weight, 1, 4) == 0 and sparsity_of(weight) == 0.75
        elif name.endswith("up_proj"):
            assert entry.pattern == "0.75" and sparsity_of(weight) == 0.75
        else:
            assert entry.pattern == "2:4" and nm_violations(weight, 2, 4) == 0
    for name in ("model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.gate_proj"):
        assert torch.equal(modules[name].weight, before[f"{name}.weight"])


def test_batching_does_not_change_the_result(tiny_model, calibration_ids):
    # Batches of 3 leave a last batch of 2: its attention mask and position embeddings are captured separately.
    whole, batched = tiny_model("llama"), tiny_model("llama")
    batched.load_state_dict(whole.state_dict())
    a = prune(whole, small_config("sparsegpt", calibration_batch_size=8), calibration_ids, return_masks=True)
    b = prune(batched, small_config("sparsegpt", calibration_batch_size=3), calibration_ids, return_masks=True)
    assert all(torch.equal(a.keep_masks[name], b.keep_masks[name]) for name in a.keep_masks)
    for (name, p), q in zip(whole.named_parameters(), batched.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_bfloat16_model(method, tiny_model, calibration_ids):
    model = tiny_model("llama").to(torch.bfloat16)
    prune(model, small_config(method), calibration_ids, progress=False)
    for name, module in linear_modules(model).items():
        assert module.weight.dtype == torch.bfloat16, name
        assert nm_violations(weight_view(module), 2, 4) == 0, name
    with torch.no_grad():
        assert torch.isfinite(model(calibration_ids[:2]).logits).all()


# --- calibration data ------------------------------------------------------------------------------------------


def test_calibration_windows_are_seeded_non_overlapping_slices(char_tokenizer, calibration_text):
    ids = tokenize_text(load_text(calibration_text), char_tokenizer)
    slots = ids.numel() // 32
    windows = calibration_windows(calibration_text, char_tokenizer, num_samples=slots, seq_len=32, seed=0)
    assert windows.shape == (slots, 32) and windows.dtype == torch.long
    starts = []
    for window in windows:
        matches = [s for s in range(0, slots * 32, 32) if torch.equal(ids[s : s + 32], window)]
        assert len(matches) >= 1
        starts.append(matches[0])
    assert sorted(starts) == list(range(0, slots * 32, 32))  # every slot once: no overlap, tail dropped
    again = calibration_windows(calibration_text, char_tokenizer, num_samples=4, seq_len=32, seed=0)
    assert torch.equal(again, windows[:4])  # the seed fixes the order
    other = calibration_windows(calibration_text, char_tokenizer, num_samples=slots, seq_len=32, seed=1)
    assert not torch.equal(other, windows)


def test_load_text_from_a_saved_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"id": [1, 2], "text": ["first doc", "second doc"]}).save_to_disk(tmp_path / "one")
    assert load_text(str(tmp_path / "one")) == "first doc\n\nsecond doc"  # the first string column
    splits = {"train": {"body": ["a"]}, "test": {"body": ["b", "c"]}}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    assert load_text(str(tmp_path / "dd")) == "a"
    assert load_text(str(tmp_path / "dd"), split="test") == "b\n\nc"
    with pytest.raises(ValueError, match="has no split 'validation'; it has train, test"):
        load_text(str(tmp_path / "dd"), split="validation")


# --- sequential propagation and shared statistics --------------------------------------------------------------


def input_statistic(model: nn.Module, module: nn.Module, ids: torch.Tensor, statistic: str) -> torch.Tensor:
    r"""The raw statistic of `module`'s input when the whole `model` runs on `ids`."""
    accumulated = STATISTIC_TYPES[statistic](module.in_features, torch.device("cpu"))
    handle = module.register_forward_pre_hook(lambda _, args: accumulated.update(args[0]))
    try:
        with torch.no_grad():
            model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    return accumulated.result()


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_block_statistics_come_from_the_pruned_previous_block(method, tiny_model, calibration_ids, spy):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    seen = spy(method)
    prune(model, small_config(method), calibration_ids, progress=False)
    statistic = METHODS[method].statistic
    assert len(seen["raw"]) == 8  # 2 blocks x (q/k/v, o, gate/up, down)

    # Block 0 is calibrated on the dense embeddings.
    block0 = input_statistic(dense, dense.model.layers[0].self_attn.q_proj, calibration_ids, statistic)
    torch.testing.assert_close(seen["raw"][0], block0, rtol=1e-4, atol=1e-4)
    # Block 1 is calibrated on the outputs of the *pruned* block 0 ...
    block1_pruned = input_statistic(model, model.model.layers[1].self_attn.q_proj, calibration_ids, statistic)
    torch.testing.assert_close(seen["raw"][4], block1_pruned, rtol=1e-4, atol=1e-4)
    # ... which differ from those of the dense block 0.
    block1_dense = input_statistic(dense, dense.model.layers[1].self_attn.q_proj, calibration_ids, statistic)
    assert (seen["raw"][4] - block1_dense).abs().max() > 1e-2 * block1_dense.abs().max()


def test_modules_reading_one_input_share_one_statistic(tiny_model, calibration_ids, spy):
    model = tiny_model("llama")
    seen = spy("sparsegpt")
    report = prune(model, small_config("sparsegpt"), calibration_ids, progress=False)
    assert len(seen["raw"]) == 8
    stats_of = {name: stats for name, (_, stats) in zip(report.modules, seen["calls"], strict=True)}
    for block in ("model.layers.0", "model.layers.1"):
        groups = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
        groups += [["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]
        leaders = [stats_of[f"{block}.{group[0]}"] for group in groups]
        for group, leader in zip(groups, leaders, strict=True):
            assert all(stats_of[f"{block}.{name}"] is leader for name in group), group
        assert len({id(leader) for leader in leaders}) == 4


def test_factorisations_per_block_equal_distinct_inputs(arch, tiny_model, calibration_ids, spy):
    model = tiny_model(arch)
    seen = spy("sparsegpt")
    prune(model, small_config("sparsegpt"), calibration_ids, progress=False)
    assert len(seen["raw"]) == 2 * DISTINCT_INPUTS_PER_BLOCK[arch]


def test_magnitude_needs_no_calibration(tiny_model, spy):
    model = tiny_model("llama")
    seen = spy("magnitude")
    report = prune(model, PruningConfig(method="magnitude", sparsity="4:8"), progress=False)
    assert len(seen["calls"]) == len(report.modules) == 14
    assert all(stats is None for _, stats in seen["calls"])
    assert all(nm_violations(weight_view(m), 4, 8) == 0 for m in linear_modules(model).values())


def test_unpruned_first_block_still_feeds_the_second(tiny_model, calibration_ids, spy):
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    seen = spy("wanda")
    report = prune(model, small_config("wanda", ignore=[r"model\.layers\.0\..*", "lm_head"]), calibration_ids)
    assert all(name.startswith("model.layers.1.") for name in report.modules) and len(report.modules) == 7
    for name, param in dense.model.layers[0].named_parameters():
        assert torch.equal(param, model.model.layers[0].get_parameter(name))
    expected = input_statistic(dense, dense.model.layers[1].self_attn.q_proj, calibration_ids, "input_norm")
    torch.testing.assert_close(seen["raw"][0], expected, rtol=1e-4, atol=1e-4)


# --- device policy ---------------------------------------------------------------------------------------------


def testplace_outside_blocks_moves_and_restores_what_is_outside(tiny_model, monkeypatch):
    model = tiny_model("llama")
    _, blocks = find_decoder_blocks(model)

    def outside_blocks():
        tensors = [*model.named_parameters(), *model.named_buffers()]
        return {t.data_ptr() for name, t in tensors if not name.startswith("model.layers.")}

    outside = outside_blocks()
    assert len(outside) == 5  # embed_tokens, norm, lm_head; buffers rotary inv_freq, original_inv_freq
    moves = []
    tensor_to = torch.Tensor.to

    def spy_to(self, *args, **kwargs):
        moves.append((self.data_ptr(), torch.device(args[0] if args else kwargs["device"])))
        return tensor_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", spy_to)
    # `cpu:0` compares unequal to the tensors' `cpu`, so on a machine without accelerators every tensor outside
    # the blocks still counts as "elsewhere" and goes through the move and the restore.
    restore = place_outside_blocks(model, blocks, torch.device("cpu", 0))
    assert sorted(moves) == sorted((ptr, torch.device("cpu", 0)) for ptr in outside)
    placed, moves[:] = outside_blocks(), []  # (`.to` may have copied them)
    restore()
    assert sorted(moves) == sorted((ptr, torch.device("cpu")) for ptr in placed)


def test_pruning_device_cpu_keeps_blocks_on_cpu(tiny_model, calibration_ids, monkeypatch):
    model = tiny_model("llama")
    moves = []
    for index, block in enumerate(model.model.layers):
        original_to = block.to

        def spy_to(*args, _index=index, _to=original_to, **kwargs):
            moves.append((_index, torch.device(args[0]) if args else kwargs.get("device")))
            return _to(*args, **kwargs)

        monkeypatch.setattr(block, "to", spy_to)
    prune(model, small_config("wanda"), calibration_ids, progress=False)
    cpu = torch.device("cpu")
    # each block: to the pruning device, then home; block 0 once more first, for one probe call while capturing
    assert moves == [(0, cpu), (0, cpu), (0, cpu), (0, cpu), (1, cpu), (1, cpu)]
    assert all(p.device == cpu for p in model.parameters())
    assert all(b.device == cpu for b in model.buffers())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs one CUDA device")
@pytest.mark.parametrize("method", METHOD_NAMES)
def test_pruning_on_cuda_returns_every_tensor_home(method, tiny_model, calibration_ids):
    model = tiny_model("llama")
    prune(model, small_config(method, pruning_device="cuda"), calibration_ids, progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())
    assert all(nm_violations(weight_view(m), 2, 4) == 0 for m in linear_modules(model).values())

    model = tiny_model("llama").cuda()  # and a model on the GPU pruned on the CPU goes back to the GPU
    prune(model, small_config(method, pruning_device="cpu"), calibration_ids, progress=False)
    assert all(p.device.type == "cuda" for p in model.parameters())
    assert all(nm_violations(weight_view(m), 2, 4) == 0 for m in linear_modules(model).values())


# --- report ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_report_contents_and_masks(method, tiny_model, calibration_ids):
    model = tiny_model("llama")
    model.train()
    report = prune(model, small_config(method, "4:8"), calibration_ids, progress=False, return_masks=True)
    assert model.training  # the mode is restored
    assert report.method == method and report.pattern == "4:8" and report.seconds > 0
    assert len(report.modules) == 14 and set(report.keep_masks) == set(report.modules)
    modules = dict(model.named_modules())
    for name, entry in report.modules.items():
        weight = weight_view(modules[name])  # (out, in)
        assert entry.seconds > 0 and entry.numel == weight.numel() and entry.num_zeros == weight.numel() // 2
        if method == "sparsegpt":
            assert entry.error is not None and entry.error > 0
        else:
            assert entry.error is None
        keep_mask = report.keep_masks[name]
        assert keep_mask.dtype == torch.bool and keep_mask.shape == weight.shape and keep_mask.device.type == "cpu"
        assert torch.equal(keep_mask, weight != 0)  # consistent with the weights (no kept weight is exactly 0)
        assert (keep_mask.view(weight.shape[0], -1, 8).sum(-1) == 4).all()
    record = json.loads(json.dumps(report.to_dict()))
    assert record["sparsity"] == 0.5 and set(record["modules"]) == set(report.modules)
    text = str(report)
    assert "model.layers.1.mlp.down_proj" in text and f"14 modules pruned with {method} (4:8)" in text
    assert prune(tiny_model("llama"), small_config(method), calibration_ids, progress=False).keep_masks is None


# --- bad input: clear errors that name the field and the fix ---------------------------------------------------


def test_group_size_that_does_not_divide_an_input_names_the_module(tiny_model, calibration_ids, caplog):
    model = tiny_model("llama", intermediate_size=100)  # down_proj has 100 inputs: 100 % 8 == 4
    with pytest.raises(ValueError, match=r"module 'model\.layers\.0\.mlp\.down_proj' has 100 inputs") as excinfo:
        prune(model, small_config("sparsegpt", "4:8"), calibration_ids, progress=False)
    assert "`skip_incompatible=True`" in str(excinfo.value) and "`ignore`" in str(excinfo.value)

    before = clone_state(model)
    with caplog.at_level(logging.WARNING, logger="hfprune"):
        report = prune(model, small_config("sparsegpt", "4:8", skip_incompatible=True), calibration_ids)
    assert "skipping 'model.layers.0.mlp.down_proj'" in caplog.text
    assert len(report.modules) == 12 and not any(name.endswith("down_proj") for name in report.modules)
    for index in (0, 1):
        name = f"model.layers.{index}.mlp.down_proj.weight"
        assert torch.equal(model.get_parameter(name), before[name])


def test_method_not_set_or_unknown(tiny_model):
    with pytest.raises(ValueError, match=r"^`method` is not set; use PruningConfig\(method='sparsegpt'.*admm"):
        prune(tiny_model("llama"), PruningConfig(sparsity="2:4"), progress=False)
    with pytest.raises(ValueError, match=r"^`method`='obs' is unknown; choose one of"):
        PruningConfig(method="obs")


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_calibrated_methods_need_calibration(method, tiny_model):
    with pytest.raises(ValueError, match=rf"`method`='{method}' needs calibration data; pass `calibration=`"):
        prune(tiny_model("llama"), small_config(method), progress=False)


@pytest.mark.parametrize("content", ["", "  \n\n \n"])
def test_empty_calibration_file(content, tiny_model, char_tokenizer, tmp_path):
    file = tmp_path / "calib.txt"
    file.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=r"calibration source '.*calib\.txt' is empty"):
        prune(tiny_model("llama"), small_config("wanda"), str(file), char_tokenizer, progress=False)


def test_calibration_too_short(tiny_model, char_tokenizer, tmp_path):
    file = tmp_path / "calib.txt"
    file.write_text("x" * 100, encoding="utf-8")  # 100 tokens: 3 windows of 32
    with pytest.raises(ValueError, match=r"has 100 tokens: 3 windows of 32, but 8 were requested") as excinfo:
        prune(tiny_model("llama"), small_config("sparsegpt"), str(file), char_tokenizer, progress=False)
    assert "`num_calibration_samples`" in str(excinfo.value) and "`calibration_seq_len`" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"calibration ids have shape \(4, 32\); 8 samples of 32 tokens") as excinfo:
        prune(tiny_model("llama"), small_config("sparsegpt"), torch.randint(0, 128, (4, 32)), progress=False)
    assert "Lower `num_calibration_samples`" in str(excinfo.value)


def test_calibration_text_without_a_tokenizer(tiny_model, calibration_text):
    with pytest.raises(ValueError, match="a tokenizer is needed"):
        prune(tiny_model("llama"), small_config("wanda"), calibration_text, progress=False)


def test_sequence_length_beyond_the_model_positions(tiny_model, calibration_ids):
    with pytest.raises(ValueError, match=r"sequence length 128 is beyond the model's 64 positions") as excinfo:
        prune(tiny_model("llama"), small_config("wanda", calibration_seq_len=128), calibration_ids, progress=False)
    assert "of at most 64" in str(excinfo.value) and "`calibration_seq_len`" in str(excinfo.value)


def test_no_prunable_modules(tiny_model):
    with pytest.raises(ValueError, match=r"no prunable modules found in LlamaForCausalLM \(targets=None, ignore="):
        prune(tiny_model("llama"), PruningConfig(method="magnitude", ignore=[".*"]), progress=False)
    with pytest.raises(ValueError, match="no prunable modules found"):
        prune(tiny_model("llama"), PruningConfig(method="magnitude", targets=["no_such_proj"]), progress=False)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_non_finite_calibration_activations(method, bad, tiny_model, calibration_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[int(calibration_ids[0, 0])] = bad
    before = clone_state(model)
    with pytest.raises(ValueError, match=r"entering 'model\.layers\.0\.self_attn\.q_proj' contain NaN or Inf"):
        prune(model, small_config(method), calibration_ids, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if torch.isfinite(before[k]).all())  # nothing pruned


def test_a_failure_mid_way_moves_the_block_back_and_says_how_far_it_got(tiny_model, calibration_ids, monkeypatch):
    from hfprune.oneshot.methods import METHODS, PruningMethod

    model = tiny_model("llama", num_hidden_layers=3)
    wanda = METHODS["wanda"]
    calls = []

    def failing(weight, stats, target, config):
        calls.append(weight.shape)
        if len(calls) == 9:  # the second module of block 1 (7 modules a block)
            raise ValueError("the kernel broke")
        return wanda.prune_weight(weight, stats, target, config)

    monkeypatch.setitem(METHODS, "wanda", PruningMethod("wanda", "input_norm", failing, wanda.prepare))
    moves = []
    original_to = model.model.layers[1].to

    def spy_to(*args, **kwargs):
        moves.append(args[0] if args else kwargs.get("device"))
        return original_to(*args, **kwargs)

    monkeypatch.setattr(model.model.layers[1], "to", spy_to)
    with pytest.raises(ValueError, match=r"decoder block 1 \(blocks 0-0 are already pruned, and some of block 1"):
        prune(model, small_config("wanda"), calibration_ids, progress=False)
    assert len(moves) == 2  # to the pruning device, and home again despite the failure
    assert sparsity_of(model.model.layers[0].mlp.down_proj.weight) == 0.5
    assert sparsity_of(model.model.layers[2].mlp.down_proj.weight) == 0.0
