"""The ``catp`` command line. Each subcommand lives next to the code it drives and
imports torch/transformers lazily, so ``catp --help`` stays fast.

Bad input is answered by :func:`user_input`: one usage error, exit status 2, no traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from catp.extras import MissingExtraError

app = typer.Typer(
    name="catp",
    help="Cross-Attention Token Pruning for BLIP-2-family models: prune, evaluate, benchmark, explain.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)


#: What the library raises for a bad argument (an unknown method, an out-of-range keep, a
#: malformed dataset, a missing optional package).
INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, MissingExtraError)


@contextlib.contextmanager
def user_input(*errors: type[Exception], param: str | None = None) -> Iterator[None]:
    """Report the errors raised inside as bad command-line input: one usage error, exit 2.

    Every command wraps the steps that check what the user typed in this, and only those:
    parsing its options, resolving names (methods, keep against the model's query count,
    architectures, datasets), and opening the files and models it names. The library
    reports bad input as ``ValueError`` / ``TypeError`` with a message that names the bad
    value, so inside the block those become a usage error that prints the message (and the
    option, when ``param`` is given) with no traceback. The work that follows (generation,
    training, timing, writing results) runs outside any such block, so a ``ValueError``
    there, which is a bug, still shows its traceback.

    Why blocks and not one handler around each whole command: that would also turn the
    bugs above into one-line messages. And why not a dedicated "bad input" exception: every
    library function that checks an argument (methods, pruning, bench, datasets) would
    have to raise it, while these blocks need no change to the library and keep its
    documented ``ValueError`` / ``TypeError``.

    Args:
        *errors: the exception types that mean bad input here; default :data:`INPUT_ERRORS`.
            A step that can only fail on bad data (the eval sweep reading images) narrows it
            to that error type.
        param: the option at fault (``"--methods"``), named in the message.

    Raises:
        typer.BadParameter: "Invalid value (for ``param``): <the message>"; exit status 2.
    """
    try:
        yield
    except (errors or INPUT_ERRORS) as error:
        raise typer.BadParameter(str(error).strip() or type(error).__name__, param_hint=param) from None


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
