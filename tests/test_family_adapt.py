"""``catp adapt`` on the families beyond BLIP-2 (Idefics2, Kosmos-2, Aria), on tiny checkpoints saved with
``save_pretrained`` (:func:`tiny_families.save_tiny_checkpoint`): what trains, training with the method in the
loop, the saved adapter reloading as the trained model, truncation and its export to a stock checkpoint
(Idefics2, Kosmos-2), and Aria's refusal to truncate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_eval import jsonl_dataset, said  # noqa: F401 (fixture)
from tiny_families import needs_family_transformers, save_tiny_checkpoint, tiny_inputs, tiny_model
from typer.testing import CliRunner

import catp
from catp.adapt import AdaptSettings, add_adapter, save_adapter, shorten_placeholders, train_adapter, trainable_parameters, truncated
from catp.cli.app import app
from catp.evaluation.datasets import load_dataset
from catp.evaluation.harness import prepare_batch
from catp.families import FAMILIES, family_of, family_of_type
from catp.models import QUERY_TOKENS_FILE, QUERY_TOKENS_KEY, load_adapter, load_config, load_model
from catp.protocol import PAPER_PROMPT

peft = pytest.importorskip("peft")
pytestmark = needs_family_transformers

#: The registered families other than BLIP-2 (whose adapter has its own tests, tests/test_adapt.py).
NEW_FAMILIES: tuple[str, ...] = tuple(f.name for f in FAMILIES if f.name != "blip2")
#: The families whose connector can run on its first k learned queries alone (``--truncate``).
TRUNCATING: tuple[str, ...] = ("idefics2", "kosmos2")

# Module names read from transformers 5.25 (SPEC.md §10): where each connector sits, the layers LoRA wraps
# in it (a perceiver layer's, for Idefics2), its learned queries, and the language model.
CONNECTOR = {"idefics2": "model.connector.perceiver_resampler.layers.", "kosmos2": "image_to_text_projection.",
             "aria": "model.multi_modal_projector."}
WRAPPED = {
    "idefics2": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "kosmos2": {"dense", "x_attn.q_proj", "x_attn.k_proj", "x_attn.v_proj", "x_attn.out_proj"},
    "aria": {"cross_attn.q_proj", "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.linear",
             "feed_forward.linear_in", "feed_forward.linear_out"},
}
QUERIES = {"idefics2": "model.connector.perceiver_resampler.latents", "kosmos2": "image_to_text_projection.latent_query",
           "aria": "model.multi_modal_projector.query"}
LANGUAGE_MODEL = {"idefics2": "model.text_model.", "kosmos2": "text_model.", "aria": "model.language_model."}
#: The learned queries' shape in the tiny models (tiny_families: 8 latents of width 32; Aria: 16 for its 980 px side).
QUERY_SHAPE = {"idefics2": (8, 32), "kosmos2": (8, 32), "aria": (16, 32)}
PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module", params=NEW_FAMILIES)
def checkpoint(request, tmp_path_factory) -> Path:
    """A tiny checkpoint of the family, model and processor saved with ``save_pretrained``."""
    return save_tiny_checkpoint(request.param, tmp_path_factory.mktemp(f"tiny-{request.param}"))


def run(*args: str, code: int = 0):
    result = CliRunner().invoke(app, [*args])
    assert result.exit_code == code, result.output + repr(result.exception)
    return result


def _training_args(checkpoint: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["adapt", "--model", str(checkpoint), "--dataset", str(data), "--val-fraction", "0.3", "--out", str(out),
            "--steps", "2", "--batch-size", "4", "--lr", "0.01", "--no-progress", *extra]


@pytest.mark.parametrize("family_name", NEW_FAMILIES)
def test_what_trains_is_lora_on_the_connector_and_the_learned_queries(family_name):
    model = add_adapter(tiny_model(family_name), AdaptSettings())
    family = family_of(model.get_base_model())
    assert tuple(family.learned_queries(model.get_base_model()).shape) == QUERY_SHAPE[family_name]
    names = trainable_parameters(model)
    queries = PEFT_PREFIX + QUERIES[family_name]
    assert queries in names
    lora = set(names) - {queries}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    prefix = PEFT_PREFIX + CONNECTOR[family_name]
    assert all(n.startswith(prefix) for n in lora), sorted(lora)
    wrapped = {n.split(".lora_")[0].removeprefix(prefix) for n in lora}
    if family_name == "idefics2":
        assert {w.split(".", 1)[0] for w in wrapped} == {"0", "1", "2"}  # every perceiver layer
        wrapped = {w.split(".", 1)[1] for w in wrapped}
    assert wrapped == WRAPPED[family_name]
    with_lm = trainable_parameters(add_adapter(tiny_model(family_name), AdaptSettings(lm_lora=True)))
    on_lm = {n for n in with_lm if n.startswith(PEFT_PREFIX + LANGUAGE_MODEL[family_name])}
    assert on_lm and all("lora_" in n for n in on_lm) and set(with_lm) - on_lm == set(names)
    frozen = trainable_parameters(add_adapter(tiny_model(family_name), AdaptSettings(query_tokens=False)))
    assert queries not in frozen


@pytest.mark.parametrize("family_name", NEW_FAMILIES)
def test_an_adapter_changes_the_model_only_where_its_weights_differ(family_name, tmp_path):
    """At its initial weights (LoRA's B at 0, the learned queries as they were) a saved adapter loads as the
    model itself; with the same adapter's queries moved, the outputs move."""
    adapted = add_adapter(tiny_model(family_name), AdaptSettings())
    save_adapter(adapted, tmp_path / "initial", {})
    inputs = tiny_inputs(family_name)
    plain = tiny_model(family_name)
    with torch.no_grad():
        expected = plain(**inputs).logits
        # Every parameter is equal; the logits up to rounding (Aria's differ by 3e-7 once peft has rebuilt its modules).
        torch.testing.assert_close(load_adapter(tiny_model(family_name), tmp_path / "initial", merge=True)(**inputs).logits, expected)
        family_of(plain).learned_queries(adapted.get_base_model()).add_(0.5)
    save_adapter(adapted, tmp_path / "moved", {})
    with torch.no_grad():
        assert not torch.allclose(load_adapter(tiny_model(family_name), tmp_path / "moved", merge=True)(**inputs).logits, expected)


@pytest.mark.parametrize("family_name", NEW_FAMILIES)
def test_the_kept_set_of_an_unmerged_adapter_is_the_merged_models(family_name):
    """The vote in the loop reads the adapted connector: the PeftModel (LoRA beside the weights) keeps what the
    same adapter merged into the weights keeps (Kosmos-2 recomputes x_attn's probabilities from its projections,
    whose own weights lack the LoRA update)."""
    adapted = add_adapter(tiny_model(family_name), AdaptSettings())
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    inputs = tiny_inputs(family_name, images_per_sample=(1, 1, 1, 1))
    family = family_of(adapted.get_base_model())
    encoder = {name: inputs[name] for name in family.model_inputs if name in inputs}
    unmerged = catp.select_queries(adapted, inputs["pixel_values"], method="catp", keep=3, **encoder)
    merged = catp.select_queries(adapted.merge_and_unload(), inputs["pixel_values"], method="catp", keep=3, **encoder)
    unadapted = catp.select_queries(tiny_model(family_name), inputs["pixel_values"], method="catp", keep=3, **encoder)
    assert torch.equal(unmerged, merged)
    assert not torch.equal(merged, unadapted)  # the adapter moves the vote: the comparison can fail


def test_training_with_the_method_in_the_loop_saves_the_trained_model(checkpoint, jsonl_dataset, tmp_path):  # noqa: F811
    """``catp`` in the loop: the saved learned queries are the trained ones, and the adapter loaded on a fresh copy
    (merged) gives the trained model's logits and its pruned answers, not the unadapted model's."""
    model, processor = load_model(str(checkpoint), "float32", "cpu")
    family = family_of(model)
    initial = family.learned_queries(model).detach().clone()
    questions = load_dataset(str(jsonl_dataset))
    settings = AdaptSettings(method="catp", keeps=(2, 4), lr=1e-2, batch_size=4, steps=2, validate_every=2, checkpoint_every=2)
    out = tmp_path / "adapter"
    result = train_adapter(model, processor, questions[:6], questions[6:], settings, out, show_progress=False, log=lambda _: None)
    assert [entry["step"] for entry in result.validation] == [2]
    saved = load_file(str(out / QUERY_TOKENS_FILE))
    trained = family.learned_queries(model).detach()
    assert saved.keys() == {QUERY_TOKENS_KEY} and torch.equal(saved[QUERY_TOKENS_KEY], trained)
    assert not torch.allclose(trained, initial)
    reloaded = load_model(str(checkpoint), "float32", "cpu", adapter=out)[0]
    plain = load_model(str(checkpoint), "float32", "cpu")[0]
    inputs = prepare_batch(processor, questions[:4], PAPER_PROMPT, model)
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, expected, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(plain(**inputs).logits, expected, atol=1e-3)
        answers = []
        for net in (model, reloaded):
            with catp.pruned(net, method="catp", keep=2) as session:
                answers.append((net.generate(**inputs, max_new_tokens=3, do_sample=False), session.keep_indices))
    assert torch.equal(answers[0][0], answers[1][0]) and torch.equal(answers[0][1], answers[1][1])


def test_adapt_command_trains_and_eval_takes_the_adapter(checkpoint, jsonl_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    run(*_training_args(checkpoint, jsonl_dataset, out, "--method", "first", "--keep", "2,4"))
    info = json.loads((out / "catp_adapter.json").read_text())
    assert info["settings"]["method"] == "first" and info["trainable_parameters"] > 0
    assert (out / "adapter_config.json").is_file() and (out / QUERY_TOKENS_FILE).is_file()
    runs = tmp_path / "run"
    run("eval", "--model", str(checkpoint), "--adapter", str(out), "--dataset", str(jsonl_dataset), "--out", str(runs),
        "--methods", "first", "--keep", "2", "--num-beams", "1", "--max-new-tokens", "2", "--limit", "2", "--no-progress")
    assert json.loads((runs / "run.json").read_text())["adapter"] == str(out)


@pytest.mark.parametrize("checkpoint", TRUNCATING, indirect=True)
def test_truncate_exports_a_stock_checkpoint_that_answers_as_the_truncated_adapter(checkpoint, jsonl_dataset, tmp_path):  # noqa: F811
    """``--truncate --export K``: stock transformers (the model class and AutoProcessor) loads the export, its processor
    writes K placeholders per image, and its generate equals the adapted model run on its first K latents."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    k = 2
    config = load_config(str(checkpoint))
    family = family_of_type(config.model_type)
    out = tmp_path / "adapter"
    run(*_training_args(checkpoint, jsonl_dataset, out, "--truncate", "--keep", f"{k},{family.num_queries(config)}",
                        "--export", str(k)))
    stock = AutoModelForImageTextToText.from_pretrained(out / f"export-{k}").eval()
    stock_processor = AutoProcessor.from_pretrained(out / f"export-{k}")
    stock_processor.tokenizer.padding_side = "left"
    assert type(stock).__name__ == family.model_classes[config.model_type]
    assert family.num_queries(stock.config) == k and family.learned_queries(stock).shape[0] == k
    questions = load_dataset(str(jsonl_dataset))[:3]
    adapted, processor = load_model(str(checkpoint), "float32", "cpu", adapter=out)
    full = prepare_batch(processor, questions, PAPER_PROMPT, adapted)
    with truncated(adapted, k), torch.no_grad():
        short = shorten_placeholders(adapted, full, k)
        expected = adapted.generate(**short, max_new_tokens=3, do_sample=False)
    again = prepare_batch(stock_processor, questions, PAPER_PROMPT, stock)
    for name in ("input_ids", "attention_mask", *family.position_inputs):  # the stock processor lays out K placeholders
        assert torch.equal(again[name], short[name]), name
    assert family.placeholder_mask(stock, again).sum(dim=1).tolist() == [k] * len(questions)
    assert short["input_ids"].shape[1] == full["input_ids"].shape[1] - (family.num_queries(config) - k)
    with torch.no_grad():
        assert torch.equal(stock.generate(**again, max_new_tokens=3, do_sample=False), expected)


@pytest.mark.parametrize("checkpoint", ["aria"], indirect=True)
def test_truncate_on_aria_is_refused_in_one_line(checkpoint, tmp_path):
    result = run("adapt", "--model", str(checkpoint), "--out", str(tmp_path / "never"), "--truncate", code=2)
    assert said(result.output, "Aria gives each image as many queries as its resolution calls for")
    assert "Traceback" not in result.output and not (tmp_path / "never").exists()
    with pytest.raises(ValueError, match="as its resolution calls for"):
        with truncated(tiny_model("aria"), 2):
            pass
