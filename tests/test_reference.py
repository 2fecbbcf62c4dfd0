"""The embedded reference model: shipped checkpoint, processor, answers, data.

The recipe that trains it and its probes are tested in ``lab/tests``.
"""

from __future__ import annotations

import pytest
import torch

import catp
from catp.reference import load, reference_model_path
from catp.reference.data import SHAPES, easy_vqa_split, format_prompt, generate_scenes, scenes_split
from catp.reference.evaluate import answer, exact_match


@pytest.fixture(scope="module")
def reference():
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    path = catp.reference_model_path()
    return Blip2ForConditionalGeneration.from_pretrained(path).eval(), Blip2Processor.from_pretrained(path)


def test_reference_path_is_a_checkpoint_dir():
    path = reference_model_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert sum(f.stat().st_size for f in path.iterdir()) <= 25 * 2**20


def test_processor_inserts_32_placeholders(reference):
    model, processor = reference
    example = easy_vqa_split("test", 1)[0]
    inputs = processor(images=example.image, text=format_prompt(example.question), return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert model.config.num_query_tokens == 32
    assert int((ids == model.config.image_token_index).sum()) == 32
    assert (ids[:32] == model.config.image_token_index).all()
    assert inputs["pixel_values"].shape[-2:] == (model.config.vision_config.image_size,) * 2


def test_plain_generate_answers_easy_vqa_with_words(reference):
    model, processor = reference
    examples = easy_vqa_split("test", 24)
    inputs = processor(images=[e.image for e in examples], text=[format_prompt(e.question) for e in examples], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3)
    # Stock layout: the caller's prompt, then the new tokens.
    assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
    predictions = [p.strip() for p in processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)]
    assert all(p.isalpha() for p in predictions), predictions
    assert exact_match(predictions, examples) >= 22 / 24, list(zip(predictions, [e.answer for e in examples]))


def test_load_defaults_to_reference_and_rejects_bad_input(reference):
    model, processor = load()
    assert type(model).__name__ == "Blip2ForConditionalGeneration" and not model.training
    assert processor.num_query_tokens == 32
    with pytest.raises(TypeError):
        load(3)


def test_pruned_answers_run_on_reference(reference):
    model, processor = reference
    examples = easy_vqa_split("test", 8)
    sessions: list = []
    predictions = answer(model, processor, examples, "catp", 4, sessions=sessions)
    assert len(predictions) == 8 and sessions[0].shape == (8, 4)


def test_scene_object_patches_follow_the_objects_left_to_right():
    import random

    from catp.reference.data import draw_scene

    rng = random.Random(5)
    for _ in range(20):
        scene = draw_scene(rng, 96)
        masks = scene.object_patches(16)
        assert masks.shape == (len(scene.objects), 256) and masks.any(1).all()
        assert not (masks.sum(0) > 1).any()  # no patch belongs to two objects
        columns = [torch.nonzero(m).squeeze(1).remainder(16).float().mean().item() for m in masks]
        assert columns == sorted(columns)
        for mask, obj in zip(masks, scene.objects):  # each mask sits around its object's centre
            rows, cols = torch.nonzero(mask.view(16, 16), as_tuple=True)
            assert abs(cols.float().mean().item() * 6 + 3 - obj.x) < 7 and abs(rows.float().mean().item() * 6 + 3 - obj.y) < 7


def test_scenes_are_deterministic_and_consistent():
    a, b, c = generate_scenes(20, seed=3), generate_scenes(20, seed=3), generate_scenes(20, seed=4)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert [(e.question, e.answer) for e in a] != [(e.question, e.answer) for e in c]
    kinds = {e.question.split()[1] for e in a}
    assert kinds == {"color", "shape", "size", "many"}
    for e in a:
        if e.question.startswith("how many"):
            assert e.answer in {"0", "1", "2", "3", "4", "5"}
        if e.question.startswith("what shape"):
            assert e.answer in SHAPES
        if e.question.startswith("what size"):
            assert e.answer in {"small", "large"}
    test = scenes_split("test", 30)
    assert len(test) == 30 and test[0].image.size == (96, 96)
    with pytest.raises(ValueError):
        generate_scenes(-1, seed=0)
    with pytest.raises(ValueError):
        scenes_split("dev")


def test_scene_captions_name_every_object_left_to_right():
    from catp.reference.data import scene_caption, scenes_with_questions

    for scene, _ in scenes_with_questions(20, seed=5):
        caption = scene_caption(scene.objects)
        parts = caption.split(" , ")
        assert len(parts) == len(scene.objects)
        assert [p.split() for p in parts] == [[o.size, o.color, o.shape] for o in scene.objects]
        assert [o.x for o in scene.objects] == sorted(o.x for o in scene.objects)


def test_validation_splits_are_disjoint_from_train():
    from catp.reference.data import EASY_VQA_VALIDATION_FROM

    train, validation = easy_vqa_split("train"), easy_vqa_split("validation")
    assert {e.image_id for e in train}.isdisjoint({e.image_id for e in validation})
    assert min(e.image_id for e in validation) == EASY_VQA_VALIDATION_FROM
    assert len(train) + len(validation) == 38_575
    assert scenes_split("validation", 5)[0].image.tobytes() != scenes_split("train", 5)[0].image.tobytes()



def test_easy_vqa_kind_names_each_template_and_rejects_other_questions():
    from catp.reference.data import EASY_VQA_TEMPLATES, easy_vqa_kind

    for kind, templates in EASY_VQA_TEMPLATES.items():
        for template in templates:
            assert easy_vqa_kind(template.format(c="teal", s="rectangle")) == kind
    with pytest.raises(ValueError, match="not an easy-VQA question template"):
        easy_vqa_kind("what size is the circle?")


def test_task_examples_name_each_task_split_and_reject_other_tasks(reference):
    from catp.reference.data import TASKS, task_examples

    assert TASKS == tuple(reference[0].config.catp_reference_tasks)  # the shipped model answers every task
    scenes = task_examples("scenes", "validation", 6)
    assert [(e.question, e.answer) for e in scenes] == [(e.question, e.answer) for e in scenes_split("validation", 6)]
    assert [e.question for e in task_examples("easy-vqa", "test", 3)] == [e.question for e in easy_vqa_split("test", 3)]
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        task_examples("vqa", "test")


def test_the_shipped_adapter_answers_from_its_first_tokens_down_to_one():
    """The shipped adapter (catp adapt --method first --keep 1,2,4,8,16,32 --full-every-step) on 48 easy-VQA
    validation questions (never test ones): with its first 4 query tokens the adapted model answers as the
    unadapted one does with all 32, and with 2 or 1 far better than the unadapted model with as few."""
    from catp.models import adapter_info
    from catp.reference.data import easy_vqa_split

    path = catp.reference_adapter_path()
    info = adapter_info(path)
    assert info["settings"]["method"] == "first" and info["settings"]["keeps"] == [32, 16, 8, 4, 2, 1] and info["settings"]["full_every_step"]
    assert not info["settings"]["truncate"] and info["trainable_parameters"] < 400_000
    examples = easy_vqa_split("validation", 48)
    base, processor = load()
    adapted, _ = load(adapter=path)
    unpruned = exact_match(answer(base, processor, examples), examples)
    pruned_base = exact_match(answer(base, processor, examples, "first", 4), examples)
    pruned_adapted = exact_match(answer(adapted, processor, examples, "first", 4), examples)
    assert pruned_adapted >= unpruned - 1 / 48 and pruned_adapted > pruned_base + 0.2, (unpruned, pruned_base, pruned_adapted)
    # Trained down to one token: at keeps 2 and 1 it still answers far better than the unadapted model does.
    for k, margin in ((2, 0.4), (1, 0.1)):
        base_k = exact_match(answer(base, processor, examples, "first", k), examples)
        adapted_k = exact_match(answer(adapted, processor, examples, "first", k), examples)
        assert adapted_k > base_k + margin, (k, base_k, adapted_k)


def test_the_model_card_names_the_shipped_adapters_files_by_their_sha256():
    """The model card's sha256 lines are those of the adapter files shipped beside it (a retrained adapter must update them)."""
    import hashlib
    import re

    card = (reference_model_path() / "README.md").read_text(encoding="utf-8")
    section = card[card.index("## The adapter"):card.index("## Limitations")]
    stated = dict(re.findall(r"`(\w+\.safetensors)` `([0-9a-f]{64})`", section))
    adapter = catp.reference_adapter_path()
    assert set(stated) == {"adapter_model.safetensors", "query_tokens.safetensors"}
    for name, digest in stated.items():
        assert hashlib.sha256((adapter / name).read_bytes()).hexdigest() == digest, name
