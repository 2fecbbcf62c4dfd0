"""Train the reference BLIP-2 from scratch on the CPU, as BLIP-2 itself is trained (Li et al., 2023: frozen image encoder and LLM, two stages).

BLIP-2 joins a *pretrained, frozen* image encoder and a *pretrained, frozen* language model
with a Q-Former, trained in two stages. The miniature copies that:

0. **Vision tower**: a ViT pretrained on generated shapes and scenes (shape and colour per
   image, and dense per-patch labels), then frozen; its outputs are cached once per image.
1. **Language model**: an OPT trained on text alone (captions, and questions with their
   answers after a caption or without one), with random position offsets so that text at
   any position is normal to it. Then frozen. It never sees a query token in training
   (:mod:`lab.language`).
2. **Stage 1, representation learning**: the Q-Former against the frozen tower with BLIP-2's
   image-text contrastive (max over the 32 queries) and image-grounded caption generation
   objectives, on scenes whose captions name every object (:mod:`lab.qformer`).
3. **Stage 2, generative learning**: the Q-Former's outputs go through a linear projection
   as soft prompts to the frozen language model; the Q-Former and the projection learn
   captioning and VQA ("Question: {} Short answer:") with a language-modelling loss.

Nothing here uses a pruning method, a query subset or a loss on the queries' similarity:
the queries differ only as far as the tasks need them to.

Deterministic for a seed and a thread count (seeded shuffles, deterministic algorithms).

    python -m lab.train --out DIR --seed 0 --threads 1
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from catp.reference.data import (
    PROMPT,
    SCENE_SPLITS,
    SCENES_VERSION,
    TASKS,
    SceneObject,
    easy_vqa_split,
    format_prompt,
    generate_shape_scenes,
    scene_caption,
    scenes_with_questions,
)
from catp.training import optimization_step, optimizer_and_schedule, progress
from lab.model import SIZES, TEXT_ARCHES, build_config, build_processor, build_tokenizer

__all__ = [
    "ImageSet",
    "TrainSettings",
    "easy_vqa_image_set",
    "encode_images",
    "object_loss",
    "pixel_values",
    "pool_object_patches",
    "projected_queries",
    "scene_image_set",
    "sincos_position_embeddings",
    "train_reference",
    "vision_data",
]


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (the run is a function of this)."""

    seed: int = 0
    size: str = "reference"
    #: Vision tower, first at a coarse 8 x 8 patch grid (images drawn at 48 px: a tiny ViT
    #: learns shape there in a few hundred steps, and stayed at chance for 300 steps on the
    #: 16 x 16 grid), then at the model's own 96 px: images per phase (half single shapes,
    #: half scenes), epochs, batch, lr.
    vision_coarse_size: int = 48
    vision_coarse_images: int = 32_000
    vision_coarse_batch_size: int = 64
    vision_images: int = 16_000
    vision_epochs: int = 2
    vision_batch_size: int = 32
    vision_lr: float = 1e-3
    #: Also classify every object's shape, colour and size from the mean of its patch tokens
    #: (scenes' questions need each object's shape, which the per-patch labels alone left
    #: hard to read: ``python -m lab.probe linear`` read 0.63 of the leftmost objects' shapes off their patches).
    vision_object_loss: bool = True
    #: Language model on text: sequences, epochs, batch, lr, largest position offset.
    #: (Small batches: reading is a skill learnt in steps, and a step of 32 costs a quarter of 128.)
    text_sequences: int = 64_000
    text_epochs: int = 2
    text_batch_size: int = 32
    text_lr: float = 1e-3
    text_max_offset: int = 40
    #: The language model's architecture (:data:`lab.model.TEXT_ARCHES`).
    text_arch: str = "opt"
    #: Generated single-shape images with captions (stages 1 and 2), beside the scenes.
    shape_images: int = 2000
    #: Stage 1 (ITC + ITG, and ITM with ``stage1_itm``): epochs over the captioned images, batch (images), lr.
    stage1_epochs: int = 2
    stage1_batch_size: int = 64
    stage1_lr: float = 5e-4
    #: Add BLIP-2's third objective, ITM with hard negatives (:mod:`lab.qformer`).
    stage1_itm: bool = True
    #: Stage 2 (captions + VQA through the frozen LM): epochs over the images, batch (images), lr.
    stage2_epochs: int = 5
    stage2_batch_size: int = 32
    stage2_lr: float = 5e-4
    #: The fallback, off by default (for when the floors cannot be met with the LM frozen):
    #: after stage 2, this many more epochs with the language model unfrozen too (always all
    #: 32 queries, never a subset), at ``lm_tune_lr``. 0 keeps the LM frozen as BLIP-2 does;
    #: otherwise the frozen-LM model is kept beside the result (frozen-lm/), bit for bit what
    #: the run with 0 writes.
    lm_tune_epochs: int = 0
    lm_tune_lr: float = 3e-4
    #: Questions per image per stage-2 epoch, at most (easy-VQA has ~10 per image; a fresh draw each epoch).
    stage2_questions_per_image: int = 4
    #: Caps for quick runs and tests (None = everything): images per source, validation questions.
    train_limit: int | None = None
    monitor_limit: int = 2000
    threads: int = 1

    def check(self) -> None:
        """Raise a ``ValueError`` naming the first setting a run cannot use."""
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; choose from {list(SIZES)}")
        if self.text_arch not in TEXT_ARCHES:
            raise ValueError(f"unknown text_arch {self.text_arch!r}; choose from {list(TEXT_ARCHES)}")
        epochs = {name: getattr(self, name) for name in ("vision_epochs", "text_epochs", "stage1_epochs", "stage2_epochs", "lm_tune_epochs")}
        if min(epochs.values()) < 0:
            raise ValueError(f"epochs must be >= 0, got {epochs}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.train_limit is not None and self.train_limit < 1:
            raise ValueError(f"train_limit must be >= 1 (or None for every image), got {self.train_limit}")


@dataclass
class ImageSet:
    """Training images with what is said about them.

    Attributes:
        images: PIL images.
        captions: one caption per image, or ``None`` where there is none (easy-VQA).
        questions: ``(image index, question, answer)`` triples.
    """

    images: list
    captions: list[str | None]
    questions: list[tuple[int, str, str]]

    def __add__(self, other: "ImageSet") -> "ImageSet":
        n = len(self.images)
        return ImageSet(self.images + other.images, self.captions + other.captions, self.questions + [(n + i, q, a) for i, q, a in other.questions])


def easy_vqa_image_set(split: str, limit: int | None) -> ImageSet:
    """easy-VQA's ``split`` (the first ``limit`` images) as an :class:`ImageSet`, without captions."""
    index: dict[int, int] = {}
    images, questions = [], []
    for e in easy_vqa_split(split, image_limit=limit):
        if e.image_id not in index:
            index[e.image_id] = len(images)
            images.append(e.image)
        questions.append((index[e.image_id], e.question, e.answer))
    return ImageSet(images, [None] * len(images), questions)


def scene_image_set(split: str, limit: int | None) -> ImageSet:
    """The scenes of ``split`` (the first ``limit``) as an :class:`ImageSet`, with their captions."""
    seed, count = SCENE_SPLITS[split]
    scenes = scenes_with_questions(count if limit is None else min(count, limit), seed)
    return ImageSet([s.image for s, _ in scenes], [scene_caption(s.objects) for s, _ in scenes], [(i, q, a) for i, (_, pairs) in enumerate(scenes) for q, a in pairs])


def _shape_images(count: int, seed: int, size: int) -> ImageSet:
    """Single generated shapes, captioned like scenes ("large red circle"): extent over half the image is large."""
    out = generate_shape_scenes(count, seed=seed, size=size)
    captions = []
    for s in out:
        bbox = s.shape_map.getbbox() or (0, 0, 0, 0)
        word = "large" if max(bbox[2] - bbox[0], bbox[3] - bbox[1]) > size / 2 else "small"
        o = s.objects[0]
        captions.append(scene_caption([SceneObject(o.shape, o.color, o.x, o.y, word)]))
    return ImageSet([s.image for s in out], captions, [])


# -- shared helpers -------------------------------------------------------------------

def pixel_values(processor, images: list, batch: int = 512):
    """``(N, 3, S, S)`` pixel values through the model's own image processor."""
    import torch

    chunks = [processor.image_processor(images[i : i + batch], return_tensors="pt").pixel_values for i in range(0, len(images), batch)]
    return torch.cat(chunks) if chunks else torch.empty(0)


def _logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"lab.train.{out}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    # Appended: a resumed run keeps the log of the stages it resumes from.
    handler = logging.FileHandler(out / "train.log", mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return log


# -- step 0: the vision tower -----------------------------------------------------------

def vision_data(count: int, seed: int, image_size: int, patch_size: int) -> tuple[list, Any, Any, Any, Any]:
    """``count`` images and labels for the vision pretraining: half single shapes, half scenes.

    Returns ``(images, labels (N, 2), maps (N, 2, P), objects (M, 4), masks (M, P))``:

    * labels are (shape, colour) for single-shape images and ``-100`` ("no label") for scenes;
    * maps are the shape (0 = background) and colour (0 = none) under each patch centre, so
      that the patch tokens learn where each object is;
    * one row of ``objects`` per drawn object: (image index, shape, colour, size), size being
      0 small / 1 large for scene objects and ``-100`` for single shapes (no size word);
      ``masks`` marks the object's patches (the patch centres of its colour, which is unique
      in its image; the patch under its centre when no patch centre falls inside it).
    """
    import random

    import torch

    from catp.reference.data import COLORS, SHAPES, draw_scene

    half = count // 2
    rng = random.Random(seed + 3)
    scenes = generate_shape_scenes(half, seed=seed, size=image_size) + [draw_scene(rng, image_size) for _ in range(count - half)]
    grid = image_size // patch_size
    colors = list(COLORS)
    labels = torch.tensor([
        [SHAPES.index(s.objects[0].shape), colors.index(s.objects[0].color)] if i < half else [-100, -100] for i, s in enumerate(scenes)
    ])
    maps = torch.stack([s.patch_labels(grid) for s in scenes])
    objects = torch.tensor([[i, SHAPES.index(o.shape), colors.index(o.color), o.size == "large" if i >= half else -100]
                            for i, s in enumerate(scenes) for o in s.objects], dtype=torch.long)
    masks = torch.cat([s.object_patches(grid) for s in scenes])
    return [s.image for s in scenes], labels, maps, objects, masks


def sincos_position_embeddings(grid: int, width: int):
    """2D sine-cosine position embeddings ``(1 + grid * grid, width)``, zeros for CLS first.

    Half of the channels encode the row, half the column, each as sines and cosines of
    geometrically spaced frequencies (the fixed embeddings of MAE; here only the start).
    """
    import torch

    if width % 4:
        raise ValueError(f"width must be a multiple of 4, got {width}")
    quarter = width // 4
    frequencies = 1.0 / (10_000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    parts = [f(axis.reshape(-1, 1) * frequencies) for axis in (rows, cols) for f in (torch.sin, torch.cos)]
    return torch.cat([torch.zeros(1, width), torch.cat(parts, dim=1)])


def pretrain_vision(model, processor, settings: TrainSettings, log: logging.Logger, show: bool) -> float:
    """Train ``model.vision_model`` on generated images, coarse grid first; returns the last phase's shape accuracy.

    The coarse phase feeds ``vision_coarse_size`` px images with ``interpolate_pos_encoding``:
    the model's own 16 x 16 position embeddings, resized on the fly, learn too.
    """
    import torch
    from torch import nn

    from catp.reference.data import COLORS, SHAPES

    vision = model.config.vision_config
    heads = nn.Linear(vision.hidden_size, len(SHAPES) + len(COLORS))
    dense_heads = nn.Linear(vision.hidden_size, 1 + len(SHAPES) + 1 + len(COLORS))
    params = list(model.vision_model.parameters()) + list(heads.parameters()) + list(dense_heads.parameters())
    if settings.vision_object_loss:  # built only when used: its init draws from the RNG
        object_heads = nn.Linear(vision.hidden_size, len(SHAPES) + len(COLORS) + 2)
        params += list(object_heads.parameters())
    phases = [
        ("coarse", settings.vision_coarse_size, settings.vision_coarse_images, 1, settings.vision_coarse_batch_size),
        ("full", vision.image_size, settings.vision_images, settings.vision_epochs, settings.vision_batch_size),
    ]
    ce = nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(settings.seed + 2)
    model.vision_model.train()
    accuracy = 0.0
    for phase, (name, image_size, count, epochs, batch_size) in enumerate(phases):
        if count == 0 or epochs == 0:
            continue
        images, labels, maps, objects, masks = vision_data(count, settings.seed + 1 + 10 * phase, image_size, vision.patch_size)
        rows_of = [[] for _ in range(count)]  # image index -> its rows of ``objects``
        for row, image in enumerate(objects[:, 0].tolist()):
            rows_of[image].append(row)
        pixels = processor.image_processor(images, size={"height": image_size, "width": image_size}, return_tensors="pt").pixel_values
        steps = math.ceil(count / batch_size) * epochs
        optimizer, scheduler = optimizer_and_schedule(params, settings.vision_lr, steps, weight_decay=0.05)
        bar = progress(steps, f"vision ({name}, {image_size} px)", show)
        done = 0
        for epoch in range(epochs):
            order = torch.randperm(count, generator=generator)
            correct = seen = 0
            for i in range(0, count, batch_size):
                idx = order[i : i + batch_size]
                out = model.vision_model(pixel_values=pixels[idx], interpolate_pos_encoding=image_size != vision.image_size)
                logits = heads(out.pooler_output)
                shape_logits, target = logits[:, : len(SHAPES)], labels[idx]
                labelled = target[:, 0] >= 0
                loss = ce(shape_logits[labelled], target[labelled, 0]) + ce(logits[labelled, len(SHAPES) :], target[labelled, 1]) if labelled.any() else 0
                patch = dense_heads(out.last_hidden_state[:, 1:])  # (B, P, 4 + 9)
                loss = loss + ce(patch[..., : 1 + len(SHAPES)].flatten(0, 1), maps[idx, 0].flatten()) + ce(patch[..., 1 + len(SHAPES) :].flatten(0, 1), maps[idx, 1].flatten())
                if settings.vision_object_loss:
                    loss = loss + object_loss(object_heads, out.last_hidden_state[:, 1:], idx, rows_of, objects, masks)
                optimization_step(loss, params, optimizer, scheduler)
                correct += int((shape_logits.argmax(-1) == target[:, 0])[labelled].sum())
                seen += int(labelled.sum())
                done += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", shape_acc=f"{correct / max(1, seen):.3f}")
                if done % 100 == 0:
                    log.info("vision %s step %d: loss %.4f, shape accuracy over the last 100 steps %.4f", name, done, loss.item(), correct / max(1, seen))
                    correct = seen = 0
            accuracy = correct / max(1, seen)
        bar.close()
        log.info("vision %s (%d px) done: %d steps", name, image_size, steps)
    return accuracy


def pool_object_patches(patches, masks):
    """The mean patch token of each object: ``patches`` ``(N, P, D)``, ``masks`` ``(N, P)`` bool -> ``(N, D)``."""
    mask = masks.unsqueeze(-1).to(patches.dtype)
    return (patches * mask).sum(1) / mask.sum(1)


def object_loss(head, patches, idx, rows_of: list[list[int]], objects, masks):
    """Shape, colour and size of every object in the batch, read off the mean of its patch tokens.

    ``patches`` is ``(B, P, D)`` for the images ``idx``; ``objects``/``masks`` are
    :func:`vision_data`'s. The per-patch labels alone leave a small object's shape hard to
    read off its patches: it is a property of the whole object, and most patches are background.
    """
    import torch
    from torch.nn.functional import cross_entropy

    from catp.reference.data import SHAPES

    position = torch.tensor([b for b, image in enumerate(idx.tolist()) for _ in rows_of[image]])
    rows = torch.tensor([row for image in idx.tolist() for row in rows_of[image]])
    logits = head(pool_object_patches(patches[position], masks[rows]))
    target = objects[rows]
    loss = cross_entropy(logits[:, : len(SHAPES)], target[:, 1]) + cross_entropy(logits[:, len(SHAPES) : -2], target[:, 2])
    if (target[:, 3] >= 0).any():
        loss = loss + cross_entropy(logits[:, -2:], target[:, 3], ignore_index=-100)
    return loss


def encode_images(model, processor, images: list, batch: int = 256):
    """The frozen vision tower's outputs ``(N, 257, D)`` for ``images``, computed once."""
    import torch

    model.vision_model.eval()
    with torch.no_grad():
        pixels = pixel_values(processor, images)
        return torch.cat([model.vision_model(pixel_values=pixels[i : i + batch]).last_hidden_state for i in range(0, len(images), batch)])


# -- stage 2: generative learning through the frozen language model ---------------------

def projected_queries(model, features):
    """Projected Q-Former outputs ``(B, Q, D_llm)`` for cached vision outputs ``features`` (B, N, D)."""
    import torch

    query = model.qformer(
        query_embeds=model.query_tokens.expand(features.shape[0], -1, -1),
        encoder_hidden_states=features,
        encoder_attention_mask=torch.ones(features.shape[:2], dtype=torch.long),
        return_dict=True,
    ).last_hidden_state
    return model.language_projection(query)


@dataclass
class _Rows:
    """Tokenized language-model rows: ``[BOS] text [EOS]``, right-padded.

    ``ids`` (R, T) long; ``labels`` (R, T) with -100 where no loss is taken; ``image`` (R,)
    the image each row belongs to; ``lengths`` (R,); ``caption`` (R,) bool: a caption row
    (else a question).
    """

    ids: Any
    labels: Any
    image: Any
    lengths: Any
    caption: Any

    def __getitem__(self, rows) -> "_Rows":
        return _Rows(self.ids[rows], self.labels[rows], self.image[rows], self.lengths[rows], self.caption[rows])


def _rows(tokenizer, images: ImageSet, with_captions: bool) -> _Rows:
    """VQA rows (loss on the answer and EOS) and, if asked, caption rows (loss on the caption and EOS)."""
    import torch

    texts, answers, owners = [], [], []
    for index, question, answer in images.questions:
        texts.append(format_prompt(question))
        answers.append(answer)
        owners.append(index)
    if with_captions:
        for index, caption in enumerate(images.captions):
            if caption is not None:
                texts.append("")
                answers.append(caption)
                owners.append(index)
    prompts = tokenizer(texts, add_special_tokens=True)["input_ids"]  # [BOS] prompt
    targets = tokenizer(answers, add_special_tokens=False)["input_ids"]
    rows = [p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, targets)]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, len(prompt) : len(row)] = ids[i, len(prompt) : len(row)]
    caption = torch.arange(len(rows)) >= len(images.questions)
    return _Rows(ids, labels, torch.tensor(owners), torch.tensor([len(r) for r in rows]), caption)


def _soft_prompt_logits(model, queries, ids, lengths):
    """Logits ``(R, Q + T, V)`` of the language model on ``[queries][ids]``.

    Mirrors ``Blip2ForConditionalGeneration.forward`` with the 32 projected query outputs
    ``queries`` (R, Q, D) in front of right-padded text ``ids`` (R, T).
    """
    import torch

    q = queries.shape[1]
    embeds = torch.cat([queries, model.get_input_embeddings()(ids)], dim=1)
    mask = torch.cat([torch.ones(len(ids), q, dtype=torch.long), (torch.arange(ids.shape[1]) < lengths[:, None]).long()], dim=1)
    return model.language_model(inputs_embeds=embeds, attention_mask=mask).logits


def _first_token_accuracy(model, features, rows: _Rows, batch: int = 256) -> float:
    """Share of VQA ``rows`` whose greedy first answer token is right (on cached ``features``)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows.ids), batch):
            ids, labels, lengths = rows.ids[i : i + batch], rows.labels[i : i + batch], rows.lengths[i : i + batch]
            logits = _soft_prompt_logits(model, projected_queries(model, features[rows.image[i : i + batch]]), ids, lengths)
            first = (labels != -100).long().argmax(dim=1)  # position of the first answer token in the text
            # Position Q + t - 1 predicts text token t.
            guess = logits[torch.arange(len(ids)), model.config.num_query_tokens + first - 1].argmax(-1)
            correct += int((guess == ids[torch.arange(len(ids)), first]).sum())
    return correct / max(1, len(rows.ids))


def generative_stage(
    model, features, rows: _Rows, settings: TrainSettings, monitors: dict[str, tuple[Any, _Rows]], log: logging.Logger, show: bool,
    *, epochs: int, lr: float, tune_language_model: bool = False, name: str = "stage 2",
) -> None:
    """Stage 2: the Q-Former, query tokens and projection learn captions and VQA; vision and LM frozen.

    One Q-Former pass per image per step: every row of an image (its questions and its
    caption) reads the same projected queries, always all 32 of them.
    ``tune_language_model=True`` trains the language model too (the fallback of the recipe,
    see :class:`TrainSettings`).
    """
    import random

    import torch

    model.requires_grad_(False)
    params = [model.query_tokens, *model.qformer.parameters(), *model.language_projection.parameters()]
    if tune_language_model:
        params += list(model.language_model.parameters())
    for p in params:
        p.requires_grad_(True)

    n_images = len(features)
    questions = [[] for _ in range(n_images)]
    captions = [[] for _ in range(n_images)]
    for r, (owner, is_caption) in enumerate(zip(rows.image.tolist(), rows.caption.tolist())):
        (captions if is_caption else questions)[owner].append(r)
    draw = random.Random(settings.seed + 9 + 100 * tune_language_model)
    steps_per_epoch = math.ceil(n_images / settings.stage2_batch_size)
    optimizer, scheduler = optimizer_and_schedule(params, lr, steps_per_epoch * epochs)
    generator = torch.Generator().manual_seed(settings.seed + 3 + 100 * tune_language_model)
    bar = progress(steps_per_epoch * epochs, name, show)
    for epoch in range(epochs):
        model.qformer.train()
        model.language_model.train(tune_language_model)  # a frozen LM runs without dropout
        order = torch.randperm(n_images, generator=generator)
        loss_sum = 0.0
        for step, i in enumerate(range(0, n_images, settings.stage2_batch_size)):
            images = order[i : i + settings.stage2_batch_size]
            local = {int(img): j for j, img in enumerate(images)}
            picked = torch.tensor([
                r for img in images.tolist()
                for r in captions[img] + draw.sample(questions[img], min(len(questions[img]), settings.stage2_questions_per_image))
            ])
            length = int(rows.lengths[picked].max())
            queries = projected_queries(model, features[images])
            owners = torch.tensor([local[int(o)] for o in rows.image[picked]])
            ids, labels = rows.ids[picked, :length], rows.labels[picked, :length]
            logits = _soft_prompt_logits(model, queries[owners], ids, rows.lengths[picked])
            q = queries.shape[1]
            # Position q + t - 1 predicts text token t.
            loss = torch.nn.functional.cross_entropy(logits[:, q - 1 : -1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            optimization_step(loss, params, optimizer, scheduler)
            loss_sum += loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / (step + 1):.3f}")
            if step % 100 == 0:
                log.info("%s epoch %d step %d/%d loss %.4f", name, epoch + 1, step, steps_per_epoch, loss_sum / (step + 1))
        held_out = {task: round(_first_token_accuracy(model, f, r), 4) for task, (f, r) in monitors.items()}
        log.info("%s epoch %d/%d done: loss %.4f, validation first-token accuracy %s", name, epoch + 1, epochs, loss_sum / (step + 1), held_out)
        bar.write(f"{name} epoch {epoch + 1}: loss {loss_sum / (step + 1):.4f}, validation {held_out}")
    bar.close()
    model.requires_grad_(False)


# -- the whole recipe -------------------------------------------------------------------

class _Stages:
    """Finished stages saved under ``folder``, so that a killed run resumes where it stopped.

    Each stage starts from its own seed, so a resumed run gives the same weights as an
    uninterrupted one. A stage's file is reused only if the settings it (and every stage
    before it) depends on are unchanged; otherwise it is trained again.
    """

    #: Settings every stage depends on (they fix the data, the vocabulary and the shapes).
    COMMON: tuple[str, ...] = ("seed", "size", "train_limit", "shape_images", "threads")

    def __init__(self, folder: Path, settings: TrainSettings, model, log: logging.Logger) -> None:
        self.folder, self.settings, self.model, self.log = folder, settings, model, log
        folder.mkdir(parents=True, exist_ok=True)

    def _cached(self, name: str, fields: tuple[str, ...], compute) -> dict:
        """The tensors saved as stage ``name`` if its settings are unchanged, else ``compute()``'s, saved.

        ``fields``: prefixes of the settings this stage depends on, its own and those of the
        stages whose results it reads (e.g. ``("vision_", "stage1_")``).
        """
        import json

        from safetensors.torch import load_file, save_file

        stamp = json.dumps({k: v for k, v in asdict(self.settings).items() if k in self.COMMON or k.startswith(fields)}, sort_keys=True)
        path, stamp_path = self.folder / f"{name}.safetensors", self.folder / f"{name}.json"
        if path.is_file() and stamp_path.is_file() and stamp_path.read_text() == stamp:
            self.log.info("%s: resumed from %s", name, path)
            return load_file(path)
        tensors = compute()
        save_file(tensors, str(path))
        stamp_path.write_text(stamp)
        return tensors

    def tensor(self, name: str, fields: tuple[str, ...], compute):
        """``compute()``'s tensor, saved as stage ``name``."""
        return self._cached(name, fields, lambda: {"tensor": compute().contiguous()})["tensor"]

    def run(self, name: str, prefixes: tuple[str, ...], fields: tuple[str, ...], train) -> None:
        """Stage ``name``'s weights (parameters whose names start with ``prefixes``): loaded if saved, else ``train()``-ed and saved."""

        def trained() -> dict:
            train()
            # clone: tied weights share memory, which safetensors refuses
            return {k: v.detach().clone() for k, v in self.model.state_dict().items() if k.startswith(prefixes)}

        unknown = self.model.load_state_dict(self._cached(name, fields, trained), strict=False).unexpected_keys
        if unknown:
            raise RuntimeError(f"stage {name!r} holds unknown weights {unknown[:3]}")


def _vocabulary_texts(train: ImageSet) -> list[str]:
    """Every text the tokenizer must know: the prompt, the questions, answers and captions, and every word of the scenes task."""
    from catp.reference.data import COLORS, EASY_VQA_TEMPLATES, SHAPES, SIZES

    words = [*COLORS, *SHAPES, *(f"{s}s" for s in SHAPES), *SIZES, *(str(i) for i in range(6)), "yes", "no", ","]
    templates = [t.format(c="red", s="circle") for group in EASY_VQA_TEMPLATES.values() for t in group]
    return [PROMPT, " ".join(words), *templates, *(q for _, q, _ in train.questions), *(a for _, _, a in train.questions), *(c for c in train.captions if c)]


def train_reference(out: str | Path, settings: TrainSettings = TrainSettings(), show_progress: bool = True) -> Path:
    """Train the reference model and save it as a Hugging Face checkpoint directory ``out``.

    Returns:
        ``out`` as a ``Path``; it holds config, safetensors, generation config, processor
        and ``train.log``.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration

    from lab.language import pretrain_language_model
    from lab.qformer import pretrain_qformer

    settings.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out)
    log.info("settings %s; scenes version %d", asdict(settings), SCENES_VERSION)
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    size = SIZES[settings.size]

    easy, scenes = easy_vqa_image_set("train", settings.train_limit), scene_image_set("train", settings.train_limit)
    shapes = _shape_images(settings.shape_images if settings.train_limit is None else min(settings.shape_images, settings.train_limit), settings.seed + 5, size.image_size)
    train = easy + scenes + shapes
    tokenizer = build_tokenizer(_vocabulary_texts(train))
    processor = build_processor(tokenizer, size)
    config = build_config(size, tokenizer, text_arch=settings.text_arch)
    config.catp_reference_tasks = list(TASKS)  # read by `catp demo` to pick its questions
    config.catp_scenes_version = SCENES_VERSION
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        # Zeros (the stock init) make all 32 queries identical.
        model.query_tokens.normal_(0.0, 0.02)
        # A 16 x 16 grid learnt from random position embeddings left the ViT at chance on
        # shape after 300 steps: start from 2D sine-cosine positions (as MAE does) instead.
        embeddings = model.vision_model.embeddings.position_embedding
        embeddings.copy_(sincos_position_embeddings(size.image_size // size.patch_size, embeddings.shape[-1])[None])

    stages = _Stages(out / "stages", settings, model, log)  # stage 2 is not saved apart: the checkpoint is its result
    torch.manual_seed(settings.seed + 10)
    stages.run("vision", ("vision_model.",), ("vision_",), lambda: pretrain_vision(model, processor, settings, log, show_progress))
    model.vision_model.requires_grad_(False)
    features = stages.tensor("features", ("vision_",), lambda: encode_images(model, processor, train.images))
    monitor_sets = {"easy-vqa": easy_vqa_image_set("validation", settings.train_limit), "scenes": scene_image_set("validation", settings.train_limit)}
    monitors = {}
    for task, images in monitor_sets.items():
        rows = _rows(tokenizer, images, with_captions=False)
        keep = torch.arange(min(len(rows.ids), settings.monitor_limit))
        monitors[task] = (encode_images(model, processor, images.images), rows[keep])
    log.info("vision tower ready; %d training images, %d questions; %.0fs so far", len(train.images), len(train.questions), time.perf_counter() - started)

    torch.manual_seed(settings.seed + 20)
    stages.run("language", ("language_model.",), ("text_",), lambda: pretrain_language_model(model.language_model, tokenizer, settings, log, show_progress))
    model.language_model.requires_grad_(False)
    log.info("language model pretrained on text; %.0fs so far", time.perf_counter() - started)

    torch.manual_seed(settings.seed + 30)
    captioned = torch.tensor([i for i, c in enumerate(train.captions) if c is not None])
    stages.run("stage1", ("qformer.", "query_tokens"), ("vision_", "stage1_"), lambda: pretrain_qformer(
        model, config, tokenizer, features[captioned], [train.captions[i] for i in captioned.tolist()], settings, log, show_progress))
    log.info("stage 1 done; %.0fs so far", time.perf_counter() - started)

    torch.manual_seed(settings.seed + 40)
    rows = _rows(tokenizer, train, with_captions=True)
    stages.run("stage2", ("qformer.", "query_tokens", "language_projection."), ("vision_", "text_", "stage1_", "stage2_"), lambda: generative_stage(
        model, features, rows, settings, monitors, log, show_progress, epochs=settings.stage2_epochs, lr=settings.stage2_lr))
    log.info("stage 2 done; %.0fs so far", time.perf_counter() - started)
    if settings.lm_tune_epochs > 0:
        _save(model, processor, out / "frozen-lm")
        torch.manual_seed(settings.seed + 50)
        generative_stage(model, features, rows, settings, monitors, log, show_progress, epochs=settings.lm_tune_epochs, lr=settings.lm_tune_lr,
                         tune_language_model=True, name="stage 2, LM unfrozen")
        log.info("stage 2 with the LM unfrozen done; %.0fs so far", time.perf_counter() - started)
    _save(model, processor, out)
    log.info("saved to %s after %.0fs", out, time.perf_counter() - started)
    return out


def _save(model, processor, out: Path) -> None:
    """Save ``model`` (eval mode, greedy generation config) and ``processor`` as a checkpoint directory."""
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=5, do_sample=False, num_beams=1,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def main(argv: list[str] | None = None) -> None:
    """``python -m lab.train``: train the reference model with the recipe's settings and save it."""
    defaults = TrainSettings()
    parser = argparse.ArgumentParser(prog="python -m lab.train", description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory to write the checkpoint (config, safetensors, processor, train.log)")
    parser.add_argument("--seed", type=int, default=defaults.seed, metavar="N", help="the same seed and thread count give the same weights")
    parser.add_argument("--size", default=defaults.size, help=f"model size: {', '.join(SIZES)}")
    parser.add_argument("--train-limit", type=int, default=None, metavar="N", help="use only the first N training images of each source (quick runs)")
    parser.add_argument("--threads", type=int, default=defaults.threads, metavar="N",
                        help="torch threads (1 is faster on a loaded 2-core machine; weights differ across thread counts)")
    parser.add_argument("--lm-tune-epochs", type=int, default=defaults.lm_tune_epochs, metavar="N",
                        help="epochs with the language model unfrozen after stage 2 (the fallback; 0 keeps it frozen as BLIP-2 does)")
    args = parser.parse_args(argv)
    settings = TrainSettings(seed=args.seed, size=args.size, train_limit=args.train_limit, threads=args.threads, lm_tune_epochs=args.lm_tune_epochs)
    try:
        settings.check()
        if args.out.exists() and not args.out.is_dir():
            raise ValueError(f"--out {args.out} exists and is not a directory")
    except ValueError as error:
        # One line, no usage: the arguments parsed, a setting is out of range.
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    path = train_reference(args.out, settings)
    print(f"saved {path} (log: {path / 'train.log'})")


if __name__ == "__main__":
    main()
