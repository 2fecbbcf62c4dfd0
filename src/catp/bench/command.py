"""``catp bench``: the command. torch/transformers are imported inside, so ``catp --help`` stays fast."""

from __future__ import annotations

import datetime
import json
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["bench", "load_model", "parse_keeps", "parse_ints"]


def parse_ints(text: str, what: str) -> list[int]:
    """``"1,4,8"`` -> ``[1, 4, 8]``; a clear error for anything else."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"{what} must be positive integers, got {text!r}")
    return values


def parse_keeps(text: str, num_query_tokens: int) -> list[Any]:
    """``"16,8,4"`` (counts) or ``"0.5,0.25"`` (fractions of ``Q``) -> token counts, as :func:`catp.resolve_keep`;
    ``mass:0.8`` / ``fence:1.5`` (optionally ``:min=N:max=N``) -> a per-sample :class:`~catp.budget.Budget`.
    Counts come largest first, then budgets in the given order."""
    from catp.budget import Budget
    from catp.pruning import resolve_keep

    keeps: list[int] = []
    budgets: list[Budget] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if ":" in part:
            try:
                budget = Budget.parse(part)
                budget.check_tokens(num_query_tokens)
            except (TypeError, ValueError) as error:
                raise typer.BadParameter(str(error)) from None
            budgets.append(budget)
            continue
        try:
            value: int | float = int(part)
        except ValueError:
            try:
                value = float(part)
            except ValueError:
                raise typer.BadParameter(f"--keep takes counts, fractions or budgets (mass:0.8, fence:1.5), got {part!r}") from None
        try:
            keeps.append(resolve_keep(value, num_query_tokens))
        except (TypeError, ValueError) as error:
            raise typer.BadParameter(str(error)) from None
    return [*sorted(set(keeps), reverse=True), *dict.fromkeys(budgets)]


def load_model(model: str | None, arch: str | None, device: str, dtype: str) -> tuple[Any, str]:
    """The model to benchmark and its name: ``--arch`` (random weights), ``--model`` (hub id or
    directory) or, with neither, the embedded reference model. Refuses, before allocating, a
    model whose weights cannot fit (:func:`catp.bench.archs.check_fits`)."""
    import torch
    from transformers import AutoConfig

    from catp.bench.archs import DTYPES, build_arch, check_fits, model_class

    if model and arch:
        raise typer.BadParameter("give --model or --arch, not both")
    torch_dtype = getattr(torch, DTYPES[dtype])
    if arch:
        return build_arch(arch, dtype=dtype, device=device), f"arch {arch} (random weights)"
    if model is None:
        from catp.reference import reference_model_path

        try:
            model = str(reference_model_path())
        except FileNotFoundError as error:
            raise typer.BadParameter(f"{error}; or pass --model / --arch") from None
    config = AutoConfig.from_pretrained(model)
    check_fits(config, dtype, device)
    loaded = model_class(config.model_type).from_pretrained(model, dtype=torch_dtype)
    return loaded.to(device).eval(), model


def bench(
    model: Annotated[str | None, typer.Option(help="Hub id or local directory (default: the embedded reference model).")] = None,
    arch: Annotated[str | None, typer.Option(help="Paper-shaped random-weight model: blip2-opt-2.7b, blip2-opt-6.7b, blip2-flan-t5-xl, instructblip-vicuna-7b, instructblip-video-vicuna-7b.")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, ...")] = "cpu",
    dtype: Annotated[str | None, typer.Option(help="fp32, bf16 or fp16 (default: bf16 for --arch, fp32 otherwise).")] = None,
    methods: Annotated[str, typer.Option(help="Comma-separated pruning methods (see `catp methods`).")] = "catp,first",
    keep: Annotated[str, typer.Option(help="Kept query tokens: counts (16,8,4), fractions of Q (0.5,0.25,0.125), or per-sample budgets (mass:0.8, fence:1.5). Video: of all frames' tokens.")] = "0.5,0.25,0.125",
    batch: Annotated[str, typer.Option(help="Comma-separated batch sizes.")] = "1",
    prompt_tokens: Annotated[int, typer.Option(help="Text tokens per sample after the image placeholders (BOS included).")] = 16,
    new_tokens: Annotated[int, typer.Option(help="New tokens per call (forced: min = max).")] = 10,
    beams: Annotated[int, typer.Option(help="Beam width.")] = 5,
    instruction_tokens: Annotated[int, typer.Option(help="InstructBLIP Q-Former instruction tokens.")] = 12,
    frames: Annotated[int, typer.Option(help="Frames per sample for a video model (InstructBLIP-Video; the stock processor's 4).")] = 4,
    warmup: Annotated[int, typer.Option(help="Warm-up calls per case.")] = 1,
    repeats: Annotated[int, typer.Option(help="Timed calls per case (median and spread).")] = 5,
    check: Annotated[bool, typer.Option("--check", help="Also time the references and print targets (a)-(d) pass/fail.")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's). On a shared machine 1 thread scales more predictably: a 2-thread matmul waits for its slower thread.")] = None,
    check_stat: Annotated[str, typer.Option(help="Statistic of the repeats the --check ratios use: min (robust to background load) or median.")] = "min",
    out: Annotated[Path, typer.Option(help="JSON output.")] = Path("bench.json"),
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Plot output (default: --out with .png).")] = None,
) -> None:
    """Measure latency, throughput, memory and FLOPs per stage over method x keep x batch."""
    import torch
    from rich.console import Console

    from catp.bench.archs import bytes_per_element
    from catp.bench.report import checks_table, plot, results_table
    from catp.bench.runner import CHECK_STATISTICS, Benchmark, BenchSettings, cases_for, evaluate_checks, machine_info
    from catp.cli import INPUT_ERRORS, user_input
    from catp.methods import get_method

    console = Console(width=None if sys.stdout.isatty() else 200)  # logs keep the table readable
    dtype = dtype or ("bf16" if arch else "fp32")
    with user_input(param="--dtype"):
        bytes_per_element(dtype)  # validates the name
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise typer.BadParameter(f"--device {device}: CUDA is not available here")
    if threads is not None:
        if threads < 1:
            raise typer.BadParameter("--threads must be >= 1")
        torch.set_num_threads(threads)
    with user_input():
        settings = BenchSettings(prompt_tokens=prompt_tokens, new_tokens=new_tokens, beams=beams,
                                 instruction_tokens=instruction_tokens, warmup=warmup, repeats=repeats, frames=frames)
    if check_stat not in CHECK_STATISTICS:
        raise typer.BadParameter(f"--check-stat must be one of {', '.join(CHECK_STATISTICS)}")
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    with user_input(param="--methods"):  # before a large model is built
        for method in method_list:
            get_method(method)
    batches = parse_ints(batch, "--batch")
    try:
        with user_input(*INPUT_ERRORS, OSError, param="--arch" if arch else "--model"):
            net, name = load_model(model, arch, device, dtype)
    except MemoryError as error:
        console.print(f"[red]catp bench: {error}[/]")
        raise typer.Exit(2) from None
    runner = Benchmark(net, device, bytes_per_element(dtype), settings, progress=lambda msg: console.log(msg))
    q = runner.num_query_tokens  # all frames' query tokens for video
    keeps = parse_keeps(keep, q)
    if check and 8 not in keeps and q >= 8 and arch == "blip2-opt-2.7b":
        keeps.append(8)  # target (d) is defined at keep 8
    with user_input():
        cases = cases_for(method_list, keeps, batches, q, check=check)
    shape = f", {runner.frames} frames x {q // runner.frames} query tokens" if runner.is_video else ""
    console.print(f"[bold]catp bench[/]: {name}{shape}, {dtype} on {device}, {len(cases)} cases x ({warmup} warm-up + {repeats} timed)")
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
        paper = arch == "blip2-opt-2.7b" and dtype == "bf16"
        report["checks"] = evaluate_checks(results, q, paper_shape=paper, statistic=check_stat)
        console.print(checks_table(report["checks"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    image = plot(results, plot_path or out.with_suffix(".png"), title)
    console.print(f"wrote {out} and {image}")
