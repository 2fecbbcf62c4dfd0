"""Offline throughput of pruned BLIP-2 in vLLM: requests/s, prompt tokens/s and time to first token per keep.

    catp bench --engine vllm                                  # the shipped reference model, fp32
    catp bench --engine vllm --arch blip2-opt-2.7b --requests 32   # paper-shaped, random weights, bf16

One catp engine serves every keep (each request sets ``catp_keep``), so the keeps share
the engine, its warm-up and the machine's state. For each keep the same ``N`` requests
are submitted at once to ``LLM.generate``: distinct images (no encoder-cache reuse, prefix
caching off), one prompt text, ``new_tokens`` forced new tokens (``min_tokens = max_tokens``,
EOS ignored). Ratios are against keep = ``Q`` (stock vLLM's embeddings: nothing is scored),
next to the analytic FLOPs ratios of :mod:`catp.bench.flops`.

A paper-shaped model (``--arch``) is served from a directory holding only its config
(``load_format="dummy"``: vLLM fills random weights), the reference tokenizer and its
processor config at the arch's image size (:func:`paper_model_dir`).
"""

from __future__ import annotations

import datetime
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from catp.vllm import overrides

__all__ = ["KEEPS", "markdown_table", "measure_throughput", "paper_model_dir"]

#: The keeps a run compares by default (the first, all query tokens, is the reference).
KEEPS: tuple[int, ...] = (32, 16, 8, 4)
#: Measured figure -> its ratio against keep Q.
_RATIOS = {"requests_per_s": "requests_ratio", "prompt_tokens_per_s": "prompt_tokens_ratio", "ttft_mean_s": "ttft_ratio"}
#: The question asked about every image (one prompt length for every request).
QUESTION = "what shape is in the image?"


def paper_model_dir(arch: str, out_dir: str | Path) -> Path:
    """A vLLM-loadable directory for a paper-shaped arch with no weights (serve it with ``load_format="dummy"``).

    The config is :func:`catp.bench.archs.arch_config` with ``architectures`` set (vLLM
    refuses ``generate()`` without it); the tokenizer is the reference model's, whose
    ``<image>`` id becomes ``image_token_index``; the processor config is the reference's
    at the arch's image size.
    """
    from transformers import AutoConfig

    from catp.bench.archs import arch_config
    from catp.reference import reference_model_path

    reference = reference_model_path()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = arch_config(arch)
    if config.model_type != "blip-2" or not config.use_decoder_only_language_model:
        raise ValueError(f"vLLM serves BLIP-2 with a decoder-only language model (OPT); {arch!r} is not one")
    config.architectures = ["Blip2ForConditionalGeneration"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(reference / name, out / name)
    tokens = json.loads((reference / "tokenizer.json").read_text())["added_tokens"]
    config.image_token_index = next(t["id"] for t in tokens if t["content"] == "<image>")
    reference_text = AutoConfig.from_pretrained(reference).text_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(config.text_config, name, getattr(reference_text, name))
    config.save_pretrained(out)
    processor = json.loads((reference / "processor_config.json").read_text())
    size = int(config.vision_config.image_size)
    processor["image_processor"]["size"] = {"height": size, "width": size}
    processor["num_query_tokens"] = int(config.num_query_tokens)
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2))
    return out


def _images(count: int, skip: int = 0) -> list[Any]:
    """``count`` distinct easy-VQA test images after the first ``skip``."""
    from catp.reference.data import easy_vqa_images

    images = easy_vqa_images("test", skip + count)[skip:]
    if len(images) < count:
        raise ValueError(f"easy-VQA has only {len(images)} test images after the first {skip}; ask for fewer requests")
    return images


def _run(llm: Any, images: Sequence[Any], keep: int, params: Any) -> dict[str, Any]:
    """One timed batch: every image with ``catp_keep=keep``, submitted at once."""
    from catp.reference.data import format_prompt

    batch = [{"prompt": format_prompt(QUESTION), "multi_modal_data": {"image": image}, "mm_processor_kwargs": {"catp_keep": keep}}
             for image in images]
    start = time.perf_counter()
    outputs = llm.generate(batch, params, use_tqdm=False)
    wall = time.perf_counter() - start
    ttft = [o.metrics.first_token_latency for o in outputs if getattr(o, "metrics", None) is not None]
    return {"wall_s": wall, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs) / len(outputs),
            "ttft_mean_s": statistics.fmean(ttft) if ttft else None}


def _summary(keep: int, runs: Sequence[dict[str, Any]], requests: int) -> dict[str, Any]:
    """One keep's row from its repeated runs: medians (wall time, mean TTFT) and the spread of the wall time."""
    walls = [r["wall_s"] for r in runs]
    wall = statistics.median(walls)
    ttfts = [r["ttft_mean_s"] for r in runs if r["ttft_mean_s"] is not None]
    prompt_tokens = runs[0]["prompt_tokens"]
    return {
        "keep": keep,
        "wall_s": wall,
        "wall_spread": (max(walls) - min(walls)) / wall,
        "requests_per_s": requests / wall,
        "prompt_tokens": prompt_tokens,
        "prompt_tokens_per_s": requests * prompt_tokens / wall,
        "ttft_mean_s": statistics.median(ttfts) if ttfts else None,
    }


def measure_throughput(
    model: str | Path | None = None,
    arch: str | None = None,
    keeps: Sequence[int | float] = KEEPS,
    requests: int = 32,
    new_tokens: int = 10,
    method: str = "catp",
    dtype: str | None = None,
    warmup: int = 4,
    repeats: int = 1,
    kv_cache_gib: float | None = None,
    max_model_len: int = 128,
) -> dict[str, Any]:
    """Throughput of catp in vLLM at each keep, in one engine and one run.

    Args:
        model: a BLIP-2 directory or hub id (default: the shipped reference model).
        arch: instead, a paper-shaped arch with random weights (:func:`paper_model_dir`).
        keeps: counts or fractions to compare (as :func:`catp.resolve_keep`); ``Q`` (all tokens, the
            reference) is added when missing.
        requests: requests per keep (distinct images).
        new_tokens: forced new tokens per request.
        method: the pruning method.
        dtype: vLLM dtype (default: bfloat16 for ``arch``, float32 otherwise).
        warmup: requests per keep run before timing (other images).
        repeats: timed rounds; each runs every keep once, the order rotated by one keep per round.
            A keep's figures are medians over the rounds.
        kv_cache_gib: KV-cache space (default: 4 GiB for ``arch``, 0.25 GiB otherwise).
        max_model_len: the engine's context length.

    Returns:
        ``{"command", "date", "model", "dtype", "method", "requests", "new_tokens", "engine_start_s",
        "machine", "results": [...]}``: per keep ``wall_s``, ``requests_per_s``, ``prompt_tokens``
        (mean per request), ``prompt_tokens_per_s``, ``ttft_mean_s``, each ``*_ratio`` against keep
        ``Q``, and ``prefill_flops_ratio`` / ``total_flops_ratio`` (analytic, per request).
    """
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from catp.bench.flops import Workload, llm_prefill_flops, stage_flops
    from catp.bench.runner import machine_info
    from catp.reference import reference_model_path
    from catp.selection import resolve_keep

    if model is not None and arch is not None:
        raise ValueError("give model or arch, not both")
    if isinstance(requests, bool) or not isinstance(requests, int) or requests < 1:
        raise ValueError(f"requests must be a positive int, got {requests!r}")
    for name, value in (("new_tokens", new_tokens), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    dtype = dtype or ("bfloat16" if arch else "float32")
    engine: dict[str, Any] = {}
    workdir = None
    if arch is not None:
        workdir = tempfile.mkdtemp(prefix="catp-vllm-bench-")
        source, name = str(paper_model_dir(arch, workdir)), f"arch {arch} (random weights)"
        engine["load_format"] = "dummy"
    else:
        source = str(model or reference_model_path())
        name = str(model) if model else "reference model"
    try:
        config = AutoConfig.from_pretrained(source)
        q = int(config.num_query_tokens)
        keeps = sorted({q, *(resolve_keep(k, q) for k in keeps)}, reverse=True)
        overrides(method=method, keep=q)  # checks the method before the engine starts
        gib = kv_cache_gib if kv_cache_gib is not None else (4.0 if arch else 0.25)
        start = time.perf_counter()
        llm = LLM(model=source, dtype=dtype, max_model_len=max_model_len, enforce_eager=True, limit_mm_per_prompt={"image": 1},
                  kv_cache_memory_bytes=int(gib * 1024**3), enable_prefix_caching=False, disable_log_stats=False,
                  hf_overrides=overrides(method=method, keep=q), seed=0, **engine)
        engine_start = time.perf_counter() - start
        try:
            params = SamplingParams(temperature=0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
            timed, spare = _images(requests), _images(warmup, skip=requests) if warmup else []
            for keep in keeps:
                if spare:
                    _run(llm, spare, keep, params)
            runs: dict[int, list[dict[str, Any]]] = {keep: [] for keep in keeps}
            for round_ in range(repeats):
                for keep in keeps[round_ % len(keeps):] + keeps[:round_ % len(keeps)]:
                    runs[keep].append(_run(llm, timed, keep, params))
            results = [_summary(keep, runs[keep], requests) for keep in keeps]
        finally:
            llm.llm_engine.engine_core.shutdown()
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
    text_tokens = round(results[0]["prompt_tokens"]) - q
    reference, flops_ref = results[0], stage_flops(config, Workload(batch=1, keep=q, prompt_tokens=text_tokens, new_tokens=new_tokens))
    for row in results:
        work = Workload(batch=1, keep=row["keep"], prompt_tokens=text_tokens, new_tokens=new_tokens)
        for key, ratio_key in _RATIOS.items():
            row[ratio_key] = None if row[key] is None or not reference[key] else row[key] / reference[key]
        row["prefill_flops_ratio"] = llm_prefill_flops(config, work) / flops_ref.prefill
        row["total_flops_ratio"] = stage_flops(config, work).total / flops_ref.total
    info = machine_info("cpu")
    import vllm

    info["vllm"] = vllm.__version__
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": name, "dtype": dtype, "method": method, "requests": requests, "new_tokens": new_tokens, "repeats": repeats,
        "text_tokens": text_tokens, "engine_start_s": round(engine_start, 1), "machine": info, "results": results,
    }


def markdown_table(report: dict[str, Any]) -> str:
    """The throughput table of a :func:`measure_throughput` report, ratios against keep ``Q``."""

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}x"

    lines = [
        f"{report['model']}, {report['dtype']}, method {report['method']}: {report['requests']} requests per keep "
        f"({report['text_tokens']} text tokens + kept query tokens, {report['new_tokens']} forced new tokens), "
        f"median of {report['repeats']} round(s); engine start {report['engine_start_s']:.0f} s",
        "",
        "| keep | prompt tokens | wall s (spread) | requests/s | ratio | prompt tokens/s | ratio | TTFT mean s | ratio "
        "| prefill FLOPs ratio | total FLOPs ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        ttft = "-" if row["ttft_mean_s"] is None else f"{row['ttft_mean_s']:.2f}"
        lines.append(
            f"| {row['keep']} | {row['prompt_tokens']:.0f} | {row['wall_s']:.2f} ({row['wall_spread']:.0%}) | {row['requests_per_s']:.2f} "
            f"| {ratio(row['requests_ratio'])} | {row['prompt_tokens_per_s']:.0f} | {ratio(row['prompt_tokens_ratio'])} "
            f"| {ttft} | {ratio(row['ttft_ratio'])} | {row['prefill_flops_ratio']:.2f} | {row['total_flops_ratio']:.2f} |"
        )
    return "\n".join(lines)
