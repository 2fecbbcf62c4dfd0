"""Runs shared by the lmms-eval tests (``catp[lmms-eval]`` and lmms-eval 0.7.3; skipped without lmms-eval).

Each ``python -m lmms_eval`` run takes 40-90 s on 2 busy cores (lmms-eval indexes its own tasks
first), so each distinct run happens once per session and its results, answers and cost are shared.
Everything is offline: the shipped reference model and a local task over its easy-VQA test questions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_task import write_task  # noqa: E402

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


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lmms-task")
    write_task(folder, QUESTIONS)
    return folder


@pytest.fixture(scope="session")
def questions() -> list[Any]:
    from local_task import questions as first

    return first(QUESTIONS)


@pytest.fixture(scope="session")
def lmms_run(task_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """``lmms_run(model_args, tasks="catp_easy_vqa", batch_size=BATCH)`` -> :class:`Run`, once per distinct run."""
    done: dict[tuple[str, str, int], Run] = {}

    def run(model_args: str, tasks: str = "catp_easy_vqa", batch_size: int = BATCH) -> Run:
        key = (model_args, tasks, batch_size)
        if key not in done:
            out = tmp_path_factory.mktemp("lmms-out")
            args = f"{model_args},cost_file={out / 'cost.json'}"
            completed = subprocess.run(lmms_eval_command(args, tasks, task_dir, out, batch_size), capture_output=True, text=True,
                                       env={**os.environ, **OFFLINE}, timeout=900)
            done[key] = Run(out, completed)
        return done[key]

    return run


@pytest.fixture(scope="session")
def reference() -> tuple[Any, Any]:
    """The reference model (fp32, CPU) and its processor, padding on the left."""
    from catp.models import load_model
    from catp.reference import reference_model_path

    return load_model(reference_model_path(), "float32", "cpu")
