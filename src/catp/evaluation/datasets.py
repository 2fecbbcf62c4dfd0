"""VQA datasets behind one interface: a loader returns a list of :class:`Question`.

A new dataset is one registered function::

    @register_dataset("my-vqa")
    def load_my_vqa(questions: Path | None = None, **_: object) -> list[Question]:
        return [Question(id=str(i), question=q, answers=(a,), image=path) for i, (q, a, path) in ...]

Built in: ``vqav2`` and ``ok-vqa`` (official questions JSON + annotations JSON + COCO
image directory), ``easy-vqa`` (from its package; splits ``train``, ``validation``: its
training images 3,600 and up, carved out, and ``test``), ``scenes`` (the project's harder
generated task, :mod:`catp.reference.data`; ``train``, ``validation``, ``test``), ``jsonl`` (one
``{"image", "question", "answers"}`` object per line) and ``hf`` (``hf:NAME``: a Hugging
Face dataset, see :mod:`catp.evaluation.hf_datasets`).

A malformed file raises a ``ValueError`` naming the file and the line or record; a
malformed row of an ``hf:`` dataset, or an image that cannot be read, a
:class:`DatasetError`.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from catp.evaluation.hf_datasets import load_hf_split
from catp.evaluation.questions import DEFAULT_SPLIT, HF_PREFIX, DatasetError, Question
from catp.reference import data as reference_data

__all__ = ["DATASETS", "DEFAULT_SPLIT", "VALIDATION_SPLITS", "DatasetError", "Question", "dataset_options", "load_dataset",
           "register_dataset", "resolve_split", "split_by_image", "subsample"]

Loader = Callable[..., list[Question]]
#: Registered dataset loaders by name. Each takes keyword arguments ``questions``,
#: ``annotations``, ``images`` (paths, any of them ``None``) and ``split``; ``hf`` also
#: ``source``, ``config`` and ``columns``.
DATASETS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register a loader under ``name`` (see the module docstring)."""
    def decorate(loader: Loader) -> Loader:
        DATASETS[name] = loader
        return loader

    return decorate


def load_dataset(
    name: str,
    *,
    questions: str | Path | None = None,
    annotations: str | Path | None = None,
    images: str | Path | None = None,
    split: str | None = None,
    config: str | None = None,
    columns: Mapping[str, str] | None = None,
) -> list[Question]:
    """Load a registered dataset.

    Args:
        name: a registered name; a path ending in ``.jsonl`` (a JSONL file); or
            ``hf:NAME``, a Hugging Face dataset: a hub id, a ``save_to_disk`` directory, or
            local parquet files (a file or a folder).
        questions, annotations, images: the files of ``vqav2`` / ``ok-vqa`` / ``jsonl``.
        split: the split; default :func:`resolve_split`.
        config, columns: of an ``hf:`` dataset only: its config (subset), and which
            column holds what (:func:`catp.evaluation.hf_datasets.parse_columns`).

    Raises:
        ValueError: unknown name, missing file arguments, options that do not apply, or a
            malformed file (a :class:`DatasetError` for a malformed ``hf:`` row).
        catp.extras.MissingExtraError: ``hf:`` without the ``datasets`` package.
    """
    label = name
    given = {"questions": questions, "annotations": annotations, "images": images, "split": split}
    split = resolve_split(name, split)
    options: dict[str, Any] = {}
    if name.startswith(HF_PREFIX):
        name, options = "hf", {"source": name[len(HF_PREFIX):], "config": config, "columns": columns}
    elif name.endswith(".jsonl") and questions is None:
        name, questions = "jsonl", name
        given["questions"] = None  # the name is the file
    loader = DATASETS.get(name)
    if loader is None:
        names = ", ".join(f"{HF_PREFIX}NAME" if n == "hf" else n for n in sorted(DATASETS))
        raise ValueError(f"unknown dataset {name!r}; choose one of {names} or a .jsonl file")
    if name != "hf" and (config is not None or columns is not None):
        raise ValueError(f"--config and --columns apply to {HF_PREFIX}NAME datasets, not to {label!r}")
    takes = _loader_options(loader)
    for option, value in given.items():
        if value is not None and option not in takes:  # silently ignored otherwise
            raise ValueError(f"--{option} does not apply to dataset {label!r}, which would ignore it")
    paths = {key: Path(value) if value is not None else None for key, value in
             (("questions", questions), ("annotations", annotations), ("images", images))}
    loaded = loader(split=split, **paths, **options)
    ids = [q.id for q in loaded]
    if len(set(ids)) != len(ids):
        duplicate = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"dataset {label!r} has duplicate question id {duplicate!r}")
    return loaded


def dataset_options(name: str) -> frozenset[str]:
    """Which of ``questions``, ``annotations``, ``images``, ``split`` dataset ``name`` reads (an
    unknown name reads none): the parameters its loader names.

    A path ending in ``.jsonl`` is the ``jsonl`` dataset with that file as its questions."""
    file = name.endswith(".jsonl") and name not in DATASETS
    loader = DATASETS.get("hf" if name.startswith(HF_PREFIX) else "jsonl" if file else name)
    takes = frozenset() if loader is None else _loader_options(loader)
    return takes - {"questions"} if file else takes


def _loader_options(loader: Loader) -> frozenset[str]:
    return frozenset(inspect.signature(loader).parameters) & {"questions", "annotations", "images", "split"}


def resolve_split(name: str, split: str | None) -> str | None:
    """The split :func:`load_dataset` loads for ``split``: itself when given; else
    :data:`DEFAULT_SPLIT` for the built-in datasets and ``None`` for ``hf:`` datasets (whose
    loader takes their only split, or asks for one)."""
    if split is not None:
        return split
    return None if name.startswith(HF_PREFIX) or name == "hf" else DEFAULT_SPLIT


def subsample(questions: Sequence[Question], fraction: float = 1.0, seed: int = 0) -> list[Question]:
    """A deterministic random subset of ``round(fraction * n)`` questions (at least 1), in their original order.

    Each question's draw depends only on ``seed`` and its id, so the subset does not
    depend on the order of the file.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    if fraction == 1.0 or not questions:
        return list(questions)
    count = max(1, round(fraction * len(questions)))
    chosen = set(sorted(range(len(questions)), key=lambda i: stable_hash(seed, questions[i].id))[:count])
    return [q for i, q in enumerate(questions) if i in chosen]


#: Datasets with a validation split of their own (for choosing adapters and settings).
VALIDATION_SPLITS: dict[str, str] = {"easy-vqa": "validation", "scenes": "validation"}


def split_by_image(questions: Sequence[Question], fraction: float, seed: int = 0) -> tuple[list[Question], list[Question]]:
    """``(rest, held out)``: about ``fraction`` of the *images* held out with all their questions.

    An image is known by ``image_key`` (by the question id where the dataset gives none), so
    no image has questions on both sides. At least one image lands on each side when there
    are two. Deterministic for ``seed``.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"val fraction must be in (0, 1), got {fraction!r}")
    draw = {key: stable_hash(seed, "val:" + key) / 2**64 for key in dict.fromkeys(q.image_key or q.id for q in questions)}
    held = {key for key, value in draw.items() if value < fraction}
    if len(draw) >= 2 and not held:
        held = {min(draw, key=draw.get)}
    if len(draw) >= 2 and len(held) == len(draw):
        held.discard(max(draw, key=draw.get))
    return [q for q in questions if (q.image_key or q.id) not in held], [q for q in questions if (q.image_key or q.id) in held]


def stable_hash(seed: int, key: str) -> int:
    """A 64-bit hash of ``(seed, key)`` that is the same in every process and run."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


# -- file helpers ----------------------------------------------------------------------

def _require(path: Path | None, what: str, dataset: str) -> Path:
    if path is None:
        raise ValueError(f"dataset {dataset!r} needs --{what} (a path)")
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory (--{what} of dataset {dataset!r})")
    folder = what == "images"  # the images are a folder; questions and annotations are files
    if path.is_dir() != folder:
        raise ValueError(f"{path} is {'a file' if folder else 'a folder'}: --{what} of dataset {dataset!r} is a "
                         f"{'folder' if folder else 'file'}")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}:{error.colno}: invalid JSON: {error.msg}") from None


def _field(record: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise ValueError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {key!r} must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise ValueError(f"{where}: 'answers' must be a non-empty list of strings, got {value!r}")
    return tuple(value)


# -- VQAv2 / OK-VQA ----------------------------------------------------------------------

_COCO_ID = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)


def _coco_index(images: Path) -> dict[int, str]:
    """image id -> file, for COCO names (``COCO_val2014_000000000042.jpg`` or ``000000000042.jpg``)."""
    index = {}
    with os.scandir(images) as entries:
        for entry in entries:
            match = _COCO_ID.search(entry.name)
            if match:
                index[int(match.group(1))] = entry.path
    return index


def load_vqa_files(questions: Path | None, annotations: Path | None, images: Path | None, dataset: str) -> list[Question]:
    """Questions from the official VQA-format files (shared by VQAv2 and OK-VQA)."""
    questions = _require(questions, "questions", dataset)
    annotations = _require(annotations, "annotations", dataset)
    images = _require(images, "images", dataset)
    q_data, a_data = _read_json(questions), _read_json(annotations)
    q_records = _field(q_data, "questions", list, str(questions))
    a_records = _field(a_data, "annotations", list, str(annotations))
    answers: dict[int, tuple[str, ...]] = {}
    for i, record in enumerate(a_records):
        where = f"{annotations}: annotations[{i}]"
        qid = _field(record, "question_id", int, where)
        raw = _field(record, "answers", list, where)
        answers[qid] = _answers([_field(a, "answer", str, f"{where}.answers") for a in raw], where)
    index = _coco_index(images)
    out = []
    for i, record in enumerate(q_records):
        where = f"{questions}: questions[{i}]"
        qid = _field(record, "question_id", int, where)
        image_id = _field(record, "image_id", int, where)
        if qid not in answers:
            raise ValueError(f"{where}: question_id {qid} has no entry in {annotations}")
        if image_id not in index:
            raise ValueError(f"{where}: image_id {image_id} has no image file in {images}")
        out.append(Question(str(qid), _field(record, "question", str, where), answers[qid], index[image_id], str(image_id)))
    return out


@register_dataset("vqav2")
def load_vqav2(questions: Path | None = None, annotations: Path | None = None, images: Path | None = None, **_: Any) -> list[Question]:
    """VQAv2: ``v2_OpenEnded_mscoco_<split>_questions.json``, ``v2_mscoco_<split>_annotations.json``, COCO images."""
    return load_vqa_files(questions, annotations, images, "vqav2")


@register_dataset("ok-vqa")
def load_okvqa(questions: Path | None = None, annotations: Path | None = None, images: Path | None = None, **_: Any) -> list[Question]:
    """OK-VQA: ``OpenEnded_mscoco_val2014_questions.json``, ``mscoco_val2014_annotations.json``, COCO val2014 images."""
    return load_vqa_files(questions, annotations, images, "ok-vqa")


# -- JSONL -------------------------------------------------------------------------------

@register_dataset("jsonl")
def load_jsonl(questions: Path | None = None, **_: Any) -> list[Question]:
    """One JSON object per line: ``image`` (path, relative to the file's folder), ``question``,
    ``answers`` (list of str), optional ``id`` (default: the line number)."""
    path = _require(questions, "questions", "jsonl")
    out = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON: {error.msg}") from None
            image = Path(_field(record, "image", str, where))
            image = image if image.is_absolute() else path.parent / image
            if not image.exists():
                raise ValueError(f"{where}: image {str(image)!r} does not exist")
            qid = record.get("id", number)
            if not isinstance(qid, (str, int)) or isinstance(qid, bool):
                raise ValueError(f"{where}: field 'id' must be a str or int, got {qid!r}")
            out.append(Question(str(qid), _field(record, "question", str, where), _answers(record.get("answers"), where), image,
                                str(image)))
    return out


# -- the reference model's tasks ---------------------------------------------------------

@register_dataset("easy-vqa")
def load_easy_vqa(split: str = "test", **_: Any) -> list[Question]:
    """easy-VQA from its package: ``train`` (images 0-3,599), ``validation`` (training images 3,600-3,999,
    carved out for choosing), ``test`` (9,673 questions on 1,000 images); one answer each."""
    examples = reference_data.easy_vqa_split(split)
    return [Question(f"{split}/{i}", e.question, (e.answer,), e.image, f"{split}/{e.image_id}") for i, e in enumerate(examples)]


@register_dataset("scenes")
def load_scenes(split: str = "test", **_: Any) -> list[Question]:
    """The project's harder multi-shape task (generated; :func:`catp.reference.data.scenes_split`):
    ``train``, ``validation``, ``test``."""
    return [Question(f"{split}/{i}", e.question, (e.answer,), e.image, f"{split}/{e.image_id}")
            for i, e in enumerate(reference_data.scenes_split(split))]


@register_dataset("hf")
def load_hf(source: str | None = None, split: str | None = None, config: str | None = None,
            columns: Mapping[str, str] | None = None, **_: Any) -> list[Question]:
    """A Hugging Face dataset, ``--dataset hf:NAME`` (see :mod:`catp.evaluation.hf_datasets`)."""
    if not source:
        raise ValueError(f"dataset 'hf' needs a name: {HF_PREFIX}NAME (a hub id, a save_to_disk directory, or parquet files)")
    return load_hf_split(source, split=split, config=config, columns=columns)
