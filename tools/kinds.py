"""Accuracy per question kind of ``catp eval`` runs on easy-VQA or scenes: which questions a keep loses.

    python tools/kinds.py out/adapted-scenes                      # every configuration of the run
    python tools/kinds.py out/adapted-scenes --config unpruned --config first@1

The kind of an easy-VQA question is its template's (:func:`catp.reference.data.easy_vqa_kind`:
``color``, ``has_shape``, ...); of a scenes question, its first two words (``how many``, ``what
color``, ``what shape``, ``what size``). The questions come from the run's own ``run.json``
(dataset, split), read again with :func:`catp.evaluation.datasets.load_dataset`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

from catp.evaluation.datasets import load_dataset
from catp.reference.data import easy_vqa_kind


def question_kind(dataset: str, question: str) -> str:
    """The kind of one ``question`` of ``dataset`` (``easy-vqa`` or ``scenes``)."""
    if dataset == "easy-vqa":
        return easy_vqa_kind(question)
    if dataset == "scenes":
        return " ".join(question.split()[:2]).lower()
    raise ValueError(f"question kinds are stated for easy-vqa and scenes, not {dataset!r}")


def kind_accuracy(predictions: Sequence[Mapping], kinds: Mapping[str, str]) -> dict[str, dict[str, tuple[float, int]]]:
    """``config -> kind -> (accuracy in %, questions)`` from prediction rows (``config``, ``id``, ``accuracy``),
    with ``kinds`` mapping each question id to its kind; ``"all"`` is every question of the config."""
    scores: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for row in predictions:
        scores[row["config"]][kinds[row["id"]]].append(float(row["accuracy"]))
        scores[row["config"]]["all"].append(float(row["accuracy"]))
    return {config: {kind: (100 * sum(v) / len(v), len(v)) for kind, v in sorted(by_kind.items())}
            for config, by_kind in scores.items()}


def run_kinds(run: Path) -> dict[str, dict[str, tuple[float, int]]]:
    """:func:`kind_accuracy` of a ``catp eval`` run directory."""
    info = json.loads((run / "run.json").read_text(encoding="utf-8"))
    questions = load_dataset(info["dataset"], split=info["split"])
    kinds = {q.id: question_kind(info["dataset"], q.question) for q in questions}
    rows = [json.loads(line) for file in sorted(run.glob("predictions-*.jsonl"))
            for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return kind_accuracy(rows, kinds)


def table(result: Mapping[str, Mapping[str, tuple[float, int]]], configs: Sequence[str]) -> str:
    """A Markdown table: a row per kind, a column per configuration."""
    kinds = sorted({k for c in configs for k in result[c]}, key=lambda k: (k == "all", k))
    lines = ["| kind (questions) | " + " | ".join(configs) + " |", "|---|" + "---|" * len(configs)]
    for kind in kinds:
        n = next(result[c][kind][1] for c in configs if kind in result[c])
        lines.append(f"| {kind} ({n:,}) | " + " | ".join(f"{result[c][kind][0]:.1f}" if kind in result[c] else "" for c in configs) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, nargs="+", help="catp eval run directories")
    parser.add_argument("--config", action="append", help="configurations to show (default: all of the run's)")
    args = parser.parse_args(argv)
    for run in args.run:
        result = run_kinds(run)
        print(f"{run}:\n{table(result, args.config or list(result))}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
