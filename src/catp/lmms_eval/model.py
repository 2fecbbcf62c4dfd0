"""The ``catp`` model of lmms-eval: a model of any family catp prunes (:mod:`catp.families`), pruned with :func:`catp.pruned`.

lmms-eval builds it as ``CatpLMM(**model_args, batch_size=..., device=...)`` and hands it its
requests in its "simple" layout. It answers ``generate_until`` in batches (left padding, the
task's generation settings, the new tokens decoded) and ``loglikelihood`` from a forward pass
with labels on the continuation; both inside :func:`catp.pruned`. Under ``accelerate launch``
each process takes its own share of the requests (lmms-eval shards them), on its own device.

The cost of the run (mean kept query tokens, FLOPs against unpruned, wall time; see
:mod:`catp.lmms_eval.cost`) goes into the results JSON's ``throughput`` (lmms-eval's own
section for a model's figures, as ``avg_catp_*`` keys) and, with ``cost_file=PATH``, whole and
per task into that JSON file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from loguru import logger
from tqdm import tqdm

from catp.lmms_eval.cost import SampleCost, as_dicts, from_dicts, summarize
from catp.lmms_eval.runner import Request, Runner, generation_settings
from catp.lmms_eval.settings import Settings, check, parse_model_args
from catp.models import load_model

__all__ = ["CatpLMM"]


class CatpLMM(lmms):
    """lmms-eval's ``catp`` model. Keyword arguments: :func:`catp.lmms_eval.settings.parse_model_args`.

    Raises:
        ModelArgsError: a bad ``--model_args`` value (named), before any request runs.
    """

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        settings = parse_model_args(**model_args)
        self.accelerator = Accelerator(cpu=settings.device == "cpu")
        if self.accelerator.num_processes > 1 or settings.device is None:
            device = str(self.accelerator.device)  # one process per device, as lmms-eval's Hugging Face models
        else:
            device = settings.device
        loaded = f"pretrained={settings.pretrained}" + ("" if settings.adapter is None else f",adapter={settings.adapter}")
        model, processor = check(loaded, load_model, settings.pretrained, settings.dtype, device, settings.adapter)
        self._device = torch.device(device)
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        self.settings: Settings = settings
        self.runner = Runner(model, processor, settings)
        if settings.method is not None:
            shown = ",".join([f"method={settings.method}", f"keep={model_args.get('keep', settings.keep)}",
                              *(f"{k}={v}" for k, v in settings.options.items())]
                             + ([f"scope={settings.scope}"] if settings.scope else []))
            check(shown, self.runner.check)
        self.costs: list[SampleCost] = []
        self.seconds = 0.0
        self._warned: set[str] = set()

    @property
    def model(self) -> Any:
        return self.runner.model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.settings.batch_size

    def _visuals(self, doc_to_visual: Callable[[Any], Any], doc_id: int, task: str, split: str) -> list[Any]:
        """The visuals of a request's document: PIL images; for a video model, a video file's frames (read
        with lmms-eval's reader) or the frames the task gives."""
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        visuals = list(visuals) if isinstance(visuals, (list, tuple)) else [visuals]
        if self.runner.video and len(visuals) == 1 and isinstance(visuals[0], str):
            from lmms_eval.models.model_utils.load_video import read_video

            return list(read_video(visuals[0], num_frm=self.settings.frames))
        if self.runner.video and len(visuals) == 1 and hasattr(visuals[0], "shape") and len(visuals[0].shape) == 4:
            return list(visuals[0])  # a (T, H, W, 3) array
        return visuals

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Answers in batches of ``batch_size``; requests with the same generation settings batch together."""
        from lmms_eval import utils

        started = time.perf_counter()
        order = utils.Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]), grouping=True)
        answers: list[str] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="catp generate_until")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            settings, until, unused = generation_settings(chunk[0][1])
            self._warn_unused(unused)
            batch = [Request(context=a[0], visuals=self._visuals(a[2], a[3], a[4], a[5]), task=a[4], doc_id=a[3]) for a in chunk]
            texts, costs = self.runner.generate(batch, settings, until)
            answers.extend(texts)
            self.costs.extend(costs)
            bar.update(len(chunk))
        bar.close()
        self.seconds += time.perf_counter() - started
        return order.get_original(answers)

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """``(log p(continuation | context), is greedy)`` per request, in batches of ``batch_size``.

        Each pair is wrapped in a ``GenerationResult``: lmms-eval 0.7.3 turns any other model output
        that is not text into its ``str()`` (``unwrap_generation_output``), which its multiple-choice
        scoring then cannot read; a ``GenerationResult``'s ``text`` passes through as it is.
        """
        from lmms_eval.api.instance import GenerationResult
        from lmms_eval import utils

        started = time.perf_counter()
        if any(len(r.args) < 6 for r in requests):
            raise NotImplementedError("the catp model scores continuations of an image's context; unconditional requests "
                                      "(acc_mutual_info) have no image: use the metric acc")
        order = utils.Collator([r.args for r in requests], lambda args: (-len(args[0]), args[0]))
        results: list[tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="catp loglikelihood")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            batch = [Request(context=a[0], visuals=self._visuals(a[2], a[3], a[4], a[5]), task=a[4], doc_id=a[3]) for a in chunk]
            continuations = [a[1] if isinstance(a[1], str) else a[1](self.task_dict[a[4]][a[5]][a[3]]) for a in chunk]
            scores, costs = self.runner.loglikelihood(batch, continuations)
            results.extend(scores)
            self.costs.extend(costs)
            bar.update(len(chunk))
        bar.close()
        self.seconds += time.perf_counter() - started
        return [GenerationResult(text=pair) for pair in order.get_original(results)]  # type: ignore[arg-type]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the catp model answers single-round tasks (generate_until, loglikelihood); "
                                  "multi-round generation is not implemented")

    def _warn_unused(self, keys: Sequence[str]) -> None:
        new = [k for k in keys if k not in self._warned]
        if new:
            logger.warning(f"catp: generation_kwargs {', '.join(new)} are not generate() settings the catp model passes on; ignored")
            self._warned.update(new)

    def cost(self) -> dict[str, Any]:
        """The run's cost over every process (:func:`catp.lmms_eval.cost.summarize`); every process must call it."""
        rows, seconds = as_dicts(self.costs), [self.seconds]
        if self.world_size > 1:
            from accelerate.utils import gather_object

            rows, seconds = gather_object(rows), gather_object(seconds)
        summary = summarize(from_dicts(rows), self.runner.model.config, wall_time_s=max(seconds))
        s = self.settings
        summary["settings"] = {"pretrained": s.pretrained, "method": s.method or "none", "keep": str(s.keep) if s.keep is not None else None,
                               "options": s.options, "adapter": None if s.adapter is None else str(s.adapter), "scope": s.scope,
                               "batch_size": s.batch_size, "prompt": self.runner.prompt, "processes": self.world_size}
        return summary

    def clean(self) -> None:
        """lmms-eval calls this on every process once all requests ran: the cost goes to the results and
        to ``cost_file``, then the model is released."""
        if getattr(self, "runner", None) is not None:
            summary = self.cost()
            if self.rank == 0:
                _log_cost(summary)
                if self.settings.cost_file is not None:
                    self.settings.cost_file.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
                    logger.info(f"catp: cost written to {self.settings.cost_file}")
            self.runner = None  # type: ignore[assignment]
        super().clean()


def _log_cost(summary: dict[str, Any]) -> None:
    """The cost into lmms-eval's ``throughput`` section of the results (``avg_catp_*``: one entry, so the average is the value)."""
    from lmms_eval.models.model_utils.gen_metrics import log_metrics

    figures = {f"catp_{k}": v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    seconds, tokens = summary["wall_time_s"], summary["new_tokens"]
    log_metrics(total_elapsed_time=seconds, total_gen_tokens=tokens, avg_speed=tokens / seconds if seconds else 0.0,
                additional_metrics=figures)
