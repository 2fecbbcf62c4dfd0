"""Summaries of a sweep: accuracy with 95% CI, retention, ratios against baselines,
paired differences, tokens into the LLM; written as JSON, CSV, Markdown and a plot."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catp.evaluation.harness import UNPRUNED, Config

__all__ = ["BASELINES", "CATP_VARIANTS", "SELECTOR_BASELINES", "baselines_for", "summarize", "write_reports"]

#: Methods a CATP variant is compared against (the paper's baselines and the simple references).
BASELINES = ("l2norm", "selfattn", "first", "random")
CATP_VARIANTS = ("catp", "catp-all", "catp-layer", "catp-image")
#: Methods a selector (``divprune``, ``dart``, ``catp-diverse``) is compared against: does
#: diversity beat CATP's vote, and does it beat chance?
SELECTOR_BASELINES = ("catp", "random")
_Z95 = 1.959963984540054


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% CI."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, _Z95 * math.sqrt(variance / n)


def baselines_for(method: str, extra: Sequence[str] = ()) -> tuple[str, ...]:
    """The methods ``method`` gets paired differences against.

    Built in: a CATP variant against :data:`BASELINES`, a selector against
    :data:`SELECTOR_BASELINES`; ``extra`` (``catp eval --compare``) is added for every
    method, the method itself excepted.
    """
    from catp.methods import SELECTORS

    built_in = BASELINES if method in CATP_VARIANTS else SELECTOR_BASELINES if method in SELECTORS else ()
    return tuple(b for b in dict.fromkeys([*built_in, *extra]) if b != method)


def summarize(per_config: Sequence[tuple[Config, list[dict[str, Any]]]], num_questions: int,
              compare: Sequence[str] = ()) -> dict[str, Any]:
    """Summary rows (one per config) and paired comparisons (each method against its
    :func:`baselines_for`, per keep).

    Accuracies are in percent. Paired differences use only questions both configs answered.
    Each row has the accuracy ratio ``x_<baseline>`` against :data:`BASELINES` and against
    the method's own baselines.

    Args:
        per_config: each config with its records.
        num_questions: questions in the run (a config with fewer is incomplete).
        compare: extra baselines every method is compared against (e.g. ``["catp", "random"]``).
    """
    by_name = {config.name: (config, {r["id"]: r for r in records}) for config, records in per_config}
    unpruned = by_name.get(UNPRUNED)
    rows = []
    for config, records in by_name.values():
        if not records:
            continue
        accuracy, half = _mean_ci([100 * r["accuracy"] for r in records.values()])
        row: dict[str, Any] = {
            "config": config.name, "method": config.method or UNPRUNED, "keep": config.keep, "n": len(records),
            "complete": len(records) == num_questions, "accuracy": accuracy, "ci95": half,
            "ci_low": accuracy - half, "ci_high": accuracy + half,
            "llm_tokens": sum(r["llm_tokens"] for r in records.values()) / len(records),
        }
        if unpruned is not None and unpruned[1]:
            base = sum(100 * r["accuracy"] for r in unpruned[1].values()) / len(unpruned[1])
            row["retention_pct"] = 100 * accuracy / base if base else float("nan")
        ratio_to = [] if config.method is None else list(dict.fromkeys([*BASELINES, *baselines_for(config.method, compare)]))
        for baseline in ratio_to:
            other = by_name.get(f"{baseline}@{config.keep}")
            if other is not None and other[1]:
                base = sum(100 * r["accuracy"] for r in other[1].values()) / len(other[1])
                row[f"x_{baseline}"] = accuracy / base if base else None  # undefined against 0 accuracy
        rows.append(row)
    comparisons = []
    for config, records in by_name.values():
        if config.method is None:
            continue
        for baseline in baselines_for(config.method, compare):
            other = by_name.get(f"{baseline}@{config.keep}")
            if other is None:
                continue
            shared = sorted(set(records) & set(other[1]))
            if not shared:
                continue
            diff, half = _mean_ci([100 * (records[i]["accuracy"] - other[1][i]["accuracy"]) for i in shared])
            verdict = "win" if diff - half > 0 else "loss" if diff + half < 0 else "tie"
            comparisons.append({"method": config.method, "baseline": baseline, "keep": config.keep, "n": len(shared),
                                "difference": diff, "ci95": half, "verdict": verdict})
    return {"num_questions": num_questions, "rows": rows, "comparisons": comparisons, "compare": list(compare)}


def markdown_table(summary: dict[str, Any]) -> str:
    """Accuracy (± 95% CI half-width) per method and keep, with retention of the unpruned accuracy."""
    rows = summary["rows"]
    keeps = sorted({r["keep"] for r in rows if r["method"] != UNPRUNED}, reverse=True)
    lines = ["| method | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    for r in rows:
        if r["method"] == UNPRUNED:
            lines.append(f"| unpruned ({r['keep']} tokens) | {r['accuracy']:.2f} ± {r['ci95']:.2f} |" + " |" * (len(keeps) - 1))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != UNPRUNED))
    cell = {(r["method"], r["keep"]): r for r in rows}
    for method in methods:
        cells = []
        for k in keeps:
            r = cell.get((method, k))
            retention = f" ({r['retention_pct']:.1f}%)" if r is not None and "retention_pct" in r else ""
            cells.append("" if r is None else f"{r['accuracy']:.2f} ± {r['ci95']:.2f}{retention}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "Paired differences, method minus baseline (percentage points, ± 95% CI), with the ratio (×):", "",
                  "| method | baseline | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|---|" + "---|" * len(keeps)]
        comp = {(c["method"], c["baseline"], c["keep"]): c for c in summary["comparisons"]}
        for method in methods:
            for baseline in baselines_for(method, summary.get("compare", ())):
                cells = []
                for k in keeps:
                    c, r = comp.get((method, baseline, k)), cell.get((method, k))
                    ratio = f", {r[f'x_{baseline}']:.2f}×" if r is not None and r.get(f"x_{baseline}") is not None else ""
                    cells.append("" if c is None else f"{c['difference']:+.2f} ± {c['ci95']:.2f} **{c['verdict']}**{ratio}")
                if any(cells):
                    lines.append(f"| {method} | {baseline} | " + " | ".join(cells) + " |")
    incomplete = [r["config"] for r in rows if not r["complete"]]
    if incomplete:
        lines += ["", f"Incomplete (fewer than {summary['num_questions']} questions): {', '.join(incomplete)}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """Accuracy against kept query tokens, one line per method (error bars: 95% CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != UNPRUNED):
        points = sorted((r["keep"], r["accuracy"], r["ci95"]) for r in rows if r["method"] == method)
        ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                    label=method, linestyle="-" if method.startswith("catp") else "--")
    for r in rows:
        if r["method"] == UNPRUNED:
            ax.axhline(r["accuracy"], color="black", linewidth=1, linestyle=":", label=f"unpruned ({r['keep']} tokens)")
    ax.set_xscale("log", base=2)
    keeps = sorted({r["keep"] for r in rows})
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.set_xlabel("query tokens kept")
    ax.set_ylabel("VQA accuracy (%)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(summary: dict[str, Any], out: Path, title: str = "") -> list[Path]:
    """``summary.json``, ``summary.csv``, ``summary.md`` and ``accuracy.png`` in ``out``."""
    paths = [out / "summary.json", out / "summary.csv", out / "summary.md", out / "accuracy.png"]
    paths[0].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    columns = list(dict.fromkeys(key for row in summary["rows"] for key in row))
    with paths[1].open("w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(summary["rows"])
    paths[2].write_text(markdown_table(summary), encoding="utf-8")
    plot(summary, paths[3], title)
    return paths
