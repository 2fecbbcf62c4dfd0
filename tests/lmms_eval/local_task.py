"""The local lmms-eval tasks over the reference model's easy-VQA test questions, written to a folder.

    python tests/lmms_eval/local_task.py OUT --limit 24

writes ``OUT/easy_vqa.parquet`` (the images inside, as PNG) and the task files of ``task/`` beside it:
``--include_path OUT`` then gives lmms-eval the tasks ``catp_easy_vqa`` (generation, VQA accuracy)
and ``catp_easy_vqa_mc`` (multiple choice, log-likelihoods). The questions are the first ``limit``
in ``catp eval``'s order (seed 0), so ``catp eval --dataset easy-vqa --limit N`` runs the same ones.
"""

from __future__ import annotations

import argparse
import functools
import shutil
from pathlib import Path

from catp.evaluation.datasets import Question, load_dataset
from catp.evaluation.harness import order_questions
from catp.reference.data import easy_vqa_kind

TASK_FILES = Path(__file__).resolve().parent / "task"
#: Task names, as the YAML files give them.
GENERATE_TASK = "catp_easy_vqa"
CHOICE_TASK = "catp_easy_vqa_mc"


def questions(limit: int, seed: int = 0) -> list[Question]:
    """The first ``limit`` easy-VQA test questions in catp eval's order."""
    return order_questions(load_dataset("easy-vqa", split="test"), seed)[:limit]


@functools.cache
def _answers_by_kind() -> dict[str, tuple[str, ...]]:
    answers: dict[str, set[str]] = {}
    for q in load_dataset("easy-vqa", split="test"):
        answers.setdefault(easy_vqa_kind(q.question), set()).add(q.answers[0])
    return {kind: tuple(sorted(found)) for kind, found in answers.items()}


def choices(question: Question) -> list[str]:
    """The multiple-choice task's choices for a question: the answers of its kind (colours, shapes, or yes / no)."""
    return list(_answers_by_kind()[easy_vqa_kind(question.question)])


def write_task(folder: Path, limit: int) -> list[Question]:
    """The parquet file and the task files in ``folder``; returns the questions, in the file's row order."""
    from datasets import Dataset, Features, Image, Sequence, Value

    chosen = questions(limit)
    features = Features({"id": Value("string"), "question": Value("string"), "answer": Value("string"),
                         "choices": Sequence(Value("string")), "image": Image()})
    rows = {"id": [q.id for q in chosen], "question": [q.question for q in chosen], "answer": [q.answers[0] for q in chosen],
            "choices": [choices(q) for q in chosen], "image": [q.load_image() for q in chosen]}
    folder.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(folder / "easy_vqa.parquet"))
    for file in TASK_FILES.iterdir():
        if file.suffix in (".yaml", ".py"):
            shutil.copy(file, folder / file.name)
    return chosen


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--limit", type=int, default=24)
    args = parser.parse_args()
    print(f"wrote {len(write_task(args.out, args.limit))} questions to {args.out}")
