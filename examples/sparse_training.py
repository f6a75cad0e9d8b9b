# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune", "torch>=2.4", "transformers>=4.56", "accelerate>=1.0", "pyyaml>=6.0"]
# ///
r"""Sparse training from a recipe: continue training a causal LM with `PruningTrainer` and save it exactly sparse.

It is also the way back from one-shot pruning: prune one-shot (in the recipe with `method:`, or before with
`hfprune prune`, whose output folder keeps the masks), then train with the masks fixed (`gradient_flow: none`) on the
logits of the dense model (`teacher_model_name_or_path:`), and save an exactly sparse checkpoint.

Usage (from the repository root; the recipes in `recipes/demo-model/` train the shipped `examples/demo-model`):
    python examples/sparse_training.py recipes/demo-model/mdgf_exp_1of16.yaml
    python examples/sparse_training.py recipes/demo-model/ste_2of4.yaml --max_steps 20 --output_dir outputs/quick
    python examples/sparse_training.py recipes/demo-model/admm_2of4_distill.yaml   # one-shot ADMM, then recovery
    python examples/sparse_training.py recipes/qwen2.5-0.5b/sparsegpt_finetune_2of4.yaml   # downloads from the Hub
    accelerate launch --config_file recipes/accelerate/ddp_cpu.yaml examples/sparse_training.py RECIPE.yaml

Options after the recipe override its fields by name (`--model_name_or_path DIR`, `--train_file FILE`, any
`PruningConfig`, distillation or `TrainingArguments` field).
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.calibration.data import load_text, tokenize_text
from hfprune.training.distillation import DistillationArguments


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Model folder or Hub id of a causal LM."})
    train_file: str = field(metadata={"help": "Training text (a file, a saved dataset folder or a dataset name)."})
    eval_file: str | None = field(default=None, metadata={"help": "Held-out text for perplexity after training."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training window."})
    eval_windows: int | None = field(default=None, metadata={"help": "Evaluate only this many 256-token windows."})
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "The dense model to distil from (logit KL); default none: plain language-model loss."},
    )


def parse_recipe(argv: list[str]) -> tuple[ModelArguments, PruningConfig, DistillationArguments, TrainingArguments]:
    r"""Reads the flat YAML recipe `argv[0]`; the `--field value` options after it override its values.

    The recipe's values become the parser's defaults, so an option on the command line wins and is converted to the
    field's type as usual; a key that is no field of the three dataclasses is an error, as in `parse_yaml_file`.
    """
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: sparse_training.py RECIPE.yaml [--field value ...]")
    parser = HfArgumentParser((ModelArguments, PruningConfig, DistillationArguments, TrainingArguments))
    recipe = yaml.safe_load(Path(argv[0]).read_text(encoding="utf-8")) or {}
    fields = {action.dest: action for action in parser._actions}
    unknown = sorted(set(recipe) - set(fields))
    if unknown:
        raise ValueError(
            f"{argv[0]}: keys that are no field of the model, pruning, distillation or training arguments: {unknown}"
        )
    parser.set_defaults(**recipe)
    for key in recipe:
        fields[key].required = False  # given by the recipe
    return parser.parse_args_into_dataclasses(args=argv[1:])


def main() -> None:
    # 1. One recipe holds the model, pruning and training fields (flat YAML; keys are the dataclass field names),
    #    and the command line may override any of them
    model_args, pruning_config, distillation, training_args = parse_recipe(sys.argv[1:])

    # 2. The model and its tokenizer; a teacher must share the vocabulary (checked before any weight loads); a folder
    #    written by `hfprune prune` brings its exact keep masks for fixed-mask training
    teacher_path = model_args.teacher_model_name_or_path
    if teacher_path is not None:
        vocab = {p: AutoConfig.from_pretrained(p).vocab_size for p in (model_args.model_name_or_path, teacher_path)}
        if len(set(vocab.values())) > 1:
            raise SystemExit(f"the teacher must share the model's vocabulary to distil its logits: vocab_size {vocab}")
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32) if teacher_path else None
    keep_masks = None if pruning_config.method else hfprune.load_keep_masks(model_args.model_name_or_path)

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
        keep_masks=keep_masks,
        teacher_model=teacher,
        **asdict(distillation),
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
