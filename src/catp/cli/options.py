"""What the commands share: one parser per kind of option, raising ``ValueError`` that names the bad value.

* ``--keep``: counts (``16,8,4``), fractions of the query tokens (``0.5``) and, where a
  command takes them, per-sample budgets (``mass:0.8``, ``fence:1.5:min=2:max=16``);
* ``--methods``: registered names, ``all``, or a user's class as ``package.module:Class``;
* output paths: checked (format, parent folder) before any model runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from catp.budget import Budget
from catp.methods import METHODS, method_class
from catp.selection import check_keep_value, resolve_keep

__all__ = ["check_figure_path", "output_dir", "output_file", "parse_keep", "parse_methods", "resolve_keeps", "split_list"]

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


def check_figure_path(path: Path) -> Path:
    """An output path for a matplotlib figure: its format checked and its folder created, before any work.

    Raises:
        ValueError: a format matplotlib cannot write, a folder that cannot be made.
    """
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = path.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise ValueError(f"cannot write a figure to {str(path)!r}: use one of .{', .'.join(sorted(formats))}")
    return output_file(path)


def output_file(path: Path) -> Path:
    """An output file path whose folder exists (made if missing) and that is not a folder itself."""
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a folder; give a file name")
    _make_folder(path.parent)
    return path


def output_dir(path: Path, make: bool = True) -> Path:
    """An output folder, made if missing (``make``); an existing file is refused."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file; give a folder for the results")
    if make:
        _make_folder(path)
    return path


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise ValueError(f"cannot make folder {str(folder)!r}: a file is in the way") from None
    except PermissionError:
        raise ValueError(f"cannot make folder {str(folder)!r}: permission denied") from None
