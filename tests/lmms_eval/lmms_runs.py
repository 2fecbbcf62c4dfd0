"""What the lmms-eval tests share: the size of the local task, and one ``python -m lmms_eval --model catp`` run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: Questions in the local task (the first N of catp eval's order on easy-VQA's test split).
QUESTIONS = 16
#: Batch size of the runs (each run's own unless a test asks for another).
BATCH = 8
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def lmms_eval_command(model_args: str, tasks: str, include: Path, out: Path, batch_size: int) -> list[str]:
    return [sys.executable, "-m", "lmms_eval", "--model", "catp", "--model_args", model_args, "--tasks", tasks,
            "--include_path", str(include), "--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"]


class Run:
    """One ``python -m lmms_eval --model catp`` run: its results JSON, its answers per task and doc id, its cost file."""

    def __init__(self, out: Path, completed: subprocess.CompletedProcess) -> None:
        self.output = completed.stdout + completed.stderr
        files = sorted(out.rglob("*_results.json"))
        if not files:
            raise AssertionError(f"lmms-eval wrote no results (exit {completed.returncode}):\n{self.output[-4000:]}")
        self.results: dict[str, Any] = json.loads(files[-1].read_text())
        self.answers: dict[str, dict[int, Any]] = {}
        for samples in out.rglob("*_samples_*.jsonl"):
            rows = [json.loads(line) for line in samples.read_text().splitlines()]
            task = samples.stem.split("_samples_", 1)[1]
            self.answers[task] = {row["doc_id"]: row["filtered_resps"] for row in rows}
        self.cost: dict[str, Any] = json.loads((out / "cost.json").read_text())
