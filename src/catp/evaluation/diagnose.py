"""``catp diagnose``: do a model's query tokens differ, and does pruning have a choice to make?

Token pruning can only help if the query tokens carry different things. This module
measures that on any ``from_pretrained`` model of a supported family and a set of images:

* **query-output cosine**: mean pairwise cosine of the Q-Former's ``Q`` output tokens, and
  the mean over queries of the cosine to the nearest other query (1.0 = duplicates);
* **effective rank** of the centred query outputs: ``exp(entropy(s / sum(s)))`` of their
  singular values ``s`` (1 = all queries on one line; up to ``Q``);
* per cross-attention layer, the **map correlation**: the mean pairwise Pearson
  correlation of the queries' attention maps over the image tokens (mean over heads), and
  the **attention entropy** of each query's map over the image tokens, divided by
  ``log N`` (1 = uniform attention);
* per method, the number of **distinct kept sets** over the images;
* on the generated scenes, each query's **share of attention on object patches** (last
  cross-attention layer, mean over heads, over the patch tokens), next to the share of
  patches that are object patches (what attention spread evenly would give).

The metrics are small pure functions over tensors; :func:`diagnose` runs the model once per
batch (the Q-Former eager, to expose its probabilities) and :func:`catp.select_queries` per
method.

    catp diagnose --dataset easy-vqa --limit 500
    catp diagnose --model Salesforce/blip2-opt-2.7b --images my_images/ --dtype float16 --device cuda
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from catp.evaluation.questions import open_image
from catp.hf import capture_connector, check_model, select_queries
from catp.methods import METHODS, get_method, seed_options
from catp.reference.data import SCENE_SPLITS, scenes_with_questions
from catp.scoring import cosine_similarity_matrix
from catp.selection import resolve_keep
from catp.training import progress as progress_bar

__all__ = [
    "Diagnosis",
    "attention_entropy",
    "diagnose",
    "effective_rank",
    "kept_set_cosine",
    "map_correlation",
    "object_attention_share",
    "query_cosine",
]

#: The Q-Former instruction for InstructBLIP models when none is given.
DEFAULT_INSTRUCTION = "What is in the image?"


# -- metrics: pure functions ----------------------------------------------------------------

def query_cosine(outputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity among the query outputs of each sample.

    Args:
        outputs: ``(B, Q, D)``.

    Returns:
        ``(mean pairwise cosine (B,), mean nearest-other-query cosine (B,))``.
    """
    cosine = cosine_similarity_matrix(outputs)  # (B, Q, Q)
    q = cosine.shape[-1]
    off_diagonal = ~torch.eye(q, dtype=torch.bool, device=cosine.device)
    pairwise = cosine[:, off_diagonal].mean(dim=-1)
    nearest = cosine.masked_fill(~off_diagonal, -2.0).amax(dim=-1).mean(dim=-1)
    return pairwise, nearest


def kept_set_cosine(outputs: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """How well a kept set stands for all the queries, and how much of it is duplicated.

    Args:
        outputs: ``(B, Q, D)`` query outputs.
        kept: ``(B, k)`` kept query indices (k >= 2).

    Returns:
        ``(coverage (B,), redundancy (B,))``: coverage is the mean over all ``Q`` queries of
        the cosine to the most similar kept query (1 when every query has a kept twin);
        redundancy is the mean over the kept queries of the cosine to the most similar
        *other* kept query (1 when the set is made of duplicates).
    """
    cosine = cosine_similarity_matrix(outputs)  # (B, Q, Q)
    to_kept = torch.gather(cosine, 2, kept[:, None, :].expand(-1, cosine.shape[1], -1))  # (B, Q, k)
    coverage = to_kept.amax(dim=-1).mean(dim=-1)
    among = torch.gather(to_kept, 1, kept[:, :, None].expand(-1, -1, kept.shape[1]))  # (B, k, k)
    self_pairs = torch.eye(kept.shape[1], dtype=torch.bool, device=outputs.device)
    redundancy = among.masked_fill(self_pairs, -2.0).amax(dim=-1).mean(dim=-1)
    return coverage, redundancy


def effective_rank(outputs: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of the normalised singular values of the centred query outputs.

    Args:
        outputs: ``(B, Q, D)``.

    Returns:
        ``(B,)``, between 1 and ``min(Q - 1, D)``.
    """
    centred = outputs.float() - outputs.float().mean(dim=1, keepdim=True)
    singular = torch.linalg.svdvals(centred)  # (B, min(Q, D))
    p = singular / singular.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    return entropy.exp()


def map_correlation(probs: torch.Tensor) -> torch.Tensor:
    """Mean pairwise Pearson correlation of the queries' attention maps.

    Args:
        probs: one cross-attention layer's probabilities ``(B, H, Q, N)``; maps are
            averaged over heads first.

    Returns:
        ``(B,)``: the mean over the ``Q (Q - 1)`` ordered pairs of distinct queries.
    """
    maps = probs.float().mean(dim=1)  # (B, Q, N)
    centred = maps - maps.mean(dim=-1, keepdim=True)
    unit = nn.functional.normalize(centred, dim=-1)
    corr = unit @ unit.transpose(1, 2)
    q = corr.shape[-1]
    off_diagonal = ~torch.eye(q, dtype=torch.bool, device=corr.device)
    return corr[:, off_diagonal].mean(dim=-1)


def attention_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy of each query's attention over the image tokens, divided by ``log N``.

    Args:
        probs: ``(B, H, Q, N)``.

    Returns:
        ``(B,)``: the mean over heads and queries (1 = uniform, 0 = one token).
    """
    p = probs.float().clamp_min(1e-12)
    entropy = -(p * p.log()).sum(dim=-1)  # (B, H, Q)
    return entropy.mean(dim=(1, 2)) / math.log(probs.shape[-1])


def object_attention_share(probs: torch.Tensor, object_patches: torch.Tensor) -> torch.Tensor:
    """Each query's share of its patch attention that falls on object patches.

    Args:
        probs: ``(B, H, Q, C + P)``: the ``C`` class-token columns first (left out), then the patches.
        object_patches: ``(B, P)`` bool, true where a patch shows an object.

    Returns:
        ``(B, Q)`` in [0, 1].
    """
    patches = probs.float().mean(dim=1)[..., -object_patches.shape[1]:]  # (B, Q, P)
    patches = patches / patches.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return (patches * object_patches[:, None, :].float()).sum(dim=-1)


# -- running a model ---------------------------------------------------------------------

@dataclass
class Diagnosis:
    """What :func:`diagnose` measured over ``num_images`` images (means over images).

    Attributes:
        model: the model's name or class.
        num_images, num_queries, keep: the run's shape.
        pairwise_cosine, nearest_cosine, effective_rank: query-output statistics.
        map_correlation, attention_entropy: one value per cross-attention layer, in order.
        distinct_kept_sets: method name -> number of distinct kept sets over the images.
        kept_coverage, kept_redundancy: method name -> mean :func:`kept_set_cosine` figures.
        object_share: per query, the mean share of attention on object patches (or ``None``).
        object_patch_share: the mean share of patches that are object patches (or ``None``).
        kept_object_share: method name -> the kept queries' mean share of attention on object
            patches, each image's kept set read on that image (empty without object masks).
    """

    model: str
    num_images: int
    num_queries: int
    keep: int
    pairwise_cosine: float
    nearest_cosine: float
    effective_rank: float
    map_correlation: list[float]
    attention_entropy: list[float]
    distinct_kept_sets: dict[str, int] = field(default_factory=dict)
    kept_coverage: dict[str, float] = field(default_factory=dict)
    kept_redundancy: dict[str, float] = field(default_factory=dict)
    object_share: list[float] | None = None
    object_patch_share: float | None = None
    kept_object_share: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def markdown(self) -> str:
        """The figures as a markdown table (one row per figure)."""
        layers = len(self.map_correlation)
        rows = [
            ("images", str(self.num_images)),
            ("mean pairwise query cosine", f"{self.pairwise_cosine:.3f}"),
            ("mean nearest-other-query cosine", f"{self.nearest_cosine:.3f}"),
            (f"effective rank (of {self.num_queries})", f"{self.effective_rank:.2f}"),
            *((f"map correlation, cross-attention layer {i + 1}/{layers}", f"{v:.3f}") for i, v in enumerate(self.map_correlation)),
            *((f"attention entropy / log N, layer {i + 1}/{layers}", f"{v:.3f}") for i, v in enumerate(self.attention_entropy)),
            *((f"distinct kept sets at keep {self.keep}: {m}", str(n)) for m, n in self.distinct_kept_sets.items()),
            *((f"kept set at keep {self.keep}, coverage / redundancy: {m}", f"{v:.3f} / {self.kept_redundancy[m]:.3f}")
              for m, v in self.kept_coverage.items()),
        ]
        if self.object_share is not None:
            share = torch.tensor(self.object_share)
            rows.append(("attention on object patches, per query: mean (min-max)", f"{share.mean():.3f} ({share.min():.3f}-{share.max():.3f})"))
            rows.append(("object patches among all patches", f"{self.object_patch_share:.3f}"))
            rows.extend((f"kept set at keep {self.keep}, attention on object patches: {m}", f"{v:.3f}") for m, v in self.kept_object_share.items())
        return "\n".join(["| figure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def qformer_inputs(model: nn.Module, processor: Any, batch: int, instruction: str | None, device: torch.device) -> dict[str, torch.Tensor]:
    """InstructBLIP's Q-Former reads the instruction too; BLIP-2's reads nothing else."""
    if "qformer_input_ids" not in inspect.signature(model.get_image_features).parameters:
        if instruction is not None:
            raise ValueError(f"{type(model).__name__} has no instruction input; leave instruction unset")
        return {}
    tokens = processor.qformer_tokenizer([instruction or DEFAULT_INSTRUCTION] * batch, return_tensors="pt", padding=True)
    return {"qformer_input_ids": tokens["input_ids"].to(device), "qformer_attention_mask": tokens["attention_mask"].to(device)}


def diagnose(
    model: nn.Module,
    processor: Any,
    images: Sequence[Any],
    methods: Sequence[str] | None = None,
    keep: int | float = 8,
    instruction: str | None = None,
    object_masks: Sequence[Any] | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> Diagnosis:
    """Measure how distinct ``model``'s query tokens are on ``images``.

    Args:
        model: a model of a supported family (:mod:`catp.families`; not a video model).
        processor: its processor (the image processor makes the pixel values and the family's
            :attr:`~catp.families.base.Family.model_inputs`, such as Idefics2's patch mask).
        images: PIL images.
        methods: pruning methods whose distinct kept sets are counted; default every registered method.
        keep: the keep level for the kept sets (a count or a fraction).
        instruction: InstructBLIP's Q-Former instruction (default :data:`DEFAULT_INSTRUCTION`).
        object_masks: optional per-image ``(gh, gw)`` bool patch grids, true on object
            patches (the generated scenes have them); adds the object-attention figures.
        batch_size: images per forward pass.
        progress: show a progress bar over the images (a forward pass and each method's
            selection per batch take a while on a CPU).

    Returns:
        A :class:`Diagnosis` (means over images).
    """
    family = check_model(model)
    if len(images) == 0:
        raise ValueError("diagnose needs at least one image")
    if object_masks is not None and len(object_masks) != len(images):
        raise ValueError(f"{len(object_masks)} object masks for {len(images)} images")
    names = list(METHODS if methods is None else methods)
    for name in names:
        get_method(name)  # an unknown method fails before any work
    q = family.num_queries(model.config)
    k = resolve_keep(keep, q)
    device = next(model.parameters()).device
    dtype = next(family.vision_tower(model).parameters()).dtype
    outputs, cross = [], []
    kept: dict[str, list[tuple[int, ...]]] = {name: [] for name in names}
    bar = progress_bar(len(images), "diagnose", progress)
    for start in range(0, len(images), batch_size):
        chunk = list(images[start : start + batch_size])
        encoded = processor.image_processor(family.image_batch(chunk), return_tensors="pt")
        pixels = encoded["pixel_values"].to(device, dtype)
        extra = {name: encoded[name].to(device) for name in family.model_inputs if name in encoded}
        extra.update(qformer_inputs(model, processor, len(chunk), instruction, device))
        with torch.no_grad(), capture_connector(model) as captured:
            family.encode(model, pixels, **extra)
        outputs.append(captured["outputs"][0])
        cross.append(torch.stack(captured["cross"]))  # (L, B, H, Q, N)
        for name in names:
            # One seed per image: one seed for all would draw the same set for every image.
            rows = select_queries(model, pixels, method=name, keep=k, **extra, **seed_options(name, range(start, start + len(chunk))))
            kept[name].extend(tuple(r) for r in rows.tolist())
        bar.update(len(chunk))
    bar.close()
    query_outputs = torch.cat(outputs)
    maps = torch.cat(cross, dim=1)  # (L, images, H, Q, N)
    pairwise, nearest = query_cosine(query_outputs)
    result = Diagnosis(
        model=str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        num_images=len(images), num_queries=q, keep=k,
        pairwise_cosine=float(pairwise.mean()), nearest_cosine=float(nearest.mean()),
        effective_rank=float(effective_rank(query_outputs).mean()),
        map_correlation=[float(map_correlation(layer).mean()) for layer in maps],
        attention_entropy=[float(attention_entropy(layer).mean()) for layer in maps],
        distinct_kept_sets={name: len(set(sets)) for name, sets in kept.items()},
    )
    kept_rows = {name: torch.tensor(sets, device=query_outputs.device) for name, sets in kept.items()}  # (images, k)
    if k >= 2:
        for name, rows in kept_rows.items():
            coverage, redundancy = kept_set_cosine(query_outputs, rows)
            result.kept_coverage[name], result.kept_redundancy[name] = float(coverage.mean()), float(redundancy.mean())
    if object_masks is not None:
        masks = torch.stack([torch.as_tensor(m, dtype=torch.bool).flatten() for m in object_masks]).to(maps.device)
        if masks.shape[1] != maps.shape[-1] - family.class_tokens:
            raise ValueError(f"object masks have {masks.shape[1]} patches, the model has {maps.shape[-1] - family.class_tokens}")
        share = object_attention_share(maps[-1], masks)  # (images, Q)
        result.object_share = share.mean(dim=0).tolist()
        result.object_patch_share = float(masks.float().mean())
        result.kept_object_share = {name: float(share.gather(1, rows).mean()) for name, rows in kept_rows.items()}
    return result


# -- images ------------------------------------------------------------------------------

def scene_images(split: str, limit: int, grid: int) -> tuple[list, list]:
    """Generated scenes of ``split`` and their object patch grids ``(grid, grid)`` (a patch with any object pixel)."""
    if split not in SCENE_SPLITS:
        raise ValueError(f"scenes split must be one of {list(SCENE_SPLITS)}, got {split!r}")
    seed, count = SCENE_SPLITS[split]
    scenes = [s for s, _ in scenes_with_questions(min(count, limit), seed)]
    masks = [np.asarray(s.shape_map.resize((grid, grid), Image.Resampling.BOX)) > 0 for s in scenes]
    return [s.image for s in scenes], masks


def folder_images(folder: Path, limit: int) -> list:
    """The first ``limit`` images of ``folder`` (by name), in RGB.

    Raises:
        ValueError: not a folder, no images in it, or a file that is not an image.
    """
    if not folder.is_dir():
        raise ValueError(f"--images must be a folder of images, got {folder}")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".webp"})[:limit]
    if not paths:
        raise ValueError(f"no .png/.jpg/.jpeg/.bmp/.webp images in {folder}")
    out = []
    for path in paths:
        try:
            out.append(open_image(path))
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read {path} as an image: {error}") from None
    return out
