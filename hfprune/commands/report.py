r"""`hfprune report MODEL`: the fraction of zeros of every prunable weight of a model."""

from __future__ import annotations

import argparse

from .common import add_common_options, emit, load_model, model_source


HELP = "sparsity of every Linear / Conv1D / fused expert weight of a model"
DESCRIPTION = "Prints the fraction of zeros of every nn.Linear, Conv1D and fused expert weight of a model, by name."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local model folder, or a Hub id ('org/name'; needs the network)")
    add_common_options(parser)


def run(args: argparse.Namespace) -> int:
    from ..evaluation import sparsity_report

    model, _ = load_model(model_source(args.model), args.dtype, plain=True)
    report = sparsity_report(model)
    width = max((len(n) for n in report), default=6)
    emit(args, report, "\n".join(f"{name:<{width}}  {value:.4f}" for name, value in report.items()))
    return 0
