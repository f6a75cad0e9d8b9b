# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune", "torch>=2.4", "transformers>=4.56", "accelerate>=1.0", "pyyaml>=6.0"]
# ///
r"""Sparse training from a recipe: continue training a causal LM with `PruningTrainer` and save it exactly sparse.

Usage (from the repository root):
    python examples/sparse_training.py recipes/llama-kdoc-5m/mdgf_exp_1of16.yaml
    accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml examples/sparse_training.py RECIPE.yaml
"""

import sys
from dataclasses import dataclass, field

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.calibration import load_text, tokenize_text


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or Hub id of a causal LM."})
    train_file: str = field(metadata={"help": "Training text (a file, a saved dataset folder or a dataset name)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out text for perplexity after training."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training window."})
    eval_windows: int | None = field(default=None, metadata={"help": "Evaluate only this many 256-token windows."})


def main() -> None:
    # 1. One recipe holds the model, pruning and training fields (flat YAML; keys are the dataclass field names)
    parser = HfArgumentParser((ModelArguments, PruningConfig, TrainingArguments))
    model_args, pruning_config, training_args = parser.parse_yaml_file(sys.argv[1])

    # 2. The model and its tokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)

    # 3. The training text, tokenized once and cut into windows of `seq_len` tokens
    ids = tokenize_text(load_text(model_args.train_file), tokenizer)
    windows = ids[: ids.numel() // model_args.seq_len * model_args.seq_len].view(-1, model_args.seq_len)
    train_dataset = [{"input_ids": row, "labels": row} for row in windows]

    # 4. Train: the target modules stay N:M (or unstructured) sparse following `gradient_flow`
    trainer = PruningTrainer(
        model,
        training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        pruning_config=pruning_config,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # 5. Save: weights times the final masks, pruning_config.json and the keep masks next to them
    trainer.save_model()
    if not trainer.is_world_process_zero():
        return
    print(hfprune.verify(training_args.output_dir))

    # 6. Held-out perplexity of the sparse model
    if model_args.eval_file:
        ppl = hfprune.perplexity(
            trainer.model, tokenizer, model_args.eval_file, seq_len=256, max_windows=model_args.eval_windows
        )
        print(f"perplexity on {model_args.eval_file}: {ppl:.2f}")


if __name__ == "__main__":
    main()
