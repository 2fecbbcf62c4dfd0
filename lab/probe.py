"""Probes of the reference recipe: short variants of one stage, measured as they train.

Each reads a finished run (the ``--out`` directory of ``python -m lab.train``), trains
nothing that is saved, and prints one line per measurement. docs/reference-model.md has
their results.

* ``stage1``: a fresh stage-1 Q-Former (:mod:`lab.qformer`) on a variant of the
  recipe, against the run's vision tower, with the query diversity of ``catp diagnose``
  every ``--every`` steps on held-out scenes: pairwise and nearest-other-query cosine,
  effective rank, and the map correlation of each cross-attention layer.
* ``reading``: how well the run's language model reads answers off a text description,
  per kind of question (:func:`lab.language.reading_accuracy`).
* ``language``: a fresh language model trained on text as the recipe does, with its
  reading accuracy after every epoch.
* ``recall``: a fresh language model on the smallest binding task of the scenes text
  ("red circle , blue triangle </s> ... what color is the circle?") alone, per architecture,
  or (``--scenes``) on the colour questions of the language model's own scene text.
* ``linear``: how well a linear classifier reads a scene's facts (how many objects; the
  leftmost and rightmost object's colour, shape, size) off the vision tower's outputs and
  off the queries the language model gets: where the scenes answers are lost.
* ``kinds``: per kind of scenes question, on validation scenes, the run's accuracy with the
  image beside its language model's reading of the scene's caption (the same question, the
  description in place of the queries): which of the two limits the answers. With
  ``--task easy-vqa``, the accuracy per easy-VQA question template kind (no captions there).

``RUN`` is a ``python -m lab.train`` output directory (or its ``frozen-lm/``):

    python -m lab.probe stage1 --model RUN --steps 150 --objectives itc,itg,itm
    python -m lab.probe reading --model RUN/frozen-lm
    python -m lab.probe language --model RUN --sequences 32000 --epochs 8
    python -m lab.probe language --model RUN --arch llama
    python -m lab.probe kinds --model RUN --scenes 300
    python -m lab.probe kinds --model RUN --task easy-vqa --scenes 100
    python -m lab.probe recall --model RUN --arch llama
    python -m lab.probe linear --model RUN --scenes 2000
"""

from __future__ import annotations

import argparse
import copy
import math
from dataclasses import asdict, dataclass
from typing import Any

from catp.reference.data import TASKS
from catp.training import optimization_step, optimizer_and_schedule
from lab.language import TEXT_SINGLE_SHARE
from lab.model import TEXT_ARCHES, build_text_config

__all__ = ["ProbeSettings", "fresh_language_model", "linear_accuracy", "probe_kinds", "probe_language", "probe_linear", "probe_recall", "probe_stage1", "recall_rows", "text_rewrite"]

FEATURES = ("vit", "embeddings", "random")


@dataclass(frozen=True)
class ProbeSettings:
    """One variant of stage 1. The defaults are the recipe's (``TrainSettings``)."""

    steps: int = 150
    batch_size: int = 64
    lr: float = 5e-4
    #: Which of BLIP-2's stage-1 objectives to train (any of "itc", "itg", "itm").
    objectives: tuple[str, ...] = ("itc", "itg")
    #: ITG joins at this step (a warm-up on ITC alone before it), with this weight.
    itg_from: int = 0
    itg_weight: float = 1.0
    #: Q-Former depth, dropout, init range; std of the query tokens' init.
    layers: int | None = None
    dropout: float | None = None
    initializer_range: float | None = None
    query_std: float = 0.02
    #: Image features the Q-Former reads: the frozen ViT's outputs (the recipe), its patch
    #: embeddings only (no mixing across patches), or a frozen random patch projection.
    features: str = "vit"
    train_images: int = 8000
    eval_images: int = 200
    every: int = 50
    seed: int = 0

    def check(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"unknown features {self.features!r}; choose from {list(FEATURES)}")
        unknown = set(self.objectives) - {"itc", "itg", "itm"}
        if unknown or not self.objectives:
            raise ValueError(f"objectives must be some of itc, itg, itm, got {list(self.objectives)}")
        if min(self.steps, self.batch_size, self.train_images, self.eval_images, self.every) < 1:
            raise ValueError("steps, batch size, image counts and --every must be >= 1")


def _features(model, processor, images: list, kind: str, seed: int):
    """``(N, 257, D)`` image features of ``kind`` (see :class:`ProbeSettings`)."""
    import torch

    from lab.train import encode_images, pixel_values, sincos_position_embeddings

    if kind == "vit":
        return encode_images(model, processor, images)
    vision = model.vision_model
    patch, width = vision.config.patch_size, vision.config.hidden_size
    grid = vision.config.image_size // patch
    # The random projection and positions are drawn once: every chunk must see the same ones.
    projection = torch.randn(3 * patch * patch, width, generator=torch.Generator().manual_seed(seed)) / math.sqrt(3 * patch * patch)
    positions = sincos_position_embeddings(grid, width)
    out = []
    with torch.no_grad():
        for i in range(0, len(images), 256):
            pixels = pixel_values(processor, images[i : i + 256])
            if kind == "embeddings":
                out.append(vision.post_layernorm(vision.embeddings(pixels)))
                continue
            patches = pixels.unfold(2, patch, patch).unfold(3, patch, patch).permute(0, 2, 3, 1, 4, 5).reshape(len(pixels), grid * grid, -1)
            tokens = patches @ projection
            tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1) + positions
            out.append(torch.nn.functional.layer_norm(tokens, (width,)))
    return torch.cat(out)


def _diversity(graph, query_tokens, features) -> dict[str, Any]:
    """Diagnose figures of the probe's Q-Former on held-out ``features``."""
    import torch

    from catp.evaluation.diagnose import effective_rank, map_correlation, query_cosine

    qformer = graph.qformer
    qformer.eval()
    implementation = qformer.config._attn_implementation
    qformer.config._attn_implementation = "eager"  # attention probabilities are returned by eager only
    with torch.no_grad():
        out = qformer(query_embeds=query_tokens.expand(len(features), -1, -1), encoder_hidden_states=features, output_attentions=True)
    qformer.config._attn_implementation = implementation
    graph.train()
    pairwise, nearest = query_cosine(out.last_hidden_state)
    return {
        "pairwise": round(float(pairwise.mean()), 3),
        "nearest": round(float(nearest.mean()), 3),
        "rank": round(float(effective_rank(out.last_hidden_state).mean()), 2),
        "map_correlation": [round(float(map_correlation(a).mean()), 2) for a in out.cross_attentions if a is not None],
    }


def probe_stage1(model_dir: str, settings: ProbeSettings = ProbeSettings(), report=print) -> list[dict[str, Any]]:
    """Train a fresh stage-1 Q-Former on ``settings`` against ``model_dir``'s vision tower.

    Returns one row per measurement (step 0, then every ``settings.every`` steps): the
    mean ITC and ITG since the last row and the :func:`_diversity` figures. ``report``
    gets each row as it is made.
    """
    import torch

    from catp.reference import load
    from lab.qformer import Stage1QFormer, caption_batches
    from lab.train import scene_image_set

    settings.check()
    torch.manual_seed(settings.seed)
    model, processor = load(model_dir)
    train, held_out = scene_image_set("train", settings.train_images), scene_image_set("validation", settings.eval_images)
    features = _features(model, processor, train.images, settings.features, settings.seed)
    held_out_features = _features(model, processor, held_out.images, settings.features, settings.seed)
    graph = Stage1QFormer(model.config, len(processor.tokenizer), settings.layers, settings.dropout, settings.initializer_range,
                          itm="itm" in settings.objectives)
    query_tokens = torch.nn.Parameter(torch.randn(1, model.config.num_query_tokens, graph.qformer.config.hidden_size) * settings.query_std)
    params = [query_tokens, *graph.parameters()]
    ids, mask, caption_ids = caption_batches(processor.tokenizer, train.captions)
    optimizer, scheduler = optimizer_and_schedule(params, settings.lr, settings.steps)
    names = ("itc", "itg", "itm")
    rows = [{"step": 0, **dict.fromkeys(names), **_diversity(graph, query_tokens, held_out_features)}]
    report(rows[-1])
    sums, n = dict.fromkeys(names, 0.0), len(train.captions)
    graph.train()
    for step in range(settings.steps):
        idx = torch.arange(step * settings.batch_size, (step + 1) * settings.batch_size) % n
        width = int(mask[idx].sum(1).max())
        use_itg = "itg" in settings.objectives and step >= settings.itg_from
        losses = graph.losses(query_tokens, ids[idx, :width], mask[idx, :width], features[idx], caption_ids[idx],
                              itc="itc" in settings.objectives, itg=use_itg, itm="itm" in settings.objectives)
        loss = sum(settings.itg_weight * value if name == "itg" else value for name, value in losses.items())
        optimization_step(loss, params, optimizer, scheduler)
        for name, value in losses.items():
            sums[name] += value.item()
        if (step + 1) % settings.every == 0 or step + 1 == settings.steps:
            count = (step + 1) - rows[-1]["step"]
            rows.append({"step": step + 1, **{name: round(sums[name] / count, 3) for name in names}, **_diversity(graph, query_tokens, held_out_features)})
            report(rows[-1])
            sums = dict.fromkeys(names, 0.0)
    return rows


def probe_language(
    model_dir: str, sequences: int, epochs: int, lr: float, seed: int = 0, max_offset: int = 40, dropout: float | None = None, layers: int | None = None,
    arch: str = "opt", single_share: float = TEXT_SINGLE_SHARE, plural_color_questions: bool = False, shape_first: bool = False, report=print,
) -> dict[str, float]:
    """Train a fresh language model like the recipe's (``pretrain_language_model``) and return its reading accuracy.

    ``max_offset`` is the largest random position offset; ``dropout`` and ``layers``
    override the LM config's. ``arch="llama"`` trains a LLaMA of the same width, depth and
    heads instead of the OPT (rotary positions instead of learnt ones; a gated MLP of
    3 x width x ``3 * width`` weights, close to OPT's 2 x width x ``4 * width``). ``report``
    gets the per-epoch log lines (loss, reading accuracy per kind of question).
    ``single_share`` changes the share of one-object rows in the text (the recipe's by default);
    the held-out texts stay the recipe's. ``plural_color_questions`` asks "what color is the
    {shape}s?" instead of "what color is the {shape}?" in training and held-out texts alike, so
    that the question's shape word is one the description never contains (as in "how many
    {shape}s"): a test of whether the repeated word is what the model cannot resolve.
    ``shape_first`` writes each object of a description as "shape colour size" instead of
    "size colour shape", so that the colour asked about a shape follows it.
    """
    import logging

    import torch

    from catp.reference import load
    from lab.language import pretrain_language_model, reading_accuracy
    from lab.train import TrainSettings

    model, processor = load(model_dir)
    torch.manual_seed(seed)
    lm = fresh_language_model(model.language_model.config, arch, dropout=dropout, layers=layers)
    log = logging.getLogger("lab.probe")
    log.propagate = False
    handler = logging.Handler()
    handler.emit = lambda record: report(record.getMessage())
    log.handlers = [handler]
    log.setLevel(logging.INFO)
    settings = TrainSettings(seed=seed, text_sequences=sequences, text_epochs=epochs, text_lr=lr, text_max_offset=max_offset)
    rewrite = text_rewrite(plural_color_questions, shape_first)
    pretrain_language_model(lm, processor.tokenizer, settings, log, show=False, single_share=single_share, rewrite=rewrite)
    return reading_accuracy(lm, processor.tokenizer, seed + 11, rewrite=rewrite)


#: The recipe's language models (:data:`lab.model.TEXT_ARCHES`), and OPT with a GELU feed-forward.
ARCHES: tuple[str, ...] = (*TEXT_ARCHES, "opt-gelu")


def fresh_language_model(config, arch: str = "opt", dropout: float | None = None, layers: int | None = None):
    """A freshly initialised causal LM of ``config``'s (an ``OPTConfig``) width, depth and heads.

    ``arch``: "opt" (the recipe's: learnt positions, ReLU), "opt-gelu" (the same with a GELU
    feed-forward) or "llama" (:func:`lab.model.build_text_config`). ``layers``
    overrides the config's depth, ``dropout`` its dropout (OPT only: LLaMA has none).
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHES:
        raise ValueError(f"unknown arch {arch!r}; choose from {list(ARCHES)}")
    if arch == "llama":
        depth = config.num_hidden_layers if layers is None else layers
        text = build_text_config("llama", config.vocab_size, config.hidden_size, depth, config.num_attention_heads,
                                 config.bos_token_id, config.eos_token_id, config.pad_token_id)
        return AutoModelForCausalLM.from_config(text)
    text = copy.deepcopy(config)
    if dropout is not None:
        text.dropout = dropout
    if layers is not None:
        text.num_hidden_layers = layers
    if arch == "opt-gelu":
        text.activation_function = "gelu"
    return AutoModelForCausalLM.from_config(text)


def recall_rows(tokenizer, count: int, objects: int, prompt: bool, seed: int, scenes: bool = False) -> tuple[Any, Any, Any]:
    """``(ids (count, T), attention mask (count, T), answers (count,))`` of a binding task of the scenes text.

    Each row describes ``objects`` objects of distinct colours and shapes ("red circle ,
    blue triangle"), then ``</s>``, then asks one shape's colour: with the paper's prompt
    ("Question: what color is the circle? Short answer:") or, with ``prompt=False``, the shape
    word alone; the answer is the colour's token. ``scenes=True`` takes the rows instead from
    the language model's own text (:func:`lab.language.text_corpus`): its scene
    descriptions (1-5 objects with sizes, shapes may repeat) with "what color is the {shape}?"
    (``objects`` and ``prompt`` do not apply). Rows are padded on the left.
    """
    import random

    import torch

    from catp.reference.data import COLORS, SHAPES, format_prompt

    if not 2 <= objects <= len(SHAPES):
        raise ValueError(f"objects must be in 2..{len(SHAPES)}, got {objects}")
    rng = random.Random(seed)
    words = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    triples = []
    if scenes:
        from lab.language import text_corpus

        while len(triples) < count:
            triples += [(c, format_prompt(q), a) for c, q, a in text_corpus(4 * count, rng.randrange(2**31), single_share=0.0)
                        if q.startswith("what color is the") and "," in c][: count - len(triples)]
    for _ in range(count - len(triples)):
        shapes, colors = rng.sample(SHAPES, objects), rng.sample(list(COLORS), objects)
        asked = rng.randrange(objects)
        caption = " , ".join(f"{c} {s}" for c, s in zip(colors, shapes))
        triples.append((caption, format_prompt(f"what color is the {shapes[asked]}?") if prompt else shapes[asked], colors[asked]))
    rows = [[*words(caption), tokenizer.bos_token_id, *words(question)] for caption, question, _ in triples]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, torch.tensor([words(answer)[0] for _, _, answer in triples])


def probe_recall(model_dir: str, arch: str = "opt", steps: int = 2000, objects: int = 2, prompt: bool = True, lr: float = 1e-3,
                 batch_size: int = 32, every: int = 250, seed: int = 0, scenes: bool = False, decay: bool = False, report=print) -> list[dict[str, Any]]:
    """Train a fresh LM (:func:`fresh_language_model`, no dropout) on :func:`recall_rows` alone.

    The scenes question "what color is the {shape}?" needs this one skill: find the shape
    in the description and read the word bound to it. Constant ``lr`` (AdamW, no weight
    decay), fresh rows every step, loss on the answer only; ``decay=True`` trains as the
    recipe's text stage does instead (warm-up and cosine decay, weight decay 0.01, clipping).
    Returns one row per ``every`` steps: the mean loss since the last row and the accuracy on
    500 held-out rows (chance: ``1 / objects``; about 0.3 with ``scenes``). ``report`` gets
    each row as it is made.
    """
    import torch

    from catp.reference import load

    if min(steps, batch_size, every) < 1:
        raise ValueError("steps, batch size and every must be >= 1")
    model, processor = load(model_dir)
    torch.manual_seed(seed)
    lm = fresh_language_model(model.language_model.config, arch, dropout=0.0)
    tokenizer = processor.tokenizer
    held_ids, held_mask, held_answers = recall_rows(tokenizer, 500, objects, prompt, seed + 1, scenes)
    train_ids, train_mask, train_answers = recall_rows(tokenizer, steps * batch_size, objects, prompt, seed + 2, scenes)
    params = list(lm.parameters())
    if decay:
        optimizer, scheduler = optimizer_and_schedule(params, lr, steps)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    max_norm = 1.0 if decay else math.inf  # no clipping: a clip coefficient of 1 leaves the gradients as they are
    rows, total = [], 0.0
    lm.train()
    for step in range(steps):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        logits = lm(input_ids=train_ids[batch], attention_mask=train_mask[batch]).logits[:, -1]
        loss = torch.nn.functional.cross_entropy(logits, train_answers[batch])
        optimization_step(loss, params, optimizer, scheduler, max_norm)
        total += loss.item()
        if (step + 1) % every == 0 or step + 1 == steps:
            lm.eval()
            with torch.no_grad():
                accuracy = float((lm(input_ids=held_ids, attention_mask=held_mask).logits[:, -1].argmax(-1) == held_answers).float().mean())
            lm.train()
            count = (step + 1) - (rows[-1]["step"] if rows else 0)
            rows.append({"step": step + 1, "loss": round(total / count, 3), "accuracy": round(accuracy, 3)})
            report(rows[-1])
            total = 0.0
    return rows


def text_rewrite(plural_color_questions: bool = False, shape_first: bool = False):
    """The :data:`lab.language.Rewrite` of :func:`probe_language`'s two text variants, or ``None`` for neither."""
    if not (plural_color_questions or shape_first):
        return None

    def rewrite(caption: str, question: str) -> tuple[str, str]:
        if shape_first:  # "small red circle , large blue triangle" -> "circle red small , triangle blue large"
            caption = " , ".join(" ".join(reversed(item.split())) for item in caption.split(" , "))
        return caption, _plural_color_question(question) if plural_color_questions else question

    return rewrite


def _plural_color_question(question: str) -> str:
    """``"what color is the circle?"`` -> ``"what color is the circles?"``; other questions unchanged."""
    from catp.reference.data import SHAPES

    for shape in SHAPES:
        if question == f"what color is the {shape}?":
            return f"what color is the {shape}s?"
    return question


def probe_kinds(model_dir: str | None, scenes: int = 300, task: str = "scenes") -> dict[str, dict[str, float | None]]:
    """Per kind of question on the first ``scenes`` validation images of ``task``: image against caption.

    Returns ``{kind: {"image": ..., "caption": ..., "questions": n}}`` plus ``"all"``, where
    ``image`` is the greedy answer's exact match (the floors' measure) with the image, and
    ``caption`` the share where the language model alone, given the scene's caption in
    place of the queries, reads the answer's first token
    (:func:`lab.language.reads_answer`). On scenes, ``kind`` is the question's
    first two words; on easy-VQA (``task="easy-vqa"``), its template's kind
    (:func:`catp.reference.data.easy_vqa_kind`), and ``caption`` is ``None``: easy-VQA has no captions.
    """
    from catp.reference import load
    from catp.reference.data import SCENE_SPLITS, VQAExample, easy_vqa_kind, easy_vqa_split, scene_caption, scenes_with_questions
    from catp.reference.evaluate import answer
    from lab.language import reads_answer

    if scenes < 1:
        raise ValueError(f"scenes must be >= 1, got {scenes}")
    if task not in TASKS:
        raise ValueError(f"task must be 'scenes' or 'easy-vqa', got {task!r}")
    model, processor = load(model_dir)
    rows: list[tuple[VQAExample, str | None, str]]
    if task == "scenes":
        seed, _ = SCENE_SPLITS["validation"]
        rows = [(VQAExample(scene.image, q, a, i), scene_caption(scene.objects), " ".join(q.split()[:2]))
                for i, (scene, pairs) in enumerate(scenes_with_questions(scenes, seed)) for q, a in pairs]
    else:
        rows = [(example, None, easy_vqa_kind(example.question)) for example in easy_vqa_split("validation", image_limit=scenes)]
    predictions = answer(model, processor, [example for example, _, _ in rows])
    tallies: dict[str, list[int]] = {}
    for (example, caption, kind), prediction in zip(rows, predictions):
        read = caption is not None and reads_answer(model.language_model, processor.tokenizer, caption, example.question, example.answer)
        for key in ("all", kind):
            tally = tallies.setdefault(key, [0, 0, 0])
            tally[0] += prediction == example.answer
            tally[1] += read
            tally[2] += 1
    return {kind: {"image": image / n, "caption": caption / n if task == "scenes" else None, "questions": n}
            for kind, (image, caption, n) in sorted(tallies.items())}


#: What :func:`probe_linear` asks of a scene: the scenes questions' facts, by object position.
LINEAR_TARGETS = ("how many", "leftmost color", "leftmost shape", "leftmost size", "rightmost color", "rightmost shape")


def _linear_target(scene, target: str) -> int:
    from catp.reference.data import COLORS, SHAPES, SIZES

    if target == "how many":
        return len(scene.objects) - 1
    position, fact = target.split()
    obj = scene.objects[0 if position == "leftmost" else -1]
    return {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}[fact].index(getattr(obj, fact))


def linear_accuracy(train_x, train_y, test_x, test_y, classes: int, steps: int = 100, l2: float = 1e-3) -> float:
    """Held-out accuracy of a multinomial logistic regression (L-BFGS, L2 ``l2``) on standardised features.

    Args:
        train_x: ``(N, F)`` features; ``train_y``: ``(N,)`` class indices below ``classes``.
        test_x, test_y: the same for the held-out rows.
    """
    import torch

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    weight = torch.zeros(train_x.shape[1], classes, requires_grad=True)
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(train_x @ weight + bias, train_y) + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return ((test_x @ weight + bias).argmax(-1) == test_y).float().mean().item()


def probe_linear(model_dir: str | None, scenes: int = 2000, held_out: int = 500) -> dict[str, dict[str, float]]:
    """How well a linear classifier reads each fact of a scene off the vision tower and off the queries.

    Fits :func:`linear_accuracy` on ``scenes`` training scenes and scores it on the first
    ``held_out`` validation scenes, per :data:`LINEAR_TARGETS`, from these features:

    * ``vision``: the vision tower's outputs (``(257 * D)``, flattened);
    * ``object patches``: for a fact about one object, the vision tower's patch outputs
      averaged over that object's patches (:meth:`catp.reference.data.Scene.object_patches`),
      what the tower offers a query that attends to the object (absent for "how many");
    * ``queries``: the Q-Former's 32 outputs as the language model gets them
      (:func:`lab.train.projected_queries`, flattened), and ``mean query``.

    Returns ``{target: {feature: accuracy, ..., "chance": ...}}``, where ``chance`` is the
    held-out share of the most common training class.
    """
    import torch

    from catp.reference import load
    from catp.reference.data import SCENE_SPLITS, scenes_with_questions
    from lab.train import encode_images, pool_object_patches, projected_queries

    if scenes < 1 or held_out < 1:
        raise ValueError(f"scenes and held_out must be >= 1, got {scenes} and {held_out}")
    model, processor = load(model_dir)
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    splits = {name: [scene for scene, _ in scenes_with_questions(n, SCENE_SPLITS[name][0])]
              for name, n in (("train", scenes), ("validation", held_out))}
    features: dict[str, dict[str, torch.Tensor]] = {}
    with torch.no_grad():
        for name, split in splits.items():
            vision = encode_images(model, processor, [scene.image for scene in split])
            queries = torch.cat([projected_queries(model, vision[i : i + 256]) for i in range(0, len(vision), 256)])
            features[name] = {"vision": vision.flatten(1), "queries": queries.flatten(1), "mean query": queries.mean(1)}
            objects = [scene.object_patches(grid) for scene in split]
            for position, index in (("leftmost", 0), ("rightmost", -1)):
                masks = torch.stack([patches[index] for patches in objects])  # (N, P)
                features[name][f"{position} object patches"] = pool_object_patches(vision[:, 1:], masks)
    out: dict[str, dict[str, float]] = {}
    for target in LINEAR_TARGETS:
        labels = {name: torch.tensor([_linear_target(scene, target) for scene in split]) for name, split in splits.items()}
        classes = int(max(labels["train"].max(), labels["validation"].max())) + 1
        kinds = {"vision": "vision", "queries": "queries", "mean query": "mean query"}
        if target != "how many":
            kinds["object patches"] = f"{target.split()[0]} object patches"
        row = {kind: linear_accuracy(features["train"][key], labels["train"], features["validation"][key], labels["validation"], classes)
               for kind, key in kinds.items()}
        row["chance"] = (labels["validation"] == labels["train"].bincount(minlength=classes).argmax()).float().mean().item()
        out[target] = row
    return out


def main(argv: list[str] | None = None) -> None:
    from lab.train import TrainSettings

    parser = argparse.ArgumentParser(prog="python -m lab.probe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    stage1 = commands.add_parser("stage1", help="a short stage 1 variant, with the queries' diversity as it trains")
    reading = commands.add_parser("reading", help="the run's language model: answers read off a text description, per question kind")
    language = commands.add_parser("language", help="a fresh language model trained on text; reading accuracy per epoch")
    kinds = commands.add_parser("kinds", help="per scenes question kind: the run with the image against its LM reading the caption")
    linear = commands.add_parser("linear", help="linear probes of scene facts on the vision tower and on the queries")
    linear.add_argument("--scenes", type=int, default=2000, help="training scenes to fit on")
    linear.add_argument("--held-out", type=int, default=500, help="validation scenes to score on")
    recall = commands.add_parser("recall", help="a fresh LM on the one skill 'what color is the {shape}' needs; accuracy as it trains")
    recall.add_argument("--arch", choices=ARCHES, default="opt", help="the LM's architecture")
    recall.add_argument("--steps", type=int, default=2000)
    recall.add_argument("--objects", type=int, default=2, help="objects per description (2 or 3)")
    recall.add_argument("--no-prompt", action="store_true", help="ask with the shape word alone instead of the paper's prompt")
    recall.add_argument("--lr", type=float, default=1e-3)
    recall.add_argument("--seed", type=int, default=0)
    recall.add_argument("--scenes", action="store_true", help="the LM text's own scene descriptions and colour questions instead")
    recall.add_argument("--decay", action="store_true", help="the recipe's schedule (warm-up, cosine decay, weight decay, clipping)")
    kinds.add_argument("--scenes", type=int, default=300, help="validation images (a scene has about 3.6 questions, an easy-VQA image about 9.7)")
    kinds.add_argument("--task", choices=TASKS, default="scenes")
    for command in (stage1, reading, language, kinds, recall, linear):
        command.add_argument("--model", required=True, help="a python -m lab.train output directory")
        command.add_argument("--threads", type=int, default=1)
    defaults = ProbeSettings()
    for field, value in asdict(defaults).items():
        if field == "objectives":
            stage1.add_argument("--objectives", default="itc,itg", help="comma-separated, any of itc, itg, itm")
        else:
            kind = type(value) if value is not None else (int if field == "layers" else float)
            stage1.add_argument(f"--{field.replace('_', '-')}", type=kind, default=value)
    recipe = TrainSettings()
    language.add_argument("--sequences", type=int, default=recipe.text_sequences)
    language.add_argument("--epochs", type=int, default=recipe.text_epochs)
    language.add_argument("--lr", type=float, default=recipe.text_lr)
    language.add_argument("--seed", type=int, default=0)
    language.add_argument("--max-offset", type=int, default=recipe.text_max_offset, help="largest random position offset")
    language.add_argument("--dropout", type=float, default=None, help="override the LM's dropout")
    language.add_argument("--layers", type=int, default=None, help="override the LM's depth")
    language.add_argument("--single-share", type=float, default=TEXT_SINGLE_SHARE, help="share of one-object rows in the text")
    language.add_argument("--plural-color-questions", action="store_true",
                          help='ask "what color is the {shape}s?": a shape word the description never contains')
    language.add_argument("--shape-first", action="store_true", help='describe each object as "shape colour size"')
    language.add_argument("--arch", choices=ARCHES, default="opt", help="the LM's architecture (llama: rotary positions)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.command == "reading":
        from catp.reference import load
        from lab.language import reading_accuracy

        model, processor = load(args.model)
        for kind, value in reading_accuracy(model.language_model, processor.tokenizer, seed=11).items():
            print(f"{kind}: {value:.3f}")
        return
    if args.command == "kinds":
        for kind, row in probe_kinds(args.model, args.scenes, args.task).items():
            caption = "" if row["caption"] is None else f", caption {row['caption']:.3f}"
            print(f"{kind}: image {row['image']:.3f}{caption} ({row['questions']} questions)")
        return
    if args.command == "linear":
        try:
            rows = probe_linear(args.model, args.scenes, args.held_out)
        except ValueError as error:
            parser.error(str(error))
        for target, row in rows.items():
            print(f"{target}: " + ", ".join(f"{kind} {value:.3f}" for kind, value in row.items()), flush=True)
        return
    if args.command == "recall":
        try:
            probe_recall(args.model, args.arch, args.steps, args.objects, not args.no_prompt, args.lr, seed=args.seed, scenes=args.scenes, decay=args.decay, report=lambda row: print(row, flush=True))
        except ValueError as error:
            parser.error(str(error))
        return
    if args.command == "language":
        probe_language(args.model, args.sequences, args.epochs, args.lr, seed=args.seed, max_offset=args.max_offset, dropout=args.dropout,
                       layers=args.layers, arch=args.arch, single_share=args.single_share,
                       plural_color_questions=args.plural_color_questions, shape_first=args.shape_first,
                       report=lambda line: print(line, flush=True))
        return
    values = {f: getattr(args, f) for f in asdict(defaults)}
    values["objectives"] = tuple(o.strip() for o in args.objectives.split(",") if o.strip())
    settings = ProbeSettings(**values)
    try:
        settings.check()
    except ValueError as error:
        parser.error(str(error))
    print(f"probe {settings}", flush=True)
    probe_stage1(args.model, settings, report=lambda row: print(row, flush=True))


if __name__ == "__main__":
    main()
