"""The ``catp`` app: one module per command, registered here.

Importing this loads typer and the core (torch through ``catp``); each command imports the
rest of its stack (transformers' models, matplotlib, rich, datasets) when it runs.
"""

from __future__ import annotations

import re

import typer

from catp.cli.adapt import adapt_command
from catp.cli.bench import bench_command
from catp.cli.demo import demo_command
from catp.cli.diagnose import diagnose_command
from catp.cli.eval import eval_command
from catp.cli.explain import explain_command
from catp.cli.options import make_console
from catp.cli.serve import SERVE_CONTEXT, serve_command
from catp.methods import METHODS, method_class

app = typer.Typer(
    name="catp",
    help="Cross-Attention Token Pruning for BLIP-2-family models: prune, evaluate, benchmark, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


def version() -> str:
    """The installed distribution's version, or the package's own where it is not installed (a checkout on PYTHONPATH)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("catp")
    except PackageNotFoundError:
        import catp

        return catp.__version__


def _print_version(given: bool) -> None:
    if given:
        typer.echo(f"catp {version()}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """Cross-Attention Token Pruning for BLIP-2-family models: prune, evaluate, benchmark, explain."""


@app.command("methods")
def methods_command() -> None:
    """List the pruning methods: name, kind, what each keeps."""
    from rich.table import Table

    table = Table("method", "kind", "what it keeps")
    for name in METHODS:
        cls = method_class(name)
        table.add_row(name, cls.kind, plain_text((cls.__doc__ or "").strip().splitlines()[0]))
    make_console().print(table)


def plain_text(docstring_line: str) -> str:
    """A docstring line without its reST markup: ``:func:`x``` and ````x```` -> ``x``."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", docstring_line)
    return text.replace("``", "")


app.command("eval")(eval_command)
app.command("bench")(bench_command)
app.command("explain")(explain_command)
app.command("diagnose")(diagnose_command)
app.command("demo")(demo_command)
app.command("adapt")(adapt_command)
app.command("serve", context_settings=SERVE_CONTEXT)(serve_command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
