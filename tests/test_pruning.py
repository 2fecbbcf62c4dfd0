"""pruned() / select_queries() on tiny models of every supported family."""

from __future__ import annotations

import pytest
import torch
from tiny_models import BOS, IMAGE_TOKEN, NUM_QUERY, tiny_inputs, tiny_model, decoder_only, qformer_inputs

import catp
from catp.layout import kept_positions

GREEDY = dict(max_new_tokens=6, do_sample=False)


def new_tokens(model, inputs, output):
    """What generate added: decoder-only outputs start with the caller's input_ids."""
    return output[:, inputs["input_ids"].shape[1]:] if decoder_only(model) else output


def reference_generate(model, inputs: dict, keep_idx: torch.Tensor, **generate_kwargs) -> torch.Tensor:
    """Hand-built pruned generation: selected projected query rows, k placeholders, LLM.generate(inputs_embeds)."""
    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"], **qformer_inputs(inputs)).pooler_output
        selected = torch.stack([features[b, keep_idx[b]] for b in range(len(keep_idx))])
        k = keep_idx.shape[1]
        rows, masks = [], []
        for ids, mask in zip(inputs["input_ids"].tolist(), inputs["attention_mask"].tolist()):
            seen, row, row_mask = 0, [], []
            for token, m in zip(ids, mask):
                if token == IMAGE_TOKEN:
                    seen += 1
                    if seen > k:
                        continue
                row.append(token)
                row_mask.append(m)
            rows.append(row)
            masks.append(row_mask)
        ids_k, mask_k = torch.tensor(rows), torch.tensor(masks)
        embeds = model.get_input_embeddings()(ids_k)
        embeds[ids_k == IMAGE_TOKEN] = selected.reshape(-1, selected.shape[-1]).to(embeds.dtype)
        return model.language_model.generate(inputs_embeds=embeds, attention_mask=mask_k, **generate_kwargs)


@pytest.mark.parametrize("method", catp.METHODS)
def test_pruned_generate_equals_hand_built_reference(model, family, method):
    inputs = tiny_inputs(family)
    with catp.pruned(model, method=method, keep=3) as session:
        out = model.generate(**inputs, **GREEDY)
    kept = catp.select_queries(model, inputs["pixel_values"], method=method, keep=3, **qformer_inputs(inputs))
    assert torch.equal(session.keep_indices, kept)
    assert kept.shape == (2, 3) and torch.all(kept[:, 1:] > kept[:, :-1])
    reference = reference_generate(model, inputs, kept, **GREEDY)
    assert torch.equal(new_tokens(model, inputs, out), reference)


def test_generate_returns_the_callers_prompt(model, family):
    inputs = tiny_inputs(family)
    with catp.pruned(model, keep=2):
        out = model.generate(**inputs, **GREEDY)
    if decoder_only(model):
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        assert out.shape[1] > inputs["input_ids"].shape[1]


# Selectors too: a greedy selection of all Q tokens must keep every one of them.
@pytest.mark.parametrize("method", ["catp", "l2norm", "random", "divprune", "dart", "catp-diverse"])
def test_keep_all_equals_unpruned(model, family, method):
    inputs = tiny_inputs(family)
    plain = model.generate(**inputs, **GREEDY)
    with catp.pruned(model, method=method, keep=NUM_QUERY):
        same = model.generate(**inputs, **GREEDY)
    with catp.pruned(model, method=method, keep=1.0):
        also = model.generate(**inputs, **GREEDY)
    assert torch.equal(plain, same) and torch.equal(plain, also)


@pytest.mark.parametrize("method", ["catp", "divprune", "dart", "catp-diverse"])
@pytest.mark.parametrize("layout", ["processor", "pad-first"])
def test_batched_equals_one_by_one(model, family, layout, method):
    inputs = tiny_inputs(family, prompt_lengths=(6, 2, 4), layout=layout)
    with catp.pruned(model, method=method, keep=4) as session:
        batched = new_tokens(model, inputs, model.generate(**inputs, **GREEDY))
        batched_keep, batched_order = session.keep_indices.clone(), session.pick_order.clone()
        for i in range(3):
            real = inputs["attention_mask"][i].bool()
            single = {
                "pixel_values": inputs["pixel_values"][i : i + 1],
                "input_ids": inputs["input_ids"][i : i + 1, real],
                "attention_mask": inputs["attention_mask"][i : i + 1, real],
                **{k: v[i : i + 1] for k, v in qformer_inputs(inputs).items()},
            }
            alone = new_tokens(model, single, model.generate(**single, **GREEDY))
            assert torch.equal(session.keep_indices[0], batched_keep[i])
            assert torch.equal(session.pick_order[0], batched_order[i])
            assert torch.equal(batched[i, : alone.shape[1]], alone[0]), f"sample {i}"


def test_sampling_matches_reference(model, family):
    inputs = tiny_inputs(family)
    sample = dict(max_new_tokens=6, do_sample=True, top_k=20)
    with catp.pruned(model, method="catp-all", keep=5) as session:
        torch.manual_seed(123)
        out = model.generate(**inputs, **sample)
    torch.manual_seed(123)
    reference = reference_generate(model, inputs, session.keep_indices, **sample)
    assert torch.equal(new_tokens(model, inputs, out), reference)


def test_beam_search_with_several_returned_sequences(model, family):
    inputs = tiny_inputs(family)
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with catp.pruned(model, method="catp", keep=3) as session:
        out = model.generate(**inputs, **beams)
    reference = reference_generate(model, inputs, session.keep_indices, **beams)
    assert out.shape[0] == 4
    assert torch.equal(new_tokens(model, inputs, out), reference)
    if decoder_only(model):
        assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"].repeat_interleave(2, dim=0))


def test_return_dict_in_generate(model, family):
    inputs = tiny_inputs(family)
    with catp.pruned(model, keep=3):
        out = model.generate(**inputs, **GREEDY, return_dict_in_generate=True, output_scores=True)
        plain = model.generate(**inputs, **GREEDY)
    assert torch.equal(out.sequences, plain)


def test_vision_and_qformer_run_once_per_generate(model, family):
    calls = {"vision": 0, "qformer": 0}
    handles = [
        model.vision_model.register_forward_hook(lambda *a: calls.__setitem__("vision", calls["vision"] + 1)),
        model.qformer.register_forward_hook(lambda *a: calls.__setitem__("qformer", calls["qformer"] + 1)),
    ]
    try:
        with catp.pruned(model, method="catp-image", keep=3):
            model.generate(**tiny_inputs(family), max_new_tokens=4, num_beams=2)
    finally:
        for h in handles:
            h.remove()
    assert calls == {"vision": 1, "qformer": 1}


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_attention_implementations_and_clean_exit(model, family):
    before = {
        "llm": model.language_model.config._attn_implementation,
        "qformer": model.qformer.config._attn_implementation,
        "vision": model.vision_model.config._attn_implementation,
    }
    assert before["llm"] == "sdpa" and before["qformer"] == "sdpa"
    hooks = hook_count(model)
    with pytest.raises(RuntimeError, match="boom"):
        with catp.pruned(model, method="catp-image", keep=3):
            assert model.language_model.config._attn_implementation == "sdpa"  # the LLM keeps SDPA
            assert model.vision_model.config._attn_implementation == before["vision"]  # recomputed, not switched
            assert model.qformer.config._attn_implementation == "eager"  # only the Q-Former runs eager
            model.generate(**tiny_inputs(family), max_new_tokens=2)
            raise RuntimeError("boom")
    assert model.qformer.config._attn_implementation == before["qformer"]
    assert hook_count(model) == hooks
    assert "generate" not in model.__dict__ and not hasattr(model, "_catp_session")
    with catp.pruned(model, method="l2norm", keep=3):
        assert model.qformer.config._attn_implementation == "sdpa"  # no probabilities needed, nothing switched


def test_forward_logits_and_labels(model, family):
    inputs = tiny_inputs(family)
    if decoder_only(model):
        labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
        labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    else:
        labels = torch.randint(3, 90, (2, 4))
    plain = model(**inputs, labels=labels)
    with catp.pruned(model, method="catp", keep=NUM_QUERY):
        same = model(**inputs, labels=labels)
    assert torch.allclose(plain.logits, same.logits, atol=1e-5) and torch.allclose(plain.loss, same.loss, atol=1e-6)

    with catp.pruned(model, method="catp", keep=3) as session:
        out = model(**inputs, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    if decoder_only(model):
        assert out.logits.shape[:2] == inputs["input_ids"].shape  # the caller's positions
        positions = kept_positions(inputs["input_ids"] == IMAGE_TOKEN, session.keep_indices, "left")
        assert positions.shape == (2, inputs["input_ids"].shape[1] - NUM_QUERY + 3) and torch.all(positions >= 0)
        dropped = torch.ones_like(inputs["input_ids"], dtype=torch.bool).scatter(1, positions, False)
        assert torch.all(out.logits[dropped] == 0)  # pruned placeholder positions hold zeros
        # The kept positions are the placeholders of the kept queries (query i sits in placeholder i).
        rank = (inputs["input_ids"] == IMAGE_TOKEN).cumsum(1) - 1
        kept_ranks = [sorted(rank[b, p].item() for p in positions[b] if inputs["input_ids"][b, p] == IMAGE_TOKEN) for b in range(2)]
        assert kept_ranks == session.keep_indices.tolist()
        # Logits at kept positions equal the LLM run on the shortened sequence.
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], **qformer_inputs(inputs)).pooler_output
            selected = torch.stack([features[b, session.keep_indices[b]] for b in range(2)])
            ids_k = inputs["input_ids"].gather(1, positions)
            embeds = model.get_input_embeddings()(ids_k)
            embeds[ids_k == IMAGE_TOKEN] = selected.reshape(-1, selected.shape[-1])
            ref = model.language_model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"].gather(1, positions))
        assert torch.allclose(out.logits.gather(1, positions[..., None].expand(-1, -1, ref.logits.shape[-1])), ref.logits, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(family, dtype):
    model = tiny_model(family).to(dtype)
    inputs = tiny_inputs(family)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    plain = model.generate(**inputs, **GREEDY)
    with catp.pruned(model, method="catp", keep=NUM_QUERY):
        assert torch.equal(model.generate(**inputs, **GREEDY), plain)
    with catp.pruned(model, method="catp-image", keep=3) as session:
        out = model.generate(**inputs, **GREEDY)
    assert session.scores.dtype == torch.float32 and out.shape[0] == 2
    with catp.pruned(model, method="catp-diverse", keep=3) as session:  # similarities computed in float32
        model.generate(**inputs, **GREEDY)
    assert session.pick_order.shape == (2, 3) and session.scores is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(family):
    model = tiny_model(family).cuda()
    inputs = {k: v.cuda() for k, v in tiny_inputs(family).items()}
    plain = model.generate(**inputs, **GREEDY)
    with catp.pruned(model, method="catp", keep=NUM_QUERY):
        assert torch.equal(model.generate(**inputs, **GREEDY), plain)
    for method in ("catp", "divprune", "dart", "catp-diverse"):
        with catp.pruned(model, method=method, keep=3) as session:
            out = model.generate(**inputs, **GREEDY)
        assert session.keep_indices.device.type == "cuda" and session.pick_order.device.type == "cuda", method
        assert out.device.type == "cuda"


def test_captioning_without_input_ids():
    model = tiny_model("blip2-opt")
    pixel_values = tiny_inputs("blip2-opt")["pixel_values"]
    with catp.pruned(model, method="catp", keep=3) as session:
        out = model.generate(pixel_values=pixel_values, **GREEDY)
    default_prompt = torch.tensor([[IMAGE_TOKEN] * NUM_QUERY + [BOS]] * 2)
    assert torch.equal(out[:, : NUM_QUERY + 1], default_prompt)
    inputs = {"pixel_values": pixel_values, "input_ids": default_prompt, "attention_mask": torch.ones_like(default_prompt)}
    assert torch.equal(out[:, NUM_QUERY + 1 :], reference_generate(model, inputs, session.keep_indices, **GREEDY))


def test_catp_layer_custom_weights_change_selection():
    model = tiny_model("blip2-opt")
    inputs = tiny_inputs("blip2-opt")
    picks = {
        tuple(w): catp.select_queries(model, inputs["pixel_values"], method="catp-layer", keep=3, layer_weights=w).tolist()
        for w in ([1.0, 0.0], [0.0, 1.0])
    }
    last_layer = catp.select_queries(model, inputs["pixel_values"], method="catp", keep=3).tolist()
    assert picks[(0.0, 1.0)] == last_layer  # all weight on the last layer = catp
    assert picks[(1.0, 0.0)] != picks[(0.0, 1.0)]


# ---- bad input --------------------------------------------------------------------


@pytest.fixture(scope="module")
def opt_model():
    return tiny_model("blip2-opt")


@pytest.mark.parametrize(
    "keep, error, match",
    [
        (0, ValueError, "out of range"),
        (-2, ValueError, "out of range"),
        (NUM_QUERY + 1, ValueError, "out of range"),
        (0.0, ValueError, r"fraction in \(0, 1\]"),
        (1.5, ValueError, r"fraction in \(0, 1\]"),
        (True, TypeError, "int count or a float fraction"),
        ("8", TypeError, "int count or a float fraction"),
        (None, TypeError, "int count or a float fraction"),
    ],
)
def test_bad_keep(opt_model, keep, error, match):
    with pytest.raises(error, match=match):
        with catp.pruned(opt_model, keep=keep):
            pass


def test_keep_fraction_rounds_to_count():
    assert catp.resolve_keep(0.5, 32) == 16
    assert catp.resolve_keep(0.125, 32) == 4
    assert catp.resolve_keep(0.01, 32) == 1


def test_unknown_method_and_option(opt_model):
    with pytest.raises(ValueError, match="unknown method 'fastv'.*catp"):
        with catp.pruned(opt_model, method="fastv"):
            pass
    with pytest.raises(TypeError, match="unknown option.*layer_weight"):
        with catp.pruned(opt_model, method="catp-layer", layer_weight=[1.0, 1.0]):
            pass


@pytest.mark.parametrize("weights, match", [([1.0], "has 1 entries"), ([1.0, -0.5], "non-negative")])
def test_bad_layer_weights_fail_before_running(opt_model, weights, match):
    with pytest.raises(ValueError, match=match):
        with catp.pruned(opt_model, method="catp-layer", layer_weights=weights):
            pass


def test_model_without_qformer():
    from transformers import OPTConfig, OPTForCausalLM

    llm = OPTForCausalLM(OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
                                   word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="has no Q-Former"):
        with catp.pruned(llm):
            pass
    with pytest.raises(ValueError, match="has no Q-Former"):
        catp.select_queries(llm, torch.zeros(1, 3, 32, 32))


def test_placeholder_count_mismatch(opt_model):
    inputs = tiny_inputs("blip2-opt")
    inputs["input_ids"][1, 0] = 5  # sample 1 now has one placeholder too few
    with catp.pruned(opt_model, keep=3):
        with pytest.raises(ValueError, match="exactly 8 image placeholder.*sample 1 has 7"):
            opt_model.generate(**inputs, max_new_tokens=2)
        with pytest.raises(ValueError, match="sample 1 has 7"):
            opt_model(**inputs)


def test_nested_pruned_on_same_model(opt_model):
    with catp.pruned(opt_model, keep=3):
        with pytest.raises(ValueError, match="already active"):
            with catp.pruned(opt_model, keep=2):
                pass
        # The outer context is intact after the refused inner one.
        assert "generate" in opt_model.__dict__
    assert "generate" not in opt_model.__dict__


def test_instructblip_select_queries_needs_instruction():
    model = tiny_model("instructblip-llama")
    with pytest.raises(ValueError, match="qformer_input_ids"):
        catp.select_queries(model, torch.zeros(1, 3, 32, 32))


def test_positional_generate_arguments(model, family):
    inputs = tiny_inputs(family)
    with catp.pruned(model, keep=3):
        by_name = model.generate(**inputs, **GREEDY)
        if family.startswith("instructblip"):
            positional = model.generate(inputs["pixel_values"], inputs["qformer_input_ids"], inputs["qformer_attention_mask"],
                                        inputs["input_ids"], inputs["attention_mask"], **GREEDY)
        else:
            positional = model.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], **GREEDY)
    assert torch.equal(by_name, positional)


@pytest.mark.parametrize("name", ["idefics2", "kosmos2", "aria"])
def test_a_family_newer_than_the_installed_transformers_is_one_clear_error(name, monkeypatch):
    """Idefics2, Kosmos-2 and Aria need transformers >= 5.25 (their encoder hand-off); an older one is named."""
    import transformers

    from catp.families import FAMILIES

    family = next(f for f in FAMILIES if f.name == name)
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(ValueError, match=r"transformers >= 5\.25.*this is transformers 5\.17\.0"):
        family.check_transformers()
    monkeypatch.setattr(transformers, "__version__", "5.25.0")
    family.check_transformers()
    blip2 = next(f for f in FAMILIES if f.name == "blip2")
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    blip2.check_transformers()  # the bottom of the declared range
