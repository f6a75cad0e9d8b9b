# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune", "torch>=2.4", "transformers>=4.56", "accelerate>=1.0", "pyyaml>=6.0"]
# ///
r"""Sparse training from a recipe: continue training a causal LM with `PruningTrainer` and save it exactly sparse.

Usage (from the repository root; the recipes in `recipes/demo-model/` train the shipped `examples/demo-model`):
    python examples/sparse_training.py recipes/demo-model/mdgf_exp_1of16.yaml
    python examples/sparse_training.py recipes/demo-model/ste_2of4.yaml --max_steps 20 --output_dir outputs/quick
    python examples/sparse_training.py recipes/qwen2.5-0.5b/sparsegpt_finetune_2of4.yaml   # downloads from the Hub
    accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml examples/sparse_training.py RECIPE.yaml

Options after the recipe override its fields by name (`--model_name_or_path DIR`, `--train_file FILE`, any
`PruningConfig` or `TrainingArguments` field).
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.calibration.data import load_text, tokenize_text


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or Hub id of a causal LM."})
    train_file: str = field(metadata={"help": "Training text (a file, a saved dataset folder or a dataset name)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out text for perplexity after training."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training window."})
    eval_windows: int | None = field(default=None, metadata={"help": "Evaluate only this many 256-token windows."})


def parse_recipe(argv: list[str]) -> tuple[ModelArguments, PruningConfig, TrainingArguments]:
    r"""Reads the flat YAML recipe `argv[0]`; the `--field value` options after it override its values.

    The recipe's values become the parser's defaults, so an option on the command line wins and is converted to the
    field's type as usual; a key that is no field of the three dataclasses is an error, as in `parse_yaml_file`.
    """
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: sparse_training.py RECIPE.yaml [--field value ...]")
    parser = HfArgumentParser((ModelArguments, PruningConfig, TrainingArguments))
    recipe = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")) or {}
    fields = {action.dest: action for action in parser._actions}
    unknown = sorted(set(recipe) - set(fields))
    if unknown:
        raise ValueError(f"{argv[0]}: keys that are no field of the model, pruning or training arguments: {unknown}")
    parser.set_defaults(**recipe)
    for key in recipe:
        fields[key].required = False  # given by the recipe
    return parser.parse_args_into_dataclasses(args=argv[1:])


def main() -> None:
    # 1. One recipe holds the model, pruning and training fields (flat YAML; keys are the dataclass field names),
    #    and the command line may override any of them
    model_args, pruning_config, training_args = parse_recipe(sys.argv[1:])

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
            trainer.model,
            tokenizer,
            model_args.eval_file,
            seq_len=256,
            max_windows=model_args.eval_windows,
            progress=not training_args.disable_tqdm,
        )
        print(f"perplexity on {model_args.eval_file}: {ppl:.2f}")


if __name__ == "__main__":
    main()
