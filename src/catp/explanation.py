"""Show which query tokens each pruning method keeps, and what they look at in the image.

Two steps, so that notebooks can draw their own figures:

* :func:`explain` runs the model once unpruned (capturing every cross-attention map) and
  once per method inside :func:`catp.pruned` (the library's own scoring and selection),
  and returns an :class:`Explanation`: the maps, the scores, the kept indices and the
  answers.
* :func:`draw_explanation` turns an :class:`Explanation` into a matplotlib figure: the
  image, the answers, one small map per query token (4 x 8 for 32 tokens) with a coloured
  frame per method that kept it (and, for a selector, the number of its pick), and one bar
  chart per method: a scorer's scores, or a selector's picks in the order it made them.

For an InstructBLIP-Video model ``image`` is a sequence of frames: the maps form a grid of
frames x queries (one block of rows per frame, over that frame), and indices are flat over
the ``T*Q`` tokens, frame-major, as :attr:`catp.PruningSession.keep_indices`.

``catp explain`` (:mod:`catp.cli.explain`) does both on the embedded reference model and a
built-in sample image by default. Notation: ``Q`` query tokens, ``L`` cross-attention
layers, ``H`` heads, ``N = C + gh * gw`` image tokens (``C`` class tokens first: 1 in BLIP-2's ViT, :attr:`~catp.families.base.Family.class_tokens`), ``k`` kept tokens.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, ImageDraw
from torch import nn

from catp.hf import capture_connector, check_model, cross_attention_layers, placeholder_token_id, pruned, takes_frames
from catp.methods import PruningMethod, get_method
from catp.protocol import PAPER_PROMPT
from catp.selection import resolve_keep

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_METHODS",
    "SAMPLE_QUESTION",
    "Explanation",
    "MethodExplanation",
    "draw_explanation",
    "check_inputs",
    "explain",
    "load_image",
    "method_colours",
    "sample_image",
    "takes_frames",
    "write_html",
]

#: Methods shown when none are asked for: the paper's method and its two baselines.
DEFAULT_METHODS: tuple[str, ...] = ("catp", "l2norm", "selfattn")
#: The paper's VQA prompt, also the reference model's.
DEFAULT_PROMPT = PAPER_PROMPT
#: The question asked about the built-in sample image.
SAMPLE_QUESTION = "what shape is in the image?"
_SAMPLE_FILE = "sample.png"

# One colour per method, in the order asked (colour-blind-safe Okabe-Ito hues).
_METHOD_COLOURS = ("#D55E00", "#0072B2", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")


# -- data ------------------------------------------------------------------------------

@dataclass(frozen=True)
class MethodExplanation:
    """What one pruning method did on the example.

    Attributes:
        name: the method's name (a key of :data:`catp.METHODS`).
        scores: ``(Q,)`` a scorer's scores (higher = keep), as ``PruningSession.scores``;
            ``None`` for a selector (``divprune``, ``dart``, ``catp-diverse``).
        kept: ``(k,)`` ascending indices it kept, as ``PruningSession.keep_indices``.
        pick_order: ``(k,)`` the same indices in the order the method picked them, as
            ``PruningSession.pick_order`` (a scorer's: by descending score).
        answer: the model's answer with only the kept tokens.
        map_layers: the cross-attention layers (0-based, among the ``L``) whose maps the
            method reads; methods that read none (``l2norm``, ``selfattn``, ``first``,
            ``random``) are shown on the last layer.
    """

    name: str
    scores: torch.Tensor | None
    kept: torch.Tensor
    pick_order: torch.Tensor
    answer: str
    map_layers: tuple[int, ...]

    @property
    def is_selector(self) -> bool:
        """Whether the method picked its tokens itself (it has a pick order, no scores)."""
        return self.scores is None

    def pick_number(self, query: int) -> int | None:
        """1 for the method's first pick, 2 for the second, ...; ``None`` when ``query`` was not kept."""
        order = self.pick_order.tolist()
        return order.index(query) + 1 if query in order else None


@dataclass(frozen=True)
class Explanation:
    """The data behind a ``catp explain`` figure, for one image and one question.

    Attributes:
        image: the RGB input image (the model sees it resized to a square); for a video, its
            frames side by side.
        question: the question asked.
        prompt: the text given to the model.
        keep: tokens kept per method (all frames', for a video).
        cross_attention: ``(L, T*Q, gh, gw)`` float32: each cross-attention layer's
            probabilities from each query token to each image patch, averaged over heads,
            CLS dropped, on the patch grid (row-major, as the ViT orders patches). Tokens are
            frame-major; ``T = 1`` for an image.
        answer: the model's answer with all ``T*Q`` tokens.
        methods: per method name, in the order asked.
        frames: a video's frames (empty for an image).
    """

    image: Image.Image
    question: str
    prompt: str
    keep: int
    cross_attention: torch.Tensor
    answer: str
    methods: dict[str, MethodExplanation] = field(default_factory=dict)
    frames: tuple[Image.Image, ...] = ()

    @property
    def num_queries(self) -> int:
        """``T*Q``: every query token of every frame."""
        return int(self.cross_attention.shape[1])

    @property
    def num_frames(self) -> int:
        """``T`` (1 for an image)."""
        return max(1, len(self.frames))

    @property
    def queries_per_frame(self) -> int:
        """``Q``."""
        return self.num_queries // self.num_frames

    @property
    def num_cross_layers(self) -> int:
        """``L``."""
        return int(self.cross_attention.shape[0])

    def attention_maps(self, layers: Sequence[int] = ()) -> torch.Tensor:
        """``(Q, gh, gw)`` maps averaged over ``layers`` (default: the last layer)."""
        chosen = list(layers) or [self.num_cross_layers - 1]
        return self.cross_attention[chosen].mean(dim=0)


def _map_layers(method: PruningMethod, num_cross_layers: int) -> tuple[int, ...]:
    """The cross-attention layers a method reads, from its own ``needs``."""
    if method.needs.cross_attention == "all":
        return tuple(range(num_cross_layers))
    return (num_cross_layers - 1,)


def _layers_label(layers: tuple[int, ...], num_cross_layers: int) -> str:
    if len(layers) == 1:
        which = "last " if layers[0] == num_cross_layers - 1 else ""
        return f"{which}cross-attention layer ({layers[0] + 1} of {num_cross_layers})"
    return f"mean of all {num_cross_layers} cross-attention layers"


# -- running the model -------------------------------------------------------------------

def _patch_grid(cross_attentions: list[torch.Tensor], class_tokens: int) -> torch.Tensor:
    """``L`` tensors ``(T, H, Q, N)`` (one sample's frames or crops; ``T = 1`` for an image) ->
    ``(L, T*Q, gh, gw)``: head mean, the ``class_tokens`` leading columns (a ViT's CLS) dropped, on the
    grid, frame-major."""
    stacked = torch.stack([a.mean(dim=1).flatten(0, 1) for a in cross_attentions])  # (L, T*Q, N)
    patches = stacked[..., class_tokens:]
    side = math.isqrt(patches.shape[-1])
    if side * side != patches.shape[-1]:
        raise ValueError(f"{patches.shape[-1]} image patches do not form a square grid")
    return patches.reshape(*patches.shape[:2], side, side)


def load_image(image: Image.Image | str | Path) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (str, Path)):
        raise TypeError(f"image must be a PIL image or a path, got {type(image).__name__}")
    path = Path(image)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give an image file")
    if not path.is_file():
        raise ValueError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            return opened.convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def check_inputs(model: nn.Module, question: str, methods: Sequence[str | PruningMethod] | str | PruningMethod,
                 keep: int | float, prompt: str = DEFAULT_PROMPT) -> list[PruningMethod]:
    """Check the arguments of :func:`explain` (all but the image) before anything runs.

    Returns:
        The methods, resolved. (A video model's ``keep`` is checked once its frames are known.)

    Raises:
        ValueError, TypeError: the argument at fault, named in the message.
    """
    family = check_model(model)
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    if isinstance(methods, (str, PruningMethod)):
        methods = [methods]
    resolved = [get_method(m) for m in methods]
    if not resolved:
        raise ValueError("give at least one method")
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"each method may appear once, got {names}")
    if not isinstance(prompt, str) or prompt.count("{}") != 1:
        raise ValueError(f"prompt must hold one '{{}}' for the question, got {prompt!r}")
    if not takes_frames(model):
        resolve_keep(keep, family.num_queries(model.config))
    return resolved


def _video_inputs(model: nn.Module, processor: Any, frames: Sequence[Image.Image], text: str) -> dict[str, torch.Tensor]:
    """One video's model inputs, built by hand: the stock video processor needs torchvision.

    ``pixel_values`` ``(1, T, C, H, W)`` from ``processor.image_processor``; ``input_ids`` the
    ``T*Q`` placeholders followed by the tokenised ``text``; the Q-Former instruction from
    ``processor.qformer_tokenizer``.
    """
    missing = [name for name in ("image_processor", "tokenizer", "qformer_tokenizer") if getattr(processor, name, None) is None]
    if missing:
        raise TypeError(f"a video explanation needs a processor with an image_processor, a tokenizer and a qformer_tokenizer "
                        f"(an InstructBlipProcessor), got {type(processor).__name__} without {', '.join(missing)}")
    pixel_values = processor.image_processor(images=list(frames), return_tensors="pt")["pixel_values"]
    text_ids = processor.tokenizer(text, return_tensors="pt")["input_ids"]
    placeholders = torch.full((1, len(frames) * check_model(model).num_queries(model.config)), placeholder_token_id(model))
    input_ids = torch.cat([placeholders, text_ids], dim=1)
    instruction = processor.qformer_tokenizer(text, return_tensors="pt")
    return {"pixel_values": pixel_values[None], "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "qformer_input_ids": instruction["input_ids"], "qformer_attention_mask": instruction["attention_mask"]}


def _side_by_side(frames: Sequence[Image.Image]) -> Image.Image:
    """Frames in a row, each resized to the first one's height."""
    height = frames[0].height
    resized = [f.resize((max(1, round(f.width * height / f.height)), height)) for f in frames]
    strip = Image.new("RGB", (sum(f.width for f in resized), height), "white")
    x = 0
    for f in resized:
        strip.paste(f, (x, 0))
        x += f.width
    return strip


def explain(
    model: nn.Module,
    processor: Any,
    image: Image.Image | str | Path | Sequence[Image.Image | str | Path],
    question: str,
    methods: Sequence[str | PruningMethod] = DEFAULT_METHODS,
    keep: int | float = 8,
    prompt: str = DEFAULT_PROMPT,
    max_new_tokens: int = 10,
    scope: str | None = None,
) -> Explanation:
    """Run ``model`` on one image and question, unpruned and under each method.

    The maps come from one unpruned ``generate``; each method's scores, kept set and
    answer come from one ``generate`` inside :func:`catp.pruned` (greedy decoding), so
    they are the library's own, and equal :func:`catp.select_queries`.

    Args:
        model: a model of a supported family (:mod:`catp.families`), such as BLIP-2, InstructBLIP-Video, Idefics2.
        processor: its processor (for video, an ``InstructBlipProcessor`` whose image processor prepares each frame).
            A family whose processor takes the image's place in the prompt (Idefics2's ``<image>``) gets it in
            front of ``prompt`` (:meth:`~catp.families.base.Family.prompt_for`).
        image: a PIL image or an image file path; for video, a sequence of them (the frames).
        question: the question; put into ``prompt`` (which has one ``{}``).
        methods: method names from :data:`catp.METHODS` or method instances, each once.
        keep: as in :func:`catp.pruned`: an int count or a float fraction.
        max_new_tokens: answer length limit.
        scope: as in :func:`catp.pruned` (video models only).

    Returns:
        An :class:`Explanation`.
    """
    resolved = check_inputs(model, question, methods, keep, prompt)
    family = check_model(model)
    text = family.prompt_for(prompt).format(question.strip())
    if takes_frames(model):
        if isinstance(image, (Image.Image, str, Path)) or not isinstance(image, Sequence) or not image:
            raise TypeError(f"a video model takes a non-empty sequence of frames (PIL images or paths), got {type(image).__name__}")
        frames = [load_image(frame) for frame in image]
        rgb = _side_by_side(frames)
        inputs = _video_inputs(model, processor, frames, text)
    else:
        frames = []
        rgb = load_image(image)
        inputs = processor(images=rgb, text=text, return_tensors="pt")
    inputs = {name: value.to(model.device) for name, value in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    generate_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)

    def answer(output: torch.Tensor) -> str:
        # Decoder-only LLMs return the prompt followed by the new tokens.
        if family.decoder_only(model):
            output = output[:, inputs["input_ids"].shape[1]:]
        return processor.batch_decode(output, skip_special_tokens=True)[0].strip()

    with torch.no_grad():
        with capture_connector(model) as captured:
            unpruned = answer(model.generate(**inputs, **generate_kwargs))
        captured = captured["cross"]
        num_layers = len(cross_attention_layers(model))
        if len(captured) != num_layers:
            raise RuntimeError(f"captured {len(captured)} cross-attention maps, expected {num_layers} (one connector run)")
        results: dict[str, MethodExplanation] = {}
        for method in resolved:
            with pruned(model, method=method, keep=keep, scope=scope) as session:
                method_answer = answer(model.generate(**inputs, **generate_kwargs))
            assert session.keep_indices is not None and session.pick_order is not None and session.keep_counts is not None
            results[method.name] = MethodExplanation(
                name=method.name,
                scores=None if session.scores is None else session.scores[0].float().cpu(),
                kept=session.keep_indices[0].cpu(),
                pick_order=session.pick_order[0].cpu(),
                answer=method_answer,
                map_layers=_map_layers(method, num_layers),
            )
    return Explanation(
        image=rgb, question=question.strip(), prompt=text, keep=int(session.keep_counts[0]),
        cross_attention=_patch_grid(captured, family.class_tokens), answer=unpruned, methods=results, frames=tuple(frames),
    )


# -- drawing ---------------------------------------------------------------------------

def _grid_shape(num_queries: int) -> tuple[int, int]:
    """Rows x columns for the per-token maps: 8 columns (4 x 8 for 32 tokens)."""
    cols = min(8, num_queries)
    return math.ceil(num_queries / cols), cols


def _heat_colours(values: Any) -> Any:
    """``(gh, gw)`` values in [0, 1] -> ``(gh, gw, 4)`` RGBA: inferno colours, opacity rising with the value."""
    from matplotlib import colormaps

    rgba = colormaps["inferno"](values)
    rgba[..., 3] = 0.15 + 0.8 * values
    return rgba


def _token_label(index: int, per_frame: int, num_frames: int) -> str:
    """``q5`` for an image; ``f1 q5`` (frame 1, query 5) for the flat index of a video token."""
    frame, query = divmod(index, per_frame)
    return f"q{query}" if num_frames == 1 else f"f{frame} q{query}"


def method_colours(names: Sequence[str]) -> dict[str, str]:
    """The colour of each method in a figure, by its position in ``names``."""
    return {name: _METHOD_COLOURS[i % len(_METHOD_COLOURS)] for i, name in enumerate(names)}


def draw_explanation(explanation: Explanation, path: str | Path | None = None) -> Figure:
    """Draw an :class:`Explanation`; save it to ``path`` (PNG, ...) when given.

    Panels (``fig.axes``, in this order): the image; the answers; for each distinct set of
    layers the methods read, a grid of maps (``Q`` of them in rows of 8, or for a video one
    such block per frame: frames x queries); one score bar chart per method. So the figure has
    ``2 + cells * groups + len(methods)`` axes, ``cells`` the grid's size (``Q`` when ``Q`` is a
    multiple of 8, ``T*Q`` for a video), ``groups`` 1 unless a method reads all
    cross-attention layers and another only the last.

    Each map is one query token's head-averaged cross-attention, min-max scaled on its own
    (so each shows where that token looks), overlaid on the image and upsampled to it patch
    by patch. A token kept by a method gets a frame in that method's colour; a token kept
    by a selector also gets the number of its pick (1 = picked first) in that colour.
    A scorer's bar chart shows its scores; a selector's shows its picks, the first pick
    tallest, each numbered.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    methods = list(explanation.methods.values())
    colours = method_colours(explanation.methods)
    groups: dict[tuple[int, ...], list[MethodExplanation]] = {}
    for m in methods:
        groups.setdefault(m.map_layers, []).append(m)
    num_queries, num_layers = explanation.num_queries, explanation.num_cross_layers
    num_frames, per_frame = explanation.num_frames, explanation.queries_per_frame
    frame_rows, cols = _grid_shape(per_frame)
    rows = frame_rows * num_frames  # one block of rows per frame: frames x queries
    greys = [frame.convert("L") for frame in explanation.frames or (explanation.image,)]

    # Heights in inches: header, each map grid (title + rows), each bar chart.
    tile = 1.45
    heights = [2.6] + [0.5 + rows * (tile + 0.25) for _ in groups] + [1.9] * len(methods)
    fig = Figure(figsize=(cols * tile + 0.6, sum(heights)), layout="constrained")
    header, *grids_and_bars = fig.subfigures(len(heights), 1, height_ratios=heights)
    grid_figs, bar_figs = grids_and_bars[: len(groups)], grids_and_bars[len(groups):]

    # Header: the image and the answers.
    ax_image, ax_text = header.subplots(1, 2, width_ratios=[1, 4])
    ax_image.imshow(explanation.image, extent=(0, 1, 0, 1), aspect="equal")
    ax_image.set_title("input image", fontsize=10, pad=4)
    ax_image.set_axis_off()
    ax_text.set_axis_off()
    ax_text.text(0, 0.98, f"Q: {explanation.question}", fontsize=13, fontweight="bold", va="top")
    lines = [(f"all {num_queries} tokens", explanation.answer, "black")]
    lines += [(f"{m.name}, keep {len(m.kept)}", m.answer, colours[m.name]) for m in methods]
    step = min(0.16, 0.78 / len(lines))
    for i, (label, text, colour) in enumerate(lines):
        y = 0.74 - i * step
        ax_text.text(0, y, f"{label}:", fontsize=11, color=colour, fontweight="bold", va="top")
        ax_text.text(0.3, y, repr(text), fontsize=11, va="top", family="monospace")

    # Map grids: a frame per method that kept the token, nested from the outside in.
    for grid_fig, (layers, members) in zip(grid_figs, groups.items()):
        maps = explanation.attention_maps(layers)
        low = maps.amin(dim=(1, 2), keepdim=True)
        maps = (maps - low) / (maps.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-12)
        kept_by = {q: [m for m in members if q in m.kept.tolist()] for q in range(num_queries)}
        axes = grid_fig.subplots(rows, cols, squeeze=False).flatten()
        for cell, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            frame, slot = divmod(cell, frame_rows * cols)
            if slot >= per_frame:
                ax.set_visible(False)
                continue
            q = frame * per_frame + slot
            # Grey image under the heat map, so that the map's colours are not mixed with the image's; the map's
            # opacity follows its value, so the image stays visible where the token does not look.
            ax.imshow(greys[frame], extent=(0, 1, 0, 1), cmap="gray", vmin=0, vmax=255)
            ax.imshow(_heat_colours(maps[q].numpy()), extent=(0, 1, 0, 1), interpolation="nearest")
            for spine in ax.spines.values():
                spine.set_visible(False)
            for depth, m in enumerate(kept_by[q]):
                inset = 0.005 + depth * 0.075
                ax.add_patch(Rectangle((inset, inset), 1 - 2 * inset, 1 - 2 * inset, transform=ax.transAxes, fill=False,
                                       edgecolor=colours[m.name], linewidth=4, clip_on=False))
            # A selector's pick number, one badge per selector along the tile's top edge.
            for slot, selector in enumerate(m for m in kept_by[q] if m.is_selector):
                ax.text(0.1 + slot * 0.28, 0.9, str(selector.pick_number(q)), transform=ax.transAxes, ha="left", va="top",
                        fontsize=8, fontweight="bold", color="white",
                        bbox=dict(boxstyle="round,pad=0.15", facecolor=colours[selector.name], edgecolor="none"))
            tags = "+".join(m.name for m in kept_by[q])
            ax.set_title(_token_label(q, per_frame, num_frames) + (f"  {tags}" if tags else ""), fontsize=8,
                         fontweight="bold" if tags else "normal",
                         color=colours[kept_by[q][0].name] if len(kept_by[q]) == 1 else "black")
        by_frame = f"\none block of rows per video frame: {num_frames} frames x {per_frame} queries" if num_frames > 1 else ""
        grid_fig.suptitle(
            f"Where each query token looks (a frame = kept by that method)\n{_layers_label(layers, num_layers)}, mean over "
            f"heads; each map scaled to its own range, bright = more attention{by_frame}", fontsize=11,
        )
        grid_fig.legend(handles=[Patch(facecolor="none", edgecolor=colours[m.name], linewidth=3, label=f"kept by {m.name}")
                                 for m in members], loc="outside lower center", ncols=len(members), fontsize=10, frameon=False)

    # One bar chart per method: a scorer's scores, a selector's picks; kept tokens in the method's colour.
    for bar_fig, m in zip(bar_figs, methods):
        ax = bar_fig.subplots()
        (_pick_bars if m.is_selector else _score_bars)(ax, m, colours[m.name], num_queries)
        ax.set_xticks(range(num_queries), [_token_label(q, per_frame, num_frames) for q in range(num_queries)], fontsize=7,
                      rotation=90)
        ax.set_xlim(-0.6, num_queries - 0.4)
        for boundary in range(per_frame, num_queries, per_frame):
            ax.axvline(boundary - 0.5, color="black", linewidth=0.8, linestyle=":")
        ax.tick_params(axis="y", labelsize=8)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def _bar_colours(m: MethodExplanation, colour: str, num_queries: int) -> list[str]:
    kept = set(m.kept.tolist())
    return [colour if q in kept else "#BBBBBB" for q in range(num_queries)]


def _score_bars(ax: Any, m: MethodExplanation, colour: str, num_queries: int) -> None:
    """A scorer's panel: its score per query token."""
    assert m.scores is not None
    ax.bar(range(num_queries), m.scores.numpy(), color=_bar_colours(m, colour, num_queries))
    # Scores differ little next to their size (votes sum to about the same): zoom on their range.
    low, high = float(m.scores.min()), float(m.scores.max())
    margin = 0.15 * (high - low) or 0.5 * abs(high) or 1.0
    ax.set_ylim(low - margin, high + margin)
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.set_ylabel("score", fontsize=9)
    ax.set_title(f"{m.name}: score per query token (coloured = the {len(m.kept)} kept) -> answer {m.answer!r}",
                 fontsize=10, color=colour, loc="left")


def _pick_bars(ax: Any, m: MethodExplanation, colour: str, num_queries: int) -> None:
    """A selector's panel (it has no scores): kept token ``q``'s bar is ``k + 1 - pick number``, so the first pick is tallest, and is numbered."""
    k = len(m.pick_order)
    numbers = [m.pick_number(q) for q in range(num_queries)]
    heights = [0 if n is None else k + 1 - n for n in numbers]
    ax.bar(range(num_queries), heights, color=_bar_colours(m, colour, num_queries))
    for q, n in enumerate(numbers):
        if n is not None:
            ax.text(q, heights[q], str(n), ha="center", va="bottom", fontsize=7, fontweight="bold")
    ax.set_ylim(0, k + 1.8)
    ax.set_yticks([])
    ax.set_ylabel("pick order", fontsize=9)
    ax.set_title(f"{m.name}: the {k} kept query tokens in the order picked (1 = first) -> answer {m.answer!r}",
                 fontsize=10, color=colour, loc="left")


def write_html(explanation: Explanation, figure: Figure, path: str | Path) -> None:
    """A self-contained HTML page: the figure (PNG, base64) and a table of kept tokens and answers."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    png = base64.b64encode(buffer.getvalue()).decode("ascii")
    rows = [f"<tr><td>unpruned (all {explanation.num_queries})</td><td>-</td><td>-</td><td>{html.escape(explanation.answer)}</td></tr>"]
    for m in explanation.methods.values():
        kept = ", ".join(f"q{q}" for q in m.kept.tolist())
        order = ", ".join(f"q{q}" for q in m.pick_order.tolist()) + ("" if m.is_selector else " (by score)")
        rows.append(f"<tr><td>{html.escape(m.name)}</td><td>{kept}</td><td>{order}</td><td>{html.escape(m.answer)}</td></tr>")
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>catp explain: {html.escape(explanation.question)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:4px 8px}}</style>
</head><body>
<h1>catp explain</h1>
<p><b>Question:</b> {html.escape(explanation.question)}<br><b>Prompt:</b> <code>{html.escape(explanation.prompt)}</code></p>
<table><tr><th>method</th><th>kept query tokens</th><th>in pick order</th><th>answer</th></tr>
{chr(10).join(rows)}
</table>
<p><img alt="catp explain figure" style="max-width:100%" src="data:image/png;base64,{png}"></p>
</body></html>
"""
    Path(path).write_text(page, encoding="utf-8")


# -- the sample image ------------------------------------------------------------------

def draw_sample_image(size: int = 64) -> Image.Image:
    """The built-in sample: an easy-VQA-style blue circle, off-centre, on a light background.

    Drawn deterministically; ``src/catp/assets/sample.png`` is this image.
    """
    scale = 4  # drawn 4x larger and shrunk: anti-aliased edges, like the reference model's training shapes
    big = Image.new("RGB", (size * scale, size * scale), (238, 244, 232))
    box = tuple(size * scale * f for f in (0.12, 0.14, 0.58, 0.60))
    ImageDraw.Draw(big).ellipse(box, fill=(0, 0, 255))
    return big.resize((size, size), Image.Resampling.LANCZOS)


def sample_image() -> Image.Image:
    """The shipped sample image (see :func:`draw_sample_image`)."""
    with resources.as_file(resources.files("catp") / "assets" / _SAMPLE_FILE) as path, Image.open(path) as image:
        return image.convert("RGB")
