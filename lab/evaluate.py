"""Accuracy of a BLIP-2 on the reference tasks, unpruned and pruned: the floors and the pruning table.

Greedy decoding with plain ``model.generate`` (inside :func:`catp.pruned` for pruned
runs, :func:`catp.reference.evaluate.answer`); the score is exact match of the whole
decoded answer (lower-cased, stripped). ``--model`` defaults to the shipped reference model.

    python -m lab.evaluate accuracy                  # full easy-VQA test split
    python -m lab.evaluate floors --model DIR        # the floors the shipped model must meet
    python -m lab.evaluate table --out docs/...      # unpruned vs keep 16/8/4
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

from catp.reference.data import VQAExample, task_examples
from catp.reference.evaluate import answer, exact_match

__all__ = ["FLOORS", "app", "pruning_table"]


def pruning_table(model, processor, tasks: dict[str, Sequence[VQAExample]], methods: Sequence[str], keeps: Sequence[int] = (16, 8, 4), on_row=None) -> list[dict[str, Any]]:
    """Exact match for every task, unpruned and for every ``method`` x ``keep``.

    Returns:
        rows ``{"method": str, "keep": int, task: accuracy, ...}``; the first row is unpruned
        (``method="unpruned"``, ``keep=num_query_tokens``). ``on_row(row)`` is called as each
        row is done (progress).
    """
    full = int(model.config.num_query_tokens)
    runs = [(None, full)] + [(m, k) for m in methods for k in keeps]
    rows = []
    for method, keep in runs:
        pruned = method is not None
        row = {"method": method or "unpruned", "keep": keep}
        row.update({t: exact_match(answer(model, processor, ex, method, keep if pruned else None), ex) for t, ex in tasks.items()})
        rows.append(row)
        if on_row is not None:
            on_row(row)
    return rows


def _markdown(rows: list[dict[str, Any]], tasks: Sequence[str], counts: dict[str, int]) -> str:
    head = "| method | keep | " + " | ".join(f"{t} ({counts[t]} q)" for t in tasks) + " |"
    lines = [head, "|" + "---|" * (2 + len(tasks))]
    for row in rows:
        lines.append(f"| {row['method']} | {row['keep']} | " + " | ".join(f"{100 * row[t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines)


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False)


@app.command("accuracy")
def accuracy_command(model: str | None = None, task: str = "easy-vqa", limit: int | None = None, threads: int = 2) -> None:
    """Unpruned greedy exact match on a task's test split (all of it unless --limit)."""
    import torch

    from catp.reference import load

    torch.set_num_threads(threads)
    net, processor = load(model)
    examples = task_examples(task, "test", limit)
    started = time.perf_counter()
    score = exact_match(answer(net, processor, examples), examples)
    print(f"{task} test: exact match {score:.4f} on {len(examples)} questions ({time.perf_counter() - started:.0f}s)")


#: The floors the shipped reference model must meet: figure -> (comparison, bound).
FLOORS: dict[str, tuple[str, float]] = {
    "easy-vqa exact match (full test split)": (">=", 0.95),
    "scenes exact match (full test split)": (">=", 0.85),
    "mean nearest-other-query cosine (500 easy-VQA test images)": ("<=", 0.90),
    "effective rank (500 easy-VQA test images)": (">=", 8.0),
    "mean pairwise query cosine (500 easy-VQA test images)": ("<=", 0.45),
    "scenes: unpruned minus `first` at keep 4 (points)": (">=", 10.0),
}


@app.command("floors")
def floors_command(model: str | None = None, threads: int = 2, out: Path | None = None, limit: int | None = None) -> None:
    """Check the reference model's floors: accuracy on both full test splits, query diversity, pruning matters.

    Greedy exact match with up to 5 new tokens; the diversity figures from
    :func:`catp.evaluation.diagnose.diagnose` on the first 500 easy-VQA test images.
    """
    import json

    import torch

    from catp.evaluation.diagnose import diagnose
    from catp.reference import load

    torch.set_num_threads(threads)
    net, processor = load(model)
    started = time.perf_counter()
    easy, scenes = task_examples("easy-vqa", "test", limit), task_examples("scenes", "test", limit)  # limit: quick checks only
    unpruned = {"easy-vqa": exact_match(answer(net, processor, easy), easy), "scenes": exact_match(answer(net, processor, scenes), scenes)}
    first4 = exact_match(answer(net, processor, scenes, "first", 4), scenes)
    images = list({e.image_id: e.image for e in easy}.values())[:500]
    figures = diagnose(net, processor, images, methods=["catp"], keep=8)
    values = {
        "easy-vqa exact match (full test split)": unpruned["easy-vqa"],
        "scenes exact match (full test split)": unpruned["scenes"],
        "mean nearest-other-query cosine (500 easy-VQA test images)": figures.nearest_cosine,
        "effective rank (500 easy-VQA test images)": figures.effective_rank,
        "mean pairwise query cosine (500 easy-VQA test images)": figures.pairwise_cosine,
        "scenes: unpruned minus `first` at keep 4 (points)": 100 * (unpruned["scenes"] - first4),
    }
    lines = ["| floor | value | required | |", "|---|---|---|---|"]
    for name, (op, bound) in FLOORS.items():
        ok = values[name] >= bound if op == ">=" else values[name] <= bound
        lines.append(f"| {name} | {values[name]:.4f} | {op} {bound} | {'PASS' if ok else 'FAIL'} |")
    lines.append(f"| (reported) last-layer map correlation | {figures.map_correlation[-1]:.4f} | | |")
    lines.append(f"| (reported) distinct CATP top-8 sets over 500 images | {figures.distinct_kept_sets['catp']} | | |")
    lines.append(f"| (reported) scenes exact match with `first` at keep 4 | {first4:.4f} | | |")
    table = "\n".join(lines)
    print(table)
    print(f"({len(easy)} easy-VQA and {len(scenes)} scenes test questions, {time.perf_counter() - started:.0f}s)")
    if out is not None:
        out.write_text(json.dumps({"values": values, "diagnosis": json.loads(figures.to_json()), "table": table}, indent=2))


@app.command("table")
def table_command(model: str | None = None, tasks: str = "easy-vqa,scenes", limit: int | None = 2000, out: Path | None = None, threads: int = 2) -> None:
    """Unpruned vs keep 16/8/4 exact match of every method in catp.METHODS, as a markdown table."""
    import torch

    import catp
    from catp.reference import load

    torch.set_num_threads(threads)
    net, processor = load(model)
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    data = {t: task_examples(t, "test", limit) for t in names}
    started = time.perf_counter()
    rows = pruning_table(net, processor, data, catp.METHODS, on_row=lambda row: print(row, f"{time.perf_counter() - started:.0f}s", flush=True))
    table = _markdown(rows, names, {t: len(v) for t, v in data.items()})
    print(table)
    print(f"({time.perf_counter() - started:.0f}s)")
    if out is not None:
        out.write_text(table + "\n")


if __name__ == "__main__":
    app(prog_name="python -m lab.evaluate")
