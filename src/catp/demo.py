"""``catp demo``: prune the embedded reference model on a few test questions and show what changes.

For a handful of test questions (easy-VQA and, when the model knows it, the project's
``scenes`` task) it answers unpruned and, for several methods, with 8 and 4 of the 32 query
tokens, and, with an adapter (``catp adapt``; the reference model's ships with it), the adapted
model with its method beside them; prints a table of the answers and the kept token indices,
and draws one PNG.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catp.reference.data import task_examples
from catp.reference.evaluate import answer

__all__ = ["DEFAULT_KEEPS", "DEFAULT_METHODS", "DemoResult", "demo_examples", "draw_demo", "print_demo", "run_demo"]

DEFAULT_METHODS = ("catp", "selfattn", "first", "random")
DEFAULT_KEEPS = (8, 4)


@dataclass
class DemoResult:
    """What the demo computed.

    Attributes:
        examples: the questions asked (``catp.reference.data.VQAExample``).
        runs: ``(method, keep)`` per column; ``("unpruned", 32)`` first.
        answers: ``answers[run][i]``: the answer to example ``i``.
        kept: ``kept[run][i]``: the kept query indices of example ``i`` (``None`` unpruned).
    """

    examples: list
    runs: list[tuple[str, int]]
    answers: dict[tuple[str, int], list[str]]
    kept: dict[tuple[str, int], list[list[int] | None]]


def demo_examples(per_task: int, tasks: tuple[str, ...]) -> list:
    """The first ``per_task`` test images of each task, one question each, cycling through question kinds."""
    out = []
    for task in tasks:
        seen: set[int] = set()
        for example in task_examples(task, "test", 40 * per_task):
            # Skip to a question of another wording than the previous pick, for variety.
            if example.image_id in seen or (out and example.question.split()[:2] == out[-1].question.split()[:2]):
                continue
            seen.add(example.image_id)
            out.append(example)
            if len(seen) == per_task:
                break
    return out


#: How the demo labels the runs of an adapted model: ``"first+adapter"``.
ADAPTED = "+adapter"


def run_demo(model, processor, examples: list, methods: tuple[str, ...] = DEFAULT_METHODS, keeps: tuple[int, ...] = DEFAULT_KEEPS,
             adapted: tuple[Any, str] | None = None) -> DemoResult:
    """Answer ``examples`` unpruned and with every ``method`` x ``keep`` (greedy, one batch each).

    Args:
        adapted: ``(adapted model, its method)``: its answers with that method at every keep are
            shown beside the others, as ``"<method>+adapter"``.
    """
    if not examples:
        raise ValueError("no examples to run")
    full = int(model.config.num_query_tokens)
    runs = [("unpruned", full)] + [(m, k) for k in keeps for m in methods]
    if adapted is not None:
        runs += [(adapted[1] + ADAPTED, k) for k in keeps]
    answers: dict[tuple[str, int], list[str]] = {}
    kept: dict[tuple[str, int], list[list[int] | None]] = {}
    for method, keep in runs:
        sessions: list = []
        pruned = method != "unpruned"
        net = adapted[0] if method.endswith(ADAPTED) and adapted is not None else model
        name = method.removesuffix(ADAPTED)
        answers[(method, keep)] = answer(net, processor, examples, name if pruned else None, keep if pruned else None,
                                         batch_size=len(examples), sessions=sessions)
        kept[(method, keep)] = sessions[0].tolist() if pruned else [None] * len(examples)
    return DemoResult(examples, runs, answers, kept)


def print_demo(result: DemoResult, console: Any = None) -> None:
    """One rich table per keep level: question, truth, unpruned, then each method's answer and kept indices."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    keeps = sorted({k for m, k in result.runs if m != "unpruned"}, reverse=True)
    full = result.runs[0]
    for keep in keeps:
        runs = [r for r in result.runs if r[1] == keep and r[0] != "unpruned"]
        table = Table(title=f"keep {keep} of {full[1]} query tokens (answer; kept token indices)", show_lines=True)
        table.add_column("question")
        table.add_column("truth")
        table.add_column("unpruned")
        for method, _ in runs:
            table.add_column(method)
        for i, example in enumerate(result.examples):
            cells = [example.question, example.answer, _mark(result.answers[full][i], example.answer)]
            for run in runs:
                indices = " ".join(str(j) for j in result.kept[run][i])
                cells.append(f"{_mark(result.answers[run][i], example.answer)}\n[dim]{indices}[/dim]")
            table.add_row(*cells)
        console.print(table)


def _mark(prediction: str, truth: str) -> str:
    ok = prediction.strip().lower() == truth.strip().lower()
    return f"[green]{prediction}[/green]" if ok else f"[red]{prediction or '(empty)'}[/red]"


def draw_demo(result: DemoResult, path: str | Path) -> Path:
    """Write a PNG: each image with its question, the truth and every run's answer (green right, red wrong)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(result.examples)
    columns = min(n, 4)
    rows = -(-n // columns)
    lines = len(result.runs) + 2
    fig = plt.figure(figsize=(4.2 * columns, rows * (3.0 + 0.24 * lines)), dpi=110)
    grid = fig.add_gridspec(rows * 2, columns, height_ratios=[3.0, 0.24 * lines] * rows, hspace=0.08, wspace=0.15)
    for i, example in enumerate(result.examples):
        r, c = divmod(i, columns)
        ax = fig.add_subplot(grid[2 * r, c])
        ax.imshow(example.image, interpolation="nearest")
        ax.set_axis_off()
        ax.set_title(example.question, fontsize=10, wrap=True)
        text = fig.add_subplot(grid[2 * r + 1, c])
        text.set_axis_off()
        text.text(0.0, 1.0, f"truth: {example.answer}", fontsize=9.5, fontweight="bold", va="top", transform=text.transAxes)
        for j, run in enumerate(result.runs, start=1):
            prediction = result.answers[run][i]
            ok = prediction.strip().lower() == example.answer.strip().lower()
            label = "unpruned (32)" if run[0] == "unpruned" else f"{run[0]} keep {run[1]}"
            text.text(0.0, 1.0 - j / lines, f"{label}: {prediction or '(empty)'}", fontsize=9, va="top", color="#1a7f37" if ok else "#cf222e", transform=text.transAxes, family="monospace")
    fig.suptitle("catp demo: answers of the reference model, unpruned and pruned (green = right, red = wrong)", fontsize=12)
    path = Path(path)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
