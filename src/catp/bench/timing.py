"""Stage timers and peak-memory probes around an unchanged ``generate``.

Stages are delimited by forward (pre-)hooks on the stock sub-modules of the model's family
(:meth:`~catp.families.base.Family.vision_tower`, :meth:`~catp.families.base.Family.language_model`),
never by forking model code:

=====================  ==============================================================
stage                  from -> to
=====================  ==============================================================
``vision``             vision tower pre-hook -> vision tower hook
``connector``          vision tower hook -> first LLM pre-hook (the connector: BLIP-2's
                       Q-Former and projection, Idefics2's resampler, ...; scoring and
                       selection, the embedding lookup, merging the image rows)
``prefill``            first LLM pre-hook (its encoder for T5) -> end of the first
                       language-model forward (prompt + first new token)
``decode``             end of the prefill -> ``generate`` returns (``n - 1`` steps,
                       beam-search bookkeeping included)
=====================  ==============================================================

Reports written before the family layer call the connector stage ``qformer``
(:func:`catp.bench.report.stage_seconds` reads both).

On CUDA every timestamp is taken after ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["StageTimer", "StageTimes", "PeakMemory"]

_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class StageTimes:
    """Seconds per stage of one call; ``decode_steps`` counts LLM forwards after the prefill."""

    vision: float = 0.0
    connector: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    end_to_end: float = 0.0
    decode_steps: int = 0

    @property
    def decode_per_token(self) -> float:
        return self.decode / self.decode_steps if self.decode_steps else 0.0

    @property
    def outside(self) -> float:
        """Time in ``generate`` outside the four stages: input checks, our placeholder
        shortening and prompt restoring, generation set-up before the vision tower."""
        return self.end_to_end - self.vision - self.connector - self.prefill - self.decode

    def as_dict(self) -> dict[str, float]:
        return {"vision": self.vision, "connector": self.connector, "prefill": self.prefill, "decode": self.decode,
                "decode_per_token": self.decode_per_token, "outside": self.outside, "end_to_end": self.end_to_end}


@dataclass
class StageTimer:
    """Hooks a model's vision tower and language model and times the stages of each :meth:`call`.

    Use as a context manager (hooks are removed on exit)::

        family = family_of(model)
        with StageTimer(family.language_model(model), family.vision_tower(model), sync=device.type == "cuda") as timer:
            times = timer.call(lambda: model.generate(**inputs))

    Without ``vision`` (a bare language model's ``generate``), only ``prefill`` and ``decode``
    are timed.
    """

    language_model: Any
    vision: Any = None
    sync: bool = False
    _marks: dict[str, float] = field(default_factory=dict)
    _lm_calls: int = 0
    _handles: list[Any] = field(default_factory=list)

    def _now(self) -> float:
        if self.sync:

            torch.cuda.synchronize()
        return time.perf_counter()

    def _mark(self, name: str, first_only: bool = True):
        def hook(*_: Any) -> None:
            if not (first_only and name in self._marks):
                self._marks[name] = self._now()

        return hook

    def _lm_done(self, *_: Any) -> None:
        self._lm_calls += 1
        if self._lm_calls == 1:
            self._marks["prefill_end"] = self._now()

    def __enter__(self) -> StageTimer:
        llm = self.language_model
        if self.vision is not None:
            self._handles.append(self.vision.register_forward_pre_hook(self._mark("vision_start")))
            self._handles.append(self.vision.register_forward_hook(self._mark("vision_end")))
        encoder = llm.get_encoder() if getattr(llm.config, "is_encoder_decoder", False) else None
        if encoder is not None:
            self._handles.append(encoder.register_forward_pre_hook(self._mark("llm_start")))
        self._handles.append(llm.register_forward_pre_hook(self._mark("llm_start")))
        self._handles.append(llm.register_forward_hook(self._lm_done))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def call(self, fn: Any) -> tuple[StageTimes, Any]:
        """Run ``fn()`` once and split its wall time into stages."""
        self._marks, self._lm_calls = {}, 0
        start = self._now()
        result = fn()
        end = self._now()
        m = self._marks
        if "prefill_end" not in m:
            raise RuntimeError("the language model never ran: nothing to time")
        times = StageTimes(end_to_end=end - start, prefill=m["prefill_end"] - m["llm_start"],
                           decode=end - m["prefill_end"], decode_steps=self._lm_calls - 1)
        if self.vision is not None:
            if "vision_end" not in m:
                raise RuntimeError("the vision tower never ran: nothing to time")
            times.vision = m["vision_end"] - m["vision_start"]
            times.connector = m["llm_start"] - m["vision_end"]
        return times, result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def _hwm_bytes() -> int | None:
    with open("/proc/self/status") as f:
        match = re.search(r"VmHWM:\s+(\d+) kB", f.read())
    return int(match.group(1)) * 1024 if match else None


def _reset_hwm() -> bool:
    """Reset the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class PeakMemory:
    """Peak memory growth during a block, in bytes.

    GPU: ``torch.cuda.max_memory_allocated`` after a reset, minus what was allocated
    before. CPU: the kernel's peak RSS (``VmHWM``, reset through ``clear_refs``) minus
    the RSS before; where that reset is not allowed, a 1 ms RSS sampler thread.
    """

    device: str = "cpu"
    peak: int = 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        if self.device.startswith("cuda"):

            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            yield self
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated() - before)
            return
        before = _rss_bytes()
        if _reset_hwm():
            yield self
            hwm = _hwm_bytes()
            self.peak = max(self.peak, (hwm or before) - before)
            return
        stop, high = threading.Event(), [before]

        def sample() -> None:
            while not stop.wait(0.001):
                high[0] = max(high[0], _rss_bytes())

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            self.peak = max(self.peak, max(high[0], _rss_bytes()) - before)
