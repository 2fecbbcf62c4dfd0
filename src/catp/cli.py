"""The ``catp`` command line. Each subcommand lives next to the code it drives and
imports torch/transformers lazily, so ``catp --help`` stays fast."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="catp",
    help="Cross-Attention Token Pruning for BLIP-2-family models: prune, evaluate, benchmark, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """Cross-Attention Token Pruning for BLIP-2-family models: prune, evaluate, benchmark, explain."""


@app.command("methods")
def methods() -> None:
    """List the pruning methods."""
    from rich.console import Console
    from rich.table import Table

    from catp.methods import _REGISTRY

    table = Table("method", "kind", "what it keeps")
    for name, cls in _REGISTRY.items():
        table.add_row(name, "selects" if cls.selects() else "scores", (cls.__doc__ or "").strip().splitlines()[0])
    Console().print(table)


# Subcommands (one line each; their modules own the options):
app.command("train-reference")(__import__("catp.reference.train", fromlist=["train_reference_command"]).train_reference_command)
app.command("demo")(__import__("catp.demo", fromlist=["demo"]).demo)
app.command("explain")(__import__("catp.explain", fromlist=["explain_command"]).explain_command)
# (registered below as they land)
app.command("bench")(__import__("catp.bench.command", fromlist=["bench"]).bench)
from catp.evaluation.cli import eval_command  # noqa: E402

app.command("eval")(eval_command)
app.command("diagnose")(__import__("catp.evaluation.diagnose", fromlist=["diagnose_command"]).diagnose_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
