r"""PruningMixin on TRL's DPOTrainer: preference training keeps the N:M pattern, in mid-run checkpoints and at the end."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from test_trainer import assert_exactly_nm, linear_weights
from transformers import AutoModelForCausalLM

import hfprune
from hfprune import PruningConfig, PruningMixin
from hfprune.sparsity import nm_violations


PAIRS = {
    "prompt": ["the weights", "a sparse model", "every checkpoint", "the mask"] * 2,
    "chosen": [" keep two of four.", " stays sparse.", " holds exact zeros.", " survives reload."] * 2,
    "rejected": [" are all dense.", " grows dense.", " loses its zeros.", " is forgotten."] * 2,
}


def test_dpo_trainer_keeps_the_pattern_and_saves_it(tmp_path, char_tokenizer, tiny_model):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class SparseDPOTrainer(PruningMixin, DPOTrainer):
        pass

    tokenizer = copy.deepcopy(char_tokenizer)
    tokenizer.pad_token = "<unk>"
    tokenizer.eos_token = "<unk>"
    args = DPOConfig(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=3, report_to=[],
        disable_tqdm=True, use_cpu=True, seed=0, max_length=48,
    )  # fmt: skip
    model = tiny_model("llama").train()
    reference = tiny_model("llama").eval()
    reference.load_state_dict(model.state_dict())
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    config = PruningConfig(sparsity="2:4", gradient_flow="srste")
    trainer = SparseDPOTrainer(
        model, reference, args=args, train_dataset=Dataset.from_dict(PAIRS), processing_class=tokenizer,
        pruning_config=config,
    )  # fmt: skip
    trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 6
    assert logged[-1]["pruning/sparsity"] == 0.5
    # DPO moves the policy away from the frozen reference: the chosen-over-rejected margin grows
    margins = [h["rewards/margins"] for h in logged]
    assert margins[-1] > margins[0], margins

    checkpoint = tmp_path / "checkpoint-3"
    assert_exactly_nm({k: v for k, v in load_file(checkpoint / "model.safetensors").items() if "proj" in k}, 2, 4)
    assert hfprune.verify(checkpoint).ok
    trainer.save_model(tmp_path / "final")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert_exactly_nm(linear_weights(final), 2, 4)
    # the reference model is never pruned or trained
    assert all(torch.equal(v, before[k]) for k, v in reference.state_dict().items())
    assert nm_violations(final.model.layers[0].mlp.down_proj.weight, 2, 4) == 0
    assert nm_violations(reference.model.layers[0].mlp.down_proj.weight, 2, 4) > 0
