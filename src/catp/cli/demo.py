"""``catp demo``: prune the embedded reference model on a few test questions and show what changes."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer

from catp.cli.errors import INPUT_ERRORS, user_input
from catp.cli.options import KEEP_HELP, METHODS_HELP, check_figure_path, parse_keep, parse_methods, resolve_keeps
from catp.demo import DEFAULT_KEEPS, DEFAULT_METHODS, demo_examples, draw_demo, print_demo, run_demo
from catp.reference import load


def demo_command(
    model: str = typer.Option(None, help="Checkpoint dir or hub id (default: the embedded reference model)."),
    adapter: Path | None = typer.Option(None, help="A catp adapt adapter directory to put on the model (merged into its weights)."),
    out: Path = typer.Option(Path("catp-demo.png"), help="Where to write the figure (.png, .pdf, .svg, ...)."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), help=METHODS_HELP + "."),
    keep: str = typer.Option(",".join(map(str, DEFAULT_KEEPS)), help=KEEP_HELP + "."),
    per_task: int = typer.Option(6, min=1, help="Test images per task."),
    threads: int = typer.Option(2, min=1, help="torch threads."),
) -> None:
    """Prune the embedded reference model on a few test questions: table of answers + kept tokens, and a PNG."""
    started = time.perf_counter()
    with user_input(param="--methods"):
        names = tuple(parse_methods(methods))
    with user_input(param="--keep"):
        keeps = parse_keep(keep, budgets=False)
    with user_input(param="--out"):
        check_figure_path(out)
    torch.set_num_threads(threads)
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        net, processor = load(model, adapter=adapter)
    with user_input(param="--keep"):
        counts = tuple(resolve_keeps(keeps, int(net.config.num_query_tokens)))
    tasks = tuple(getattr(net.config, "catp_reference_tasks", None) or ("easy-vqa",))
    result = run_demo(net, processor, demo_examples(per_task, tasks), names, counts)
    print_demo(result)
    path = draw_demo(result, out)
    print(f"wrote {path} ({time.perf_counter() - started:.1f}s)")
