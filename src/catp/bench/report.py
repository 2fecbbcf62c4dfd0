"""Outputs of ``catp bench``: a rich table, the checks, a plot of latency and FLOPs vs kept tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["results_table", "checks_table", "plot", "stage_seconds", "markdown_tables", "flops_table"]

_MIB = 1024**2


def _kept_text(result: dict[str, Any]) -> str:
    kept = result.get("kept")
    if kept is None or kept["min"] == kept["max"]:
        return str(kept["min"] if kept else result["keep"])
    return f"{kept['mean']:.1f} ({kept['min']}-{kept['max']})"


#: A stage's older name in reports: the connector stage was ``qformer`` before the family layer.
_OLD_NAMES = {"connector": "qformer"}


def stage_seconds(result: dict[str, Any], stage: str) -> dict[str, float]:
    """The summary (median, min, max, spread) of one stage of a result, also from a report that names the
    stage as before the family layer (``qformer``)."""
    seconds = result["seconds"]
    return seconds[stage] if stage in seconds else seconds[_OLD_NAMES[stage]]


def _ms(result: dict[str, Any], stage: str) -> str:
    return f"{stage_seconds(result, stage)['median'] * 1e3:.1f}"


def results_table(results: Sequence[dict[str, Any]], title: str) -> Any:
    """One row per case: median stage times (ms), end-to-end with its spread, throughput,
    LLM tokens, analytic GFLOPs (prefill / total), KV cache and peak memory (MiB)."""
    from rich.table import Table

    table = Table(title=title)
    for column in ("method", "keep", "kept (min-max)", "batch", "LLM tok", "vision", "conn+score", "prefill", "decode", "/token",
                   "end-to-end ms", "samples/s", "GFLOP prefill", "GFLOP total", "KV MiB", "peak MiB"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for r in results:
        e2e = r["seconds"]["end_to_end"]
        table.add_row(
            r["method"], str(r["keep"]), _kept_text(r), str(r["batch"]), str(r["tokens_into_llm"]),
            _ms(r, "vision"), _ms(r, "connector"), _ms(r, "prefill"), _ms(r, "decode"), _ms(r, "decode_per_token"),
            f"{e2e['median'] * 1e3:.1f} ±{e2e['spread'] / 2:.0%}", f"{r['throughput_samples_per_s']:.2f}",
            f"{r['flops']['prefill'] / 1e9:.3g}", f"{r['flops']['total'] / 1e9:.3g}",
            f"{r['kv_cache_bytes'] / _MIB:.1f}", f"{r['peak_memory_bytes'] / _MIB:.0f}",
        )
    return table


def checks_table(checks: Sequence[dict[str, Any]]) -> str:
    """One line per check: ``PASS (a) catp keep 8 batch 1: +0.4% (<= 2%); detail`` (rich markup)."""
    lines = []
    for c in checks:
        verdict = {True: "[green]PASS[/]", False: "[red]FAIL[/]", None: "[yellow]n/a [/]"}[c["passed"]]
        value = "" if c["value"] is None else (f"{c['value']:.2f}" if c["target"] == "d" else f"{c['value']:+.1%}")
        lines.append(f"{verdict} ({c['target']}) {c['case']}: {value} ({c['limit']}); {c['detail']}")
    return "\n".join(lines)


def _kept_mean(result: dict[str, Any]) -> float:
    """Query tokens fed per sample: the count, or a budget's mean (older reports have no ``kept``)."""
    return float(result["kept"]["mean"]) if "kept" in result else float(result["keep"])


def plot(results: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Left: median end-to-end and prefill latency (min-max bars) vs kept tokens; right:
    analytic prefill and total GFLOPs vs kept tokens. One line per method and batch;
    the unpruned ``none`` point sits at keep ``Q``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        if r["method"] != "llm-only":
            groups.setdefault((r["method"], r["batch"]), []).append(r)
    for (method, batch), rows in groups.items():
        rows = sorted(rows, key=_kept_mean)
        x = [_kept_mean(r) for r in rows]
        for stage, style in (("end_to_end", "-o"), ("prefill", "--s")):
            med = [r["seconds"][stage]["median"] * 1e3 for r in rows]
            err = [[m - r["seconds"][stage]["min"] * 1e3 for m, r in zip(med, rows)],
                   [r["seconds"][stage]["max"] * 1e3 - m for m, r in zip(med, rows)]]
            left.errorbar(x, med, yerr=err, fmt=style, capsize=3, label=f"{method} b{batch} {stage.replace('_', '-')}")
    seen: set[int] = set()
    for batch in sorted({r["batch"] for r in results}):
        rows = sorted({r["keep"]: r for r in results if r["batch"] == batch and r["method"] != "llm-only"}.values(),
                      key=_kept_mean)
        if batch in seen or not rows:
            continue
        seen.add(batch)
        x = [_kept_mean(r) for r in rows]
        right.plot(x, [r["flops"]["total"] / 1e9 for r in rows], "-o", label=f"total b{batch}")
        right.plot(x, [r["flops"]["prefill"] / 1e9 for r in rows], "--s", label=f"LLM prefill b{batch}")
    left.set(xlabel="kept query tokens (mean per sample)", ylabel="latency (ms, median; bars min-max)", title="measured latency")
    right.set(xlabel="kept query tokens (mean per sample)", ylabel="GFLOPs (analytic)", title="analytic FLOPs")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_tables(report: dict[str, Any], statistic: str = "median") -> str:
    """The stage breakdown of a ``catp bench`` JSON report as Markdown (used for docs/performance.md):
    ms per stage (``statistic`` of the repeats: median or min) with each stage's share of the
    end-to-end time, and the checks."""
    lines = ["| method | keep | batch | LLM tokens | vision | connector+scoring | LLM prefill | decode (per token) | end-to-end (spread) | samples/s | GFLOPs prefill / total | KV cache MiB | peak RSS/alloc MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        s, e2e = r["seconds"], r["seconds"]["end_to_end"][statistic]

        def cell(stage: str) -> str:
            value = stage_seconds(r, stage)[statistic]
            return f"{value * 1e3:.0f} ({value / e2e:.0%})"

        lines.append(
            f"| {r['method']} | {r['keep']} | {r['batch']} | {r['tokens_into_llm']} | {cell('vision')} | {cell('connector')} | "
            f"{cell('prefill')} | {cell('decode')} ({s['decode_per_token'][statistic] * 1e3:.0f}) | "
            f"{e2e * 1e3:.0f} ({s['end_to_end']['spread']:.0%}) | {r['batch'] / e2e:.3f} | "
            f"{_gflops(r['flops']['prefill'])} / {_gflops(r['flops']['total'])} | {r['kv_cache_bytes'] / _MIB:.1f} | "
            f"{r['peak_memory_bytes'] / _MIB:.0f} |")
    for c in report.get("checks", []):
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[c["passed"]]
        value = f"{c['value']:.2f}" if c["target"] == "d" else f"{c['value']:+.1%}"
        lines.append(f"\n- ({c['target']}) {c['case']}: **{verdict}** {value} ({c['limit']}); {c['detail']}")
    return "\n".join(lines)


def _gflops(flops: float) -> str:
    """GFLOPs with 3 significant digits, whole numbers from 100 on (no exponents)."""
    giga = flops / 1e9
    return f"{giga:.3g}" if giga < 100 else f"{giga:.0f}"


def flops_table(rows: Sequence[dict[str, Any]], dtype: str) -> str:
    """Analytic GFLOPs per stage as Markdown, one row per :func:`catp.bench.runner.flops_grid` case (used for
    docs/performance.md), with prefill and total against all query tokens and the KV cache in ``dtype``."""
    lines = [f"| batch | keep | vision | connector | LLM prefill | decode | total | prefill vs all | total vs all | "
             f"KV cache MiB ({dtype}) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = {stage: _gflops(r["flops"][stage]) for stage in ("vision", "connector", "prefill", "decode", "total")}
        lines.append(f"| {r['batch']} | {r['keep']} | {f['vision']} | {f['connector']} | {f['prefill']} | {f['decode']} | "
                     f"{f['total']} | {r['prefill_ratio']:.0%} | {r['total_ratio']:.0%} | {r['kv_cache_bytes'] / _MIB:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m catp.bench.report bench.json [median|min]
    import json
    import sys

    print(markdown_tables(json.loads(Path(sys.argv[1]).read_text()), *sys.argv[2:3]))
