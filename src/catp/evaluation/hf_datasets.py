"""Hugging Face datasets as VQA questions: ``catp eval --dataset hf:NAME``.

``NAME`` is one of:

* a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``;
* a local parquet file (one split, which ``datasets`` names ``train``), or a local folder
  of data files (splits from the file names, e.g. ``data/validation-00000-of-00068.parquet``);
* a hub id (``lmms-lab/VQAv2``), with ``config`` (``--config``) where it has several.

A dataset with one split needs no ``split``; with several, one must be chosen.

Columns: each role is read from the first default column that exists, unless
``columns`` (``--columns role=column,...``) names one:

=========  ============================================  ==========================================
role       default columns, in order                     a row holds
=========  ============================================  ==========================================
image      ``image``                                     a ``datasets.Image``, bytes, or a path
question   ``question``                                  a str
answers    ``answers``, ``answer``,                      a list of str, a list of ``{"answer": str}``
           ``multiple_choice_answer``                    records (VQAv2 parquet), or one str
id         ``question_id``, ``id``; neither: row index   an int or a str
=========  ============================================  ==========================================

So the VQAv2 parquet layout (``answers`` records and a ``multiple_choice_answer``
string) is scored against its 10 human answers. The question, answer and id columns are
read when the dataset loads; an image is read from its row only when its batch runs, so
the split's images are never all in memory. A relative image path is relative to the
local dataset's folder.

Malformed data raises :class:`~catp.evaluation.datasets.DatasetError` naming the dataset,
split, row and column; a split with no answers at all (VQAv2's test split) is refused.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from catp.evaluation.questions import HF_PREFIX, DatasetError, Question, open_image
from catp.extras import import_extra

if TYPE_CHECKING:
    import datasets

__all__ = ["COLUMN_ROLES", "DEFAULT_COLUMNS", "describe_default_columns", "load_hf_split", "parse_columns"]

#: What ``columns`` may name.
COLUMN_ROLES: tuple[str, ...] = ("image", "question", "answers", "id")
#: The columns tried, in order, for a role that ``columns`` does not name. With no id
#: column the row index is the id, so the subset and the ``random`` method's seeds stay stable.
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "image": ("image",),
    "question": ("question",),
    "answers": ("answers", "answer", "multiple_choice_answer"),
    "id": ("question_id", "id"),
}


def describe_default_columns() -> str:
    """:data:`DEFAULT_COLUMNS` in words, for help texts."""
    def choices(names: tuple[str, ...]) -> str:
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"

    return "; ".join(f"{role}={choices(names)}" + (" (else the row index)" if role == "id" else "")
                     for role, names in DEFAULT_COLUMNS.items())


def parse_columns(text: str) -> dict[str, str]:
    """``"image=img,answers=labels"`` -> ``{"image": "img", "answers": "labels"}`` (roles: :data:`COLUMN_ROLES`)."""
    mapping: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        role, equals, column = (part.strip() for part in item.partition("="))
        if not equals or not role or not column:
            raise ValueError(f"expected role=column pairs separated by commas, got {item!r}")
        if role not in COLUMN_ROLES:
            raise ValueError(f"unknown role {role!r} in {item!r}; the roles are {', '.join(COLUMN_ROLES)}")
        if role in mapping:
            raise ValueError(f"role {role!r} is given twice")
        mapping[role] = column
    if not mapping:
        raise ValueError(f"no role=column pair in {text!r}")
    return mapping


def load_hf_split(source: str, split: str | None = None, config: str | None = None,
                  columns: Mapping[str, str] | None = None) -> list[Question]:
    """The questions of one split of a Hugging Face dataset (see the module docstring).

    Args:
        source: a ``save_to_disk`` directory, a parquet file, a data folder, or a hub id.
        split: the split; may be omitted when there is only one.
        config: the hub dataset's (or data folder's) config.
        columns: role -> column, overriding :data:`DEFAULT_COLUMNS`.

    Returns:
        One :class:`Question` per row, in row order; each image is read on demand.

    Raises:
        ValueError: no such source, split or config; several splits and no ``split``.
        DatasetError: a missing column, a split without answers, or a malformed row.
        catp.extras.MissingExtraError: the ``datasets`` package is not installed.
    """
    label = HF_PREFIX + source
    hf = import_extra("datasets", "datasets", f"dataset {label!r}")
    unknown = sorted(set(columns or {}) - set(COLUMN_ROLES))
    if unknown:
        raise ValueError(f"unknown column role(s) {', '.join(unknown)}; the roles are {', '.join(COLUMN_ROLES)}")
    data, split, folder = _open_split(hf, source, label, split, config)
    return _questions(hf, data, f"dataset {label!r}, split {split!r}", dict(columns or {}), folder)


# -- opening -----------------------------------------------------------------------------

@contextmanager
def _opening(label: str) -> Iterator[None]:
    """Name the dataset in what ``datasets`` raises when it cannot open it (no such file,
    no data files, the hub out of reach, a missing config)."""
    try:
        yield
    except (OSError, ValueError) as error:
        raise ValueError(f"dataset {label!r}: {error}") from error


def _open_split(hf: Any, source: str, label: str, split: str | None,
                config: str | None) -> tuple[datasets.Dataset, str, Path | None]:
    """The chosen split, its name, and the folder relative image paths start from (``None`` on the hub)."""
    path = Path(source).expanduser()
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        if config is not None:
            raise ValueError(f"dataset {label!r} was written by save_to_disk and has no configs; drop --config {config}")
        with _opening(label):
            saved = hf.load_from_disk(str(path))
        splits = dict(saved) if isinstance(saved, hf.DatasetDict) else {str(saved.split or "train"): saved}
        chosen = _choose_split(label, list(splits), split)
        return splits[chosen], chosen, path
    data_files = None
    if path.is_file():
        if path.suffix != ".parquet":
            raise ValueError(f"dataset {label!r}: a data file must be .parquet; for other layouts pass the folder, "
                             "or a directory written by save_to_disk")
        if config is not None:
            raise ValueError(f"dataset {label!r} is one parquet file and has no configs; drop --config {config}")
        builder, data_files, folder = "parquet", str(path), path.parent
    elif path.is_dir():
        builder, folder = str(path), path
    elif source.startswith((".", "/", "~")) or path.suffix == ".parquet":
        raise ValueError(f"dataset {label!r}: no such file or directory")
    else:
        builder, folder = source, None  # a hub id
    with _opening(label):
        available = hf.get_dataset_split_names(builder, config_name=config, data_files=data_files)
    chosen = _choose_split(label, list(available), split)
    with _opening(label):
        data = hf.load_dataset(builder, name=config, data_files=data_files, split=chosen)
    return data, chosen, folder


def _choose_split(label: str, available: list[str], split: str | None) -> str:
    if split is None:
        if len(available) == 1:
            return available[0]
        raise ValueError(f"dataset {label!r} has splits {', '.join(available)}; choose one with --split")
    if split not in available:
        raise ValueError(f"dataset {label!r} has no split {split!r}; its splits: {', '.join(available)}")
    return split


# -- rows --------------------------------------------------------------------------------

def _questions(hf: Any, data: datasets.Dataset, where: str, columns: dict[str, str], folder: Path | None) -> list[Question]:
    """One question per row; reads every column but the image's."""
    if len(data) == 0:
        raise DatasetError(f"{where}: no rows")
    chosen = {role: _column(role, columns, data.column_names, where) for role in COLUMN_ROLES}
    images = _ImageColumn(hf, data, chosen["image"], where, folder)
    wanted = [chosen[role] for role in ("question", "answers", "id") if chosen[role] is not None]
    # VQAv2's layout names the image of each question: a validation split carved by image uses it.
    image_key = "image_id" if "image_id" in data.column_names else None
    wanted += [image_key] if image_key else []
    values = data.select_columns(list(dict.fromkeys(wanted))).to_dict()
    answers_column = chosen["answers"]
    answers = [_answers(value, f"{where}, row {row}, column {answers_column!r}") for row, value in enumerate(values[answers_column])]
    if not any(answers):
        raise DatasetError(f"{where}: column {answers_column!r} holds no answers in any row (a test split?); "
                           "catp eval scores against the human answers, so choose a split that has them")
    out = []
    for row in range(len(data)):
        if not answers[row]:
            raise DatasetError(f"{where}, row {row}, column {answers_column!r}: empty answer list")
        out.append(Question(
            id=_id(values, chosen["id"], row, where),
            question=_question(values[chosen["question"]][row], f"{where}, row {row}, column {chosen['question']!r}"),
            answers=answers[row],
            image=functools.partial(images.read, row),
            image_key=None if image_key is None else str(values[image_key][row]),
        ))
    return out


def _column(role: str, columns: dict[str, str], available: list[str], where: str) -> str | None:
    """The column that holds ``role``: the named one, else the first default that exists (``None``: no id column)."""
    if role in columns:
        if columns[role] not in available:
            raise DatasetError(f"{where}: no column {columns[role]!r} (given for {role}); its columns: {', '.join(available)}")
        return columns[role]
    found = next((name for name in DEFAULT_COLUMNS[role] if name in available), None)
    if found is None and role != "id":
        tried = ", ".join(repr(name) for name in DEFAULT_COLUMNS[role])
        raise DatasetError(f"{where}: no {role} column (looked for {tried}); its columns: {', '.join(available)}; "
                           f"name one with --columns {role}=COLUMN")
    return found


def _answers(value: Any, where: str) -> tuple[str, ...]:
    """A row's answers: ``()`` when it has none; a ``DatasetError`` for a value of another shape."""
    if isinstance(value, dict):  # a Sequence({"answer": ...}) feature gives a dict of lists
        if "answer" not in value:
            raise DatasetError(f"{where}: a record without an 'answer' field: {value!r}")
        value = value["answer"]
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value.strip() else ()
    if isinstance(value, (list, tuple)):
        out = []
        for item in value:
            answer = item.get("answer") if isinstance(item, dict) else item
            if not isinstance(answer, str):
                raise DatasetError(f"{where}: expected answers as str or {{'answer': str}} records, got {item!r}")
            out.append(answer)
        return tuple(out)
    raise DatasetError(f"{where}: expected a list of answers or one answer, got {type(value).__name__} {value!r}")


def _question(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise DatasetError(f"{where}: expected the question text, got {value!r}")
    return value


def _id(values: dict[str, list[Any]], column: str | None, row: int, where: str) -> str:
    if column is None:
        return str(row)
    value = values[column][row]
    if not isinstance(value, (int, str)) or isinstance(value, bool) or value == "":
        raise DatasetError(f"{where}, row {row}, column {column!r}: expected an int or str id, got {value!r}")
    return str(value)


class _ImageColumn:
    """Reads the image of one row when asked (a whole split of images never sits in memory)."""

    def __init__(self, hf: Any, data: datasets.Dataset, column: str, where: str, folder: Path | None) -> None:
        feature = data.features[column]
        data = data.select_columns([column])
        if isinstance(feature, hf.Image):
            # Undecoded ({"bytes", "path"}), so that a bad image is reported with its row.
            data = data.cast_column(column, hf.Image(decode=False))
        elif not _image_like(hf, feature):
            raise DatasetError(f"{where}: column {column!r} holds {feature}; an image column holds a datasets.Image, "
                               "bytes, or a path")
        self.data, self.column, self.where, self.folder = data, column, where, folder

    def read(self, row: int) -> Image.Image:
        """The image of ``row``, decoded."""
        value = self.data[row][self.column]
        try:
            return _decode(value, self.folder)
        except (OSError, ValueError, TypeError) as error:
            raise DatasetError(f"{self.where}, row {row}, column {self.column!r}: cannot read the image: {error}") from None


def _image_like(hf: Any, feature: Any) -> bool:
    """bytes, a path, or the ``{"bytes", "path"}`` struct of an image stored without its feature."""
    if isinstance(feature, hf.Value):
        return feature.dtype in ("binary", "large_binary", "string", "large_string")
    return isinstance(feature, dict) and set(feature) <= {"bytes", "path"} and bool(feature)


def _decode(value: Any, folder: Path | None) -> Image.Image:
    """``value``: bytes, a path, or ``{"bytes": ..., "path": ...}`` (bytes win) -> a loaded RGB image."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return open_image(value)
    if isinstance(value, str) and value:
        path = Path(value)
        return open_image(path if path.is_absolute() or folder is None else folder / path)
    raise ValueError(f"expected image bytes or a path, got {'nothing' if value in (None, '') else type(value).__name__}")
