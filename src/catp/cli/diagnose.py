"""``catp diagnose``: do a model's query tokens differ, and does pruning have a choice to make?"""

from __future__ import annotations

from pathlib import Path

import torch
import typer

from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    KEEP_HELP,
    METHODS_HELP,
    check_adapter,
    make_console,
    output_file,
    parse_keep,
    parse_methods,
    refuse_unused,
)
from catp.evaluation.diagnose import DEFAULT_INSTRUCTION, diagnose, folder_images, qformer_inputs, scene_images
from catp.families import num_queries
from catp.models import DTYPES, check_device, resolve_dtype
from catp.reference import load
from catp.reference.data import easy_vqa_images
from catp.selection import resolve_keep

DATASETS = ("easy-vqa", "scenes")


def diagnose_command(
    model: str | None = typer.Option(None, help="Hub id or local directory. Default: the embedded reference model."),
    adapter: Path | None = typer.Option(None, help="A catp adapt adapter directory to put on the model (merged into its weights)."),
    dataset: str | None = typer.Option(None, help="Images from easy-vqa (the default) or scenes (scenes add the object-attention "
                                       "figures); not with --images."),
    split: str | None = typer.Option(None, help="Split of --dataset: train, validation or test (the default)."),
    images: Path | None = typer.Option(None, help="A folder of images to use instead of --dataset."),
    limit: int = typer.Option(500, min=1, help="Number of images."),
    methods: str = typer.Option("all", help=METHODS_HELP + ": their distinct kept sets are counted."),
    keep: str = typer.Option("8", help=KEEP_HELP + "; one value, for the kept sets."),
    instruction: str | None = typer.Option(None, help=f"InstructBLIP's Q-Former instruction (default {DEFAULT_INSTRUCTION!r})."),
    device: str = typer.Option("cpu", help="cpu, cuda or cuda:N."),
    dtype: str = typer.Option("auto", help=f"One of {', '.join(DTYPES)}; auto: float16 on CUDA, float32 otherwise."),
    out: Path | None = typer.Option(None, help="Also write the figures as JSON here."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Measure how distinct a model's query tokens are: cosine, effective rank, map correlation, entropy, kept sets."""
    from rich.table import Table

    with user_input(param="--device"):
        check_device(device)
    with user_input(param="--dtype"):
        resolve_dtype(dtype, device)
    with user_input(param="--methods"):
        names = parse_methods(methods)
    with user_input(param="--keep"):
        keep_value = parse_keep(keep, budgets=False, single=True)[0]
    if images is not None:
        refuse_unused("--images gives the images", dataset=dataset, split=split)
        with user_input(param="--images"):  # before the model loads
            pictures = folder_images(images, limit)
    dataset = "easy-vqa" if dataset is None else dataset
    split = "test" if split is None else split
    if images is None and dataset not in DATASETS:
        raise typer.BadParameter(f"--dataset must be one of {', '.join(DATASETS)} (or give --images), got {dataset!r}")
    if adapter is not None:
        with user_input(param="--adapter"):
            check_adapter(adapter)
    if out is not None:
        with user_input(param="--out"):
            output_file(out)
    with user_input(*INPUT_ERRORS, OSError, param="--model" if adapter is None else "--model/--adapter"):
        loaded, processor = load(model, dtype, device, adapter=adapter)
    with user_input(param="--keep"):
        resolve_keep(keep_value, num_queries(loaded.config))
    with user_input(param="--instruction"):
        qformer_inputs(loaded, processor, 1, instruction, torch.device(device))  # an instruction the model cannot take
    grid = int(loaded.config.vision_config.image_size) // int(loaded.config.vision_config.patch_size)
    masks = None
    with user_input(param="--split"):
        if images is None and dataset == "scenes":
            pictures, masks = scene_images(split, limit, grid)
        elif images is None:
            pictures = easy_vqa_images(split, limit)
    with interruptible():
        result = diagnose(loaded, processor, pictures, methods=names, keep=keep_value, instruction=instruction, object_masks=masks,
                          progress=progress)
    table = Table("figure", "value", title=f"catp diagnose: {result.model}")
    for line in result.markdown().splitlines()[2:]:
        name, value = (cell.strip() for cell in line.strip("|").split("|"))
        table.add_row(name, value)
    make_console().print(table)
    if out is not None:
        out.write_text(result.to_json())
        typer.echo(f"wrote {out}")
