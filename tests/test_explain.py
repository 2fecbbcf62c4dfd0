"""catp.explain(): the data behind the figure, the figure's panels, the CLI, bad input."""

from __future__ import annotations

import pytest
import torch
from matplotlib.colors import to_rgba
from PIL import Image
from tiny_models import BOS, IMAGE_TOKEN, NUM_QUERY, PAD, tiny_model, top_k
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import Blip2Processor, PreTrainedTokenizerFast
from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

import catp
from catp.explanation import DEFAULT_PROMPT, draw_explanation, draw_sample_image, method_colours, sample_image, write_html

QUESTION = "what shape is in the image?"
METHODS = ("catp", "catp-all", "l2norm", "selfattn", "first")
KEEP = 3


def tiny_processor() -> Blip2Processor:
    """A Blip2Processor for the tiny models: word-level vocab inside their 100 ids, "<image>" = IMAGE_TOKEN."""
    words = "question : short answer what shape color is in the image ? circle rectangle triangle blue red".split()
    vocab = {"<unk>": 0, "<pad>": PAD, "</s>": BOS, **{w: 3 + i for i, w in enumerate(words)}, "<image>": IMAGE_TOKEN}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="</s>",
                                        eos_token="</s>")
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=NUM_QUERY)


@pytest.fixture(scope="module")
def model():
    return tiny_model("blip2-opt")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


@pytest.fixture(scope="module")
def explanation(model, processor):
    return catp.explain(model, processor, sample_image(), QUESTION, methods=METHODS, keep=KEEP)


def test_processor_puts_the_tiny_models_placeholders(processor):
    ids = processor(images=sample_image(), text=DEFAULT_PROMPT.format(QUESTION), return_tensors="pt")["input_ids"]
    assert (ids == IMAGE_TOKEN).sum().item() == NUM_QUERY


def test_kept_sets_equal_select_queries(model, processor, explanation):
    pixel_values = processor(images=sample_image(), return_tensors="pt")["pixel_values"]
    assert list(explanation.methods) == list(METHODS)
    for name, result in explanation.methods.items():
        expected = catp.select_queries(model, pixel_values, method=name, keep=KEEP)
        assert torch.equal(result.kept, expected[0]), name
        assert len(result.kept) == KEEP
        # The kept set is the top-k of the scores shown.
        assert torch.equal(result.kept, top_k(result.scores[None], KEEP)[0])


def test_answers_are_those_of_pruned_generate(model, processor, explanation):
    inputs = processor(images=sample_image(), text=DEFAULT_PROMPT.format(QUESTION), return_tensors="pt")
    greedy = dict(max_new_tokens=10, do_sample=False, num_beams=1)

    def decode(out):
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()

    with torch.no_grad():
        assert explanation.answer == decode(model.generate(**inputs, **greedy))
        with catp.pruned(model, method="catp", keep=KEEP):
            assert explanation.methods["catp"].answer == decode(model.generate(**inputs, **greedy))


def test_attention_maps_are_the_models_cross_attention(model, processor, explanation):
    pixel_values = processor(images=sample_image(), return_tensors="pt")["pixel_values"]
    model.qformer.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            image_embeds = model.vision_model(pixel_values).last_hidden_state
            out = model.qformer(query_embeds=model.query_tokens, encoder_hidden_states=image_embeds,
                                output_attentions=True, return_dict=True)
    finally:
        model.qformer.set_attn_implementation("sdpa")
    last = out.cross_attentions[-1][0].mean(dim=0)[:, 1:]  # (Q, patches), CLS dropped
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert explanation.cross_attention.shape == (len(out.cross_attentions), NUM_QUERY, side, side)
    torch.testing.assert_close(explanation.attention_maps(), last.reshape(NUM_QUERY, side, side))
    assert explanation.methods["catp"].map_layers == (len(out.cross_attentions) - 1,)
    assert explanation.methods["catp-all"].map_layers == tuple(range(len(out.cross_attentions)))
    # explain() leaves the model as it found it.
    assert model.qformer.config._attn_implementation == "sdpa"


def test_figure_panels_and_png(explanation, tmp_path):
    path = tmp_path / "explain.png"
    fig = draw_explanation(explanation, path)
    # image + answers, one grid of Q maps per layer set (last layer; all layers for catp-all), one bar chart per method.
    assert len(fig.axes) == 2 + 2 * NUM_QUERY + len(METHODS)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.width > 500
    # catp's kept tokens, and only those, carry a frame in catp's colour (on the last-layer grid).
    catp_colour = to_rgba(method_colours(METHODS)["catp"])
    last_layer_grid = fig.axes[2:2 + NUM_QUERY]
    framed = [q for q, ax in enumerate(last_layer_grid) if any(p.get_edgecolor() == catp_colour for p in ax.patches)]
    assert framed == explanation.methods["catp"].kept.tolist()


def test_selectors_show_their_pick_order(model, processor, tmp_path):
    methods = ("catp", "divprune", "catp-diverse")
    ex = catp.explain(model, processor, sample_image(), QUESTION, methods=methods, keep=KEEP)
    pixel_values = processor(images=sample_image(), return_tensors="pt")["pixel_values"]
    for name in ("divprune", "catp-diverse"):
        m = ex.methods[name]
        assert m.is_selector and m.scores is None
        with catp.pruned(model, method=name, keep=KEEP) as session, torch.no_grad():
            model.get_image_features(pixel_values)
        assert torch.equal(m.pick_order, session.pick_order[0]) and torch.equal(m.kept, session.keep_indices[0])
        assert [m.pick_number(q) for q in m.pick_order.tolist()] == [1, 2, 3]
    assert not ex.methods["catp"].is_selector
    fig = draw_explanation(ex)
    assert len(fig.axes) == 2 + NUM_QUERY + len(methods)
    # Each tile a selector kept carries its pick number in the selector's colour; no other tile does.
    colour = to_rgba(method_colours(methods)["divprune"])
    grid = fig.axes[2:2 + NUM_QUERY]
    badges = {q: [t.get_text() for t in ax.texts if to_rgba(t.get_bbox_patch().get_facecolor()) == colour]
              for q, ax in enumerate(grid)}
    assert {q: b for q, b in badges.items() if b} == {q: [str(ex.methods["divprune"].pick_number(q))]
                                                      for q in ex.methods["divprune"].kept.tolist()}
    # The selector's bar panel numbers its picks.
    bars = fig.axes[2 + NUM_QUERY + 1]
    assert sorted(t.get_text() for t in bars.texts) == ["1", "2", "3"]
    write_html(ex, fig, tmp_path / "x.html")
    order = ", ".join(f"q{q}" for q in ex.methods["divprune"].pick_order.tolist())
    assert f"<td>{order}</td>" in (tmp_path / "x.html").read_text()


def test_default_methods_give_one_grid(model, processor, tmp_path):
    ex = catp.explain(model, processor, sample_image(), QUESTION, keep=0.5)
    assert list(ex.methods) == ["catp", "l2norm", "selfattn"] and ex.keep == NUM_QUERY // 2
    assert len(draw_explanation(ex).axes) == 2 + NUM_QUERY + 3
    html_path = tmp_path / "explain.html"
    write_html(ex, draw_explanation(ex), html_path)
    page = html_path.read_text()
    assert "data:image/png;base64," in page and QUESTION.replace("?", "") in page


def test_sample_image_is_the_drawn_one():
    assert sample_image().tobytes() == draw_sample_image().tobytes()


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(question="  "), ValueError, "question"),
        (dict(methods=["catp", "nope"]), ValueError, "unknown method"),
        (dict(methods=["catp", "catp"]), ValueError, "once"),
        (dict(methods=[]), ValueError, "at least one"),
        (dict(keep=True), TypeError, "keep"),
        (dict(keep=NUM_QUERY + 1), ValueError, "out of range"),
        (dict(image="/no/such/image.png"), ValueError, "not found"),
        (dict(image=42), TypeError, "PIL image or a path"),
        (dict(prompt="Question: Short answer:"), ValueError, "prompt"),
    ],
)
def test_bad_input(model, processor, kwargs, error, match):
    call = dict(image=sample_image(), question=QUESTION) | kwargs
    with pytest.raises(error, match=match):
        catp.explain(model, processor, **call)


def test_cli_writes_png_and_html(model, processor, tmp_path):
    from typer.testing import CliRunner

    from catp.cli.app import app

    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    png, page = tmp_path / "out.png", tmp_path / "out.html"
    args = ["explain", "--model", str(tmp_path / "model"), "--methods", "catp,dart", "--keep", "0.5", "--out", str(png)]
    result = CliRunner().invoke(app, [*args, "--html", str(page)])
    assert result.exit_code == 0, result.output
    assert "catp keep 4" in result.output and png.stat().st_size > 0 and "base64" in page.read_text()
    assert "dart keep 4" in result.output and "picked in order" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--methods", "catp,bogus"], "unknown method"),
        (["--keep", "eight"], "--keep"),
        (["--image", "/no/such.png", "--question", "what?"], "not found"),
        (["--image", "/no/such.png"], "not found"),  # the missing file first, not the missing question
        (["--image", "{sample}"], "--question"),
    ],
)
def test_cli_bad_input(args, message, tmp_path):
    from typer.testing import CliRunner

    from catp.cli.app import app

    from catp.explanation import sample_image

    sample_image().save(tmp_path / "sample.png")
    args = [a.replace("{sample}", str(tmp_path / "sample.png")) for a in args]
    result = CliRunner().invoke(app, ["explain", "--out", str(tmp_path / "x.png"), *args])
    assert result.exit_code == 2 and message in " ".join(result.output.replace("│", " ").split())


def _reference_or_skip():
    """The embedded reference model and processor; skip while the checkpoint is not there."""
    try:
        from catp import reference

        return reference.load()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(f"reference model not available: {error}")


def test_reference_model_kept_sets_equal_select_queries():
    model, processor = _reference_or_skip()
    methods = ("catp", "catp-all", "l2norm", "selfattn")
    ex = catp.explain(model, processor, sample_image(), QUESTION, methods=methods, keep=8)
    pixel_values = processor(images=sample_image(), return_tensors="pt")["pixel_values"]
    for name in methods:
        assert torch.equal(ex.methods[name].kept, catp.select_queries(model, pixel_values, method=name, keep=8)[0]), name
    grid = model.config.vision_config.image_size // model.config.vision_config.patch_size
    assert ex.cross_attention.shape[1:] == (model.config.num_query_tokens, grid, grid)
    assert len(draw_explanation(ex).axes) == 2 + 2 * model.config.num_query_tokens + len(methods)


def test_instructblip_kept_sets_equal_select_queries():
    from transformers import InstructBlipProcessor

    blip2 = tiny_processor()
    processor = InstructBlipProcessor(blip2.image_processor, blip2.tokenizer, blip2.tokenizer, num_query_tokens=NUM_QUERY)
    model = tiny_model("instructblip-t5")
    ex = catp.explain(model, processor, sample_image(), QUESTION, keep=KEEP)
    inputs = processor(images=sample_image(), text=DEFAULT_PROMPT.format(QUESTION), return_tensors="pt")
    qformer = {k: v for k, v in inputs.items() if k.startswith("qformer_")}
    for name, result in ex.methods.items():
        assert torch.equal(result.kept, catp.select_queries(model, inputs["pixel_values"], method=name, keep=KEEP, **qformer)[0])


def test_video_explanation_shows_frames_by_queries(tmp_path):
    from tiny_models import FRAMES
    from transformers import InstructBlipProcessor

    blip2 = tiny_processor()
    processor = InstructBlipProcessor(blip2.image_processor, blip2.tokenizer, blip2.tokenizer, num_query_tokens=NUM_QUERY)
    model = tiny_model("instructblipvideo-llama")
    frames = [sample_image(), sample_image().rotate(90), draw_sample_image(48)]
    assert len(frames) == FRAMES
    ex = catp.explain(model, processor, frames, QUESTION, methods=("catp", "l2norm"), keep=5)
    assert ex.num_frames == FRAMES and ex.queries_per_frame == NUM_QUERY and ex.keep == 5
    assert ex.cross_attention.shape[:2] == (len(catp.hf.cross_attention_layers(model)), FRAMES * NUM_QUERY)
    from catp.explanation import _video_inputs

    inputs = _video_inputs(model, processor, frames, DEFAULT_PROMPT.format(QUESTION))
    assert inputs["pixel_values"].shape[:2] == (1, FRAMES) and (inputs["input_ids"] == IMAGE_TOKEN).sum() == FRAMES * NUM_QUERY
    qformer = {k: v for k, v in inputs.items() if k.startswith("qformer_")}
    for name, result in ex.methods.items():
        assert result.scores.shape == (FRAMES * NUM_QUERY,)
        assert torch.equal(result.kept, catp.select_queries(model, inputs["pixel_values"], method=name, keep=5, **qformer)[0])
    figure = draw_explanation(ex, tmp_path / "video.png")
    # Header (2), one map per token of every frame, one bar chart per method.
    assert len(figure.axes) == 2 + FRAMES * NUM_QUERY + 2
    titles = [ax.get_title() for ax in figure.axes]
    assert any(t.startswith(f"f{FRAMES - 1} q{NUM_QUERY - 1}") for t in titles)
    per_frame = catp.explain(model, processor, frames, QUESTION, methods=("catp",), keep=2, scope="frame")
    assert per_frame.keep == 2 * FRAMES
    with pytest.raises(TypeError, match="sequence of frames"):
        catp.explain(model, processor, sample_image(), QUESTION)
