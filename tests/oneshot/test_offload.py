r"""Models dispatched with a `device_map`: offloaded blocks are onloaded one at a time, pruned, and written back.

The oracle is the same model pruned in memory: masks and weights must be bit-identical, and so must the checkpoint.
"""

import pytest
import torch
from accelerate import cpu_offload
from transformers import AutoModelForCausalLM

import hfprune
from hfprune import PruningConfig
from hfprune.models.offload import is_offloaded, read_parameter


CONFIG = PruningConfig(method="sparsegpt", sparsity="2:4", num_calibration_samples=8, calibration_batch_size=4)


@pytest.fixture
def saved(tiny_model, tmp_path, calibration_ids):
    model = tiny_model("llama", num_hidden_layers=3)
    folder = tmp_path / "dense"
    model.save_pretrained(folder)
    reference = AutoModelForCausalLM.from_pretrained(folder).eval()
    report = hfprune.prune(reference, CONFIG, calibration_ids, progress=False, return_masks=True)
    return folder, reference, report


def disk_map(layers_on_disk):
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({f"model.layers.{i}": "disk" if i in layers_on_disk else "cpu" for i in range(3)})
    return device_map


def assert_same_weights(model, reference):
    for name, param in reference.named_parameters():
        assert torch.equal(read_parameter(model, name), param.detach()), name


def test_disk_offloaded_blocks_prune_exactly_like_in_memory(saved, tmp_path, calibration_ids):
    folder, reference, reference_report = saved
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=disk_map({0, 2})).eval()
    assert is_offloaded(model.model.layers[0]) and not is_offloaded(model.model.layers[1])
    report = hfprune.prune(
        model, CONFIG, calibration_ids, progress=False, return_masks=True, offload_folder=tmp_path / "offload"
    )
    assert model.model.layers[0].mlp.down_proj.weight.device.type == "meta"  # back in its offload map
    for name, keep_mask in reference_report.keep_masks.items():
        assert torch.equal(report.keep_masks[name], keep_mask), name
    assert_same_weights(model, reference)
    assert {n: m.sparsity for n, m in report.modules.items()} == {
        n: m.sparsity for n, m in reference_report.modules.items()
    }
    # the checkpoint, written through the offload hooks, is the in-memory one; the dense checkpoint is untouched
    out = hfprune.save_pruned(model, tmp_path / "pruned", CONFIG, report)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert_same_weights(reloaded, reference)
    assert hfprune.verify(out).ok
    dense = AutoModelForCausalLM.from_pretrained(folder)
    assert hfprune.sparsity_report(dense)["model.layers.0.mlp.down_proj"] == 0.0


def test_disk_offload_from_the_checkpoint_needs_an_offload_folder(saved, calibration_ids):
    folder, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=disk_map({1})).eval()
    before = read_parameter(model, "model.layers.0.mlp.down_proj.weight").clone()
    with pytest.raises(ValueError, match=r"model.layers.1.* pass `offload_folder=`"):
        hfprune.prune(model, CONFIG, calibration_ids, progress=False)
    assert torch.equal(read_parameter(model, "model.layers.0.mlp.down_proj.weight"), before)  # nothing pruned


def test_cpu_offloaded_model_prunes_in_its_state_dict(saved, calibration_ids):
    folder, reference, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert is_offloaded(model.model.layers[1])
    hfprune.prune(model, CONFIG, calibration_ids, progress=False)
    assert_same_weights(model, reference)


def test_a_block_split_across_devices_is_refused(tiny_model, calibration_ids):
    model = tiny_model("llama")
    model.model.layers[0].mlp.to("meta")  # stands in for a second device
    with pytest.raises(ValueError, match="sits on several devices"):
        hfprune.prune(model, CONFIG, calibration_ids, progress=False)


def test_activations_on_disk_give_the_same_model(tiny_model, calibration_ids, tmp_path, monkeypatch):
    import tempfile

    import hfprune.calibration.capture

    reference = tiny_model("llama")
    model = tiny_model("llama")
    model.load_state_dict(reference.state_dict())
    hfprune.prune(reference, CONFIG, calibration_ids, progress=False)
    folders = []
    original = hfprune.calibration.capture.DiskActivations.__init__

    def spy(self, folder=None):
        original(self, folder)
        folders.append(self._folder)

    monkeypatch.setattr(hfprune.calibration.capture.DiskActivations, "__init__", spy)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    config = PruningConfig(**{**CONFIG.to_dict(), "offload_activations": True})
    hfprune.prune(model, config, calibration_ids, progress=False)
    assert folders and folders[0].startswith(str(tmp_path))
    assert not any(name.startswith("hfprune-activations-") for name in __import__("os").listdir(tmp_path))  # removed
    for (name, param), ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(param, ref), name


@pytest.mark.parametrize("tied", [False, True])
def test_streaming_map_leaves_untied_embeddings_on_disk(tiny_model, tied):
    from hfprune.models.offload import streaming_device_map

    model = tiny_model("llama", num_hidden_layers=2, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    device_map = streaming_device_map(model, "model.layers", 2)
    where = "cpu" if tied else "disk"  # one tensor cannot be offloaded to two places
    assert device_map == {
        "model.layers.0": "disk",
        "model.layers.1": "disk",
        "model.embed_tokens": where,
        "lm_head": where,
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
    }


def test_block_matrices_are_read_one_at_a_time(saved, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import hfprune.models.blocks
    from hfprune.models import find_decoder_blocks, named_block_matrices

    folder, _, _ = saved
    model = AutoModelForCausalLM.from_pretrained(folder, device_map=disk_map({0, 1, 2}), offload_folder=tmp_path / "o")
    reads = []
    original = hfprune.models.blocks.read_parameter
    monkeypatch.setattr(hfprune.models.blocks, "read_parameter", lambda m, n: reads.append(n) or original(m, n))
    path, blocks = find_decoder_blocks(model)
    matrices = named_block_matrices(blocks, path)
    assert reads == []  # lazy: nothing is read (or held) before it is asked for
    name, first = next(matrices)
    assert reads == ["0.self_attn.q_proj.weight"] and name == "model.layers.0.self_attn.q_proj.weight"
    dense = load_file(folder / "model.safetensors")  # `reference` is the pruned copy; this model is still dense
    assert torch.equal(first, dense["model.layers.0.self_attn.q_proj.weight"])
    assert len(list(matrices)) == 3 * 7 - 1
