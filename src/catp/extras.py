"""Optional dependencies: ``pip install "catp[NAME]"`` adds the packages of extra ``NAME``.

Code that needs one imports it with :func:`import_extra`, which turns its absence into a
:class:`MissingExtraError` that says which ``pip install`` adds it.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingExtraError", "import_extra"]


class MissingExtraError(ImportError):
    """A package of an optional extra is not installed; the message says how to install it."""


def import_extra(module: str, extra: str, needed_for: str) -> ModuleType:
    """Import ``module``, which the extra ``extra`` installs.

    Args:
        module: the top-level module, e.g. ``"datasets"``.
        extra: the catp extra that installs it, e.g. ``"datasets"``.
        needed_for: what needs it, for the message (``"catp eval --dataset hf:..."``).

    Raises:
        MissingExtraError: ``module`` is not installed. (An installed module that fails to
            import raises its own error: that is a broken install, not a missing extra.)
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        if error.name != module:
            raise
        raise MissingExtraError(f'{needed_for} needs the {module!r} package: pip install "catp[{extra}]"', name=module) from error
