"""Every command on every family beyond BLIP-2: ``catp eval``, ``diagnose``, ``explain`` and ``bench`` run on a
tiny checkpoint of each registered family saved with ``save_pretrained`` (:func:`tiny_families.save_tiny_checkpoint`),
which ``--model`` recognises from its config; a model without a supported connector gets one line naming the
supported classes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from test_eval import said
from tiny_families import save_tiny_checkpoint
from typer.testing import CliRunner

from catp.cli.app import app
from catp.evaluation import harness
from catp.evaluation.harness import UNPRUNED
from catp.families import FAMILIES, supported_classes

from tiny_families import needs_family_transformers

pytestmark = needs_family_transformers

#: The registered families other than BLIP-2 (whose commands have their own tests).
NEW_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.name != "blip2")
COLORS = ("red", "blue", "green")


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    """A tiny checkpoint of the family, model and processor saved with ``save_pretrained``."""
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """4 questions over 3 plain images, as a JSONL file."""
    root = tmp_path_factory.mktemp("family-data")
    for i, color in enumerate(COLORS):
        Image.new("RGB", (32, 32), color).save(root / f"{i}.png")
    lines = [json.dumps({"id": f"q{i}", "image": f"{i % len(COLORS)}.png", "question": "what color is the shape ?",
                         "answers": [COLORS[i % len(COLORS)]]}) for i in range(4)]
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "questions.jsonl"


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def test_eval_runs_pruned_and_unpruned(checkpoint, questions, tmp_path):
    out = tmp_path / "run"
    run("eval", "--model", str(checkpoint), "--dataset", str(questions), "--out", str(out), "--methods", "catp,first",
        "--keep", "2", "--num-beams", "1", "--max-new-tokens", "2", "--batch-size", "3", "--no-progress")
    records = harness.read_predictions(out)
    assert sorted(records) == sorted((name, f"q{i}") for name in (UNPRUNED, "catp@2", "first@2") for i in range(4))
    # Unpruned: the processor's placeholders for one image, the same for every question.
    assert len({r["kept"] for (name, _), r in records.items() if name == UNPRUNED}) == 1
    for (name, qid), record in records.items():
        if name != UNPRUNED:  # the same text, with 2 connector tokens
            full = records[(UNPRUNED, qid)]
            assert record["kept"] == 2
            assert full["llm_tokens"] - record["llm_tokens"] == full["kept"] - 2
    assert (out / "summary.json").is_file()


def test_eval_none_alone(checkpoint, questions, tmp_path):
    run("eval", "--model", str(checkpoint), "--dataset", str(questions), "--out", str(tmp_path / "run"), "--methods", "none",
        "--num-beams", "2", "--max-new-tokens", "2", "--limit", "2", "--no-progress")
    assert {name for name, _ in harness.read_predictions(tmp_path / "run")} == {UNPRUNED}


@pytest.mark.parametrize("command", ["eval", "diagnose", "explain", "bench"])
def test_a_model_without_a_supported_connector_is_one_line(command, tmp_path):
    from transformers import LlavaConfig

    LlavaConfig(text_config=dict(model_type="llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32, vocab_size=64),
                vision_config=dict(model_type="clip_vision_model", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32, image_size=32, patch_size=8)).save_pretrained(tmp_path / "llava")
    required = ["--out", str(tmp_path / "figure.png")] if command == "explain" else []
    result = run(command, "--model", str(tmp_path / "llava"), *required, code=2)
    assert said(result.output, "a 'llava' model has no Q-Former or other cross-attention connector that catp prunes")
    assert said(result.output, supported_classes())
    assert "Traceback" not in result.output


def test_diagnose(checkpoint, tmp_path):
    out = tmp_path / "diagnosis.json"
    run("diagnose", "--model", str(checkpoint), "--limit", "3", "--methods", "catp,first,random", "--keep", "2", "--out", str(out),
        "--no-progress")
    figures = json.loads(out.read_text())
    assert figures["num_images"] == 3 and figures["keep"] == 2
    assert set(figures["distinct_kept_sets"]) == {"catp", "first", "random"}
    assert figures["distinct_kept_sets"]["first"] == 1
    assert len(figures["map_correlation"]) == len(figures["attention_entropy"]) >= 1
    assert 0 < figures["effective_rank"] <= figures["num_queries"]
    assert all(0 < e <= 1 for e in figures["attention_entropy"])


def test_explain(checkpoint, tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 32), "red").save(image)
    figure, page = tmp_path / "explain.png", tmp_path / "explain.html"
    result = run("explain", "--model", str(checkpoint), "--image", str(image), "--question", "what color is the shape ?",
                 "--methods", "catp,first", "--keep", "2", "--max-new-tokens", "2", "--out", str(figure), "--html", str(page))
    assert figure.stat().st_size > 0 and page.stat().st_size > 0
    assert said(result.output, "first keep 2:") and said(result.output, "kept [0, 1]")


def test_explanation_maps_are_each_latents_attention_over_the_patch_grid(checkpoint):
    from catp.explanation import explain
    from catp.hf import capture_connector
    from catp.models import load_model

    model, processor = load_model(str(checkpoint))
    explanation = explain(model, processor, Image.new("RGB", (32, 32), "blue"), "what color ?", methods=["catp"], keep=2,
                          max_new_tokens=1)
    inputs = processor(images=Image.new("RGB", (32, 32), "blue"), text=explanation.prompt, return_tensors="pt")
    with capture_connector(model) as captured:
        model.generate(**inputs, max_new_tokens=1, do_sample=False)
    from catp.families import family_of

    maps = explanation.cross_attention  # (L, Q, gh, gw): the patch columns (a class token has no place on the grid)
    first = captured["cross"][0].mean(dim=1)[0][:, family_of(model).class_tokens:]  # (Q, N patches)
    assert maps.shape[0] == len(captured["cross"]) and maps.shape[1] == first.shape[0]
    assert maps.shape[2] * maps.shape[3] == first.shape[1]
    assert torch.allclose(maps[0].flatten(1), first)
    kept = explanation.methods["catp"].kept
    assert kept.shape == (2,)


@pytest.mark.parametrize("family_name", NEW_FAMILIES)
def test_connector_flops_equal_a_count_of_the_stock_connector(family_name):
    """The family's connector FLOPs formula against torch's count of the matrix products of one connector run."""
    from tiny_families import tiny_inputs, tiny_model
    from torch.utils.flop_counter import FlopCounterMode

    from catp.families import family_of

    model = tiny_model(family_name)
    # Eager everywhere: torch's counter sees the attention's matrix products (Kosmos-2's x_attn follows the LLM's setting).
    model.set_attn_implementation("eager")
    family = family_of(model)
    inputs = tiny_inputs(family_name, images_per_sample=(1,))
    encoder_inputs = {name: inputs[name] for name in family.model_inputs if name in inputs}
    seen: dict[str, Any] = {}

    def patches(module, args, output) -> None:
        seen["image_tokens"] = output[0].shape[1]

    tower = family.vision_tower(model)
    hook = tower.register_forward_hook(patches)
    with family.eager_connector(model), FlopCounterMode(display=False) as counter:
        family.encode(model, inputs["pixel_values"], **encoder_inputs)  # the vision tower, then the connector
    hook.remove()
    connector = counter.get_total_flops() - sum(counter.get_flop_counts()[type(tower).__name__].values())
    assert connector == family.connector_flops(model.config, seen["image_tokens"]) > 0
