"""The embedded reference model: shipped checkpoint, processor, training determinism, data."""

from __future__ import annotations

import pytest
import torch

import catp
from catp.reference import load, reference_model_path
from catp.reference.data import SHAPES, easy_vqa_split, format_prompt, generate_scenes, scenes_split
from catp.reference.evaluate import answer, exact_match
from catp.reference.train import reader_from_checkpoint, TrainSettings, train_reference


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


@pytest.fixture(scope="module")
def tiny_settings():
    return TrainSettings(size="tiny", epochs=1, batch_size=16, pretrain_images=64, pretrain_epochs=1, pretrain_batch_size=32, train_limit=48, monitor_limit=8)


def test_train_reference_is_deterministic_and_loadable(tmp_path, tiny_settings):
    from safetensors.torch import load_file
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    first = train_reference(tmp_path / "a", tiny_settings, show_progress=False)
    second = train_reference(tmp_path / "b", tiny_settings, show_progress=False)
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_reference(tmp_path / "c", TrainSettings(**{**tiny_settings.__dict__, "seed": 1}), show_progress=False)
    assert not torch.equal(load_file(other / "model.safetensors")["query_tokens"], a["query_tokens"])
    # The init traps of SPEC §6 are fixed: random distinct queries, a trainable ViT init.
    assert a["query_tokens"].std() > 1e-3
    log = (first / "train.log").read_text()
    assert log.count("] epoch 1/1 done") + log.count(" epoch 1/1 done: loss") - log.count("reader epoch 1/1 done") == 1
    assert log.count("reader epoch 1/1 done") == 1  # stage 4 ran

    LLM_KEY = next(k for k in a if k.startswith("language_model.") and k.endswith("fc1.weight"))
    # Stage 4 alone on the stage-2 weights gives the full run's weights.
    stage2 = train_reference(tmp_path / "s2", TrainSettings(**{**tiny_settings.__dict__, "reader_epochs": 0}), show_progress=False)
    assert not torch.equal(load_file(stage2 / "model.safetensors")[LLM_KEY], a[LLM_KEY])
    resumed = reader_from_checkpoint(stage2, tmp_path / "s4", tiny_settings, show_progress=False)
    r = load_file(resumed / "model.safetensors")
    assert all(torch.equal(r[k], a[k]) for k in a), [k for k in a if not torch.equal(r[k], a[k])][:3]

    model = Blip2ForConditionalGeneration.from_pretrained(first)
    processor = Blip2Processor.from_pretrained(first)
    example = easy_vqa_split("test", 1)[0]
    inputs = processor(images=example.image, text=format_prompt(example.question), return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == 32
    out = model.generate(**inputs, max_new_tokens=2)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_train_reference_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="tasks"):
        train_reference(tmp_path, TrainSettings(tasks=("coco",)))
    with pytest.raises(ValueError, match="size"):
        train_reference(tmp_path, TrainSettings(size="huge"))


def test_scenes_are_deterministic_and_consistent():
    a, b, c = generate_scenes(20, seed=3), generate_scenes(20, seed=3), generate_scenes(20, seed=4)
    assert [(e.question, e.answer) for e in a] == [(e.question, e.answer) for e in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    assert [(e.question, e.answer) for e in a] != [(e.question, e.answer) for e in c]
    kinds = {e.question.split()[1] for e in a}
    assert kinds == {"color", "shape", "many"}
    for e in a:
        if e.question.startswith("how many"):
            assert e.answer in {"0", "1", "2", "3", "4"}
        if e.question.startswith("what shape"):
            assert e.answer in SHAPES
    test = scenes_split("test", 30)
    assert len(test) == 30 and test[0].image.size == (96, 96)
    with pytest.raises(ValueError):
        generate_scenes(-1, seed=0)
    with pytest.raises(ValueError):
        scenes_split("validation")
