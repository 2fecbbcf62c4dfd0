"""``catp eval``: the accuracy sweep of the paper's protocol on a model of any supported family (:mod:`catp.families`).

Multi-process (one shard of the questions per process; the merged result equals a
1-process run)::

    accelerate launch --num_processes 2 -m catp eval --out runs/x   # add --cpu on a CPU machine
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
import typer

from catp.budget import Budget
from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    BUDGET_HELP,
    KEEP_HELP,
    METHODS_HELP,
    check_adapter,
    check_dataset_files,
    check_range,
    output_dir,
    parse_keep,
    parse_methods,
    refuse_unused,
    resolve_keeps,
)
from catp.evaluation import harness, report
from catp.evaluation.datasets import DatasetError, load_dataset, resolve_split, subsample
from catp.evaluation.hf_datasets import describe_default_columns, parse_columns
from catp.evaluation.questions import DEFAULT_SPLIT
from catp.families import num_queries
from catp.methods import budget_refusal, get_method
from catp.models import DTYPES, check_device, load_config, load_model, resolve_dtype
from catp.protocol import PAPER_KEEPS, PAPER_MAX_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT
from catp.reference import reference_model_path


def eval_command(
    model: Optional[str] = typer.Option(None, help="Hub id or local directory. Default: the embedded reference model."),
    adapter: Optional[Path] = typer.Option(None, help="A catp adapt adapter directory to put on the model (merged into its weights)."),
    dataset: str = typer.Option("easy-vqa", help="vqav2, ok-vqa, easy-vqa, scenes, jsonl, a path ending in .jsonl, or hf:NAME "
                                "(a Hugging Face dataset: hub id, save_to_disk directory, or parquet file/folder)."),
    questions: Optional[Path] = typer.Option(None, help="Questions file (VQA questions JSON, or the JSONL file)."),
    annotations: Optional[Path] = typer.Option(None, help="VQA annotations JSON (vqav2, ok-vqa)."),
    images: Optional[Path] = typer.Option(None, help="COCO image directory (vqav2, ok-vqa)."),
    split: Optional[str] = typer.Option(None, help=f"Split. easy-vqa, scenes: train, validation or test (default {DEFAULT_SPLIT}). "
                                        "hf: required when the dataset has several."),
    config: Optional[str] = typer.Option(None, help="Config (subset) of an hf: dataset that has several."),
    columns: Optional[str] = typer.Option(None, help="Columns of an hf: dataset as role=column pairs, e.g. "
                                          "image=img,answers=labels. Default: " + describe_default_columns() + "."),
    methods: str = typer.Option("all", help=METHODS_HELP + "; 'none': the unpruned model alone."),
    compare: str = typer.Option("", help="Also give every method's paired differences against these methods (e.g. catp,random). "
                                "Built in, by each method's kind: CATP variants vs the baselines; selectors vs the CATP variants "
                                "and the baselines."),
    keep: Optional[str] = typer.Option(None, help=KEEP_HELP + BUDGET_HELP + f"; unpruned always runs. Default: "
                                       f"{','.join(map(str, PAPER_KEEPS))}."),
    match_budgets: bool = typer.Option(False, help="After the sweep, also run each method at the fixed counts on both sides of "
                                       "each budget's mean kept tokens (floor and ceil), so that the report compares the budget "
                                       "with a fixed k at the same mean."),
    batch_size: int = typer.Option(8, min=1, help="Questions per generate() call."),
    dtype: str = typer.Option("auto", help=f"One of {', '.join(DTYPES)}; auto: float16 on CUDA, float32 otherwise."),
    device: Optional[str] = typer.Option(None, help="cpu, cuda or cuda:N. Default: this process's accelerate device (cpu or its GPU)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep only the first N selected questions (in the run's fixed random order)."),
    fraction: float = typer.Option(1.0, help="Random fraction of the questions, in (0, 1] (the paper: 0.1)."),
    seed: int = typer.Option(0, help="Seed of the subset, the question order and the random method."),
    prompt: str = typer.Option(PAPER_PROMPT, help="Prompt; its one {} is the question. A family whose processor takes the "
                               "image's place in the prompt (Idefics2 <image>, Aria <|img|>) gets it in front unless the prompt holds it."),
    num_beams: int = typer.Option(PAPER_NUM_BEAMS, min=1, help="Beam search width."),
    max_new_tokens: int = typer.Option(PAPER_MAX_NEW_TOKENS, min=1, help="Most new tokens per answer (min 1)."),
    out: Path = typer.Option(Path("catp-eval"), help="Run directory: predictions (resumable: rerun the same command after "
                             "a stop or Ctrl-C), summaries, plot."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Evaluate pruning methods x keep levels (plus unpruned) with the VQA accuracy; resumable, shardable."""
    from accelerate import PartialState

    # Everything the options name is checked before the model's weights load or a question runs.
    with user_input(param="--dtype"):
        resolve_dtype(dtype, "cpu")
    if device is not None:
        with user_input(param="--device"):
            check_device(device)
    with user_input(param="--methods"):
        chosen = [] if methods.strip() == "none" else parse_methods(methods)
    if not chosen:  # the unpruned model alone
        refuse_unused("--methods none runs the unpruned model alone", keep=keep, compare=compare.strip() or None,
                      match_budgets=match_budgets)
    with user_input(param="--compare"):
        baselines = parse_methods(compare) if compare.strip() else []
    with user_input(param="--keep"):
        keeps = parse_keep(",".join(map(str, PAPER_KEEPS)) if keep is None else keep)
    if not any(isinstance(k, Budget) for k in keeps):
        refuse_unused("it matches per-sample budgets (mass:0.8, fence:1.5) in --keep, and there are none", match_budgets=match_budgets)
    with user_input(param="--fraction"):
        check_range("--fraction", fraction, 0, 1, low_open=True)
    check_dataset_files([dataset], questions, annotations, images)
    if adapter is not None:
        with user_input(param="--adapter"):
            check_adapter(adapter)
    with user_input(param="--columns"):
        column_map = parse_columns(columns) if columns is not None else None
    with user_input(param="--prompt"):
        protocol = harness.Protocol(prompt=prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=1)
    with user_input(param="--out"):
        output_dir(out, make=False)  # the run's folder is made once everything else is checked
    model_name = model or str(reference_model_path())
    with user_input(param="--model"):
        num_query_tokens = num_queries(load_config(model_name))
    with user_input(param="--keep"):
        keeps = resolve_keeps(keeps, num_query_tokens) if chosen else []  # the unpruned model alone needs no keep
    with user_input():
        configs = harness.build_configs(chosen, keeps, num_query_tokens)
        selected = load_dataset(dataset, questions=questions, annotations=annotations, images=images, split=split,
                                config=config, columns=column_map)
        if not selected:
            raise ValueError(f"dataset {dataset if questions is None else str(questions)!r} has no questions: nothing to run")
        selected = subsample(selected, fraction, seed)
    if limit is not None:
        selected = harness.order_questions(selected, seed)[:limit]
    state = PartialState(cpu=device == "cpu")
    with user_input(*INPUT_ERRORS, OSError, param="--model" if adapter is None else "--model/--adapter"):
        net, processor = load_model(model_name, dtype, device or str(state.device), adapter=adapter)
    dtype = resolve_dtype(dtype, device or str(state.device))
    refusals = [budget_refusal(get_method(m)) for m in chosen] if any(isinstance(k, Budget) for k in keeps) else []
    if state.is_main_process:
        for refusal in filter(None, refusals):
            typer.echo(f"note: {refusal}; it runs at the fixed counts only")
    manifest = harness.manifest_for(model_name, dataset if questions is None else str(questions), resolve_split(dataset, split),
                                    fraction, seed, limit, dtype, protocol, len(selected), config=config, columns=column_map,
                                    adapter=None if adapter is None else str(adapter))
    with user_input(param="--out"):  # an --out that holds another run
        if state.is_main_process:
            harness.check_manifest(out, manifest, is_main=True)
        state.wait_for_everyone()
        harness.check_manifest(out, manifest, is_main=False)
    # Only bad data (an unreadable image) is the user's to fix here; anything else is a bug.
    # (no_grad, not set_grad_enabled: the command may run inside another program, e.g. a test.)
    sweep = dict(protocol=protocol, batch_size=batch_size, seed=seed, rank=state.process_index, world_size=state.num_processes,
                 barrier=state.wait_for_everyone, progress=progress)
    with user_input(DatasetError), interruptible(f"rerun the same command to resume from {out}"), torch.no_grad():
        try:
            harness.run_sweep(net, processor, selected, configs, out, **sweep)
            if match_budgets:  # then the fixed counts around each budget's mean
                state.wait_for_everyone()
                extra = [c for c in harness.matching_keeps(list(harness.iter_records(out, selected, configs)), num_query_tokens)
                         if c not in configs]
                harness.run_sweep(net, processor, selected, extra, out, **sweep)
                configs = configs + extra
        except DatasetError as error:
            raise DatasetError(f"{error}\nThe predictions made so far are kept in {out}: fix the data and rerun the same "
                               "command to resume.") from None
    state.wait_for_everyone()
    if state.is_main_process:
        summary = report.summarize(list(harness.iter_records(out, selected, configs)), len(selected), compare=baselines)
        summary["run"] = manifest
        label = ("the reference model" if model is None else model) + ("" if adapter is None else f" + adapter {adapter.name}")
        paths = report.write_reports(summary, out, title=f"{label} on {dataset}")
        typer.echo(report.markdown_table(summary))
        typer.echo("wrote " + ", ".join(str(p) for p in paths))
