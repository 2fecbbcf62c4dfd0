"""``catp explain``: the figure of which query tokens each method keeps, and what they look at."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from catp.cli.errors import INPUT_ERRORS, interruptible, user_input
from catp.cli.options import (
    KEEP_HELP,
    METHODS_HELP,
    check_adapter,
    check_figure_path,
    output_file,
    parse_keep,
    parse_methods,
    refuse_unused,
    split_list,
)
from catp.explanation import (
    DEFAULT_METHODS,
    SAMPLE_QUESTION,
    check_inputs,
    draw_explanation,
    explain,
    load_image,
    sample_image,
    takes_frames,
    write_html,
)
from catp.reference import load
from catp.selection import SCOPES


def explain_command(
    out: Path = typer.Option(..., "--out", help="Where to write the figure (.png, .pdf, .svg, ...)."),
    image: Path | None = typer.Option(None, "--image", help="Image file. Default: the built-in sample image."),
    frames: str | None = typer.Option(None, "--frames", help="Video models (InstructBLIP-Video): comma-separated frame image files."),
    scope: str | None = typer.Option(None, "--scope", help="Video models (with --frames): keep counts over all frames' tokens "
                                     "(video, default) or per frame."),
    question: str | None = typer.Option(None, "--question", help=f"Question. Default with the sample image: {SAMPLE_QUESTION!r}."),
    model: str | None = typer.Option(None, "--model", help="Model directory or hub id. Default: the embedded reference model."),
    adapter: Path | None = typer.Option(None, help="A catp adapt adapter directory to put on the model (merged into its weights)."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods", help=METHODS_HELP + "."),
    keep: str = typer.Option("8", "--keep", help=KEEP_HELP + "; one value."),
    html_out: Path | None = typer.Option(None, "--html", help="Also write a self-contained HTML page here."),
    max_new_tokens: int = typer.Option(10, "--max-new-tokens", min=1, help="Answer length limit."),
) -> None:
    """Show which query tokens each method keeps, and what each token looks at in the image."""
    if image is not None and frames is not None:
        raise typer.BadParameter("give --image (an image model) or --frames (a video model), not both")
    with user_input(param="--image" if frames is None else "--frames"):
        if frames is not None:
            picture: Any = [load_image(Path(f)) for f in split_list(frames)]
            if not picture:
                raise ValueError(f"--frames names no image file: {frames!r}")
        else:
            picture = sample_image() if image is None else load_image(image)
    if (image is not None or frames is not None) and question is None:
        raise typer.BadParameter("give the --question to ask about --image / --frames", param_hint="--question")
    if frames is None:
        refuse_unused("--scope applies to video models, which take --frames", scope=scope)
    elif scope is not None and scope not in SCOPES:
        raise typer.BadParameter(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}", param_hint="--scope")
    with user_input(param="--methods"):
        names = parse_methods(methods)
    with user_input(param="--keep"):
        keep_value = parse_keep(keep, budgets=False, single=True)[0]
    with user_input(param="--out"):
        check_figure_path(out)
    if html_out is not None:
        with user_input(param="--html"):
            output_file(html_out)
    if adapter is not None:
        with user_input(param="--adapter"):
            check_adapter(adapter)
    with user_input(*INPUT_ERRORS, OSError, param="--model" if adapter is None else "--model/--adapter"):
        loaded, processor = load(model, adapter=adapter)
    if (frames is not None) != takes_frames(loaded):
        raise typer.BadParameter("a video model takes --frames; an image model takes --image")
    with user_input():
        check_inputs(loaded, question or SAMPLE_QUESTION, names, keep_value)
    with interruptible():
        explanation = explain(loaded, processor, picture, question or SAMPLE_QUESTION, methods=names, keep=keep_value,
                              max_new_tokens=max_new_tokens, scope=scope)
    figure = draw_explanation(explanation, out)
    typer.echo(f"unpruned: {explanation.answer!r}")
    for m in explanation.methods.values():
        picks = f", picked in order {m.pick_order.tolist()}" if m.is_selector else ""
        typer.echo(f"{m.name} keep {explanation.keep}: {m.answer!r}  kept {m.kept.tolist()}{picks}")
    typer.echo(f"wrote {out}")
    if html_out is not None:
        write_html(explanation, figure, html_out)
        typer.echo(f"wrote {html_out}")
