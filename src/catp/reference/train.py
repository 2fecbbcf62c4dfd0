"""Train the reference BLIP-2 from scratch on the CPU (SPEC §7's recipe).

1. Pretrain the ViT on generated single-shape images (classify shape and colour).
2. Freeze it and compute its outputs once per VQA image.
3. Train the Q-Former, the projection and the OPT language model on VQA with the prompt
   ``"Question: {} Short answer:"``, the loss on the answer tokens and EOS only.
4. Freeze all but the language model and fine-tune it on random subsets of the query
   tokens (:mod:`catp.reference.reader`), so that it reads a pruned prefix at all.

Deterministic for a seed (single process, fixed thread count, seeded shuffles).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import typer

from catp.reference.data import PROMPT, VQAExample, easy_vqa_split, format_prompt, generate_shape_images
from catp.reference.model import SIZES, build_config, build_processor, build_tokenizer

__all__ = ["TrainSettings", "train_reference", "task_examples", "TASKS"]

#: Tasks the reference model can be trained on, in training-mix order.
TASKS: tuple[str, ...] = ("easy-vqa", "scenes")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that determines a training run (the run is a function of this)."""

    seed: int = 0
    size: str = "reference"
    tasks: tuple[str, ...] = ("easy-vqa",)
    epochs: int = 4
    batch_size: int = 64
    lr: float = 1e-3
    pretrain_images: int = 30_000
    pretrain_epochs: int = 2
    pretrain_batch_size: int = 128
    pretrain_lr: float = 1e-3
    #: Stage 3 (see catp.reference.reader): LLM-only fine-tune on random query subsets.
    reader_epochs: int = 1
    reader_lr: float = 1e-4
    #: Caps for quick runs and tests (None = the whole split).
    train_limit: int | None = None
    monitor_limit: int = 2000
    threads: int = 2


def task_examples(task: str, split: str, limit: int | None = None) -> list[VQAExample]:
    """The VQA examples of ``task`` ("easy-vqa" or "scenes") for ``split`` ("train"/"test")."""
    if task == "easy-vqa":
        return easy_vqa_split(split, limit)
    if task == "scenes":
        from catp.reference.data import scenes_split

        return scenes_split(split, limit)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")


def _pixels(processor, images: list, batch: int = 512):
    """``(N, 3, S, S)`` pixel values through the model's own image processor."""
    import torch

    chunks = [processor.image_processor(images[i : i + batch], return_tensors="pt").pixel_values for i in range(0, len(images), batch)]
    return torch.cat(chunks) if chunks else torch.empty(0)


def _schedule(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _logger(out: Path) -> logging.Logger:
    log = logging.getLogger(f"catp.reference.train.{out}")
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):
        log.removeHandler(handler)
    handler = logging.FileHandler(out / "train.log", mode="w")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    log.addHandler(handler)
    return log


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)


def _pretrain_data(settings: TrainSettings, image_size: int, patch_size: int) -> tuple[list, Any, Any]:
    """Images and labels for the vision pretraining.

    easy-VQA only: ``pretrain_images`` single-shape images; labels ``(N, 2)`` = (shape, colour).
    With ``scenes``: half single-shape images, half scenes, and also dense labels
    ``(N, 2, P)``: the shape (0 = background) and colour (0 = none) under each patch centre,
    so that the patch tokens learn where each object is. ``-100`` marks "no label".
    """
    import random

    import numpy as np
    import torch
    from PIL import Image

    from catp.reference.data import COLORS, SHAPES, draw_scene, generate_shape_images, generate_shape_scenes

    if "scenes" not in settings.tasks:
        samples = generate_shape_images(settings.pretrain_images, seed=settings.seed + 1, size=image_size)
        return [s[0] for s in samples], torch.tensor([[s[1], s[2]] for s in samples]), None
    half = settings.pretrain_images // 2
    rng = random.Random(settings.seed + 4)
    scenes = generate_shape_scenes(half, seed=settings.seed + 1) + [draw_scene(rng, image_size) for _ in range(settings.pretrain_images - half)]
    grid = image_size // patch_size

    def dense(label_map: Image.Image) -> Any:
        # NEAREST down-sampling reads the pixel at each patch centre.
        return torch.from_numpy(np.asarray(label_map.resize((grid, grid), Image.NEAREST), dtype=np.int64).reshape(-1))

    labels = torch.tensor([
        [SHAPES.index(s.objects[0].shape), list(COLORS).index(s.objects[0].color)] if len(s.objects) == 1 else [-100, -100] for s in scenes
    ])
    maps = torch.stack([torch.stack([dense(s.shape_map), dense(s.color_map)]) for s in scenes])
    return [s.image for s in scenes], labels, maps


def pretrain_vision(model, processor, settings: TrainSettings, log: logging.Logger, show: bool) -> float:
    """Train ``model.vision_model`` on generated images; returns the last epoch's shape accuracy (single-shape images)."""
    import torch
    from torch import nn

    from catp.reference.data import COLORS, SHAPES

    vision = model.config.vision_config
    images, labels, maps = _pretrain_data(settings, vision.image_size, vision.patch_size)
    pixels = _pixels(processor, images)
    heads = nn.Linear(vision.hidden_size, len(SHAPES) + len(COLORS))
    dense_heads = nn.Linear(vision.hidden_size, 1 + len(SHAPES) + 1 + len(COLORS)) if maps is not None else None
    params = list(model.vision_model.parameters()) + list(heads.parameters()) + (list(dense_heads.parameters()) if dense_heads else [])
    optimizer = torch.optim.AdamW(params, lr=settings.pretrain_lr, weight_decay=0.05)
    steps_per_epoch = math.ceil(len(images) / settings.pretrain_batch_size)
    total = steps_per_epoch * settings.pretrain_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, max(1, total // 20)))
    generator = torch.Generator().manual_seed(settings.seed + 2)
    model.vision_model.train()
    accuracy = 0.0
    ce = nn.functional.cross_entropy
    bar = _progress(total, "vision pretrain", show)
    for epoch in range(settings.pretrain_epochs):
        order = torch.randperm(len(images), generator=generator)
        correct = seen = 0
        for i in range(0, len(images), settings.pretrain_batch_size):
            idx = order[i : i + settings.pretrain_batch_size]
            out = model.vision_model(pixel_values=pixels[idx])
            logits = heads(out.pooler_output)
            shape_logits, target = logits[:, : len(SHAPES)], labels[idx]
            loss = ce(shape_logits, target[:, 0], ignore_index=-100) + ce(logits[:, len(SHAPES) :], target[:, 1], ignore_index=-100)
            if dense_heads is not None:
                patch = dense_heads(out.last_hidden_state[:, 1:])  # (B, P, 4 + 9)
                loss = loss + ce(patch[..., : 1 + len(SHAPES)].flatten(0, 1), maps[idx, 0].flatten()) + ce(patch[..., 1 + len(SHAPES) :].flatten(0, 1), maps[idx, 1].flatten())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            labelled = target[:, 0] >= 0
            correct += int((shape_logits.argmax(-1) == target[:, 0])[labelled].sum())
            seen += int(labelled.sum())
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", shape_acc=f"{correct / max(1, seen):.3f}")
        accuracy = correct / max(1, seen)
        log.info("vision pretrain epoch %d/%d: loss %.4f, shape accuracy %.4f", epoch + 1, settings.pretrain_epochs, loss.item(), accuracy)
    bar.close()
    return accuracy


@dataclass
class _Encoded:
    """Examples turned into tensors: ``features`` (num_images, N, D) and per-example rows."""

    features: Any
    image_index: Any  # (E,) long
    input_ids: Any  # (E, L) long, right-padded, 32 placeholders first
    labels: Any  # (E, L) long, -100 except answer tokens and EOS
    lengths: Any  # (E,) long
    answer_start: Any  # (E,) long: position of the first answer token


def _encode(model, processor, examples: list[VQAExample], batch: int = 256) -> _Encoded:
    """Run the frozen vision tower once per distinct image and tokenize the examples."""
    import torch

    tokenizer = processor.tokenizer
    q = model.config.num_query_tokens
    images: dict[int, int] = {}
    unique: list = []
    image_index = []
    for example in examples:
        key = id(example.image)
        if key not in images:
            images[key] = len(unique)
            unique.append(example.image)
        image_index.append(images[key])
    model.vision_model.eval()
    with torch.no_grad():
        pixels = _pixels(processor, unique)
        features = torch.cat([model.vision_model(pixel_values=pixels[i : i + batch]).last_hidden_state for i in range(0, len(unique), batch)])
    prompts = tokenizer([format_prompt(e.question) for e in examples], add_special_tokens=True)["input_ids"]
    answers = tokenizer([e.answer for e in examples], add_special_tokens=False)["input_ids"]
    rows = [[model.config.image_token_index] * q + p + a + [tokenizer.eos_token_id] for p, a in zip(prompts, answers)]
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompts)):
        input_ids[i, : len(row)] = torch.tensor(row)
        start = q + len(p)
        labels[i, start : len(row)] = input_ids[i, start : len(row)]
    return _Encoded(
        features=features,
        image_index=torch.tensor(image_index),
        input_ids=input_ids,
        labels=labels,
        lengths=torch.tensor([len(r) for r in rows]),
        answer_start=torch.tensor([q + len(p) for p in prompts]),
    )


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


def _vqa_logits(model, features, input_ids, attention_mask):
    """Logits ``(B, L, V)`` of the stock sub-modules on cached vision outputs ``features`` (B, N, D).

    Mirrors ``Blip2ForConditionalGeneration.forward`` with the placeholders first in every row.
    """
    import torch

    q = model.config.num_query_tokens
    embeds = model.get_input_embeddings()(input_ids[:, q:])
    embeds = torch.cat([projected_queries(model, features), embeds], dim=1)
    return model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).logits


def _first_token_accuracy(model, data: _Encoded, rows, batch: int = 256) -> float:
    """Share of ``rows`` whose greedy first answer token is right (answers are one token + EOS)."""
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(rows), batch):
            idx = rows[i : i + batch]
            length = int(data.lengths[idx].max())
            ids = data.input_ids[idx, :length]
            logits = _vqa_logits(model, data.features[data.image_index[idx]], ids, (ids != -1).long() & (torch.arange(length) < data.lengths[idx, None]).long())
            at = data.answer_start[idx] - 1
            guess = logits[torch.arange(len(idx)), at].argmax(-1)
            correct += int((guess == ids[torch.arange(len(idx)), at + 1]).sum())
    model.train()
    return correct / max(1, len(rows))


def train_reference(out: str | Path, settings: TrainSettings = TrainSettings(), show_progress: bool = True) -> Path:
    """Train the reference model and save it as a Hugging Face checkpoint directory ``out``.

    Returns:
        ``out`` as a ``Path``; it holds config, safetensors, generation config, processor
        and ``train.log``.
    """
    import torch
    from transformers import Blip2ForConditionalGeneration, GenerationConfig

    if settings.size not in SIZES:
        raise ValueError(f"unknown size {settings.size!r}; choose from {list(SIZES)}")
    if settings.epochs < 1 or settings.pretrain_epochs < 0:
        raise ValueError("epochs must be >= 1 and pretrain_epochs >= 0")
    unknown = [t for t in settings.tasks if t not in TASKS]
    if unknown or not settings.tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {settings.tasks}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out)
    log.info("settings %s", asdict(settings))
    started = time.perf_counter()
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)

    train = [e for task in settings.tasks for e in task_examples(task, "train", settings.train_limit)]
    monitor = {task: task_examples(task, "test", settings.monitor_limit) for task in settings.tasks}
    tokenizer = build_tokenizer([PROMPT] + [e.question for e in train] + [e.answer for e in train])
    size = SIZES[settings.size]
    processor = build_processor(tokenizer, size)
    config = build_config(size, tokenizer)
    config.catp_reference_tasks = list(settings.tasks)  # read by `catp demo` to pick its questions
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        # Zeros (the stock init) make all 32 queries identical (SPEC §6).
        model.query_tokens.normal_(0.0, 0.02)
    model.train()

    shape_accuracy = pretrain_vision(model, processor, settings, log, show_progress)
    model.vision_model.requires_grad_(False)
    data = _encode(model, processor, train)
    monitors = {task: _encode(model, processor, examples) for task, examples in monitor.items()}
    log.info("vision pretrained (shape acc %.4f); %d train questions on %d images; %.0fs so far", shape_accuracy, len(train), len(data.features), time.perf_counter() - started)

    params = [p for name, p in model.named_parameters() if not name.startswith("vision_model.")]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.01)
    steps_per_epoch = math.ceil(len(train) / settings.batch_size)
    total = steps_per_epoch * settings.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, total, max(1, total // 20)))
    generator = torch.Generator().manual_seed(settings.seed + 3)
    bar = _progress(total, "vqa", show_progress)
    for epoch in range(settings.epochs):
        order = torch.randperm(len(train), generator=generator)
        correct = seen = 0
        loss_sum = 0.0
        for step, i in enumerate(range(0, len(train), settings.batch_size)):
            idx = order[i : i + settings.batch_size]
            length = int(data.lengths[idx].max())
            ids, labels = data.input_ids[idx, :length], data.labels[idx, :length]
            mask = (torch.arange(length) < data.lengths[idx, None]).long()
            logits = _vqa_logits(model, data.features[data.image_index[idx]], ids, mask)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            at = data.answer_start[idx] - 1
            correct += int((logits[torch.arange(len(idx)), at].argmax(-1) == ids[torch.arange(len(idx)), at + 1]).sum())
            seen += len(idx)
            loss_sum += loss.item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_sum / (step + 1):.3f}", acc=f"{correct / seen:.3f}")
            if step % 100 == 0:
                log.info("epoch %d step %d/%d loss %.4f train acc %.4f", epoch + 1, step, steps_per_epoch, loss_sum / (step + 1), correct / seen)
        held_out = {task: _first_token_accuracy(model, enc, torch.arange(len(enc.input_ids))) for task, enc in monitors.items()}
        log.info("epoch %d/%d done: loss %.4f train acc %.4f, test first-token acc (first %d) %s, %.0fs", epoch + 1, settings.epochs, loss_sum / (step + 1), correct / seen, settings.monitor_limit, held_out, time.perf_counter() - started)
        bar.write(f"epoch {epoch + 1}: loss {loss_sum / (step + 1):.4f}, train acc {correct / seen:.4f}, test acc {held_out}")
    bar.close()
    _reader_stage(model, data, settings, log, show_progress)

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=4, do_sample=False, num_beams=1,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)
    log.info("saved to %s after %.0fs", out, time.perf_counter() - started)
    return out


def _reader_stage(model, data: _Encoded, settings: TrainSettings, log: logging.Logger, show: bool) -> None:
    """Stage 4: the language model learns to read any subset of the query tokens."""
    if settings.reader_epochs < 1:
        return
    import torch

    from catp.reference.reader import finetune_reader

    # Reseed: dropout draws from the global generator, and stage 4 must not depend on
    # how much of it stages 1-3 used (so that --reader-from equals the full run).
    torch.manual_seed(settings.seed + 7)
    model.eval()  # the frozen Q-Former runs without dropout; finetune_reader puts the LLM back in train mode
    model.requires_grad_(False)
    model.language_model.requires_grad_(True)
    bar = _progress(math.ceil(len(data.input_ids) / settings.batch_size) * settings.reader_epochs, "reader", show)
    finetune_reader(model, data, seed=settings.seed, epochs=settings.reader_epochs, lr=settings.reader_lr,
                    batch_size=settings.batch_size, log=log, bar=bar)
    bar.close()


def reader_from_checkpoint(source: str | Path, out: str | Path, settings: TrainSettings = TrainSettings(), show_progress: bool = True) -> Path:
    """Run only stage 4 on a stage-2 checkpoint ``source`` and save the result to ``out``.

    Gives the same weights as a full :func:`train_reference` run with the same settings
    whose stages 1-3 produced ``source`` (stage 4 reads nothing else from the run).
    """
    import shutil

    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = _logger(out)
    log.info("stage 4 only, from %s; settings %s", source, asdict(settings))
    torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    model = Blip2ForConditionalGeneration.from_pretrained(source).eval()
    processor = Blip2Processor.from_pretrained(source)
    train = [e for task in model.config.catp_reference_tasks for e in task_examples(task, "train", settings.train_limit)]
    data = _encode(model, processor, train)
    _reader_stage(model, data, settings, log, show_progress)
    model.eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if Path(source, "train.log").is_file() and Path(source).resolve() != out.resolve():
        shutil.copy(Path(source, "train.log"), out / "train-stages-1-3.log")
    log.info("saved to %s", out)
    return out


def train_reference_command(
    out: Path = typer.Option(..., help="Directory to write the checkpoint (config, safetensors, processor, train.log)."),
    seed: int = typer.Option(0, help="Seed: the same seed gives the same weights."),
    epochs: int = typer.Option(TrainSettings.epochs, help="VQA epochs."),
    tasks: str = typer.Option(",".join(TrainSettings.tasks), help=f"Comma-separated tasks from {', '.join(TASKS)}."),
    size: str = typer.Option(TrainSettings.size, help=f"Model size: {', '.join(SIZES)}."),
    pretrain_images: int = typer.Option(TrainSettings.pretrain_images, help="Generated images for the vision pretraining."),
    train_limit: int = typer.Option(None, help="Use only the first N training questions of each task (quick runs)."),
    reader_epochs: int = typer.Option(TrainSettings.reader_epochs, help="Stage-4 epochs (0 skips it): the LLM learns to read any subset of query tokens."),
    reader_from: Path = typer.Option(None, help="Run only stage 4 on this stage-2 checkpoint (same result as the full run that made it)."),
    threads: int = typer.Option(TrainSettings.threads, help="torch threads (1 is faster on a loaded 2-core machine; weights may differ across thread counts)."),
) -> None:
    """Train the reference BLIP-2 from scratch on the CPU and save it as a Hugging Face checkpoint."""
    settings = TrainSettings(
        seed=seed, epochs=epochs, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()), size=size,
        pretrain_images=pretrain_images, train_limit=train_limit, threads=threads, reader_epochs=reader_epochs,
    )
    path = reader_from_checkpoint(reader_from, out, settings) if reader_from else train_reference(out, settings)
    print(f"saved {path} (log: {path / 'train.log'})")
