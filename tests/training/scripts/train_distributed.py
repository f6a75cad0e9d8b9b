r"""Trains a tiny Llama with PruningTrainer; run under `torchrun --nproc_per_node 2` (DDP, gloo) or as one process.

Every process writes `<output>/rank<r>.json` (rank, world size, backend, sha256 of its final keep masks and weights)
and `<output>/rank<r>.pt` (the masks and weights), so a test can check that the ranks agree with each other and with
a single-process run at the same global batch.

    torchrun --nproc_per_node 2 tests/scripts/train_distributed.py OUTPUT --per-device-batch 2
    python tests/scripts/train_distributed.py OUTPUT --per-device-batch 4
"""

import argparse
import hashlib
import json
import os

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, TrainingArguments

from hfprune import PruningConfig, PruningTrainer


def digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--per-device-batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--gradient-flow", default="mdgf_exp")
    parser.add_argument("--check-fsdp", action="store_true")
    options = parser.parse_args()
    torch.set_num_threads(1)

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
    args = TrainingArguments(
        output_dir=os.path.join(options.output, "run"),
        max_steps=options.steps,
        per_device_train_batch_size=options.per_device_batch,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        train_sampling_strategy="sequential",
    )
    pruning = PruningConfig(sparsity="2:4", gradient_flow=options.gradient_flow, finetune_fraction=0.5)
    trainer = PruningTrainer(model, args, train_dataset=data, pruning_config=pruning)
    trainer.train()

    rank, world_size = args.process_index, args.world_size
    masks = trainer.gradient_flow.keep_masks
    weights = {name: entry.param.detach().clone() for name, entry in trainer.gradient_flow.targets.items()}
    record = {
        "rank": rank,
        "world_size": world_size,
        "distributed": torch.distributed.is_available() and torch.distributed.is_initialized(),
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "masks_sha256": digest(masks),
        "weights_sha256": digest(weights),
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }
    if options.check_fsdp:
        try:
            PruningTrainer(
                model,
                TrainingArguments(
                    output_dir=args.output_dir,
                    use_cpu=True,
                    fsdp="full_shard",
                    fsdp_config={"version": 1},
                    report_to=[],
                ),
                train_dataset=data,
                pruning_config=pruning,
            )
            record["fsdp_error"] = None
        except ValueError as e:
            record["fsdp_error"] = str(e)
    torch.save({"masks": masks, "weights": weights}, os.path.join(options.output, f"rank{rank}.pt"))
    with open(os.path.join(options.output, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
