"""pruned() / select_queries() on tiny InstructBLIP-Video models (a LLaMA and a T5 language model)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import (
    FRAMES,
    IMAGE_TOKEN,
    NUM_QUERY,
    VIDEO_FAMILIES,
    decoder_only,
    hand_built_generate,
    tiny_inputs,
    tiny_model,
    qformer_inputs,
)
from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

import catp
from catp.methods import SELECTORS
from tiny_models import top_k

# Per-step logits too: the tiny T5 repeats one token, so tokens alone would prove little.
GREEDY = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True, output_logits=True)
P = FRAMES * NUM_QUERY  # placeholders per sample


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def family(request):
    """Overrides the conftest's: this module tests the video families (``model`` follows)."""
    return request.param


def assert_matches_hand_built(model, inputs: dict, out, keep_indices: torch.Tensor) -> None:
    """Each sample of a pruned batched ``generate`` equals its hand-built one-sample run."""
    prompt = inputs["input_ids"].shape[1] if decoder_only(model) else 1  # T5: after the decoder start token
    for b, row in enumerate(keep_indices.tolist()):
        alone = hand_built_generate(model, inputs, b, [i for i in row if i >= 0], **GREEDY)
        steps = len(alone.logits)
        assert torch.equal(out.sequences[b, prompt : prompt + steps], alone.sequences[0, -steps:]), f"sample {b}"
        for batched, single in zip(out.logits[:steps], alone.logits):
            assert torch.allclose(batched[b], single[0], atol=1e-4), f"sample {b}"


@pytest.mark.parametrize("scope, keep", [("video", 7), ("frame", 2)])
@pytest.mark.parametrize("method", catp.METHODS)
def test_generate_equals_hand_built_reference(model, family, method, scope, keep):
    inputs = tiny_inputs(family)
    if method in SELECTORS and scope == "video":
        with pytest.raises(ValueError, match=f"'{method}' is a selector: on a video it picks within each frame; use scope='frame'"):
            with catp.pruned(model, method=method, keep=keep, scope=scope):
                pass
        return
    with catp.pruned(model, method=method, keep=keep, scope=scope) as session:
        out = model.generate(**inputs, **GREEDY)
    kept = session.keep_indices
    per_sample = keep if scope == "video" else keep * FRAMES
    assert kept.shape == (2, per_sample) and torch.all(kept[:, 1:] > kept[:, :-1])  # frame-major order
    assert session.keep_counts.tolist() == [per_sample] * 2 and session.num_frames == FRAMES
    assert torch.equal(session.pick_order.sort(dim=1).values, kept)
    if scope == "frame":
        assert torch.all(torch.bincount(kept.flatten() // NUM_QUERY, minlength=FRAMES) == 2 * keep)
    assert torch.equal(kept, catp.select_queries(model, inputs["pixel_values"], method=method, keep=keep, scope=scope,
                                                 **qformer_inputs(inputs)))
    assert_matches_hand_built(model, inputs, out, kept)


@pytest.mark.parametrize("method", ["catp", "catp-all", "catp-layer", "catp-image", "l2norm", "selfattn", "first"])
def test_each_frame_is_scored_as_an_image(llama, method):
    """The video scores of frame t are the image scores of frame t, on the same weights.

    (One language model suffices: the scores come from the vision tower and the Q-Former.)
    """
    model = llama
    image_model = InstructBlipForConditionalGeneration(
        InstructBlipConfig.from_dict({**model.config.to_dict(), "image_token_index": IMAGE_TOKEN})
    ).eval()
    image_model.load_state_dict(model.state_dict())
    inputs = tiny_inputs("instructblipvideo-llama")
    with catp.pruned(model, method=method, keep=4) as session:
        model.generate(**inputs, max_new_tokens=1)
    video_scores = session.scores.view(2, FRAMES, NUM_QUERY)
    image_inputs = {**tiny_inputs("instructblip-llama"), **qformer_inputs(inputs)}
    for t in range(FRAMES):
        with catp.pruned(image_model, method=method, keep=4) as image_session:
            image_model.generate(**{**image_inputs, "pixel_values": inputs["pixel_values"][:, t]}, max_new_tokens=1)
        assert torch.allclose(video_scores[:, t], image_session.scores, rtol=1e-5, atol=1e-4), f"frame {t}"


@pytest.mark.parametrize("method", ["catp", "catp-all", "catp-image"])
def test_every_frame_casts_the_same_total_vote(model, family, method):
    inputs = tiny_inputs(family)
    with catp.pruned(model, method=method, keep=4) as session:
        model.generate(**inputs, max_new_tokens=1)
    totals = session.scores.view(2, FRAMES, NUM_QUERY).sum(dim=-1)
    assert torch.allclose(totals, totals[0, 0].expand_as(totals), rtol=1e-5)


def test_video_scope_is_one_top_k_over_all_frames(model, family):
    inputs = tiny_inputs(family)
    video = catp.select_queries(model, inputs["pixel_values"], keep=5, **qformer_inputs(inputs))
    with catp.pruned(model, keep=5) as session:
        model.generate(**inputs, max_new_tokens=1)
    assert torch.equal(session.keep_indices, video)
    assert torch.equal(video, top_k(session.scores, 5))  # ties to the lower index, as for images
    frame = catp.select_queries(model, inputs["pixel_values"], keep=2, scope="frame", **qformer_inputs(inputs))
    per_frame = top_k(session.scores.view(2 * FRAMES, NUM_QUERY), 2)
    offsets = (torch.arange(2 * FRAMES) % FRAMES * NUM_QUERY)[:, None]
    assert torch.equal(frame, (per_frame + offsets).view(2, -1))


def test_keep_all_equals_unpruned(model, family):
    inputs = tiny_inputs(family)
    plain = model.generate(**inputs, max_new_tokens=5)
    for keep, scope in [(P, "video"), (1.0, "video"), (NUM_QUERY, "frame"), (1.0, "frame")]:
        with catp.pruned(model, method="catp", keep=keep, scope=scope):
            assert torch.equal(model.generate(**inputs, max_new_tokens=5), plain), (keep, scope)


def test_float_keep_counts_per_scope(model, family):
    inputs = tiny_inputs(family)
    for scope, expected in [("video", round(0.25 * P)), ("frame", FRAMES * round(0.25 * NUM_QUERY))]:
        kept = catp.select_queries(model, inputs["pixel_values"], keep=0.25, scope=scope, **qformer_inputs(inputs))
        assert kept.shape == (2, expected)


@pytest.mark.parametrize("keep", [6, catp.Budget(mass=0.5), catp.Budget(fence=0.0, min=2)])
@pytest.mark.parametrize("layout", ["processor", "pad-first"])
def test_batched_equals_one_by_one(model, family, layout, keep):
    inputs = tiny_inputs(family, prompt_lengths=(6, 2, 4), layout=layout)
    with catp.pruned(model, method="catp", keep=keep) as session:
        out = model.generate(**inputs, **GREEDY)
        batched_keep = session.keep_indices.clone()
        prompt = inputs["input_ids"].shape[1] if decoder_only(model) else 1  # T5: after the decoder start token
        for i in range(3):
            real = inputs["attention_mask"][i].bool()
            single = {
                "pixel_values": inputs["pixel_values"][i : i + 1],
                "input_ids": inputs["input_ids"][i : i + 1, real],
                "attention_mask": inputs["attention_mask"][i : i + 1, real],
                **{k: v[i : i + 1] for k, v in qformer_inputs(inputs).items()},
            }
            alone = model.generate(**single, **GREEDY)
            row = batched_keep[i][batched_keep[i] >= 0]
            assert torch.equal(session.keep_indices[0], row), f"sample {i}"
            steps = len(alone.logits)
            new = alone.sequences[0, single["input_ids"].shape[1] if decoder_only(model) else 1 :]
            assert torch.equal(out.sequences[i, prompt : prompt + new.shape[0]], new), f"sample {i}"
            if not decoder_only(model) and layout == "processor":
                continue  # padding between the placeholders and the text moves T5's relative positions, even unpruned
            for batched, one in zip(out.logits[:steps], alone.logits):
                assert torch.allclose(batched[i], one[0], atol=1e-4), f"sample {i}"


def test_callers_layout_and_forward(model, family):
    inputs = tiny_inputs(family)
    with catp.pruned(model, keep=5) as session:
        out = model.generate(**inputs, max_new_tokens=3)
        if decoder_only(model):
            assert torch.equal(out[:, : inputs["input_ids"].shape[1]], inputs["input_ids"])
        if decoder_only(model):
            labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN, -100)
            labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
        else:
            labels = torch.randint(3, 90, (2, 4))
        pruned_out = model(**inputs, labels=labels)
    assert torch.isfinite(pruned_out.loss)
    if decoder_only(model):
        assert pruned_out.logits.shape[:2] == inputs["input_ids"].shape  # the caller's positions
        rank = (inputs["input_ids"] == IMAGE_TOKEN).cumsum(1) - 1
        for b in range(2):
            dropped = (inputs["input_ids"][b] == IMAGE_TOKEN) & ~torch.isin(rank[b], session.keep_indices[b])
            assert int(dropped.sum()) == P - 5 and torch.all(pruned_out.logits[b, dropped] == 0)
    plain = model(**inputs, labels=labels)
    with catp.pruned(model, keep=P):
        same = model(**inputs, labels=labels)
    assert torch.allclose(plain.logits, same.logits, atol=1e-5) and torch.allclose(plain.loss, same.loss, atol=1e-6)


def test_generate_without_input_ids_uses_the_calls_frames(model, family):
    inputs = tiny_inputs(family)
    with catp.pruned(model, keep=4) as session:
        out = model.generate(pixel_values=inputs["pixel_values"], **qformer_inputs(inputs), max_new_tokens=3)
    assert session.keep_indices.shape == (2, 4) and out.shape[0] == 2
    if decoder_only(model):
        assert torch.all(out[:, :P] == IMAGE_TOKEN) and out.shape[1] > P + 1


def hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_model_restored_on_exit(model, family):
    inputs = tiny_inputs(family)
    hooks, impl = hook_count(model), model.qformer.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        with catp.pruned(model, method="selfattn", keep=3, scope="frame"):
            assert model.qformer.config._attn_implementation == "eager"
            model.generate(**inputs, max_new_tokens=2)
            raise RuntimeError("boom")
    assert hook_count(model) == hooks and model.qformer.config._attn_implementation == impl
    assert "generate" not in model.__dict__ and "generate" not in model.language_model.__dict__
    assert not hasattr(model, "_catp_session")


# ---- bad input --------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama():
    return tiny_model("instructblipvideo-llama")


def test_wrong_placeholder_count(llama):
    inputs = tiny_inputs("instructblipvideo-llama")
    inputs["input_ids"][1, 0] = 5  # one placeholder short of T*Q
    with catp.pruned(llama, keep=3):
        message = rf"exactly {P} video placeholder tokens .*\({FRAMES} frames x {NUM_QUERY} query tokens\).*sample 1 has {P - 1}"
        with pytest.raises(ValueError, match=message):
            llama.generate(**inputs, max_new_tokens=2)
        with pytest.raises(ValueError, match=message):
            llama(**inputs)
    two_frames = tiny_inputs("instructblipvideo-llama", frames=2)
    two_frames["pixel_values"] = tiny_inputs("instructblipvideo-llama")["pixel_values"]  # 3 frames, 2 x Q placeholders
    with catp.pruned(llama, keep=3), pytest.raises(ValueError, match=f"sample 0 has {2 * NUM_QUERY}"):
        llama.generate(**two_frames, max_new_tokens=2)


def test_wrong_pixel_values_rank(llama):
    inputs = tiny_inputs("instructblipvideo-llama")
    inputs["pixel_values"] = inputs["pixel_values"][:, 0]
    with catp.pruned(llama, keep=3):
        with pytest.raises(ValueError, match=r"\(batch, frames, channels, height, width\), got \(2, 3, 32, 32\)"):
            llama.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="frames"):
        catp.select_queries(llama, inputs["pixel_values"], **qformer_inputs(inputs))
    image_model = tiny_model("blip2-opt")
    image_inputs = tiny_inputs("blip2-opt")
    with catp.pruned(image_model, keep=3), pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        image_model.generate(**{**image_inputs, "pixel_values": image_inputs["pixel_values"][:, None]}, max_new_tokens=2)


def test_scope_on_an_image_model_and_unknown_scope(llama):
    image_model = tiny_model("instructblip-llama")
    with pytest.raises(TypeError, match="scope= applies to video models"):
        with catp.pruned(image_model, keep=3, scope="frame"):
            pass
    with pytest.raises(TypeError, match="scope= applies to video models"):
        catp.select_queries(image_model, torch.zeros(1, 3, 32, 32), scope="video")
    with pytest.raises(ValueError, match="scope must be one of 'video', 'frame'"):
        with catp.pruned(llama, keep=3, scope="clip"):
            pass


def test_keep_above_the_video_is_an_error_at_call_time(llama):
    inputs = tiny_inputs("instructblipvideo-llama")
    with catp.pruned(llama, keep=P + 1):  # T is not known yet: accepted
        with pytest.raises(ValueError, match=rf"keep={P + 1} is out of range: the video has {FRAMES} frames x {NUM_QUERY} query tokens"):
            llama.generate(**inputs, max_new_tokens=2)
    with pytest.raises(ValueError, match="out of range"):
        with catp.pruned(llama, keep=NUM_QUERY + 1, scope="frame"):  # per frame: known up front
            pass
    with pytest.raises(ValueError, match="out of range"):
        with catp.pruned(llama, keep=0):
            pass


def test_missing_video_token_index():
    model = tiny_model("instructblipvideo-llama")
    model.config.video_token_index = None
    with pytest.raises(ValueError, match="video_token_index is None"):
        with catp.pruned(model, keep=3):
            pass


def test_select_queries_needs_the_instruction(llama):
    with pytest.raises(ValueError, match="qformer_input_ids"):
        catp.select_queries(llama, torch.zeros(1, FRAMES, 3, 32, 32))
