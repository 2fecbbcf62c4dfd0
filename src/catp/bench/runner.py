"""Run the benchmark grid (method x keep x batch), summarise, check the targets.

A *case* is one configuration. Besides the pruning methods of :data:`catp.METHODS`
two references are timed the same way:

* ``none``: the plain, unpruned ``model.generate`` (no hooks of ours but the timers);
* ``llm-only``: the bare language model's ``generate`` on random embeddings of
  ``k + T`` tokens, i.e. the same LLM fed a prompt ``k`` query tokens long without
  any pruning machinery (target (c)).

Warm-up runs come first; the timed repeats are interleaved (repeat 1 of every case,
then repeat 2, ...) so that a background load drifting over time hits every case alike
and ratios between cases stay fair.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from catp.bench.flops import Workload, kv_cache_bytes, stage_flops
from catp.bench.timing import PeakMemory, StageTimer, StageTimes
from catp.budget import Budget
from catp.families import Family, family_of, family_of_type
from catp.hf import pruned
from catp.methods import SELECTORS, budget_refusal, check_runnable, get_method

__all__ = ["BenchCase", "BenchSettings", "Benchmark", "evaluate_checks", "cases_for", "flops_grid", "query_tokens", "workload_for",
           "REFERENCES", "CHECK_STATISTICS", "machine_info"]

REFERENCES = ("none", "llm-only")
_STAGES = ("vision", "connector", "prefill", "decode", "decode_per_token", "outside", "end_to_end")


@dataclass(frozen=True)
class BenchCase:
    """One configuration: ``method`` (a :data:`catp.METHODS` name or a reference), ``keep``
    (a count, or a per-sample :class:`~catp.budget.Budget`), ``batch``."""

    method: str
    keep: int | Budget
    batch: int

    @property
    def keep_label(self) -> int | str:
        """``keep`` as the results hold it: a count, or the budget's text (``mass:0.8``)."""
        return self.keep if isinstance(self.keep, int) else str(self.keep)


@dataclass(frozen=True)
class BenchSettings:
    """The workload shared by every case (the paper's VQA call by default:
    ``"Question: {q} Short answer:"`` is about 16 OPT tokens with BOS, beam search
    with 5 beams, 10 new tokens forced so random weights give a fixed workload)."""

    prompt_tokens: int = 16
    new_tokens: int = 10
    beams: int = 5
    instruction_tokens: int = 12
    warmup: int = 1
    repeats: int = 5
    seed: int = 0
    frames: int = 4  # video models only: the stock processor's frame count

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "beams", "repeats", "frames"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.warmup < 0 or self.instruction_tokens < 0:
            raise ValueError("warmup and instruction_tokens must be >= 0")


def cases_for(methods: Sequence[str], keeps: Sequence[int | Budget], batches: Sequence[int], num_query_tokens: int,
              check: bool = False) -> list[BenchCase]:
    """The grid. Always the unpruned reference (``none`` at keep ``Q``) per batch.

    With ``check``: also ``catp`` at keep ``Q`` (target b), ``first`` and ``llm-only``
    at every count (targets a, c), and every selector (:data:`catp.methods.SELECTORS`) at
    every count, so that target (a) covers the cost of a greedy selection as well as of scoring.
    A budget runs only with methods that can carry one.
    """
    check_runnable(methods, keeps)  # an unknown method, or only budgets no method carries, fails here
    cases: list[BenchCase] = []
    for batch in batches:
        wanted = [BenchCase("none", num_query_tokens, batch)]
        if check:
            wanted.append(BenchCase("catp", num_query_tokens, batch))
        for keep in keeps:
            if isinstance(keep, Budget):
                wanted += [BenchCase(method, keep, batch) for method in methods if budget_refusal(get_method(method)) is None]
                continue
            extra = ["first", *methods, *SELECTORS, "llm-only"] if check else list(methods)
            wanted += [BenchCase(method, keep, batch) for method in extra]
        cases += [case for i, case in enumerate(wanted) if case not in wanted[:i] and case not in cases]
    return cases


def _summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread (min, max, (max - min) / median) of repeated measurements."""
    median = statistics.median(values)
    return {"median": median, "min": min(values), "max": max(values),
            "spread": (max(values) - min(values)) / median if median else 0.0}


def machine_info(device: str) -> dict[str, Any]:
    """What the figures were measured on."""
    import transformers

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "python": platform.python_version()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _is_video(config: Any) -> bool:
    return config.model_type == "instructblipvideo"


def _is_instruct(config: Any) -> bool:
    return config.model_type in ("instructblip", "instructblipvideo")


def frames_per_sample(config: Any, settings: BenchSettings) -> int:
    """Frames per sample: ``settings.frames`` for a video model, 1 for images."""
    return settings.frames if _is_video(config) else 1


def query_tokens(config: Any, settings: BenchSettings) -> int:
    """Query tokens per sample of a model of ``config``, all frames: what the grid's counts count (``f Q``)."""
    return frames_per_sample(config, settings) * family_of_type(config.model_type).num_queries(config)


def workload_for(config: Any, settings: BenchSettings, batch: int, keep: int) -> Workload:
    """The :class:`~catp.bench.flops.Workload` of ``batch`` samples feeding the LLM ``keep`` query tokens each."""
    s = settings
    return Workload(batch=batch, keep=keep, prompt_tokens=s.prompt_tokens, new_tokens=s.new_tokens, beams=s.beams,
                    instruction_tokens=s.instruction_tokens if _is_instruct(config) else 0,
                    frames=frames_per_sample(config, settings))


def flops_grid(config: Any, settings: BenchSettings, keeps: Sequence[int], batches: Sequence[int],
               dtype_bytes: int) -> list[dict[str, Any]]:
    """Analytic FLOPs per stage and KV-cache bytes of every ``keep`` x ``batch`` (no model is built:
    ``catp bench --flops-only``), all query tokens first at each batch, with each row's prefill and total
    against that row.

    Returns:
        one ``{"batch", "keep", "flops", "kv_cache_bytes", "prefill_ratio", "total_ratio"}`` per case.
    """
    q = query_tokens(config, settings)
    rows = []
    for batch in batches:
        full = stage_flops(config, workload_for(config, settings, batch, q))
        for keep in dict.fromkeys([q, *keeps]):
            work = workload_for(config, settings, batch, keep)
            flops = stage_flops(config, work)
            rows.append({"batch": batch, "keep": keep, "flops": flops.as_dict(),
                         "kv_cache_bytes": kv_cache_bytes(config, work, dtype_bytes),
                         "prefill_ratio": flops.prefill / full.prefill, "total_ratio": flops.total / full.total})
    return rows


@dataclass
class Benchmark:
    """Times :class:`BenchCase` s on one model.

    Args:
        model: a model of any family (:mod:`catp.families`), in eval mode, on ``device``.
        dtype_bytes: bytes per element of the LLM's dtype (for the KV-cache size).
    """

    model: Any
    device: str
    dtype_bytes: int
    settings: BenchSettings = field(default_factory=BenchSettings)
    progress: Callable[[str], None] | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def family(self) -> Family:
        return family_of(self.model)

    _kept: dict[BenchCase, list[int]] = field(default_factory=dict, repr=False)

    @property
    def is_video(self) -> bool:
        return _is_video(self.config)

    @property
    def frames(self) -> int:
        """Frames per sample: ``settings.frames`` for a video model, 1 for images."""
        return frames_per_sample(self.config, self.settings)

    @property
    def num_query_tokens(self) -> int:
        """Query tokens per sample, all frames: what the grid's counts count (``f Q``)."""
        return query_tokens(self.config, self.settings)

    @property
    def is_instruct(self) -> bool:
        return _is_instruct(self.config)

    def kept(self, case: BenchCase) -> list[int]:
        """Query tokens each sample fed the LLM: the count, or what the budget kept in the timed calls."""
        if isinstance(case.keep, int):
            return [case.keep] * case.batch
        return self._kept[case]

    def workload(self, case: BenchCase) -> Workload:
        # The LLM runs every sample at the batch's largest count (fillers pad the others).
        return workload_for(self.config, self.settings, case.batch, max(self.kept(case)))

    def inputs(self, batch: int) -> dict[str, Any]:
        """Synthetic processor-shaped inputs (:meth:`~catp.families.base.Family.synthetic_inputs`: the family's
        placeholders, ``T`` prompt tokens, random pixels), on the device, pixels in the vision tower's dtype."""
        s = self.settings
        g = torch.Generator().manual_seed(s.seed)
        inputs = self.family.synthetic_inputs(self.model, batch, s.prompt_tokens, g, groups=self.frames,
                                              instruction_tokens=s.instruction_tokens)
        dtype = next(self.family.vision_tower(self.model).parameters()).dtype
        return {name: value.to(self.device, dtype) if value.is_floating_point() else value.to(self.device)
                for name, value in inputs.items()}

    def generate_kwargs(self) -> dict[str, Any]:
        s = self.settings
        return {"num_beams": s.beams, "max_new_tokens": s.new_tokens, "min_new_tokens": s.new_tokens, "do_sample": False}

    def _runner(self, case: BenchCase) -> tuple[Callable[[], StageTimes], Callable[[], None]]:
        """A function timing one call of ``case``, and the clean-up to run after its repeats."""

        sync = self.device.startswith("cuda")
        gen = self.generate_kwargs()
        stack: list[Any] = []
        llm = self.family.language_model(self.model)
        if case.method == "llm-only":
            generator = self.family.text_generator(self.model)
            g = torch.Generator().manual_seed(self.settings.seed)
            length = case.keep + self.settings.prompt_tokens
            table = llm.get_input_embeddings().weight  # (V, D): the LLM's input width and dtype
            embeds = (torch.randn(case.batch, length, table.shape[1], generator=g) * 0.02).to(self.device, table.dtype)
            mask = torch.ones(case.batch, length, dtype=torch.long, device=self.device)
            timer = StageTimer(llm, sync=sync).__enter__()
            stack.append(timer)

            def call() -> StageTimes:
                with torch.inference_mode():
                    return timer.call(lambda: generator.generate(inputs_embeds=embeds, attention_mask=mask, **gen))[0]
        else:
            inputs = self.inputs(case.batch)
            session = None
            if case.method != "none":
                context = pruned(self.model, method=case.method, keep=case.keep)
                session = context.__enter__()
                stack.append(context)
            timer = StageTimer(llm, self.family.vision_tower(self.model), sync=sync).__enter__()
            stack.append(timer)

            def call() -> StageTimes:
                with torch.inference_mode():
                    times = timer.call(lambda: self.model.generate(**inputs, **gen))[0]
                if session is not None and isinstance(case.keep, Budget):
                    self._kept[case] = session.keep_counts.tolist()
                return times

        def close() -> None:
            for item in reversed(stack):
                item.__exit__(None, None, None)

        return call, close

    def _once(self, case: BenchCase, memory: PeakMemory) -> StageTimes:
        call, close = self._runner(case)
        try:
            with memory.measure():
                return call()
        finally:
            close()

    def run(self, cases: Sequence[BenchCase]) -> list[dict[str, Any]]:
        """Warm up every case, then time ``repeats`` interleaved rounds; one summary per case."""
        times: dict[BenchCase, list[StageTimes]] = {case: [] for case in cases}
        memory = {case: PeakMemory(self.device) for case in cases}
        for case in cases:
            for _ in range(self.settings.warmup):
                self._once(case, PeakMemory(self.device))
        for r in range(self.settings.repeats):
            for i, case in enumerate(cases):
                if self.progress:
                    self.progress(f"repeat {r + 1}/{self.settings.repeats}, case {i + 1}/{len(cases)}: {case.method} keep {case.keep_label} batch {case.batch}")
                times[case].append(self._once(case, memory[case]))
        return [self._summarise(case, times[case], memory[case].peak) for case in cases]

    def _summarise(self, case: BenchCase, runs: list[StageTimes], peak: int) -> dict[str, Any]:
        work = self.workload(case)
        flops = stage_flops(self.config, work).as_dict()
        if case.method == "llm-only":
            flops.update(vision=0, connector=0, total=flops["prefill"] + flops["decode"])
        stages = {stage: _summary([run.as_dict()[stage] for run in runs]) for stage in _STAGES}
        kept = self.kept(case)
        return {
            **asdict(case),
            "keep": case.keep_label,
            # Real tokens: each sample's kept query tokens and its text (fillers are not fed, only computed).
            "tokens_into_llm": sum(kept) + case.batch * work.prompt_tokens,
            "kept": {"mean": sum(kept) / len(kept), "min": min(kept), "max": max(kept), "per_sample": kept},
            "frames": work.frames,
            "decode_steps": runs[0].decode_steps,
            "seconds": stages,
            "throughput_samples_per_s": case.batch / stages["end_to_end"]["median"],
            "flops": flops,
            "kv_cache_bytes": kv_cache_bytes(self.config, work, self.dtype_bytes),
            "peak_memory_bytes": peak,
            "repeats": len(runs),
        }


def _find(results: Sequence[dict[str, Any]], method: str, keep: int, batch: int) -> dict[str, Any] | None:
    return next((r for r in results if (r["method"], r["keep"], r["batch"]) == (method, keep, batch)), None)


CHECK_STATISTICS = ("min", "median")


def evaluate_checks(results: Sequence[dict[str, Any]], num_query_tokens: int, paper_shape: bool,
                    statistic: str = "min") -> list[dict[str, Any]]:
    """The cost targets, each ``{"target", "case", "value", "limit", "passed", "detail", "statistic"}``.

    ``statistic`` picks which summary of the repeats the ratios use. ``min`` (default) is
    the estimate least touched by a background load (contention only ever adds time; on a
    shared 2-core machine medians swing by 2x); ``median`` suits a quiet machine.
    Writing ``t(case, stage)`` for that statistic:

    (a) scoring overhead: ``(t(m, k, connector) - t(first, k, connector)) / t(first, k, end_to_end) <= 2%``
        for every method ``m``, scorers and selectors; the connector stage is where scoring, selection
        and the eager connector cost.
    (b) pruned(keep=all) vs plain generate: at keep ``Q`` the vision tower and the LLM run the
        same stock computation on the same shapes, so the cost of ours is
        ``[t(connector) + t(outside)](catp, Q) - [t(connector) + t(outside)](none)``, over
        ``t(none, end_to_end)``, ``<= 2%``. The direct ratio ``t(catp, Q, end_to_end) /
        t(none, end_to_end) - 1`` is reported next to it; under background load its noise
        (tens of %) hides a 2% effect.
    (c) ``|t(catp, k, prefill) / t(llm-only, k, prefill) - 1| <= 5%``.
    (d) paper shape only: ``t(none, prefill) / t(catp, 8, prefill) >= 0.8 x FLOPs(prefill, Q) / FLOPs(prefill, 8)``.
    """
    if statistic not in CHECK_STATISTICS:
        raise ValueError(f"statistic must be one of {CHECK_STATISTICS}, got {statistic!r}")
    checks: list[dict[str, Any]] = []

    def _t(result: dict[str, Any], stage: str) -> float:  # the chosen statistic
        return float(result["seconds"][stage][statistic])

    def add(target: str, case: str, value: float | None, limit: str, passed: bool | None, detail: str) -> None:
        checks.append({"target": target, "case": case, "value": value, "limit": limit, "passed": passed,
                       "detail": f"{detail} ({statistic} of repeats)", "statistic": statistic})

    for r in results:
        method, keep, batch = r["method"], r["keep"], r["batch"]
        where = f"{method} keep {keep} batch {batch}"
        if method in REFERENCES or method == "first" or not isinstance(keep, int):
            continue  # budgets have no reference at the same count
        first = _find(results, "first", keep, batch)
        if first is not None and keep < num_query_tokens:
            overhead = (_t(r, "connector") - _t(first, "connector")) / _t(first, "end_to_end")
            add("a", where, overhead, "<= 2%", overhead <= 0.02,
                f"connector+{'selection' if method in SELECTORS else 'scoring'} {_t(r, 'connector') * 1e3:.1f} ms vs first {_t(first, 'connector') * 1e3:.1f} ms, "
                f"end-to-end (first) {_t(first, 'end_to_end') * 1e3:.1f} ms")
        if method == "catp" and keep == num_query_tokens and (none := _find(results, "none", keep, batch)):
            ours = _t(r, "connector") + _t(r, "outside") - _t(none, "connector") - _t(none, "outside")
            slower = ours / _t(none, "end_to_end")
            direct = _t(r, "end_to_end") / _t(none, "end_to_end") - 1
            add("b", where, slower, "<= 2%", slower <= 0.02,
                f"connector+scoring+outside stages {(_t(r, 'connector') + _t(r, 'outside')) * 1e3:.1f} ms vs "
                f"{(_t(none, 'connector') + _t(none, 'outside')) * 1e3:.1f} ms; direct end-to-end {_t(r, 'end_to_end') * 1e3:.1f} ms "
                f"vs generate() {_t(none, 'end_to_end') * 1e3:.1f} ms ({direct:+.1%})")
        if method == "catp" and (bare := _find(results, "llm-only", keep, batch)):
            diff = _t(r, "prefill") / _t(bare, "prefill") - 1
            add("c", where, diff, "within 5%", abs(diff) <= 0.05,
                f"prefill {_t(r, 'prefill') * 1e3:.1f} ms vs bare LLM on {keep}+T tokens {_t(bare, 'prefill') * 1e3:.1f} ms")
        if method == "catp" and keep == 8 < num_query_tokens and (none := _find(results, "none", num_query_tokens, batch)):
            measured = _t(none, "prefill") / _t(r, "prefill")
            analytic = none["flops"]["prefill"] / r["flops"]["prefill"]
            passed = measured >= 0.8 * analytic if paper_shape else None
            add("d", where, measured / analytic, ">= 0.8 x FLOPs ratio", passed,
                f"prefill speed-up {measured:.2f}x vs FLOPs ratio {analytic:.2f}x"
                + ("" if paper_shape else " (target applies at paper shape: --arch blip2-opt-2.7b --dtype bfloat16)"))
    return checks
