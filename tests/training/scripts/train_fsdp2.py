r"""Trains a tiny Llama with PruningTrainer under FSDP2 (or DDP, `--ddp`), saves, and resumes from the middle.

Needs accelerators: accelerate enables FSDP only there (on CPU it silently trains plain multi-process instead).

    torchrun --standalone --nproc_per_node 2 tests/training/scripts/train_fsdp2.py OUTPUT
    torchrun --standalone --nproc_per_node 2 tests/training/scripts/train_fsdp2.py OUTPUT --ddp

Rank 0 writes `OUTPUT/result.json`: whether FSDP really ran, the N:M violations and sparsity of the saved model, and
`OUTPUT/final.pt` (the saved target weights) of the uninterrupted and the resumed run.
"""

import argparse
import json
import os

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from hfprune import PruningConfig, PruningTrainer
from hfprune.sparsity import nm_violations


def build(output: str, ddp: bool, resume: str | None = None):
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": row, "labels": row} for row in ids]
    fsdp = {} if ddp else {"fsdp": "full_shard", "fsdp_config": {"version": 2, "state_dict_type": "FULL_STATE_DICT"}}
    args = TrainingArguments(
        output_dir=output,
        max_steps=6,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=3,
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),  # `--ddp` on CPU: gloo
        seed=0,
        train_sampling_strategy="sequential",
        **fsdp,
    )
    pruning = PruningConfig(sparsity="2:4", gradient_flow="mdgf_exp", finetune_fraction=0.5)
    return PruningTrainer(model, args, train_dataset=data, pruning_config=pruning)


def saved_targets(trainer, folder: str) -> dict[str, torch.Tensor]:
    weights = load_file(os.path.join(folder, "model.safetensors"))
    return {n: weights[trainer.gradient_flow.parameter_names[n]] for n in trainer.gradient_flow.targets}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--ddp", action="store_true")
    options = parser.parse_args()

    trainer = build(os.path.join(options.output, "run"), options.ddp)
    trainer.train()
    trainer.save_model(os.path.join(options.output, "final"))
    fsdp_ran = trainer.is_fsdp_enabled and trainer.gradient_flow.is_sharded

    resumed = build(os.path.join(options.output, "run"), options.ddp)
    resumed.train(resume_from_checkpoint=os.path.join(options.output, "run", "checkpoint-3"))
    resumed.save_model(os.path.join(options.output, "resumed"))

    if trainer.is_world_process_zero():
        final = saved_targets(trainer, os.path.join(options.output, "final"))
        again = saved_targets(trainer, os.path.join(options.output, "resumed"))
        result = {
            "fsdp": fsdp_ran,
            "world_size": trainer.args.world_size,
            "violations": sum(nm_violations(w, 2, 4) for w in final.values()),
            "sparsity": 1 - sum(int((w != 0).sum()) for w in final.values()) / sum(w.numel() for w in final.values()),
            "resume_max_diff": max(float((final[n] - again[n]).abs().max()) for n in final),
            "masks_equal_after_resume": all(torch.equal(final[n] != 0, again[n] != 0) for n in final),
        }
        torch.save(final, os.path.join(options.output, "final.pt"))
        with open(os.path.join(options.output, "result.json"), "w", encoding="utf-8") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
