r"""The markdown page of a [`MultiComparisonReport`]: one dense model against one or several pruned ones."""

from __future__ import annotations

import math
import os

from .markdown_fragility import escape, fragility_section
from .robustness import top1_kept


def comparison_markdown(report, files: dict[str, str]) -> str:
    r"""The report page; it links the PNG plots named in `files` (by kind), which `save` writes beside it."""
    sections = (_summary, _loss, _geometry, _corruptions, _similarity, fragility_section, _blocks, _layers, _windows)
    lines = []
    for section in sections:
        lines += section(report, files)
    return "\n".join(lines)


def relative(new: float, old: float) -> str:
    if not math.isfinite(new) or not math.isfinite(old) or old == 0:
        return "-"
    return f"{100 * (new - old) / old:+.2f}%"


def _plot(files, kind: str, alt: str) -> list[str]:
    return [f"![{alt}]({os.path.basename(files[kind])})", ""] if kind in files else []


def _f(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None or not math.isfinite(value) else format(value, spec)


def _summary(report, files):
    names = report.names
    title = "# Dense vs pruned" if len(names) == 1 else f"# Dense vs {len(names)} pruned models"
    dense_geometry = report.models[0].geometry.dense
    lines = [
        title,
        "",
        "| model | perplexity | change | mean loss increase (nats) | tokens worse | top-1 accuracy | top-1 flips |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| dense | {report.dense_perplexity:.4f} | | | | {dense_geometry.top1_accuracy:.4f} | |",
    ]
    for m in report.models:
        lines.append(
            f"| {escape(m.name)} | {m.pruned_perplexity:.4f} | {relative(m.pruned_perplexity, m.dense_perplexity)} | "
            f"{m.loss_increase.mean:+.4f} | {100 * m.loss_increase.fraction_increased:.1f}% | "
            f"{m.geometry.pruned.top1_accuracy:.4f} | {100 * m.geometry.flips:.2f}% |"
        )
    return lines + [
        "",
        (
            f"{report.num_windows} windows of {report.seq_len} tokens ({report.num_tokens} predicted tokens); linear "
            f"CKA over {report.cka_tokens} evenly spaced tokens. Top-1 flips: tokens whose top-1 prediction differs "
            "from the dense model's."
        ),
        "",
    ]


def _loss(report, files):
    quantiles = list(report.models[0].loss_increase.quantiles)
    lines = [
        "## Per-token loss increase (pruned NLL - dense NLL, nats)",
        "",
        "| model | mean | std | tokens worse | " + " | ".join(f"q{q}" for q in quantiles) + " |",
        "| --- | ---: | ---: | ---: |" + " ---: |" * len(quantiles),
    ]
    for m in report.models:
        li = m.loss_increase
        values = " | ".join(f"{li.quantiles[q]:.4f}" for q in quantiles)
        lines.append(
            f"| {escape(m.name)} | {li.mean:.4f} | {li.std:.4f} | {100 * li.fraction_increased:.1f}% | {values} |"
        )
    return lines + [""] + _plot(files, "loss_increase", "loss increase histogram")


def _geometry(report, files):
    lines = [
        "## Last-layer geometry per predicted token",
        "",
        (
            "For the final hidden state `h` (after the last norm, what the LM head reads) and the output-embedding row "
            "`E_y` of the target token `y`: the angle between `h` and `E_y` (degrees; smaller: closer to the target's "
            "direction), the norm `||h||`, and the margin: target logit minus the largest other logit (> 0 exactly "
            "when the top-1 prediction is right). Medians over the predicted tokens; changes are per token, pruned - "
            "dense."
        ),
        "",
        (
            "| model | top-1 accuracy | angle (deg) | norm | margin | flips | right -> wrong | wrong -> right | "
            "mean angle change (deg) | median norm ratio | mean margin change |"
        ),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    dense = report.models[0].geometry.dense
    row = (
        f"{dense.angle.quantiles['0.5']:.2f} | {dense.norm.quantiles['0.5']:.3f} | {dense.margin.quantiles['0.5']:.3f}"
    )
    lines.append(f"| dense | {dense.top1_accuracy:.4f} | {row} | | | | | | |")
    for m in report.models:
        g, p = m.geometry, m.geometry.pruned
        lines.append(
            f"| {escape(m.name)} | {p.top1_accuracy:.4f} | {p.angle.quantiles['0.5']:.2f} | "
            f"{p.norm.quantiles['0.5']:.3f} | {p.margin.quantiles['0.5']:.3f} | {100 * g.flips:.2f}% | "
            f"{100 * g.correct_to_wrong:.2f}% | {100 * g.wrong_to_correct:.2f}% | {g.mean_angle_change:+.3f} | "
            f"{g.median_norm_ratio:.4f} | {g.mean_margin_change:+.4f} |"
        )
    return lines + [""] + _plot(files, "geometry", "angle, norm and margin distributions")


def _corruptions(report, files):
    if not report.models[0].corruptions:
        return []
    first = report.models[0].corruptions[0]
    lines = [
        "## Under corrupted input",
        "",
        (
            f"Every model reads the same corrupted copy of the evaluation data (severity {first.severity:g}, seed "
            f"{first.seed}). NLL increase: mean NLL per token on the corrupted data minus on the clean data (nats); "
            "extra over dense: the pruned model's NLL increase minus the dense model's (> 0: the noise costs it more "
            "than it costs the dense model). Flips: tokens whose top-1 prediction differs from the dense model's on "
            "the same input. Top-1 kept: top-1 accuracy on the corrupted input / on the clean input (bounded, so it "
            "does not favour a model that is already bad on clean input, as the NLL increase does). Text corruptions "
            "are predicted as written (typos included); `token_dropout` corrupts the context only and keeps the "
            "targets clean"
            + (f" (fill id {report.token_dropout_fill_id})." if report.token_dropout_fill_id is not None else ".")
        ),
        "",
        (
            "| corruption | model | perplexity | NLL increase | extra over dense | top-1 accuracy | top-1 kept | "
            "flips (clean -> noisy) |"
        ),
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    kept = top1_kept(report)
    for c, result in enumerate(report.models[0].corruptions):
        lines.append(
            f"| `{result.name}` | dense | {result.dense_perplexity:.4f} | {result.dense_nll_increase:+.4f} | | "
            f"{result.dense_top1_accuracy:.4f} | {_percent(kept['dense'][c])} | |"
        )
        for m in report.models:
            r = m.corruptions[c]
            lines.append(
                f"| | {escape(m.name)} | {r.pruned_perplexity:.4f} | {r.pruned_nll_increase:+.4f} | "
                f"{r.extra_nll_increase:+.4f} | {r.pruned_top1_accuracy:.4f} | {_percent(kept[m.name][c])} | "
                f"{100 * m.geometry.flips:.2f}% -> {100 * r.flips:.2f}% |"
            )
    extra = {m.name: sum(r.extra_nll_increase for r in m.corruptions) / len(m.corruptions) for m in report.models}
    worst = max(extra, key=extra.get)
    average = f"{extra[worst]:+.4f} nats per token, averaged over the corruptions"
    verdict = (
        f"By loss, the most brittle is **{escape(worst)}** (extra NLL increase over dense {average})."
        if extra[worst] > 0
        else f"By loss, no pruned model loses more to these corruptions than the dense model; the closest is "
        f"**{escape(worst)}** ({average})."
    )
    mean_kept = {name: _mean(shares) for name, shares in kept.items()}
    least = min((n for n in mean_kept if n != "dense" and mean_kept[n] is not None), key=mean_kept.get, default=None)
    if least is not None and mean_kept["dense"] is not None:
        relation = "less" if mean_kept[least] < mean_kept["dense"] else "no less"
        verdict += (
            f" By top-1 accuracy kept (averaged over the corruptions), **{escape(least)}** keeps the least, "
            f"{_percent(mean_kept[least])}: {relation} than the dense model's {_percent(mean_kept['dense'])}."
        )
    lines += ["", verdict, ""]
    return lines + _plot(files, "corruptions", "corrupted-input results")


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) or not values else sum(values) / len(values)


def _matrix(names, matrix, title):
    lines = [f"| {title} | " + " | ".join(escape(n) for n in names) + " |", "| --- |" + " ---: |" * len(names)]
    lines += [
        f"| {escape(n)} | " + " | ".join(_f(v, ".3f") for v in row) + " |"
        for n, row in zip(names, matrix, strict=True)
    ]
    return lines + [""]


def _similarity(report, files):
    s = report.similarity
    if s is None:
        return []
    lines = [
        "## Which methods damage the same tokens",
        "",
        (
            "Correlation over the predicted tokens of two models' loss increases (Pearson; Spearman on ranks), and "
            f"the Jaccard overlap of the tokens each damages (loss up by at least "
            f"{report.fragility.damage_threshold:.3f} nats)."
        ),
        "",
    ]
    lines += _matrix(s.names, s.spearman, "Spearman") + _matrix(s.names, s.pearson, "Pearson")
    lines += _matrix(s.names, s.jaccard, "Jaccard")
    return lines + _plot(files, "similarity", "method similarity matrices")


def _blocks(report, files):
    names = report.names
    header = " | ".join(f"{escape(n)} cosine | {escape(n)} CKA" for n in names)
    lines = [
        "## Hidden-state similarity per block",
        "",
        "Mean token cosine (all tokens) and linear CKA (the token sample) of the dense and the pruned hidden states.",
        "",
        f"| block | {header} |",
        "| --- |" + " ---: | ---: |" * len(names),
    ]
    for i, block in enumerate(report.models[0].blocks):
        cells = " | ".join(f"{m.blocks[i].cosine:.6f} | {m.blocks[i].cka:.6f}" for m in report.models)
        lines.append(f"| {block.name} | {cells} |")
    return lines + [""] + _plot(files, "blocks", "per-block similarity")


def _layers(report, files):
    names = report.names
    lines = [
        "## Per-layer sparsity and reconstruction error",
        "",
        (
            "Each cell: recorded pattern, measured sparsity, and the method's reconstruction error where it records "
            "one: `2/n ||(W - W_hat) X||_F^2` over the n calibration tokens `X` of the layer, summed over output rows "
            "(SparseGPT: its OBS estimate; ADMM: computed after the last iteration; magnitude and Wanda record none)."
        ),
        "",
        "| module | " + " | ".join(escape(n) for n in names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for i, layer in enumerate(report.models[0].layers):
        cells = []
        for m in report.models:
            entry = m.layers[i]
            error = "" if entry.error is None else f" · err {entry.error:.3g}"
            cells.append(f"{entry.pattern or 'not pruned'} · {entry.sparsity:.4f}{error}")
        lines.append(f"| {layer.name} | " + " | ".join(cells) + " |")
    return lines + [""] + _plot(files, "layers", "per-layer sparsity and error")


def _windows(report, files):
    lines = []
    for m in report.models:
        suffix = f": {escape(m.name)}" if len(report.models) > 1 else ""
        for title, windows in (("Most damaged windows", m.most_damaged), ("Least damaged windows", m.least_damaged)):
            lines += [f"## {title}{suffix}", ""]
            for w in windows:
                lines += [
                    (
                        f"**window {w.index}**: mean loss increase {w.mean_increase:+.4f} nats (dense NLL "
                        f"{w.dense_nll:.4f}, pruned {w.pruned_nll:.4f})"
                    ),
                    "",
                    "> " + escape(w.text),
                    "",
                ]
    return lines
