"""Data for the reference model: easy-VQA, generated single-shape images for vision
pretraining, and the project's own multi-object ``scenes`` task.

Every generator here is deterministic for its seed and draws with PIL only.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from catp.protocol import PAPER_PROMPT

__all__ = [
    "COLORS",
    "SHAPES",
    "PROMPT",
    "VQAExample",
    "easy_vqa_images",
    "easy_vqa_kind",
    "easy_vqa_split",
    "format_prompt",
    "generate_shape_images",
    "generate_shape_scenes",
    "generate_scenes",
    "draw_scene",
    "scene_questions",
    "scenes_split",
    "scenes_with_questions",
    "scene_caption",
    "SCENES_VERSION",
    "TASKS",
    "task_examples",
]

#: The prompt format the reference model is trained with (the paper's VQA prompt).
PROMPT = PAPER_PROMPT

#: easy-VQA's eight colours (read off its images: pure RGB values).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "teal": (0, 128, 128),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
}
SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle")


def format_prompt(question: str) -> str:
    """The model's text input for ``question`` (``PROMPT`` filled in)."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty string, got {question!r}")
    return PROMPT.format(question.strip())


@dataclass(frozen=True)
class VQAExample:
    """One question about one image.

    Attributes:
        image: an RGB PIL image.
        question: the question, lower case, ending with ``?``.
        answer: a single-word answer.
        image_id: the image's id within its split (several questions share an image).
    """

    image: Image.Image
    question: str
    answer: str
    image_id: int


# -- easy-VQA ------------------------------------------------------------------------

#: easy-VQA has no validation split: its last 400 training images (ids 3600-3999) and their
#: questions are ours, for tuning the recipe; "train" is the rest.
EASY_VQA_VALIDATION_FROM = 3600


def easy_vqa_split(split: str, limit: int | None = None, image_limit: int | None = None) -> list[VQAExample]:
    """easy-VQA questions of ``split`` in the dataset's order.

    "train": the questions on training images 0-3599 (34,687); "validation": those on
    training images 3600-3999 (3,888; carved out for tuning); "test": the test split (9,673).
    Images are opened once and shared by their questions. ``limit`` keeps the first
    ``limit`` questions; ``image_limit`` only those on the first ``image_limit`` images.
    """
    import easy_vqa

    if split not in ("train", "validation", "test"):
        raise ValueError(f"split must be 'train', 'validation' or 'test', got {split!r}")
    if split == "test":
        questions, answers, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
    else:
        questions, answers, image_ids = easy_vqa.get_train_questions()
        paths = easy_vqa.get_train_image_paths()
        keep = [(image_id >= EASY_VQA_VALIDATION_FROM) == (split == "validation") for image_id in image_ids]
        questions, answers, image_ids = ([x for x, k in zip(column, keep) if k] for column in (questions, answers, image_ids))
    if image_limit is not None:
        first = list(dict.fromkeys(image_ids))[:image_limit]
        keep = [image_id in set(first) for image_id in image_ids]
        questions, answers, image_ids = ([x for x, k in zip(column, keep) if k] for column in (questions, answers, image_ids))
    if limit is not None:
        questions, answers, image_ids = questions[:limit], answers[:limit], image_ids[:limit]
    images: dict[int, Image.Image] = {}
    out = []
    for question, answer, image_id in zip(questions, answers, image_ids):
        if image_id not in images:
            with Image.open(paths[image_id]) as im:
                images[image_id] = im.convert("RGB")
        out.append(VQAExample(images[image_id], question, answer, int(image_id)))
    return out


def easy_vqa_images(split: str, limit: int | None = None) -> list[Image.Image]:
    """The distinct images of easy-VQA's ``split``, in the dataset's order (the first ``limit``).

    A test image carries about 10 questions; this gives each image once.
    """
    return list({e.image_id: e.image for e in easy_vqa_split(split, image_limit=limit)}.values())


#: easy-VQA's question templates (read off its training questions): ``{c}`` a colour,
#: ``{s}`` a shape; the "not_" kinds ask with a negation, which flips the yes/no answer.
EASY_VQA_TEMPLATES: dict[str, tuple[str, ...]] = {
    "color": ("what color is the shape?", "what color is the {s}?", "what is the color of the {s}?", "what is the color of the shape?"),
    "shape": ("what shape is in the image?", "what shape does the image contain?", "what shape is present?", "what is the {c} shape?"),
    "has_color": ("is a {c} shape present?", "is there a {c} shape?", "does the image contain a {c} shape?", "is there a {c} shape in the image?"),
    "not_color": ("does the image not contain a {c} shape?", "is there not a {c} shape?", "is there not a {c} shape in the image?", "is no {c} shape present?"),
    "has_shape": ("is there a {s}?", "is a {s} present?", "does the image contain a {s}?", "is there a {s} in the image?"),
    "not_shape": ("is no {s} present?", "is there not a {s}?", "does the image not contain a {s}?", "is there not a {s} in the image?"),
}


#: Each template of :data:`EASY_VQA_TEMPLATES` as a regular expression (a word for ``{c}`` and ``{s}``), with its kind.
_EASY_VQA_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(re.escape(template).replace(re.escape("{c}"), r"\w+").replace(re.escape("{s}"), r"\w+")))
    for kind, templates in EASY_VQA_TEMPLATES.items() for template in templates
)


def easy_vqa_kind(question: str) -> str:
    """The :data:`EASY_VQA_TEMPLATES` kind of an easy-VQA ``question`` ("color", "has_shape", ...).

    Raises ``ValueError`` for a question that no template produces.
    """
    for kind, pattern in _EASY_VQA_PATTERNS:
        if pattern.fullmatch(question):
            return kind
    raise ValueError(f"not an easy-VQA question template: {question!r}")


# -- drawing -------------------------------------------------------------------------

def _background(rng: random.Random) -> tuple[int, int, int]:
    # easy-VQA backgrounds are random light tints.
    return tuple(rng.randint(225, 255) for _ in range(3))  # type: ignore[return-value]


def _shape_outline(shape: str, box: tuple[float, float, float, float], rng: random.Random) -> tuple[str, list]:
    """Geometry of ``shape`` filling roughly the box ``(x0, y0, x1, y1)``: ``(kind, coordinates)``, kind "ellipse", "rectangle" or "polygon"."""
    x0, y0, x1, y1 = box
    if shape == "circle":
        return "ellipse", list(box)
    if shape == "rectangle":
        # Rectangles of varied aspect inside the box.
        w, h = x1 - x0, y1 - y0
        sx, sy = rng.uniform(0.55, 1.0) * w, rng.uniform(0.55, 1.0) * h
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        return "rectangle", [cx - sx / 2, cy - sy / 2, cx + sx / 2, cy + sy / 2]
    if shape == "triangle":
        # Upright, as in easy-VQA, with a varied aspect.
        w = (x1 - x0) * rng.uniform(0.8, 1.0)
        cx = (x0 + x1) / 2
        return "polygon", [(cx, y0), (cx + w / 2, y1), (cx - w / 2, y1)]
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _paint(draw: ImageDraw.ImageDraw, outline: tuple[str, list], fill: int | tuple[int, int, int]) -> None:
    kind, geometry = outline
    if kind == "ellipse":
        draw.ellipse(geometry, fill=fill)
    elif kind == "rectangle":
        draw.rectangle(geometry, fill=fill)
    else:
        draw.polygon(geometry, fill=fill)


def generate_shape_images(n: int, seed: int, size: int = 64) -> list[tuple[Image.Image, int, int]]:
    """``n`` images with one shape each, for pretraining the vision tower.

    Returns:
        a list of ``(image, shape index into SHAPES, colour index into COLORS)``.
    """
    return [(s.image, SHAPES.index(s.objects[0].shape), list(COLORS).index(s.objects[0].color)) for s in generate_shape_scenes(n, seed, size)]


def generate_shape_scenes(n: int, seed: int, size: int = 64) -> list["Scene"]:
    """``n`` easy-VQA-like scenes with one large shape each, with their dense label maps."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    names = list(COLORS)
    out = []
    for _ in range(n):
        canvas = _Canvas(size, rng)
        shape, color = SHAPES[rng.randrange(len(SHAPES))], names[rng.randrange(len(names))]
        extent = rng.uniform(0.25, 0.9) * size
        x0, y0 = rng.uniform(0, size - extent), rng.uniform(0, size - extent)
        out.append(canvas.add(shape, color, (x0, y0, x0 + extent, y0 + extent), rng).finish())
    return out


class _Canvas:
    """An image and its dense shape / colour label maps, drawn together.

    The image is drawn at ``_SUPERSAMPLE`` times the size and reduced, for the soft
    anti-aliased edges of easy-VQA's images.
    """

    def __init__(self, size: int, rng: random.Random) -> None:
        self.size = size
        self.image = Image.new("RGB", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), _background(rng))
        self.shape_map, self.color_map = Image.new("L", (size, size), 0), Image.new("L", (size, size), 0)
        self.objects: list[SceneObject] = []

    def add(self, shape: str, color: str, box: tuple[float, float, float, float], rng: random.Random, size: str = "large") -> "_Canvas":
        kind, geometry = _shape_outline(shape, box, rng)
        big = [tuple(c * _SUPERSAMPLE for c in g) if isinstance(g, tuple) else g * _SUPERSAMPLE for g in geometry]
        _paint(ImageDraw.Draw(self.image), (kind, big), COLORS[color])
        _paint(ImageDraw.Draw(self.shape_map), (kind, geometry), 1 + SHAPES.index(shape))
        _paint(ImageDraw.Draw(self.color_map), (kind, geometry), 1 + list(COLORS).index(color))
        self.objects.append(SceneObject(shape, color, (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, size))
        return self

    def finish(self) -> "Scene":
        image = self.image.resize((self.size, self.size), Image.BOX)
        return Scene(image, tuple(sorted(self.objects, key=lambda o: o.x)), self.shape_map, self.color_map)


_SUPERSAMPLE = 4


# -- scenes: the project's harder task ------------------------------------------------

#: Version of the scenes task (generator, questions and captions). Version 2: 1-5 objects in
#: 5 columns, two sizes, any height, captions; version 1 (catp <= 0.1): 2-4 objects, 4 columns.
SCENES_VERSION = 2
#: Resolution of scene images and the fixed seeds and sizes of the scene splits. "validation"
#: is carved from the training generator's distribution (another seed) for tuning the recipe.
SCENE_SIZE = 96
SCENE_SPLITS: dict[str, tuple[int, int]] = {"train": (10_007, 8000), "validation": (30_011, 500), "test": (20_011, 1000)}  # split -> (seed, scenes)
#: Columns of a scene: its objects sit in distinct columns, so "left of" is always well defined.
COLUMNS = 5
#: Object extent as a share of the column width, per size word.
SIZES: dict[str, tuple[float, float]] = {"small": (0.4, 0.6), "large": (0.8, 1.0)}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: its shape, colour name, size word and centre in pixels."""

    shape: str
    color: str
    x: float
    y: float
    size: str = "large"


@dataclass(frozen=True)
class Scene:
    """A scene image, its objects (sorted left to right) and dense labels.

    Attributes:
        image: ``size x size`` RGB image.
        objects: the objects, sorted by ``x``.
        shape_map: ``size x size`` "L" image: 0 background, ``1 + SHAPES.index(shape)`` inside an object.
        color_map: ``size x size`` "L" image: 0 background, ``1 + list(COLORS).index(color)``.
    """

    image: Image.Image
    objects: tuple[SceneObject, ...]
    shape_map: Image.Image
    color_map: Image.Image

    def patch_labels(self, grid: int) -> torch.Tensor:
        """``(2, grid * grid)`` long tensor: the shape and colour labels at each patch centre."""

        return torch.stack([_at_patch_centres(m, grid) for m in (self.shape_map, self.color_map)])

    def object_patches(self, grid: int) -> torch.Tensor:
        """``(len(objects), grid * grid)`` bool tensor: the patches of each object, left to right.

        An object's patches are those whose centre shows its colour (colours are distinct
        within a scene); an object too small to cover any patch centre gets the patch under its centre.
        """

        colors = _at_patch_centres(self.color_map, grid)
        patch = self.image.width / grid
        masks = torch.stack([colors == 1 + list(COLORS).index(o.color) for o in self.objects])
        for mask, o in zip(masks, self.objects):
            if not mask.any():
                mask[min(grid - 1, int(o.y / patch)) * grid + min(grid - 1, int(o.x / patch))] = True
        return masks


def _at_patch_centres(label_map: Image.Image, grid: int) -> torch.Tensor:
    """``(grid * grid,)`` long tensor: ``label_map``'s value at each patch centre of a ``grid x grid`` patching."""
    # NEAREST down-sampling reads the pixel at each patch centre.
    return torch.from_numpy(np.asarray(label_map.resize((grid, grid), Image.NEAREST), dtype=np.int64).reshape(-1))


def draw_scene(rng: random.Random, size: int = SCENE_SIZE, min_objects: int = 1, max_objects: int = COLUMNS) -> Scene:
    """Draw ``min_objects..max_objects`` shapes of distinct colours in distinct columns.

    Each object is "small" or "large" (:data:`SIZES`, relative to the column width) and
    sits at any height.
    """
    if not 1 <= min_objects <= max_objects <= COLUMNS:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {COLUMNS}, got {min_objects}, {max_objects}")
    canvas = _Canvas(size, rng)
    count = rng.randint(min_objects, max_objects)
    columns = sorted(rng.sample(range(COLUMNS), count))
    color_names = rng.sample(list(COLORS), count)
    column_width = size / COLUMNS
    for column, color in zip(columns, color_names):
        shape = rng.choice(SHAPES)
        size_word = rng.choice(list(SIZES))
        extent = rng.uniform(*SIZES[size_word]) * column_width
        x0 = column * column_width + rng.uniform(0, column_width - extent)
        y0 = rng.uniform(0, size - extent)
        canvas.add(shape, color, (x0, y0, x0 + extent, y0 + extent), rng, size_word)
    return canvas.finish()


def scene_caption(objects: "tuple[SceneObject, ...] | list[SceneObject]") -> str:
    """The caption that names every object, left to right: ``"small red circle , large blue triangle"``."""
    return " , ".join(f"{o.size} {o.color} {o.shape}" for o in objects)


def scene_questions(scene: Scene | tuple[SceneObject, ...], rng: random.Random) -> list[tuple[str, str]]:
    """Up to four ``(question, answer)`` pairs about ``scene``, each needing specific objects.

    * "what color is the {shape}?" about a shape that occurs exactly once;
    * "what shape is left of the {color} object?": the nearest object to its left;
    * "what size is the {color} object?": "small" or "large";
    * "how many {shape}s are there?" answered with a digit ("0" to "5").

    ``scene`` may also be the objects alone (for text-only data).
    """
    objects = scene.objects if isinstance(scene, Scene) else tuple(scene)
    pairs = []
    unique = [s for s in SHAPES if sum(o.shape == s for o in objects) == 1]
    if unique:
        shape = rng.choice(unique)
        pairs.append((f"what color is the {shape}?", next(o.color for o in objects if o.shape == shape)))
    if len(objects) > 1:
        i = rng.randrange(1, len(objects))
        pairs.append((f"what shape is left of the {objects[i].color} object?", objects[i - 1].shape))
    target = rng.choice(objects)
    pairs.append((f"what size is the {target.color} object?", target.size))
    shape = rng.choice(SHAPES)
    pairs.append((f"how many {shape}s are there?", str(sum(o.shape == shape for o in objects))))
    return pairs


def scenes_with_questions(n: int, seed: int, size: int = SCENE_SIZE) -> list[tuple[Scene, list[tuple[str, str]]]]:
    """``n`` generated scenes, each with its ``(question, answer)`` pairs, deterministic for ``seed``."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = draw_scene(rng, size)
        out.append((scene, scene_questions(scene, rng)))
    return out


def generate_scenes(n: int, seed: int, size: int = SCENE_SIZE) -> list[VQAExample]:
    """Questions about ``n`` generated scenes (about 3.7 per scene), deterministic for ``seed``.

    Each scene holds 1-5 shapes (circle, rectangle, triangle) of distinct easy-VQA colours
    and two sizes on a light background; ``image_id`` is the scene's index.
    """
    return [VQAExample(scene.image, q, a, index) for index, (scene, pairs) in enumerate(scenes_with_questions(n, seed, size)) for q, a in pairs]


def scenes_split(split: str, limit: int | None = None) -> list[VQAExample]:
    """The fixed ``"train"`` (8,000 scenes), ``"validation"`` (500) or ``"test"`` (1,000 scenes) split.

    ``limit`` keeps the first ``limit`` questions.
    """
    if split not in SCENE_SPLITS:
        raise ValueError(f"split must be one of {list(SCENE_SPLITS)}, got {split!r}")
    seed, count = SCENE_SPLITS[split]
    if limit is not None:
        count = min(count, limit)  # at least one question per scene: never fewer than needed
    return generate_scenes(count, seed)[:limit]


# -- the tasks -----------------------------------------------------------------------

#: Tasks the reference model answers (``catp eval`` and ``catp demo`` can ask it about them).
TASKS: tuple[str, ...] = ("easy-vqa", "scenes")


def task_examples(task: str, split: str, limit: int | None = None) -> list[VQAExample]:
    """The VQA examples of ``task`` ("easy-vqa" or "scenes") for ``split`` ("train", "validation" or "test")."""
    if task == "easy-vqa":
        return easy_vqa_split(split, limit)
    if task == "scenes":
        return scenes_split(split, limit)
    raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
