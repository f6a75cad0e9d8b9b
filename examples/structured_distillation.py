# /// script
# requires-python = ">=3.10"
# dependencies = ["hfprune", "torch>=2.4", "transformers>=4.56", "accelerate>=1.0", "pyyaml>=6.0"]
# ///
r"""Structured pruning, then recovery by distillation (Minitron): remove half of every MLP's channels with
`hfprune.prune_structured`, then train the smaller model on the logits of its dense original with `PruningTrainer`.

Offline and on CPU with the shipped recipe, which prunes `examples/demo-model` (run from the repository root):
    python examples/structured_distillation.py          # recipes/demo-model/sparsegpt_mlp50_distill.yaml
    python examples/structured_distillation.py RECIPE.yaml --max_steps 20 --distillation_temperature 2.0

The recipe's keys are fields of `ModelArguments` and `DistillationArguments` below, of `hfprune.PruningConfig`
(`structure`, `method`, the calibration fields) and of `TrainingArguments`; options after it override them.
"""

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

import hfprune
from hfprune import PruningConfig, PruningTrainer
from hfprune.calibration.data import load_text, tokenize_text
from hfprune.structured.budget_search import budget_table, structure_text
from hfprune.training.distillation import DistillationArguments


RECIPE = "recipes/demo-model/sparsegpt_mlp50_distill.yaml"


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "The dense model: the teacher, and what is pruned."})
    train_file: str = field(metadata={"help": "Training text, cut into windows of `seq_len` tokens."})
    calibration_file: str = field(metadata={"help": "Calibration text of the structured pruning."})
    eval_file: str = field(metadata={"help": "Held-out text for perplexity (256-token windows)."})
    seq_len: int = field(default=128, metadata={"help": "Tokens per training window."})


def main() -> None:
    # 1. The recipe's values become the defaults; `--field value` options after it win
    argv = sys.argv[1:]
    recipe_file = argv.pop(0) if argv and not argv[0].startswith("-") else RECIPE
    parser = HfArgumentParser((ModelArguments, PruningConfig, DistillationArguments, TrainingArguments))
    recipe = yaml.safe_load(Path(recipe_file).read_text(encoding="utf-8"))
    if unknown := sorted(set(recipe) - {action.dest for action in parser._actions}):
        raise SystemExit(f"{recipe_file}: keys that are no field of the arguments: {unknown}")
    parser.set_defaults(**recipe)
    for action in parser._actions:
        action.required = action.required and action.dest not in recipe
    model_args, pruning_config, distillation, training_args = parser.parse_args_into_dataclasses(args=argv)

    # 2. The dense model twice: the teacher, and the student about to be pruned
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    teacher, student = (AutoModelForCausalLM.from_pretrained(model_args.model_name_or_path, dtype=torch.float32)
                        for _ in range(2))  # fmt: skip

    def ppl(model) -> float:
        return hfprune.perplexity(model, tokenizer, model_args.eval_file, seq_len=256, progress=False)

    # 3. Structured pruning: a smaller dense model with a standard config (`intermediate_size` halved)
    rows = [("dense", ppl(teacher), sum(p.numel() for p in teacher.parameters()))]
    #    (with a budget such as `structure: {params: 0.7}`, the structure the search picked; its candidates are printed)
    report = hfprune.prune_structured(student, pruning_config, model_args.calibration_file, tokenizer)
    if report.budget:
        print(budget_table(report.budget))
    rows.append((f"{pruning_config.method} {structure_text(report.structure)}", ppl(student), None))

    # 4. Distillation from the dense teacher; the student has no masks to keep, so `pruning_config=None`
    ids = tokenize_text(load_text(model_args.train_file), tokenizer)
    windows = ids[: ids.numel() // model_args.seq_len * model_args.seq_len].view(-1, model_args.seq_len)
    trainer = PruningTrainer(
        student, training_args, train_dataset=[{"input_ids": row, "labels": row} for row in windows],
        processing_class=tokenizer, pruning_config=None, teacher_model=teacher, **asdict(distillation),
    )  # fmt: skip
    trainer.train()
    trainer.save_model()  # a plain, smaller checkpoint: AutoModelForCausalLM.from_pretrained loads it
    rows.append((f"+ distillation, {trainer.state.global_step} steps", ppl(student.eval()), None))

    # 5. Perplexity before and after
    params = sum(p.numel() for p in student.parameters())
    print(f"\n{'model':<34}{'perplexity':>12}{'params':>12}")
    for name, value, count in rows:
        print(f"{name:<34}{value:>12.2f}{count or params:>12,}")


if __name__ == "__main__":
    main()
