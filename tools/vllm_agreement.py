"""How closely catp in vLLM follows the Hugging Face path: kept sets and answers, per method.

    python tools/vllm_agreement.py --dtype bfloat16 --keep 8

Starts one catp engine on the shipped reference model at ``--dtype`` with the kept-index
record on (:data:`catp.vllm.RECORD_ENV`), asks every method per request, and compares

* each image's kept set with :func:`catp.select_queries` on the Hugging Face model in fp32
  and, for a lower precision, at that dtype too (``from_pretrained`` keeps the Q-Former and
  query tokens in fp32 for fp16, not for bf16);
* each question's greedy answer (5 new tokens) with ``catp.pruned()`` + ``generate()``.

The tests in ``tests/vllm`` assert the fp32 figures; this command reports every dtype.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catp.reference.data import VQAExample, easy_vqa_split, format_prompt
from catp.vllm import RECORD_ENV, image_tag, overrides, read_records

__all__ = ["REFERENCE_ENGINE", "agreement_questions", "distinct_images", "kept_sets", "markdown", "measure", "vqa_requests"]

#: Engine arguments for the shipped reference model on a CPU (add ``dtype``).
REFERENCE_ENGINE: dict[str, Any] = dict(
    max_model_len=128,
    enforce_eager=True,
    limit_mm_per_prompt={"image": 1},
    kv_cache_memory_bytes=1 << 28,  # the tiny model needs little; also skips vLLM's free-memory check
    seed=0,
)
#: New tokens of a greedy answer (as catp.reference.evaluate).
ANSWER_TOKENS = 5


def agreement_questions(images: int = 64) -> list[VQAExample]:
    """easy-VQA test questions: the first 64 (on 7 images), then the first question of each of the first ``images`` images."""
    first = easy_vqa_split("test", 64)
    seen = {(e.image_id, e.question) for e in first}
    per_image: dict[int, VQAExample] = {}
    for example in easy_vqa_split("test", image_limit=images):
        per_image.setdefault(example.image_id, example)
    return first + [e for e in per_image.values() if (e.image_id, e.question) not in seen]


def distinct_images(examples: Sequence[VQAExample]) -> list[VQAExample]:
    """One example per distinct image, in order."""
    per_image: dict[int, VQAExample] = {}
    for example in examples:
        per_image.setdefault(example.image_id, example)
    return list(per_image.values())


def vqa_requests(examples: Sequence[VQAExample], **catp_kwargs: Any) -> list[dict[str, Any]]:
    """vLLM prompts for ``examples``; ``catp_kwargs`` (``catp_keep=...``) become each request's ``mm_processor_kwargs``."""
    out = []
    for example in examples:
        request: dict[str, Any] = {"prompt": format_prompt(example.question), "multi_modal_data": {"image": example.image}}
        if catp_kwargs:
            request["mm_processor_kwargs"] = dict(catp_kwargs)
        out.append(request)
    return out


def kept_sets(records: Sequence[dict[str, Any]]) -> dict[tuple[str, int, str], set[tuple[int, ...]]]:
    """``(method, keep, image tag) -> the kept sets recorded`` (one set when the engine is consistent)."""
    table: dict[tuple[str, int, str], set[tuple[int, ...]]] = defaultdict(set)
    for record in records:
        table[record["method"], record["keep"], record["tag"]].add(tuple(record["kept"]))
    return dict(table)


def _hf_reference(dtype: str, methods: Sequence[str], keep: int, images: Sequence[VQAExample],
                  questions: Sequence[VQAExample]) -> dict[str, dict[str, list[Any]]]:
    """Kept sets (one tuple per image) and answers of the Hugging Face path at ``dtype``."""
    import catp
    import catp.reference
    from catp.reference.evaluate import answer

    model, processor = catp.reference.load(dtype=dtype)
    pixel_values = processor.image_processor([e.image for e in images], return_tensors="pt")["pixel_values"]
    pixel_values = pixel_values.to(model.dtype)
    out: dict[str, dict[str, list[Any]]] = {}
    for method in methods:
        kept = catp.select_queries(model, pixel_values, method=method, keep=keep)
        out[method] = {"kept": [tuple(row) for row in kept.tolist()],
                       "answers": answer(model, processor, questions, method=method, keep=keep)}
    return out


def measure(dtype: str = "float32", keep: int = 8, images: int = 64, methods: Sequence[str] | None = None) -> dict[str, Any]:
    """Serve every method at ``keep`` in vLLM at ``dtype`` and compare with the Hugging Face path.

    Returns:
        ``{"dtype", "keep", "images", "questions", "engine_start_s", "methods": {name: {...}}}``; per
        method: ``kept_vs_hf_fp32`` and ``answers_vs_hf_fp32`` (shares of images / questions), the same
        ``..._vs_hf_dtype`` against the HF model at ``dtype`` (lower precisions only), and
        ``answer_differences``: ``(question, vLLM answer, HF answer at dtype)``.
    """
    from vllm import LLM, SamplingParams

    import catp

    methods = list(methods or catp.METHODS)
    questions = agreement_questions(images)
    image_examples = distinct_images(questions)
    record = Path(tempfile.mkdtemp(prefix="catp-agreement-")) / "kept.jsonl"
    saved = os.environ.get(RECORD_ENV)
    os.environ[RECORD_ENV] = str(record)
    try:
        start = time.perf_counter()
        llm = LLM(model=str(catp.reference_model_path()), dtype=dtype, hf_overrides=overrides(keep=keep), **REFERENCE_ENGINE)
        engine_start = time.perf_counter() - start
        try:
            batch = [r for m in methods for r in vqa_requests(questions, catp_method=m)]
            outputs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=ANSWER_TOKENS), use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        if saved is None:
            os.environ.pop(RECORD_ENV, None)
        else:
            os.environ[RECORD_ENV] = saved
    kept = kept_sets(read_records(record))
    n = len(questions)
    answers = {m: [o.outputs[0].text.strip() for o in outputs[i * n:(i + 1) * n]] for i, m in enumerate(methods)}
    references = {"hf_fp32": _hf_reference("float32", methods, keep, image_examples, questions)}
    if dtype != "float32":
        references["hf_dtype"] = _hf_reference(dtype, methods, keep, image_examples, questions)
    tags = [image_tag(e.image) for e in image_examples]
    result: dict[str, Any] = {"dtype": dtype, "keep": keep, "images": len(image_examples), "questions": n,
                              "engine_start_s": round(engine_start, 1), "methods": {}}
    for method in methods:
        row: dict[str, Any] = {}
        for name, reference in references.items():
            expected = reference[method]
            row[f"kept_vs_{name}"] = sum(kept.get((method, keep, t)) == {k} for t, k in zip(tags, expected["kept"])) / len(tags)
            row[f"answers_vs_{name}"] = sum(a == b for a, b in zip(answers[method], expected["answers"])) / n
        closest = references.get("hf_dtype", references["hf_fp32"])[method]["answers"]
        row["answer_differences"] = [(q.question, a, b) for q, a, b in zip(questions, answers[method], closest) if a != b]
        result["methods"][method] = row
    return result


def markdown(result: dict[str, Any]) -> str:
    """The result of :func:`measure` as a Markdown table."""
    lower = result["dtype"] != "float32"
    header = "| method | kept = HF fp32 | answers = HF fp32 |"
    rule = "|---|---|---|"
    if lower:
        header += f" kept = HF {result['dtype']} | answers = HF {result['dtype']} |"
        rule += "---|---|"
    lines = [f"vLLM {result['dtype']}, keep {result['keep']}: {result['images']} images, {result['questions']} questions",
             "", header, rule]
    for method, row in result["methods"].items():
        line = f"| {method} | {row['kept_vs_hf_fp32']:.1%} | {row['answers_vs_hf_fp32']:.1%} |"
        if lower:
            line += f" {row['kept_vs_hf_dtype']:.1%} | {row['answers_vs_hf_dtype']:.1%} |"
        lines.append(line)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python tools/vllm_agreement.py", description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--keep", type=int, default=8)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    parser.add_argument("--out", type=Path, default=None, help="also write the result as JSON")
    args = parser.parse_args(argv)
    methods = args.methods.split(",") if args.methods else None
    result = measure(args.dtype, args.keep, args.images, methods)
    print(markdown(result))
    for method, row in result["methods"].items():
        if row["answer_differences"]:
            print(f"{method}: answers differ on {row['answer_differences']}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":  # vLLM spawns its engine process: keep the guard
    main()
