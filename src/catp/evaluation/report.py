"""Summaries of a sweep: accuracy with 95% CI, retention, ratios against baselines,
paired differences, tokens into the LLM, the distribution of kept query tokens, and each
per-sample budget against a fixed ``k`` at the same mean; written as JSON, CSV, Markdown
and a plot of accuracy against the mean query tokens fed."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catp.budget import Budget
from catp.evaluation.harness import UNPRUNED, Config
from catp.evaluation.metric import normalize_answer
from catp.methods import compared_with

__all__ = ["accuracy_interval", "budget_comparisons", "full_model_label", "kept_distribution", "markdown_table", "paired_difference",
           "summarize", "write_reports"]

_Z95 = 1.959963984540054


def _mean_ci(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% CI."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, _Z95 * math.sqrt(variance / n)


def _wilson(proportion: float, n: int) -> tuple[float, float]:
    """The Wilson score 95% interval of a proportion in ``[0, 1]`` over ``n`` trials.

    For scores in ``[0, 1]`` that are not 0/1 (VQA accuracy takes 0, 1/3, 2/3, 1) the variance
    is at most ``p (1 - p)``, so this interval is the conservative one."""
    z2 = _Z95**2
    centre = (proportion + z2 / (2 * n)) / (1 + z2 / n)
    half = _Z95 * math.sqrt(proportion * (1 - proportion) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_difference(differences: Sequence[float]) -> tuple[float, float]:
    """The mean of per-question differences of two configs (points) and the half-width of its 95% CI.

    The normal approximation over the questions, unless every question differs by the same
    amount (most often 0: the two score alike on every question) or there is one question:
    that interval has no width, which ``n`` questions cannot warrant. The half-width then
    bounds what the questions not seen could do: a share of them at most the Wilson upper
    bound for 0 of ``n`` could differ otherwise, each moving the mean by at most
    ``100 + |mean|`` points (per-question scores lie in ``[0, 1]``)."""
    mean, half = _mean_ci(differences)
    if half > 0:
        return mean, half
    return mean, _wilson(0.0, len(differences))[1] * (100 + abs(mean))


def accuracy_interval(values: Sequence[float]) -> dict[str, Any]:
    """Mean accuracy (values in percent) with its 95% CI: ``accuracy``, ``ci95`` (half-width),
    ``ci_low``, ``ci_high``, ``ci_method``.

    The normal approximation over the questions (``ci_method`` ``"normal"``, clipped to
    ``[0, 100]``), unless every question scored the same (all right, all wrong) or there is one
    question: that interval has no width then, which would claim certainty that ``n``
    questions cannot give, so the Wilson score interval is used (``"wilson"``; ``ci95`` is its
    larger side, for symmetric error bars)."""
    accuracy, half = _mean_ci(values)
    if half > 0:
        return {"accuracy": accuracy, "ci95": half, "ci_low": max(0.0, accuracy - half), "ci_high": min(100.0, accuracy + half),
                "ci_method": "normal"}
    low, high = (100 * bound for bound in _wilson(accuracy / 100, len(values)))
    return {"accuracy": accuracy, "ci95": max(accuracy - low, high - accuracy), "ci_low": low, "ci_high": high, "ci_method": "wilson"}


def _percentile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` in ``[0, 1]`` of sorted values."""
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def kept_distribution(kept: Sequence[int]) -> dict[str, Any]:
    """Mean, quartiles, range and histogram of the query tokens each question fed to the LLM."""
    ordered = sorted(kept)
    histogram: dict[str, int] = {}
    for k in ordered:
        histogram[str(k)] = histogram.get(str(k), 0) + 1
    return {"kept_mean": sum(ordered) / len(ordered), "kept_min": ordered[0], "kept_p25": _percentile(ordered, 0.25),
            "kept_median": _percentile(ordered, 0.5), "kept_p75": _percentile(ordered, 0.75), "kept_max": ordered[-1],
            "kept_histogram": histogram}


def _kept(config: Config, record: dict[str, Any]) -> int:
    # Records written before budgets existed have no "kept": their count is the config's.
    return int(record.get("kept", config.keep))


def _same_answer(a: str, b: str) -> bool:
    """Whether two answers are the same after the VQA answer normalisation."""
    return normalize_answer(a) == normalize_answer(b)


def summarize(per_config: Sequence[tuple[Config, list[dict[str, Any]]]], num_questions: int,
              compare: Sequence[str] = ()) -> dict[str, Any]:
    """Summary rows (one per config), paired comparisons (each method against those its kind
    is compared with, :func:`catp.methods.compared_with`, per keep) and budget comparisons
    (each budget vs a fixed ``k`` at the same mean, :func:`budget_comparisons`).

    Accuracies are in percent, confidence intervals clipped to ``[0, 100]``. Paired
    differences use only questions both configs answered. Each row has the accuracy ratio
    ``x_<baseline>`` against each method it is compared with, and, with an unpruned run,
    ``retention_pct`` (accuracy over the unpruned accuracy) and ``loyalty_pct`` (the share of
    questions answered the same as unpruned, after answer normalisation).

    Args:
        per_config: each config with its records.
        num_questions: questions in the run (a config with fewer is incomplete).
        compare: extra baselines every method is compared against (e.g. ``["catp", "random"]``).
    """
    by_name = {config.name: (config, {r["id"]: r for r in records}) for config, records in per_config}
    measured = list(dict.fromkeys(config.method for config, _ in per_config if config.method is not None))
    unpruned = by_name.get(UNPRUNED)
    rows = []
    for config, records in by_name.values():
        if not records:
            continue
        interval = accuracy_interval([100 * r["accuracy"] for r in records.values()])
        accuracy = interval["accuracy"]
        row: dict[str, Any] = {
            "config": config.name, "method": config.method or UNPRUNED, "keep": config.keep_label,
            "budget": isinstance(config.keep, Budget), "n": len(records),
            "complete": len(records) == num_questions, **interval,
            "llm_tokens": sum(r["llm_tokens"] for r in records.values()) / len(records),
            **kept_distribution([_kept(config, r) for r in records.values()]),
        }
        if unpruned is not None and unpruned[1]:
            base = sum(100 * r["accuracy"] for r in unpruned[1].values()) / len(unpruned[1])
            row["retention_pct"] = round(100 * accuracy / base, 6) if base else float("nan")
            # Loyalty (EffiVLM-Bench's term): the share of questions answered as the unpruned model
            # answers them; accuracy alone can hide a model that is right by other answers.
            shared = [i for i in records if i in unpruned[1]]
            if shared:
                same = sum(_same_answer(records[i]["prediction"], unpruned[1][i]["prediction"]) for i in shared)
                row["loyalty_pct"] = round(100 * same / len(shared), 6)
        ratio_to = [] if config.method is None else compared_with(config.method, measured, compare)
        for baseline in ratio_to:
            other = by_name.get(f"{baseline}@{config.keep_label}")
            if other is not None and other[1]:
                base = sum(100 * r["accuracy"] for r in other[1].values()) / len(other[1])
                row[f"x_{baseline}"] = accuracy / base if base else None  # undefined against 0 accuracy
        rows.append(row)
    comparisons = []
    for config, records in by_name.values():
        if config.method is None:
            continue
        for baseline in compared_with(config.method, measured, compare):
            other = by_name.get(f"{baseline}@{config.keep_label}")
            if other is None:
                continue
            shared = sorted(set(records) & set(other[1]))
            if not shared:
                continue
            diff, half = paired_difference([100 * (records[i]["accuracy"] - other[1][i]["accuracy"]) for i in shared])
            comparisons.append({"method": config.method, "baseline": baseline, "keep": config.keep_label, "n": len(shared),
                                "difference": diff, "ci95": half, "verdict": _verdict(diff, half)})
    return {"num_questions": num_questions, "rows": rows, "comparisons": comparisons, "compare": list(compare),
            "budget_comparisons": budget_comparisons(list(by_name.values()))}


def _verdict(difference: float, half: float) -> str:
    return "win" if difference - half > 0 else "loss" if difference + half < 0 else "tie"


def budget_comparisons(per_config: Sequence[tuple[Config, dict[str, dict[str, Any]]]]) -> list[dict[str, Any]]:
    """Each budget against a fixed ``k`` of the same method at the same mean query tokens.

    A budget whose questions keep ``m`` tokens on average is compared with the fixed
    counts ``lo <= m <= hi`` nearest to it (the unpruned model counts as ``k = Q``), mixed
    with weight ``w = (m - lo) / (hi - lo)``: spending ``lo`` tokens on a ``1 - w`` share of
    the questions and ``hi`` on the rest has mean ``m`` too. The difference is paired per
    question: ``acc_budget - ((1 - w) acc_lo + w acc_hi)``, in points with a 95% CI. Run the
    fixed counts ``floor(m)`` and ``ceil(m)`` (``catp eval --match-budgets``) for the
    tightest comparison.

    Args:
        per_config: ``(config, {question id: record})`` of every config of the sweep.

    Returns:
        One dict per budget config with a bracketing pair of fixed counts measured.
    """
    by_method: dict[str, list[tuple[int, dict[str, dict[str, Any]]]]] = {}
    unpruned = next(((config.keep, records) for config, records in per_config if config.method is None and records), None)
    for config, records in per_config:
        if config.method is not None and isinstance(config.keep, int) and records:
            by_method.setdefault(config.method, []).append((config.keep, records))
    out = []
    for config, records in per_config:
        if config.method is None or not isinstance(config.keep, Budget) or not records:
            continue
        fixed = sorted(by_method.get(config.method, []) + ([unpruned] if unpruned else []), key=lambda item: item[0])
        mean = sum(_kept(config, r) for r in records.values()) / len(records)
        below = [item for item in fixed if item[0] <= mean]
        above = [item for item in fixed if item[0] >= mean]
        if not below or not above:
            continue
        (lo, lo_records), (hi, hi_records) = below[-1], above[0]
        weight = 0.0 if hi == lo else (mean - lo) / (hi - lo)
        shared = sorted(set(records) & set(lo_records) & set(hi_records))
        if not shared:
            continue
        diffs = [100 * (records[i]["accuracy"] - (1 - weight) * lo_records[i]["accuracy"] - weight * hi_records[i]["accuracy"])
                 for i in shared]
        difference, half = paired_difference(diffs)
        fixed_accuracy = sum(100 * ((1 - weight) * lo_records[i]["accuracy"] + weight * hi_records[i]["accuracy"])
                             for i in shared) / len(shared)
        out.append({"method": config.method, "budget": config.keep_label, "n": len(shared), "kept_mean": mean,
                    "fixed_low": lo, "fixed_high": hi, "weight_high": weight, "accuracy": fixed_accuracy + difference,
                    "fixed_accuracy": fixed_accuracy, "difference": difference, "ci95": half, "verdict": _verdict(difference, half)})
    return out


def _keep_columns(rows: Sequence[dict[str, Any]]) -> list[int | str]:
    """Fixed counts, largest first, then budgets in the order they ran."""
    pruned = [r for r in rows if r["method"] != UNPRUNED]
    counts = sorted({r["keep"] for r in pruned if not r["budget"]}, reverse=True)
    return counts + list(dict.fromkeys(r["keep"] for r in pruned if r["budget"]))


def _kept_text(row: dict[str, Any]) -> str:
    return (f"{row['kept_mean']:.2f} ({row['kept_min']} / {row['kept_p25']:g} / {row['kept_median']:g} / "
            f"{row['kept_p75']:g} / {row['kept_max']})")


def full_model_label(summary: dict[str, Any]) -> str:
    """What the row of all query tokens is: the unpruned model, or, in a run with an adapter, the
    adapted model with all its tokens (the adapter changes it: it is not the unpruned original)."""
    return "adapted, all tokens" if summary.get("run", {}).get("adapter") else UNPRUNED


def _accuracy_text(row: dict[str, Any]) -> str:
    """``acc ± half`` (normal 95% CI), or ``acc [low, high]`` where the Wilson interval stands in (:func:`accuracy_interval`)."""
    if row.get("ci_method") == "wilson":
        return f"{row['accuracy']:.2f} [{row['ci_low']:.1f}, {row['ci_high']:.1f}]"
    return f"{row['accuracy']:.2f} ± {row['ci95']:.2f}"


def _legend(summary: dict[str, Any], full: str) -> list[str]:
    """How to read the tables: each figure of a cell, in words."""
    rows = summary["rows"]
    lines = ["", "How to read this:", "",
             "* A cell is the VQA accuracy in % over the questions, ± the half-width of its 95% confidence interval (normal "
             "approximation over the questions)."]
    if any(r.get("ci_method") == "wilson" for r in rows):
        lines.append("* `[low, high]` instead of `±`: every question scored the same (all right or all wrong), where the normal "
                     "interval has no width; the 95% Wilson score interval for that many questions is shown instead.")
    if any("retention_pct" in r for r in rows):
        lines.append(f"* `(R%, S% same)`: R is the retention, the accuracy as a share of the accuracy in the `{full}` row; S is "
                     f"the share of questions answered as in the `{full}` row (after the VQA answer normalisation), which "
                     "accuracy alone can hide.")
    if any(r["budget"] for r in rows):
        lines.append("* `N tokens` (budgets): the mean query tokens a per-sample budget fed to the language model per question.")
    if summary["comparisons"]:
        lines.append("* Paired differences: method minus baseline on the same questions, in percentage points ± 95% CI; **win** / "
                     "**loss**: the interval lies above / below 0, **tie**: it holds 0; `×`: the ratio of the two accuracies.")
    return lines


def markdown_table(summary: dict[str, Any]) -> str:
    """Accuracy (95% CI) per method and keep, with retention of the full model's accuracy and the
    share of answers the same as it gives; for budgets, the kept tokens and the comparison with a
    fixed ``k`` at the same mean; then a legend of the figures. The full model is the unpruned one,
    or the adapted one with all its tokens in a run with an adapter (:func:`full_model_label`)."""
    rows = summary["rows"]
    keeps = _keep_columns(rows)
    full = full_model_label(summary)
    if not keeps:  # the unpruned model alone (catp eval --methods none)
        return "\n".join(["| model | accuracy |", "|---|---|"] + [f"| {full} ({r['keep']} tokens) | {_accuracy_text(r)} |"
                                                                 for r in rows if r["method"] == UNPRUNED]
                         + _legend(summary, full)) + "\n"
    lines = ["| method | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|" + "---|" * len(keeps)]
    for r in rows:
        if r["method"] == UNPRUNED:
            lines.append(f"| {full} ({r['keep']} tokens) | {_accuracy_text(r)} |" + " |" * (len(keeps) - 1))
    methods = list(dict.fromkeys(r["method"] for r in rows if r["method"] != UNPRUNED))
    cell = {(r["method"], r["keep"]): r for r in rows}
    for method in methods:
        cells = []
        for k in keeps:
            r = cell.get((method, k))
            retention = f" ({r['retention_pct']:.1f}%" if r is not None and "retention_pct" in r else ""
            if retention:
                retention += f", {r['loyalty_pct']:.0f}% same)" if "loyalty_pct" in r else ")"
            mean = f", {r['kept_mean']:.1f} tokens" if r is not None and r["budget"] else ""
            cells.append("" if r is None else f"{_accuracy_text(r)}{retention}{mean}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if summary["comparisons"]:
        lines += ["", "Paired differences, method minus baseline (percentage points, ± 95% CI), with the ratio (×):", "",
                  "| method | baseline | " + " | ".join(f"keep {k}" for k in keeps) + " |", "|---|---|" + "---|" * len(keeps)]
        comp = {(c["method"], c["baseline"], c["keep"]): c for c in summary["comparisons"]}
        for method in methods:
            for baseline in compared_with(method, methods, summary.get("compare", ())):
                cells = []
                for k in keeps:
                    c, r = comp.get((method, baseline, k)), cell.get((method, k))
                    ratio = f", {r[f'x_{baseline}']:.2f}×" if r is not None and r.get(f"x_{baseline}") is not None else ""
                    cells.append("" if c is None else f"{c['difference']:+.2f} ± {c['ci95']:.2f} **{c['verdict']}**{ratio}")
                if any(cells):
                    lines.append(f"| {method} | {baseline} | " + " | ".join(cells) + " |")
    budgets = [r for r in rows if r["budget"]]
    if budgets:
        versus = {(c["method"], c["budget"]): c for c in summary.get("budget_comparisons", [])}
        lines += ["", "Per-sample budgets: query tokens fed to the LLM per question, mean (min / p25 / median / p75 / max), "
                  "and the budget minus a fixed k of the same method at the same mean tokens (a mix of the two nearest "
                  "measured counts; paired, percentage points ± 95% CI):", "",
                  "| method | budget | kept tokens | accuracy | fixed k at the same mean | budget − fixed |", "|---|---|---|---|---|---|"]
        for r in budgets:
            c = versus.get((r["method"], r["keep"]))
            if c is None:
                fixed = difference = "no measured fixed k on both sides of the mean"
            else:
                mix = str(c["fixed_low"]) if c["fixed_low"] == c["fixed_high"] else f"{c['fixed_low']}–{c['fixed_high']} (w {c['weight_high']:.2f})"
                fixed = f"{c['fixed_accuracy']:.2f} (k {mix})"
                difference = f"{c['difference']:+.2f} ± {c['ci95']:.2f} **{c['verdict']}**"
            lines.append(f"| {r['method']} | {r['keep']} | {_kept_text(r)} | {_accuracy_text(r)} | {fixed} | {difference} |")
    incomplete = [r["config"] for r in rows if not r["complete"]]
    if incomplete:
        lines += ["", f"Incomplete (fewer than {summary['num_questions']} questions): {', '.join(incomplete)}."]
    return "\n".join(lines + _legend(summary, full)) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str = "") -> None:
    """Accuracy against the mean query tokens fed to the LLM, one line per method over its fixed
    counts and one marker per budget (error bars: 95% CI), so a budget reads against the fixed
    ``k`` line at the same mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != UNPRUNED):
        points = sorted((r["kept_mean"], r["accuracy"], r["ci95"]) for r in rows if r["method"] == method and not r["budget"])
        color = None
        if points:
            line = ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o", capsize=3,
                               label=method, linestyle="-" if method.startswith("catp") else "--")
            color = line[0].get_color()
        for r in (r for r in rows if r["method"] == method and r["budget"]):
            ax.errorbar([r["kept_mean"]], [r["accuracy"]], yerr=[r["ci95"]], marker="*", markersize=11, capsize=3, linestyle="none",
                        color=color, label=f"{method} {r['keep']}")
    for r in rows:
        if r["method"] == UNPRUNED:
            ax.axhline(r["accuracy"], color="black", linewidth=1, linestyle=":", label=f"{full_model_label(summary)} ({r['keep']} tokens)")
    ax.set_xscale("log", base=2)
    keeps = sorted({r["keep"] for r in rows if not r["budget"]})
    ax.set_xticks(keeps, [str(k) for k in keeps])
    ax.set_xlabel("query tokens fed to the LLM (mean per question)")
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
