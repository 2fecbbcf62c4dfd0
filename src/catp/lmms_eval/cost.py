"""The cost of an lmms-eval run beside its score: kept tokens, analytic FLOPs against unpruned, wall time.

Each request the model answers leaves a :class:`SampleCost` (the shape of its call); :func:`summarize`
turns a run's records into the figures reported with the results. FLOPs are
:func:`catp.bench.flops.stage_flops` of each sample alone (batch 1: padding and the fillers of
per-sample budgets are not counted), pruned and with every query token, same text, same new tokens.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from catp.bench.flops import Workload, stage_flops

__all__ = ["SampleCost", "as_dicts", "from_dicts", "summarize"]

@dataclass(frozen=True)
class SampleCost:
    """One request's call.

    Attributes:
        task: the lmms-eval task.
        kept: query tokens fed to the language model (all ``queries`` when unpruned).
        queries: the connector tokens of the request: its placeholders in the prompt (``frames x Q``; Aria: the ``Q``
            of the call's resolution, per crop), from the family's
            :meth:`~catp.families.base.Family.placeholder_mask`.
        prompt_tokens: text tokens into the language model (for a log-likelihood: context and continuation; the
            family's image delimiters count as text).
        new_tokens: tokens generated (1 for a log-likelihood: one forward pass).
        beams: beam width.
        instruction_tokens: the Q-Former's instruction tokens (InstructBLIP; 0 for every other model).
        frames: video frames (1 for an image: the vision tower and connector count one image at the family's
            :meth:`~catp.families.base.Family.image_side`).
    """

    task: str
    kept: int
    queries: int
    prompt_tokens: int
    new_tokens: int
    beams: int = 1
    instruction_tokens: int = 0
    frames: int = 1

    def workload(self, kept: int) -> Workload:
        return Workload(batch=1, keep=kept, prompt_tokens=max(1, self.prompt_tokens), new_tokens=max(1, self.new_tokens),
                        beams=self.beams, instruction_tokens=self.instruction_tokens, frames=self.frames)

def summarize(records: Sequence[SampleCost], config: Any, wall_time_s: float) -> dict[str, Any]:
    """The run's cost, overall and per task.

    Returns:
        ``{"samples", "mean_kept_tokens", "mean_query_tokens", "mean_llm_tokens", "new_tokens", "flops_ratio",
        "tflops", "wall_time_s", "tasks": {task: the same without wall_time_s}}`` (``new_tokens``: generated, 1
        per log-likelihood); ``flops_ratio`` is total FLOPs
        pruned over total FLOPs unpruned (``None``, with ``flops_note``, for a language model
        :mod:`catp.bench.flops` has no cost model for).
    """
    by_task: dict[str, list[SampleCost]] = defaultdict(list)
    for record in records:
        by_task[record.task].append(record)
    out = {**_figures(records, config), "wall_time_s": round(wall_time_s, 3)}
    out["tasks"] = {task: _figures(rows, config) for task, rows in sorted(by_task.items())}
    return out

def _figures(records: Sequence[SampleCost], config: Any) -> dict[str, Any]:
    n = len(records)
    out: dict[str, Any] = {
        "samples": n,
        "mean_kept_tokens": sum(r.kept for r in records) / n if n else None,
        "mean_query_tokens": sum(r.queries for r in records) / n if n else None,
        "mean_llm_tokens": sum(r.kept + r.prompt_tokens for r in records) / n if n else None,
        "new_tokens": sum(r.new_tokens for r in records),
    }
    try:
        pruned = sum(stage_flops(config, r.workload(r.kept)).total for r in records)
        full = sum(stage_flops(config, r.workload(r.queries)).total for r in records)
    except ValueError as error:  # no cost model for this language model
        return {**out, "flops_ratio": None, "tflops": None, "flops_note": str(error)}
    return {**out, "flops_ratio": pruned / full if full else None, "tflops": pruned / 1e12}

def as_dicts(records: Sequence[SampleCost]) -> list[dict[str, Any]]:
    """Records as plain dicts (to gather them across processes)."""
    return [asdict(r) for r in records]

def from_dicts(rows: Sequence[dict[str, Any]]) -> list[SampleCost]:
    return [SampleCost(**row) for row in rows]
