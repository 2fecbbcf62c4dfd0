"""``catp eval``: the accuracy sweep of the paper's protocol on any BLIP-2-family model.

Multi-process (one shard of the questions per process; the merged result equals a
1-process run)::

    accelerate launch --num_processes 2 -m catp eval --out runs/x   # add --cpu on a CPU machine
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from catp.budget import Budget
from catp.evaluation.datasets import DEFAULT_SPLIT
from catp.evaluation.hf import describe_default_columns
from catp.protocol import PAPER_KEEPS, PAPER_MAX_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT

_DTYPES = ("auto", "float32", "float16", "bfloat16")


def _split_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _parse_keep(text: str) -> list[int | float | Budget]:
    """``"16,8,4"`` -> counts; an item with a ``.`` is a fraction (``"0.5"``); ``mass:0.8`` or
    ``fence:1.5`` (optionally ``:min=N:max=N``) is a per-sample :class:`~catp.budget.Budget`."""
    out: list[int | float | Budget] = []
    for item in _split_list(text):
        try:
            out.append(Budget.parse(item) if ":" in item else float(item) if "." in item else int(item))
        except ValueError as error:
            detail = f" ({error})" if ":" in item else ""
            raise typer.BadParameter(f"--keep takes counts, fractions or budgets (mass:0.8, fence:1.5) separated by commas, "
                                     f"got {item!r}{detail}") from None
    if not out:
        raise typer.BadParameter("--keep is empty")
    return out


def check_dtype(dtype: str) -> None:
    """Raise a ``ValueError`` unless ``dtype`` is one of ``auto, float32, float16, bfloat16``."""
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


#: The model classes ``catp eval`` runs, by ``config.model_type``.
_MODEL_CLASSES = {"blip-2": "Blip2ForConditionalGeneration", "instructblip": "InstructBlipForConditionalGeneration"}


def model_config(name: str):
    """The config of model ``name`` (hub id or local directory), a BLIP-2 or InstructBLIP one.

    Raises:
        OSError: no such model; ValueError: a model of another type.
    """
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name)
    if config.model_type not in _MODEL_CLASSES:
        raise ValueError(f"{name} is a {config.model_type!r} model; catp eval supports {', '.join(_MODEL_CLASSES)}")
    return config


def load_model(name: str, dtype: str, device: str):
    """Model (eval mode, on ``device``) and processor from a hub id or a local directory.

    Raises:
        OSError: no such model; ValueError: not a BLIP-2 / InstructBLIP model, or an unknown ``dtype``.
    """
    import torch
    import transformers
    from tokenizers import AddedToken
    from transformers import AutoProcessor

    check_dtype(dtype)
    model_class = getattr(transformers, _MODEL_CLASSES[model_config(name).model_type])
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    model = model_class.from_pretrained(name, dtype=getattr(torch, dtype)).to(device).eval()
    processor = AutoProcessor.from_pretrained(name)
    if model.config.use_decoder_only_language_model:
        processor.tokenizer.padding_side = "left"  # generation continues at the right end
    if isinstance(getattr(processor, "image_token", None), str):
        # A tokenizer that declares its image token in extra_special_tokens reloads it as a str,
        # but Blip2Processor.__call__ (5.23) reads image_token.content.
        processor.image_token = AddedToken(processor.image_token, normalized=False, special=True)
    return model, processor, dtype


def _default_model() -> str:
    import catp

    locate = getattr(catp, "reference_model_path", None)
    try:
        path = locate() if locate is not None else None
    except FileNotFoundError as error:
        raise typer.BadParameter(f"{error}; or pass --model (a hub id or a local directory)") from None
    if path is None:
        raise typer.BadParameter("no embedded reference model in this install; pass --model (a hub id or a local directory)")
    return str(path)


def eval_command(
    model: Optional[str] = typer.Option(None, help="Hub id or local directory. Default: the embedded reference model."),
    dataset: str = typer.Option("easy-vqa", help="vqav2, ok-vqa, easy-vqa, scenes, jsonl, a path ending in .jsonl, or hf:NAME "
                                "(a Hugging Face dataset: hub id, save_to_disk directory, or parquet file/folder)."),
    questions: Optional[Path] = typer.Option(None, help="Questions file (VQA questions JSON, or the JSONL file)."),
    annotations: Optional[Path] = typer.Option(None, help="VQA annotations JSON (vqav2, ok-vqa)."),
    images: Optional[Path] = typer.Option(None, help="COCO image directory (vqav2, ok-vqa)."),
    split: Optional[str] = typer.Option(None, help=f"Split. easy-vqa, scenes: train or test (default {DEFAULT_SPLIT}). hf: required when "
                                        "the dataset has several."),
    config: Optional[str] = typer.Option(None, help="Config (subset) of an hf: dataset that has several."),
    columns: Optional[str] = typer.Option(None, help="Columns of an hf: dataset as role=column pairs, e.g. "
                                          "image=img,answers=labels. Default: " + describe_default_columns() + "."),
    methods: str = typer.Option("all", help="Comma-separated methods, or 'all' (catp.METHODS)."),
    compare: str = typer.Option("", help="Also give every method's paired differences against these methods (e.g. catp,random). "
                                "Built in: CATP variants vs l2norm, selfattn, first, random; divprune, dart, catp-diverse vs catp, random."),
    keep: str = typer.Option(",".join(map(str, PAPER_KEEPS)), help="Comma-separated keep counts, fractions like 0.5, or per-sample "
                             "budgets like mass:0.8 / fence:1.5 (optionally :min=N:max=N); unpruned always runs."),
    match_budgets: bool = typer.Option(False, help="After the sweep, also run each method at the fixed counts on both sides of "
                                       "each budget's mean kept tokens (floor and ceil), so that the report compares the budget "
                                       "with a fixed k at the same mean."),
    batch_size: int = typer.Option(8, min=1, help="Questions per generate() call."),
    dtype: str = typer.Option("auto", help=f"One of {', '.join(_DTYPES)}; auto: float16 on CUDA, float32 otherwise."),
    device: Optional[str] = typer.Option(None, help="Default: this process's accelerate device (cpu or its GPU)."),
    limit: Optional[int] = typer.Option(None, min=1, help="Keep only the first N selected questions (in the run's fixed random order)."),
    fraction: float = typer.Option(1.0, help="Random fraction of the questions (the paper: 0.1)."),
    seed: int = typer.Option(0, help="Seed of the subset, the question order and the random method."),
    prompt: str = typer.Option(PAPER_PROMPT, help="Prompt; {} is the question."),
    num_beams: int = typer.Option(PAPER_NUM_BEAMS, min=1, help="Beam search width."),
    max_new_tokens: int = typer.Option(PAPER_MAX_NEW_TOKENS, min=1, help="Most new tokens per answer (min 1)."),
    out: Path = typer.Option(Path("catp-eval"), help="Run directory: predictions (resumable), summaries, plot."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Evaluate pruning methods x keep levels (plus unpruned) with the VQA accuracy; resumable, shardable."""
    import torch
    from accelerate import PartialState

    from catp.cli import INPUT_ERRORS, user_input
    from catp.evaluation import harness, report
    from catp.evaluation.datasets import DatasetError, load_dataset, resolve_split, subsample
    from catp.evaluation.hf import parse_columns
    from catp.methods import METHODS, budget_refusal, get_method

    # Everything the options name is checked before the model's weights load or a question runs.
    with user_input(param="--dtype"):
        check_dtype(dtype)
    chosen = list(METHODS) if methods == "all" else _split_list(methods)
    baselines = _split_list(compare)
    unknown = [m for m in baselines if m not in METHODS]
    if unknown:
        raise typer.BadParameter(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}", param_hint="--compare")
    keeps = _parse_keep(keep)
    with user_input(param="--columns"):
        column_map = parse_columns(columns) if columns is not None else None
    with user_input(param="--prompt"):
        protocol = harness.Protocol(prompt=prompt, num_beams=num_beams, max_new_tokens=max_new_tokens, min_new_tokens=1)
    model_name = model or _default_model()
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        num_query_tokens = int(model_config(model_name).num_query_tokens)
    with user_input():
        configs = harness.build_configs(chosen, keeps, num_query_tokens)
        selected = load_dataset(dataset, questions=questions, annotations=annotations, images=images, split=split,
                                config=config, columns=column_map)
        selected = subsample(selected, fraction, seed)
    if limit is not None:
        selected = harness.order_questions(selected, seed)[:limit]
    state = PartialState(cpu=device == "cpu")
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        net, processor, dtype = load_model(model_name, dtype, device or str(state.device))
    refusals = [budget_refusal(get_method(m)) for m in chosen] if any(isinstance(k, Budget) for k in keeps) else []
    if state.is_main_process:
        for refusal in filter(None, refusals):
            typer.echo(f"note: {refusal}; it runs at the fixed counts only")
    manifest = harness.manifest_for(model_name, dataset if questions is None else str(questions), resolve_split(dataset, split),
                                    fraction, seed, limit, dtype, protocol, len(selected), config=config, columns=column_map)
    with user_input():  # an --out that holds another run
        if state.is_main_process:
            harness.check_manifest(out, manifest, is_main=True)
        state.wait_for_everyone()
        harness.check_manifest(out, manifest, is_main=False)
    # Only bad data (an unreadable image) is the user's to fix here; anything else is a bug.
    # (no_grad, not set_grad_enabled: the command may run inside another program, e.g. a test.)
    sweep = dict(protocol=protocol, batch_size=batch_size, seed=seed, rank=state.process_index, world_size=state.num_processes,
                 barrier=state.wait_for_everyone, progress=progress)
    with user_input(DatasetError), torch.no_grad():
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
        paths = report.write_reports(summary, out, title=f"{Path(model_name).name} on {dataset}")
        typer.echo(report.markdown_table(summary))
        typer.echo("wrote " + ", ".join(str(p) for p in paths))
