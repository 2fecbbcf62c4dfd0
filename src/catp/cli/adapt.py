"""``catp adapt``: train a small adapter so that the model answers well from the tokens a method keeps."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    KEEP_HELP,
    check_dataset_files,
    check_range,
    output_dir,
    parse_keep,
    parse_methods,
    refuse_unused,
    resolve_keeps,
)
from catp.families import family_of_type
from catp.models import DTYPES

#: The share of the training images held out for validation where a dataset has no validation split.
DEFAULT_VAL_FRACTION = 0.05


def adapt_command(
    out: Path = typer.Option(..., help="Adapter directory: a peft adapter, its query tokens, settings and validation figures; "
                             "while training, its resumable checkpoint (rerun the same command to resume)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local directory. Default: the embedded reference model."),
    method: Optional[str] = typer.Option(None, help="The pruning method in the loop (a name from `catp methods`, or "
                                         "package.module:Class). Default: first. Not with --truncate, which prunes by position."),
    keep: str = typer.Option("4,8,16,32", help=KEEP_HELP + "; each batch draws one (elastic), so one adapter serves them all."),
    full_every_step: bool = typer.Option(False, help="Each step also trains with all query tokens (the mean of the two "
                                         "losses), so that small keeps do not cost the full model."),
    dataset: list[str] = typer.Option(["easy-vqa", "scenes"], help="Training data, repeatable: easy-vqa, scenes, a .jsonl file, "
                                      "hf:NAME, or vqav2 / ok-vqa with --questions/--annotations/--images."),
    questions: Optional[Path] = typer.Option(None, help="Questions file of a vqav2 / ok-vqa / jsonl dataset."),
    annotations: Optional[Path] = typer.Option(None, help="VQA annotations JSON (vqav2, ok-vqa)."),
    images: Optional[Path] = typer.Option(None, help="COCO image directory (vqav2, ok-vqa)."),
    split: Optional[str] = typer.Option(None, help="The split to train on, of the datasets that have splits (never a test "
                                        "split). Default: train."),
    val_fraction: Optional[float] = typer.Option(None, help="For data without a validation split (JSONL, hf:, VQAv2): this share, "
                                                 "in (0, 1), of the training images, with all their questions, is held out to "
                                                 f"choose the checkpoint. Default: {DEFAULT_VAL_FRACTION}."),
    val_limit: int = typer.Option(300, min=1, help="Validation questions per dataset (the first in a fixed random order)."),
    truncate: bool = typer.Option(False, help="MQT's mode: the connector runs on its first k learned queries; export the "
                                  "result with --export K. Refused, with the reason, on a family whose query count is not "
                                  "one config field."),
    export: list[int] = typer.Option([], help="After training (--truncate), write a stock checkpoint of the model's family "
                                     "with K learned queries, processor included, to OUT/export-K; repeatable."),
    merge: bool = typer.Option(False, help="Also write the adapted model merged into a full checkpoint, OUT/merged."),
    rank: int = typer.Option(8, min=1, help="LoRA rank."),
    lm_lora: bool = typer.Option(False, help="Also LoRA on the language model (frozen by default, as BLIP-2 keeps it)."),
    query_tokens: bool = typer.Option(True, help="Train the learned queries (BLIP-2's query tokens, the other families' "
                                      "latents; saved beside the adapter)."),
    lr: float = typer.Option(5e-4, help="Peak learning rate (AdamW, warm-up, cosine decay)."),
    batch_size: int = typer.Option(32, min=1, help="Questions per step."),
    steps: int = typer.Option(1200, min=1, help="Optimisation steps."),
    validate_every: int = typer.Option(300, min=1, help="Steps between validations; the best state is kept."),
    checkpoint_every: int = typer.Option(50, min=1, help="Steps between resumable checkpoints in OUT/checkpoint (Ctrl-C also "
                                         "writes one after the step under way; a killed run resumes from the last)."),
    seed: int = typer.Option(0, help="Seed of the data order, the keeps drawn and the LoRA init."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("float32", help=f"One of {', '.join(DTYPES)} (train in float32 unless memory forces otherwise)."),
    threads: int = typer.Option(1, min=1, help="torch CPU threads. On a shared CPU one thread is faster: a two-thread "
                                "matmul waits for its slower thread (on this project's 2-core machines a step took 1.3 s "
                                "with 1 thread and 14 s with 2); run two trainings side by side instead."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train an adapter (LoRA on the connector, BLIP-2's projection, the learned queries) with the pruning method in the loop."""
    import torch
    from accelerate import PartialState

    from catp.adapt import (
        CHECKPOINT_DIR,
        AdaptSettings,
        check_export,
        check_out,
        export_truncated,
        load_adapter,
        train_adapter,
        truncating_family,
    )
    from catp.evaluation.datasets import VALIDATION_SPLITS, dataset_options, load_dataset, split_by_image
    from catp.extras import import_extra
    from catp.evaluation.harness import order_questions
    from catp.models import check_device, load_config, load_model, resolve_dtype
    from catp.reference import reference_model_path

    with user_input(param="--device"):
        check_device(device)
    with user_input(param="--dtype"):
        dtype = resolve_dtype(dtype, device)
    if truncate:
        refuse_unused("--truncate keeps the first k query tokens, by position, with no pruning method", method=method)
    with user_input(param="--method"):
        names = parse_methods("first" if method is None else method)
        if len(names) != 1:
            raise ValueError(f"give one method, got {method!r}; train one adapter per method and compare them on validation")
    method_name = names[0]
    with user_input(param="--keep"):
        keep_values = parse_keep(keep, budgets=False)
    given = {"questions": questions, "annotations": annotations, "images": images, "split": split}
    for option, value in given.items():
        if not any(option in dataset_options(data) for data in dataset):
            refuse_unused(f"no dataset of {', '.join(dataset)} reads it", **{option: value})
    split = given["split"] = "train" if split is None else split
    if split.startswith("test"):
        raise typer.BadParameter(f"catp adapt trains on a training split, never on {split!r}: test splits are for catp eval only",
                                 param_hint="--split")
    if all(data in VALIDATION_SPLITS for data in dataset):
        refuse_unused(f"{', '.join(dataset)} {'has' if len(dataset) == 1 else 'have'} a validation split of "
                      f"{'its' if len(dataset) == 1 else 'their'} own", val_fraction=val_fraction)
    with user_input(param="--val-fraction"):
        val_fraction = check_range("--val-fraction", DEFAULT_VAL_FRACTION if val_fraction is None else val_fraction, 0, 1,
                                   low_open=True, high_open=True)
    if not lr > 0:
        raise typer.BadParameter(f"--lr must be > 0, got {lr:g}", param_hint="--lr")
    if export and not truncate:
        raise typer.BadParameter("--export writes a checkpoint with fewer query tokens, which only a --truncate adapter is "
                                 "trained for", param_hint="--export")
    check_dataset_files(dataset, questions, annotations, images)
    with user_input():
        import_extra("peft", "adapt", "catp adapt")
    with user_input(param="--out"):
        output_dir(out, make=False)
    name = model or str(reference_model_path())
    with user_input(param="--model"):
        config = load_config(name)
    q = family_of_type(config.model_type).num_queries(config)
    if truncate:
        with user_input(param="--truncate"):  # a family whose connector cannot run its first k queries alone
            truncating_family(config)
    with user_input(param="--keep"):
        keeps = tuple(int(k) for k in resolve_keeps(keep_values, q))
    with user_input(param="--export"):
        for k in export:
            check_export(config, k)
    settings = AdaptSettings(method=method_name, keeps=keeps, full_every_step=full_every_step, truncate=truncate, rank=rank, lm_lora=lm_lora, query_tokens=query_tokens,
                             lr=lr, batch_size=batch_size, steps=steps, validate_every=min(validate_every, steps),
                             checkpoint_every=checkpoint_every, seed=seed)
    with user_input():
        settings.check(q)
    with user_input(param="--out"):  # an adapter or checkpoint of other settings
        check_out(out, settings)
    train, val, sources = [], [], []
    with user_input(param="--dataset"):
        for data in dataset:
            # Each dataset gets the options it reads (--split, the files); those no dataset reads were refused above.
            files = {k: v for k, v in given.items() if k in dataset_options(data)}
            part = load_dataset(data, **files)
            if not part:
                raise ValueError(f"dataset {data!r} has no {split!r} questions: nothing to train on")
            if data in VALIDATION_SPLITS:
                held = load_dataset(data, **{**files, "split": VALIDATION_SPLITS[data]})
                source = f"{data}: split {VALIDATION_SPLITS[data]!r}"
            else:
                part, held = split_by_image(part, val_fraction, seed)
                source = f"{data}: {val_fraction:.0%} of the {split!r} images, held out by image (seed {seed})"
            held = order_questions(held, seed)[:val_limit]
            train += part
            val += held
            sources.append({"dataset": data, "train": f"split {split!r}", "train_questions": len(part), "validation": source,
                            "validation_questions": len(held)})
    torch.set_num_threads(threads)
    # Under accelerate launch / torchrun, each process takes its share of every batch.
    state = PartialState(cpu=device == "cpu")
    device = device if device == "cpu" else str(state.device)
    with user_input(*INPUT_ERRORS, OSError, param="--model"):
        net, processor = load_model(name, dtype, device)
    if state.is_main_process:
        output_dir(out)
    state.wait_for_everyone()
    started = time.perf_counter()
    echo = typer.echo if state.is_main_process else (lambda _: None)
    checkpoint = out / CHECKPOINT_DIR / "state.json"
    with interruptible(lambda: f"the checkpoint in {checkpoint.parent} resumes it: rerun the same command" if checkpoint.is_file()
                       else "no checkpoint was written yet: a rerun starts over"):
        result = train_adapter(net, processor, train, val, settings, out, show_progress=progress and state.is_main_process,
                               data={"model": model or "the reference model (catp.reference_model_path())", "sources": sources},
                               log=echo)
    if not state.is_main_process:
        return
    best = result.best
    typer.echo(f"trained {result.steps} steps in {result.seconds / 60:.1f} min of training; best validation at step {best['step']}: "
               + ", ".join(f"keep {k}: {a:.1f}%" for k, a in best["accuracy"].items()))
    typer.echo(f"wrote the adapter to {out} ({time.perf_counter() - started:.0f} s in this call)")
    # Each from a fresh copy: an export cuts the learned queries of the model it is given.
    for target, k in ([(out / "merged", None)] if merge else []) + [(out / f"export-{k}", k) for k in export]:
        fresh, fresh_processor = load_model(name, dtype, device)
        adapted = load_adapter(fresh, out, merge=True)
        if k is None:
            adapted.save_pretrained(str(target))
            fresh_processor.save_pretrained(str(target))
        else:
            export_truncated(adapted, fresh_processor, k, target)
        typer.echo(f"wrote {target}")
