"""Runs shared by the lmms-eval tests (``catp[lmms-eval]`` and lmms-eval 0.7.3; skipped without lmms-eval).

Each ``python -m lmms_eval`` run takes 40-90 s on 2 busy cores (lmms-eval indexes its own tasks
first), so each distinct run happens once per session and its results, answers and cost are shared.
Everything is offline: the shipped reference model and a local task over its easy-VQA test questions.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from lmms_runs import BATCH, OFFLINE, QUESTIONS, Run, lmms_eval_command
from local_task import write_task


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
