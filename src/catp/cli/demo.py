"""``catp demo``: prune the embedded reference model on a few test questions and show what changes."""

from __future__ import annotations

import importlib.util
import tempfile
import time
from pathlib import Path

import torch
import typer

from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    KEEP_HELP,
    METHODS_HELP,
    check_adapter,
    check_figure_path,
    make_console,
    parse_keep,
    parse_methods,
    refuse_unused,
    resolve_keeps,
)
from catp.demo import DEFAULT_KEEPS, DEFAULT_METHODS, demo_examples, draw_demo, print_demo, run_demo
from catp.models import adapter_info
from catp.reference import load, shipped_adapter


def demo_command(
    model: str = typer.Option(None, help="Checkpoint dir or hub id (default: the embedded reference model)."),
    adapter: Path | None = typer.Option(None, help="A catp adapt adapter: its answers (with the method it was trained for) are "
                                        "shown beside the others. Default: the shipped one, with the reference model."),
    show_adapter: bool = typer.Option(True, "--show-adapter/--no-adapter", help="Show the adapted model's answers."),
    out: Path | None = typer.Option(None, help="Where to write the figure (.png, .pdf, .svg, ...). Default: catp-demo.png in "
                                    "a new temporary folder (the path is printed)."),
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
    if not show_adapter:
        refuse_unused("--no-adapter shows no adapted model", adapter=adapter)
    if adapter is not None:
        with user_input(param="--adapter"):
            check_adapter(adapter)
            if adapter_info(adapter).get("settings", {}).get("truncate"):
                raise ValueError(f"{adapter} was trained with --truncate: it runs exported (catp adapt --export K), not pruned")
    with user_input(param="--out"):
        # Not into the working folder unasked: a temporary folder, whose path is printed at the end.
        out = check_figure_path(out or Path(tempfile.mkdtemp(prefix="catp-demo-")) / "catp-demo.png")
    torch.set_num_threads(threads)
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        net, processor = load(model)
    with user_input(param="--keep"):
        counts = tuple(resolve_keeps(keeps, int(net.config.num_query_tokens)))
    if adapter is None and model is None and show_adapter:
        adapter = shipped_adapter()
        if adapter is not None and importlib.util.find_spec("peft") is None:
            # The plain install has no peft: the demo runs without the adapter rather than fail.
            typer.echo('note: the shipped adapter needs peft (pip install "catp[adapt]"); showing the pruned answers only')
            adapter = None
    adapted = None
    if adapter is not None and show_adapter:
        with user_input(*INPUT_ERRORS, OSError, param="--adapter"):
            adapted = (load(model, adapter=adapter)[0], adapter_info(adapter).get("settings", {}).get("method", "first"))
    tasks = tuple(getattr(net.config, "catp_reference_tasks", None) or ("easy-vqa",))
    with interruptible():
        result = run_demo(net, processor, demo_examples(per_task, tasks), names, counts, adapted=adapted)
    print_demo(result, make_console())
    path = draw_demo(result, out)
    print(f"wrote {path} ({time.perf_counter() - started:.1f}s)")
