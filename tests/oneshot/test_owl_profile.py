r"""`sparsity_profile="owl"`: each block's sparsity from its outlier ratio on the dense model, held by verify."""

import pytest
import torch

import hfprune
from hfprune import PruningConfig
from hfprune.oneshot.owl import outlier_ratio, owl_sparsities, wanda_scores
from hfprune.sparsity import num_to_prune


CONFIG = PruningConfig(
    method="wanda", sparsity="0.6", sparsity_profile="owl", num_calibration_samples=8, calibration_batch_size=4
)


def dense_block_ratios(model, tokens, threshold=5.0):
    r"""The oracle: input norms of every Linear from hooks on full forward passes of the dense model."""
    sums, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:

            def hook(_, args, name=name):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + x.square().sum(0)

            handles.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for start in range(0, tokens.shape[0], 4):
            model(input_ids=tokens[start : start + 4], use_cache=False)
    for handle in handles:
        handle.remove()
    modules = dict(model.named_modules())
    ratios = []
    for index in range(len(model.model.layers)):
        names = [n for n in sums if n.startswith(f"model.layers.{index}.")]
        ratios.append(
            outlier_ratio([wanda_scores(modules[n].weight.detach(), sums[n].float()) for n in names], threshold)
        )
    return ratios


def test_blocks_get_the_oracle_sparsities_and_verify_holds_them(tiny_model, calibration_ids, tmp_path):
    model = tiny_model("llama", num_hidden_layers=3)
    expected = owl_sparsities(dense_block_ratios(model, calibration_ids), 0.6, 0.08)
    report = hfprune.prune(model, CONFIG, calibration_ids, progress=False)
    assert list(report.block_sparsities) == [0, 1, 2]
    assert list(report.block_sparsities.values()) == pytest.approx(expected, abs=1e-6)
    assert sum(report.block_sparsities.values()) / 3 == pytest.approx(0.6)
    assert len({round(s, 6) for s in report.block_sparsities.values()}) == 3  # really per block
    modules = dict(model.named_modules())
    for name, entry in report.modules.items():
        block = int(name.split(".")[2])
        assert float(entry.pattern) == pytest.approx(report.block_sparsities[block], abs=1e-6)
        weight = modules[name].weight
        per_row = (weight == 0).sum(1)  # Wanda: per output row, counts differing by at most one
        assert int(per_row.sum()) == num_to_prune(weight.numel(), float(entry.pattern)), name
        assert int(per_row.max() - per_row.min()) <= 1, name
    folder = hfprune.save_pruned(model, tmp_path / "owl", CONFIG, report)
    assert hfprune.verify(folder).ok
    # a block pruned less than its own target no longer verifies, even if the average would hold
    loaded = hfprune.load_pretrained(folder)
    name = min(report.modules, key=lambda n: -float(report.modules[n].pattern))
    weight = dict(loaded.named_modules())[name].weight
    with torch.no_grad():
        weight[weight == 0] = 1e-3
    assert name in hfprune.verify(loaded).modules


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": "2:4"}, "is N:M"),
        ({"method": "magnitude"}, "needs calibration activations"),
        ({"owl_lambda": 0.7}, "`owl_lambda`"),
    ],
)
def test_owl_settings_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(**{**CONFIG.to_dict(), **kwargs})
