"""The evaluation sweep: every (method, keep) configuration plus the unpruned model, on
every question, with per-question predictions appended to JSONL as they finish.

Resuming: a run directory holds ``run.json`` (what is being measured) and one
``predictions-<rank>.jsonl`` per process. A new run over the same directory reads every
prediction file, skips each (config, question) already there and computes the rest.

Sharding: questions are put in a fixed order (a seeded shuffle of their ids) and cut
into batches; with ``N`` processes, process ``r`` runs batches ``r, r + N, ...``. A
fresh 1-process run forms exactly the same batches, so merged results are identical.
Any finished prefix of a killed run is a uniform random subset of the questions.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from catp.budget import Budget
from catp.evaluation.datasets import Question, stable_hash
from catp.evaluation.metric import vqa_accuracy
from catp.families import family_of
from catp.hf import pruned as pruned_model
from catp.methods import budget_refusal, check_runnable, get_method, seed_options
from catp.protocol import PAPER_MAX_NEW_TOKENS, PAPER_MIN_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT, check_prompt
from catp.selection import resolve_keep

__all__ = ["Config", "Protocol", "RunState", "build_configs", "family_prompts", "image_inputs", "matching_keeps", "on_model",
           "prepare_batch", "read_predictions", "run_sweep"]

UNPRUNED = "unpruned"


@dataclass(frozen=True)
class Protocol:
    """How answers are generated (the paper's protocol by default)."""

    prompt: str = PAPER_PROMPT
    num_beams: int = PAPER_NUM_BEAMS
    max_new_tokens: int = PAPER_MAX_NEW_TOKENS
    min_new_tokens: int = PAPER_MIN_NEW_TOKENS

    def __post_init__(self) -> None:
        check_prompt(self.prompt)
        if self.num_beams < 1 or self.max_new_tokens < 1 or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"bad generation settings: {self}")


@dataclass(frozen=True)
class Config:
    """One point of the sweep: a method at a keep count or a per-sample :class:`~catp.budget.Budget`,
    or the unpruned model (``method is None``)."""

    method: str | None
    keep: int | Budget

    @property
    def name(self) -> str:
        return UNPRUNED if self.method is None else f"{self.method}@{self.keep}"

    @property
    def keep_label(self) -> int | str:
        """``keep`` as records and reports hold it: a count, or the budget's text (``mass:0.8``)."""
        return self.keep if isinstance(self.keep, int) else str(self.keep)


def build_configs(methods: Sequence[str], keeps: Sequence[int | float | Budget], num_query_tokens: int) -> list[Config]:
    """The unpruned model plus every ``method x keep`` (keeps resolved to counts, as ``catp.pruned`` does).

    Counts come first, largest first, then budgets in the given order. A budget is skipped
    for methods that cannot carry one (``first``, ``random``, the selectors).

    With no methods, only the unpruned model runs (a checkpoint measured as it is, e.g. one
    exported with fewer query tokens).

    Raises:
        ValueError: an unknown method or a bad keep; methods given but none left to run.
    """
    counts = sorted({resolve_keep(k, num_query_tokens) for k in keeps if not isinstance(k, Budget)}, reverse=True)
    budgets = list(dict.fromkeys(k for k in keeps if isinstance(k, Budget)))
    for budget in budgets:
        budget.check_tokens(num_query_tokens)  # a min above the query tokens fails before anything runs
    if methods:
        check_runnable(methods, [*counts, *budgets])
    resolved = {m: get_method(m) for m in methods}
    pruned = [Config(m, k) for m in methods for k in counts]
    pruned += [Config(m, b) for m in methods for b in budgets if budget_refusal(resolved[m]) is None]
    return [Config(None, num_query_tokens), *pruned]


def matching_keeps(per_config: Sequence[tuple[Config, list[dict[str, Any]]]], num_query_tokens: int) -> list[Config]:
    """Fixed-count configs that bracket each budget's mean kept tokens: ``floor`` and ``ceil`` of the mean.

    A budget is then compared with a fixed ``k`` at the same mean (a mix of the two counts,
    see :func:`catp.evaluation.report.budget_comparisons`).
    """
    extra: dict[Config, None] = {}
    for config, records in per_config:
        if config.method is None or not isinstance(config.keep, Budget) or not records:
            continue
        mean = sum(r["kept"] for r in records) / len(records)
        for k in sorted({math.floor(mean), math.ceil(mean)}):
            extra[Config(config.method, min(max(k, 1), num_query_tokens))] = None
    return list(extra)


def question_seed(run_seed: int, question_id: str) -> int:
    """The ``random`` method's seed for one question: independent of batching, sharding and resuming."""
    return stable_hash(run_seed, question_id) % (2**63)


def read_predictions(out: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """Every record of every ``predictions-*.jsonl`` in ``out``, keyed by ``(config, question id)``.

    A truncated last line (a run killed while writing) is ignored; it is recomputed.
    """
    records: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(out.glob("predictions-*.jsonl")):
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # no newline after it: cut off mid-write
                    continue
                raise ValueError(f"{path}:{number}: corrupt prediction record") from None
            records[(record["config"], record["id"])] = record
    return records


class _Writer:
    """Appends records to one JSONL file, one flush per batch (so a kill loses at most a batch)."""

    def __init__(self, path: Path) -> None:
        if path.exists():
            # Drop a partial last line left by a killed run, so appends start on a fresh line.
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        self.file = path.open("a", encoding="utf-8")

    def write(self, records: Sequence[dict[str, Any]]) -> None:
        self.file.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class RunState:
    """Where the sweep is: for the progress bar and for tests."""

    total: int = 0
    done_before: int = 0
    computed: int = 0
    batches: list[list[str]] = field(default_factory=list)


def check_manifest(out: Path, manifest: dict[str, Any], is_main: bool) -> None:
    """Write ``run.json``, or check that an existing one describes the same measurement."""
    path = out / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
        if changed:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {manifest.get(k)!r}" for k in changed)
            raise ValueError(f"{out} holds a run with other settings ({details}); resume with the same settings or use another --out")
    elif is_main:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def order_questions(questions: Sequence[Question], seed: int) -> list[Question]:
    """The fixed processing order: a seeded shuffle by id."""
    return sorted(questions, key=lambda q: stable_hash(seed, "order:" + q.id))


def run_sweep(
    model: Any,
    processor: Any,
    questions: Sequence[Question],
    configs: Sequence[Config],
    out: Path,
    *,
    protocol: Protocol = Protocol(),
    batch_size: int = 8,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    barrier: Any = None,
    progress: bool = True,
) -> RunState:
    """Run every config on every question not yet in ``out``; append predictions as they finish.

    Args:
        model: a model of a supported family (:mod:`catp.families`), in eval mode, on its device.
        processor: its processor (images + prompts -> ``pixel_values``, ``input_ids``, ...).
        questions: the selected questions (same list in every process).
        configs: from :func:`build_configs`.
        out: the run directory (``run.json`` already checked).
        batch_size: questions per ``generate`` call.
        seed: the run seed (order of questions; ``random``'s per-question seeds).
        rank, world_size: this process's shard.
        barrier: called once every process has read what is done (``accelerate``'s
            ``wait_for_everyone``), so no process sees another's new records.

    Returns:
        The :class:`RunState` of this process.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    done = set(read_predictions(out))
    if barrier is not None:
        barrier()
    names = [c.name for c in configs]
    ordered = order_questions(questions, seed)
    pending = [q for q in ordered if any((name, q.id) not in done for name in names)]
    batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)][rank::world_size]
    state = RunState(total=len(questions) * len(configs), done_before=len(done & {(n, q.id) for n in names for q in questions}))
    state.batches = [[q.id for q in b] for b in batches]
    todo = sum((name, q.id) not in done for b in batches for q in b for name in names)
    writer = _Writer(out / f"predictions-{rank}.jsonl")
    bar = tqdm(total=todo, desc=f"eval[{rank}]" if world_size > 1 else "eval", unit="answer", disable=not progress, dynamic_ncols=True)
    try:
        for batch in batches:
            inputs = prepare_batch(processor, batch, protocol.prompt, model)
            placeholders = family_of(model).placeholder_mask(model, inputs).sum(dim=1)
            text_tokens = (inputs["attention_mask"].sum(dim=1) - placeholders).tolist()
            for config in configs:
                missing = [i for i, q in enumerate(batch) if (config.name, q.id) not in done]
                if not missing:
                    continue
                with torch.inference_mode():
                    answers, kept = _generate(model, processor, inputs, config, protocol, [question_seed(seed, q.id) for q in batch],
                                              placeholders.tolist())
                # Tokens fed to the LLM: the real ones, kept query tokens + text (no padding, no fillers).
                records = [{
                    "config": config.name, "method": config.method or UNPRUNED, "keep": config.keep_label, "id": batch[i].id,
                    "prediction": answers[i], "accuracy": vqa_accuracy(answers[i], batch[i].answers),
                    "kept": kept[i], "llm_tokens": kept[i] + int(text_tokens[i]),
                } for i in missing]
                writer.write(records)
                state.computed += len(records)
                bar.update(len(records))
    finally:
        bar.close()
        writer.close()
    return state


def prepare_batch(processor: Any, batch: Sequence[Question], prompt: str, model: Any) -> dict[str, Any]:
    """Processor outputs for a batch of questions (``prompt`` with ``{}`` for the question, laid out for the model's
    family: :func:`family_prompts`), on the model's device (:func:`image_inputs`)."""
    return image_inputs(processor, model, [q.load_image() for q in batch], family_prompts(model, prompt, [q.question for q in batch]))


def family_prompts(model: Any, prompt: str, questions: Sequence[str]) -> list[str]:
    """Each question, stripped, in ``prompt`` (one ``{}``) laid out for one image of the model's family: the family's
    image text where its processor expects it (:meth:`~catp.families.base.Family.prompt_for`; Idefics2's ``<image>``
    in front, nothing for BLIP-2)."""
    template = family_of(model).prompt_for(prompt)
    return [template.format(question.strip()) for question in questions]


def image_inputs(processor: Any, model: Any, images: Sequence[Any], texts: Sequence[str]) -> dict[str, Any]:
    """The processor's outputs for one image per text (``B`` of each; texts from :func:`family_prompts`), padded as the
    processor pads (on the left for a decoder-only language model, :func:`catp.models.load_model`), on the model's
    device (:func:`on_model`): ``input_ids`` and ``attention_mask`` ``(B, L)``, ``pixel_values`` and the family's
    other inputs."""
    return on_model(processor(images=list(images), text=list(texts), return_tensors="pt", padding=True), model)


def on_model(inputs: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """``inputs`` on the model's device, pixel values in the model's dtype."""
    dtype = next(model.parameters()).dtype
    return {k: (v.to(model.device, dtype=dtype) if k == "pixel_values" else v.to(model.device)) for k, v in inputs.items()}


def _generate(model: Any, processor: Any, inputs: dict[str, Any], config: Config, protocol: Protocol,
              seeds: list[int], placeholders: list[int]) -> tuple[list[str], list[int]]:
    """Generate answers for one batch under one config (``placeholders``: each sample's unpruned connector tokens).

    Returns:
        The decoded new text per sample, and the query tokens each sample fed to the LLM.
    """
    settings = dict(num_beams=protocol.num_beams, max_new_tokens=protocol.max_new_tokens, min_new_tokens=protocol.min_new_tokens,
                    do_sample=False)
    if config.method is None:
        output = model.generate(**inputs, **settings)
        kept = placeholders
    else:
        with pruned_model(model, method=config.method, keep=config.keep, **seed_options(config.method, seeds)) as session:
            output = model.generate(**inputs, **settings)
        kept = session.keep_counts.tolist()
    if family_of(model).decoder_only(model):
        output = output[:, inputs["input_ids"].shape[1]:]
    return [text.strip() for text in processor.batch_decode(output, skip_special_tokens=True)], kept


def iter_records(out: Path, questions: Sequence[Question], configs: Sequence[Config]) -> Iterator[tuple[Config, list[dict[str, Any]]]]:
    """Per config, the records of the selected questions (in question order; missing ones left out)."""
    records = read_predictions(out)
    for config in configs:
        yield config, [records[(config.name, q.id)] for q in questions if (config.name, q.id) in records]


def manifest_for(model_name: str, dataset: str, split: str | None, fraction: float, seed: int, limit: int | None, dtype: str,
                 protocol: Protocol, num_questions: int, *, config: str | None = None,
                 columns: Mapping[str, str] | None = None, adapter: str | None = None) -> dict[str, Any]:
    """What a run measures; a resumed run must match it (methods and keeps may be added).

    ``config`` and ``columns`` (of an ``hf:`` dataset) and ``adapter`` appear only when given,
    so the manifests of other runs are unchanged.
    """
    manifest = {"model": model_name, "dataset": dataset, "split": split, "fraction": fraction, "seed": seed, "limit": limit,
                "dtype": dtype, "num_questions": num_questions, **asdict(protocol)}
    if config is not None:
        manifest["config"] = config
    if columns is not None:
        manifest["columns"] = dict(columns)
    if adapter is not None:
        manifest["adapter"] = adapter
    return manifest


def env_rank() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (accelerate / torchrun), else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
