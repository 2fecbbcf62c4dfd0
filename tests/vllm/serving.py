"""Helpers of the vLLM tests (no vLLM import at module level)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tools.vllm_agreement import REFERENCE_ENGINE

#: Engine arguments shared by every engine in these tests: the reference model in fp32.
ENGINE: dict[str, Any] = {**REFERENCE_ENGINE, "dtype": "float32"}
#: The engine setting of the ``llm`` fixture.
ENGINE_METHOD, ENGINE_KEEP = "catp", 8


def model_path() -> str:
    import catp

    return str(catp.reference_model_path())


def greedy(max_tokens: int = 5, **kwargs: Any) -> Any:
    from vllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def shutdown(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


@contextlib.contextmanager
def recording_engine(record: Path, model: str, **kwargs: Any) -> Iterator[Any]:
    """``vllm.LLM(model, **kwargs)`` writing the kept indices to ``record`` (read by the engine process it
    spawns, through :data:`catp.vllm.RECORD_ENV`); shut down, and the variable restored, on exit."""
    from vllm import LLM

    import catp.vllm

    saved = os.environ.get(catp.vllm.RECORD_ENV)
    os.environ[catp.vllm.RECORD_ENV] = str(record)
    llm = LLM(model=model, **kwargs)
    try:
        yield llm
    finally:
        shutdown(llm)
        if saved is None:
            os.environ.pop(catp.vllm.RECORD_ENV, None)
        else:
            os.environ[catp.vllm.RECORD_ENV] = saved
