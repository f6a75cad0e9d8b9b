r"""The report page's section on the tokens and windows every pruned model damages, and those none does."""

from __future__ import annotations

import math
import re


def escape(text: str) -> str:
    r"""`text` with markdown's special characters backslash-escaped (shared by the whole report page)."""
    return re.sub(r"([\\`*_{}\[\]<>#|])", r"\\\1", text)


def fragility_section(report, files) -> list[str]:
    r"""The section on fragile and robust tokens, vocabulary entries and windows ([`Fragility`])."""
    f, names = report.fragility, report.names
    every = "every pruned model" if len(names) > 1 else "the pruned model"
    lines = [
        "## Fragile and robust tokens",
        "",
        (
            f"A token is damaged by a model when its loss rose by at least {f.damage_threshold:.3f} nats (the target's "
            f"probability fell to {math.exp(-f.damage_threshold):.2f} of the dense model's or less). Fragile: damaged "
            f"by {every}; robust: damaged by none."
        ),
        "",
        "Damaged: " + ", ".join(f"{escape(n)} {100 * v:.2f}%" for n, v in f.damaged_fraction.items()) + ".",
        f"Fragile: {100 * f.fragile_fraction:.2f}% of the tokens"
        + (f" (independent damage would give {100 * f.independent_fraction:.3f}%)" if len(names) > 1 else "")
        + f"; robust: {100 * f.robust_fraction:.2f}%.",
        "",
        "The dense model on each group (medians; NLL is the mean):",
        "",
        "| tokens | count | dense top-1 accuracy | dense NLL | margin | angle (deg) | norm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {g.group} | {g.tokens} | {g.dense_top1_accuracy:.4f} | {g.dense_nll:.3f} | {g.margin:.3f} | "
            f"{g.angle:.2f} | {g.norm:.3f} |"
            for g in f.geometry
        ),
        "",
    ]
    if f.tokens:
        lines += [
            "Most fragile tokens (ranked by the smallest increase over the models; context, then the predicted token):",
            "",
            "| window | position | context | token | dense NLL | " + " | ".join(escape(n) for n in names) + " |",
            "| ---: | ---: | --- | --- | ---: |" + " ---: |" * len(names),
        ]
        for t in f.tokens:
            increases = " | ".join(f"{t.increases[n]:+.3f}" for n in names)
            lines.append(
                f"| {t.window} | {t.position} | {_code(t.context)} | {_code(t.target)} | {t.dense_nll:.3f} | "
                f"{increases} |"
            )
        lines.append("")
    for title, entries in (
        ("Vocabulary entries most often fragile", f.fragile_types),
        ("Vocabulary entries most often left undamaged", f.robust_types),
    ):
        if not entries:
            continue
        lines += [
            f"{title} (at least 5 occurrences; share of occurrences damaged):",
            "",
            "| token | count | fragile | " + " | ".join(escape(n) for n in names) + " |",
            "| --- | ---: | ---: |" + " ---: |" * len(names),
        ]
        for e in entries:
            damaged = " | ".join(f"{100 * e.damaged_fraction[n]:.0f}%" for n in names)
            lines.append(f"| {_code(e.token)} | {e.count} | {100 * e.fragile_fraction:.0f}% | {damaged} |")
        lines.append("")
    for title, windows in (
        ("Fragile windows (largest smallest mean increase over the models)", f.fragile_windows),
        ("Robust windows (smallest largest mean increase over the models)", f.robust_windows),
    ):
        lines += [f"### {title}", ""]
        for w in windows:
            increases = ", ".join(f"{escape(n)} {w.increases[n]:+.4f}" for n in names)
            lines += [f"**window {w.index}**: mean loss increase {increases} nats", "", "> " + escape(w.text), ""]
    return lines


def _code(text: str) -> str:
    r"""Inline code that shows spaces and newlines and survives a table cell."""
    shown = text.replace("\n", "\\n").replace("|", "\\|").replace("`", "'")
    return f"`{shown}`" if shown.strip() else f"`{shown.replace(' ', '␣')}`"
