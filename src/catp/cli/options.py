"""What the commands share: one parser per kind of option, raising ``ValueError`` that names the bad value.

* ``--keep``: counts (``16,8,4``), fractions of the query tokens (``0.5``) and, where a
  command takes them, per-sample budgets (``mass:0.8``, ``fence:1.5:min=2:max=16``);
* ``--methods``: registered names, ``all``, or a user's class as ``package.module:Class``;
* method options (``--option``): ``NAME=VALUE`` pairs, the value read as JSON where it is JSON;
* output paths: checked (format, parent folder) before any model runs.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catp.budget import Budget
from catp.methods import METHODS, method_class
from catp.selection import check_keep_value, resolve_keep

__all__ = ["check_adapter", "check_dataset_files", "check_figure_path", "check_range", "input_path", "make_console", "output_dir", "output_file",
           "parse_keep", "parse_methods", "parse_options", "refuse_unused", "resolve_keeps", "split_list"]

KEEP_HELP = "Kept query tokens, comma-separated: counts (16,8,4) or fractions of the query tokens (0.5,0.25)"
BUDGET_HELP = ", or per-sample budgets (mass:0.8, fence:1.5, optionally :min=N:max=N)"
METHODS_HELP = ("Comma-separated methods: names from `catp methods`, 'all', or your own PruningMethod subclass "
                "as package.module:Class")


def split_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_keep(text: str, budgets: bool = True, single: bool = False) -> list[int | float | Budget]:
    """``"16,8,4"`` -> counts; an item with a ``.`` is a fraction (``"0.5"``); ``mass:0.8`` or
    ``fence:1.5`` (optionally ``:min=N:max=N``) is a :class:`~catp.budget.Budget`.

    Args:
        budgets: whether budgets are allowed.
        single: whether exactly one value must be given.

    Raises:
        ValueError: an item that is none of these, a count below 1, a fraction outside ``(0, 1]``.
    """
    items = split_list(text)
    if not items:
        raise ValueError("--keep is empty: give a count (8), a fraction (0.25)" + (" or a budget (mass:0.8)" if budgets else ""))
    if single and len(items) > 1:
        raise ValueError(f"give one keep value, got {text!r}")
    out: list[int | float | Budget] = []
    for item in items:
        if ":" in item:
            if not budgets:
                raise ValueError(f"this command takes a count or a fraction, not a budget: {item!r}")
            out.append(Budget.parse(item))
            continue
        try:
            value: int | float = float(item) if "." in item or "e" in item.lower() else int(item)
        except ValueError:
            also = ", or a budget (mass:0.8, fence:1.5)" if budgets else ""
            raise ValueError(f"cannot read keep {item!r}: give a count (8), a fraction (0.25){also}") from None
        check_keep_value(value)
        out.append(value)
    return out


def resolve_keeps(keeps: Sequence[int | float | Budget], num_tokens: int) -> list[int | Budget]:
    """Counts (fractions resolved as :func:`catp.resolve_keep` does), largest first and without repeats,
    then the budgets in the given order; each checked against ``num_tokens``."""
    counts = sorted({resolve_keep(k, num_tokens) for k in keeps if not isinstance(k, Budget)}, reverse=True)
    budgets = list(dict.fromkeys(k for k in keeps if isinstance(k, Budget)))
    for budget in budgets:
        budget.check_tokens(num_tokens)
    return [*counts, *budgets]


def parse_methods(text: str) -> list[str]:
    """Method names from ``--methods``: registered names, ``all`` (every registered method), or
    ``package.module:Class`` (imported and registered under its ``name``). Repeats are dropped.

    Raises:
        ValueError: nothing given, or a name that is not a method.
    """
    names: list[str] = []
    for item in split_list(text):
        if item == "all":
            names.extend(METHODS)
        else:
            names.append(method_class(item).name)
    if not names:
        raise ValueError(f"no method given ({text!r}); choose from {', '.join(METHODS)}")
    return list(dict.fromkeys(names))


def parse_options(items: Sequence[str]) -> dict[str, Any]:
    """``["seed=3", "layer_weights=[1,0,0,0,0,1]"]`` -> ``{"seed": 3, "layer_weights": [1, 0, 0, 0, 0, 1]}``.

    A value is read as JSON when it is JSON, else kept as text (``features=qformer``).

    Raises:
        ValueError: an item without ``=``, or an option given twice.
    """
    options: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--option takes NAME=VALUE (e.g. seed=3, layer_weights=[1,0,0,0,0,1]), got {item!r}")
        if name in options:
            raise ValueError(f"--option {name} is given twice")
        try:
            options[name] = json.loads(text)
        except ValueError:
            options[name] = text
    return options


def check_figure_path(path: Path) -> Path:
    """An output path for a matplotlib figure: its format checked and its folder made and written to, before any work.

    Raises:
        ValueError: a format matplotlib cannot write, a folder that cannot be made or written.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(f"cannot write a figure to {str(path)!r}: use one of .{', '.join(sorted(formats))}")
    return output_file(path)


def output_file(path: Path) -> Path:
    """An output file path that can be written: not a folder, its folder made (if missing) and written to once.

    Raises:
        ValueError: a folder, a folder that cannot be made (a file in the way, no such
            file system, no permission) or written to, a file that cannot be overwritten.
    """
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name")
    _writable_folder(path.parent, make=True)
    if path.exists() and not os.access(path, os.W_OK):
        raise ValueError(f"cannot write {str(path)!r}: permission denied")
    return path


def output_dir(path: Path, make: bool = True) -> Path:
    """An output folder that can be written: made and written to once. With ``make=False``
    nothing is made (the command makes it once all else is checked): the nearest folder that
    exists on the way is written to instead, which is race-free when several processes
    (``accelerate launch``) check the same path at once.

    Raises:
        ValueError: an existing file, or a folder that cannot be made or written to.
    """
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; give a folder for the results")
    _writable_folder(path, make=make)
    return path


def _writable_folder(folder: Path, make: bool) -> None:
    """Make ``folder`` (and its parents) and write a probe file in it; without ``make``, probe
    the nearest existing folder on its way instead (the rest can then be made in it)."""
    folder = Path(os.path.abspath(folder))
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    try:
        if make:
            folder.mkdir(parents=True, exist_ok=True)
        elif not existing.is_dir():
            raise NotADirectoryError(str(existing))
        with tempfile.TemporaryFile(dir=folder if make else existing):
            pass
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot make folder {str(folder)!r}: a file is in the way") from None
    except PermissionError:
        raise ValueError(f"cannot write in {str(folder)!r}: permission denied") from None
    except OSError as error:  # /proc/..., a read-only or full file system
        raise ValueError(f"cannot write in {str(folder)!r}: {error.strerror or error}") from None


def input_path(path: Path, folder: bool, what: str) -> Path:
    """An existing folder (``folder``) or file (not ``folder``), called ``what`` in the messages.

    Raises:
        ValueError: no such path, or a file where a folder is needed (or the reverse).
    """
    if not path.exists():
        raise ValueError(f"{str(path)!r}: no such {what}")
    if not (path.is_dir() if folder else path.is_file()):
        raise ValueError(f"{str(path)!r} is {'a file' if folder else 'a folder'}; give a {what}")
    return path


def check_adapter(path: Path) -> Path:
    """A ``catp adapt`` adapter folder that can be loaded: peft installed, and a readable
    ``adapter_config.json`` with its ``peft_type`` (:func:`catp.models.check_adapter_dir`).

    Raises:
        ValueError: what is wrong with the folder; MissingExtraError: peft is not installed.
    """
    from catp.extras import import_extra
    from catp.models import check_adapter_dir

    check_adapter_dir(path)
    import_extra("peft", "adapt", "an adapter (--adapter)")
    return path


def check_range(name: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    """``value`` of option ``name`` within ``[low, high]`` (``(`` / ``)`` where open).

    Raises:
        ValueError: outside, with the interval named.
    """
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not inside:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be in {interval}, got {value:g}")
    return value


def refuse_unused(reason: str, **given: object) -> None:
    """Refuse options that would be ignored: each keyword is an option (``val_fraction`` is
    ``--val-fraction``) whose value is ``None`` when the user did not give it.

    Raises:
        typer.BadParameter: naming the first option given, and ``reason``.
    """
    import typer

    for name, value in given.items():
        if value is not None and value is not False and value != []:
            option = "--" + name.rstrip("_").replace("_", "-")
            raise typer.BadParameter(f"{_shown(option, value)} would be ignored: {reason}", param_hint=option)


def _shown(option: str, value: object) -> str:
    """The option as typed: ``--merge``, ``--split train``, ``--export 4 8``."""
    if value is True:
        return option
    return f"{option} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def make_console() -> Any:
    """A rich console: the terminal's width, or, when the output is not a terminal (a log, a
    pipe, a test), a wide one, so that tables print whole instead of cutting answers at 80 columns."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 1000)


def check_dataset_files(datasets: Sequence[str], questions: Path | None, annotations: Path | None, images: Path | None) -> None:
    """The files the ``--dataset`` options name, before anything loads: a ``.jsonl`` dataset and
    ``--questions`` / ``--annotations`` are files, ``--images`` a folder; each message names its option.

    Raises:
        typer.BadParameter: a missing path, or a file where a folder is needed (or the reverse).
    """
    from catp.cli.errors import user_input

    for name in datasets:
        if name.endswith(".jsonl") and not name.startswith("hf:"):
            with user_input(param="--dataset"):
                input_path(Path(name), folder=False, what="JSONL file")
    for option, path, folder in (("--questions", questions, False), ("--annotations", annotations, False), ("--images", images, True)):
        if path is not None:
            with user_input(param=option):
                input_path(path, folder, "folder" if folder else "file")
