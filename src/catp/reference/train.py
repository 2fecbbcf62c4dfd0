"""Stand-in for the ``catp train-reference`` command, which :mod:`catp.cli` still registers.

The recipe that trains the reference model is in the repository's ``lab/`` folder
(``python -m lab.train``, run from a checkout). Delete this module together with the
``train-reference`` line of ``catp/cli.py``.
"""

from __future__ import annotations

import typer

__all__ = ["train_reference_command"]


def train_reference_command() -> None:
    """Moved: run ``python -m lab.train --out DIR`` from a checkout of the catp repository (lab/README.md)."""
    typer.echo("error: `catp train-reference` has moved: run `python -m lab.train --out DIR` from a checkout of the catp repository (lab/README.md)", err=True)
    raise typer.Exit(2)
