"""Bad command-line input as one usage line (exit status 2, no traceback).

A leaf module: the commands import it, it imports nothing of theirs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import typer

from catp.extras import MissingExtraError

__all__ = ["INPUT_ERRORS", "INTERRUPTED", "interruptible", "user_input"]

#: What the library raises for a bad argument (an unknown method, an out-of-range keep, a
#: malformed dataset, a missing optional package).
INPUT_ERRORS: tuple[type[Exception], ...] = (ValueError, TypeError, MissingExtraError)

#: The exit status of a command stopped by Ctrl-C (128 + SIGINT, as a shell reports it).
INTERRUPTED = 130


@contextlib.contextmanager
def user_input(*errors: type[Exception], param: str | None = None) -> Iterator[None]:
    """Report the errors raised inside as bad command-line input: one usage error, exit 2.

    Every command wraps the steps that check what the user typed in this, and only those:
    parsing its options, resolving names (methods, keep against the model's query count,
    architectures, datasets), and opening the files and models it names. The library
    reports bad input as ``ValueError`` / ``TypeError`` with a message that names the bad
    value; inside the block those become a usage error that prints the message (and the
    option, when ``param`` is given). The work that follows (generation, training, timing,
    writing results) runs outside any such block, so a ``ValueError`` there, which is a
    bug, still shows its traceback.

    Args:
        *errors: the exception types that mean bad input here; default :data:`INPUT_ERRORS`.
        param: the option at fault (``"--methods"``), named in the message.

    Raises:
        typer.BadParameter: "Invalid value (for ``param``): <the message>"; exit status 2.
    """
    try:
        yield
    except (errors or INPUT_ERRORS) as error:
        raise typer.BadParameter(str(error).strip() or type(error).__name__, param_hint=param) from None


@contextlib.contextmanager
def interruptible(resume: str | Callable[[], str] | None = None) -> Iterator[None]:
    """Report a Ctrl-C inside as one line on stderr (how to resume, where the command can), exit status 130.

    Args:
        resume: how to continue where the work stopped (``"rerun the same command to resume
            from runs/x"``), or a function that says it once stopped (whether a checkpoint
            was written); ``None`` for a command that starts over.
    """
    try:
        yield
    except KeyboardInterrupt:
        how = resume() if callable(resume) else resume
        typer.echo("interrupted" + (f": {how}" if how else ""), err=True)
        raise typer.Exit(INTERRUPTED) from None
