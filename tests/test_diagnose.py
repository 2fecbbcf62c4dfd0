"""catp diagnose: the metrics on constructed tensors, the run on tiny models, the CLI."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_explain import tiny_processor
from tiny_models import NUM_QUERY, tiny_model
from typer.testing import CliRunner

import catp
from catp.cli.app import app
from catp.evaluation.diagnose import (
    attention_entropy,
    diagnose,
    effective_rank,
    kept_set_cosine,
    map_correlation,
    object_attention_share,
    query_cosine,
)


def test_duplicate_queries_have_cosine_one_and_rank_one():
    one = torch.randn(1, 1, 16)
    dup = one.expand(2, 8, 16) * torch.linspace(1, 2, 8)[None, :, None]  # same direction, other norms
    pairwise, nearest = query_cosine(dup)
    assert torch.allclose(pairwise, torch.ones(2)) and torch.allclose(nearest, torch.ones(2))
    # Centred duplicates along one direction span one dimension.
    assert torch.allclose(effective_rank(dup), torch.ones(2), atol=1e-4)


def test_orthogonal_queries_have_cosine_zero_and_full_rank():
    eye = torch.eye(8)[None]  # 8 orthogonal unit queries
    pairwise, nearest = query_cosine(eye)
    assert torch.allclose(pairwise, torch.zeros(1)) and torch.allclose(nearest, torch.zeros(1))
    # Centred, the 8 one-hot vectors span 7 dimensions with equal singular values.
    assert effective_rank(eye).item() == pytest.approx(7.0, rel=1e-4)


def test_kept_set_cosine_against_a_hand_computed_case():
    # Queries 0 and 1 are twins, 2 and 3 orthogonal to them and to each other.
    outputs = torch.tensor([[[1.0, 0, 0], [1.0, 0.1, 0], [0, 1.0, 0], [0, 0, 1.0]]])
    twin = 1 / math.sqrt(1.01)  # cosine of queries 0 and 1
    coverage, redundancy = kept_set_cosine(outputs, torch.tensor([[0, 1]]))
    assert redundancy.item() == pytest.approx(twin)  # the kept pair is a duplicate
    # Query 2 is closest to 1 (0.1 / sqrt(1.01)); query 3 has no kept neighbour.
    assert coverage.item() == pytest.approx((1 + 1 + 0.1 / math.sqrt(1.01) + 0) / 4)
    coverage, redundancy = kept_set_cosine(outputs, torch.tensor([[0, 3]]))
    assert redundancy.item() == pytest.approx(0.0, abs=1e-6) and coverage.item() == pytest.approx((1 + twin + 0 + 1) / 4)


def test_map_correlation_and_entropy():
    maps = torch.rand(1, 1, 1, 10).softmax(-1).expand(1, 2, 4, 10)  # every query and head the same map
    assert map_correlation(maps).item() == pytest.approx(1.0, abs=1e-5)
    anti = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[None, None]  # two queries, opposite maps
    assert map_correlation(anti).item() == pytest.approx(-1.0, abs=1e-5)
    uniform = torch.full((1, 2, 3, 16), 1 / 16)
    assert attention_entropy(uniform).item() == pytest.approx(1.0, abs=1e-5)
    peaked = torch.zeros(1, 1, 1, 16)
    peaked[..., 3] = 1
    assert attention_entropy(peaked).item() == pytest.approx(0.0, abs=1e-5)


def test_object_attention_share_ignores_cls_and_renormalises():
    probs = torch.tensor([[[[0.5, 0.25, 0.25, 0.0], [0.0, 0.0, 0.0, 1.0]]]])  # (1, 1, 2, 1 + 3): CLS first
    objects = torch.tensor([[True, False, False]])
    share = object_attention_share(probs, objects)
    assert share.tolist() == [[0.5, 0.0]]


@pytest.mark.parametrize("family", ["blip2-opt", "instructblip-llama"])
def test_diagnose_on_tiny_models(family):
    model = tiny_model(family)
    processor = tiny_processor()
    if family.startswith("instructblip"):
        words = processor.tokenizer
        processor = SimpleNamespace(image_processor=processor.image_processor, qformer_tokenizer=words)
    g = torch.Generator().manual_seed(0)
    images = [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(5)]
    grid = torch.zeros(5, 4, 4, dtype=torch.bool)
    grid[:, :2] = True
    result = diagnose(model, processor, images, methods=["catp", "first", "random"], keep=3, object_masks=grid, batch_size=2)
    assert result.num_images == 5 and result.keep == 3 and result.num_queries == NUM_QUERY
    assert -1 <= result.pairwise_cosine <= result.nearest_cosine <= 1
    assert 1 <= result.effective_rank <= NUM_QUERY
    layers = len(catp.hf.cross_attention_layers(model))
    assert len(result.map_correlation) == len(result.attention_entropy) == layers
    assert all(0 < e <= 1 for e in result.attention_entropy)
    assert result.distinct_kept_sets["first"] == 1
    assert 1 <= result.distinct_kept_sets["catp"] <= 5
    assert set(result.kept_coverage) == set(result.kept_redundancy) == {"catp", "first", "random"}
    assert all(-1 <= v <= 1 for v in [*result.kept_coverage.values(), *result.kept_redundancy.values()])
    assert "coverage / redundancy: catp" in result.markdown()
    assert len(result.object_share) == NUM_QUERY and result.object_patch_share == pytest.approx(0.5)
    # `first` keeps queries 0-2 on every image: its kept share is theirs.
    assert result.kept_object_share["first"] == pytest.approx(sum(result.object_share[:3]) / 3, abs=1e-5)
    assert set(result.kept_object_share) == {"catp", "first", "random"} and all(0 <= v <= 1 for v in result.kept_object_share.values())
    assert "attention on object patches: catp" in result.markdown()
    # The Q-Former's attention implementation is restored.
    assert model.qformer.config._attn_implementation != "eager" or model.config.qformer_config._attn_implementation == "eager"
    assert "effective rank" in result.markdown()


def test_diagnose_bad_input():
    model, processor = tiny_model("blip2-opt"), tiny_processor()
    image = Image.new("RGB", (32, 32))
    with pytest.raises(ValueError, match="at least one image"):
        diagnose(model, processor, [])
    with pytest.raises(ValueError, match="unknown method"):
        diagnose(model, processor, [image], methods=["nope"])
    with pytest.raises(ValueError, match="object masks"):
        diagnose(model, processor, [image], object_masks=[])
    with pytest.raises(ValueError, match="no Q-Former"):
        diagnose(torch.nn.Linear(2, 2), processor, [image])


def test_cli_diagnose_on_reference_scenes(tmp_path):
    out = tmp_path / "d.json"
    result = CliRunner().invoke(app, ["diagnose", "--dataset", "scenes", "--limit", "6", "--methods", "catp,first", "--out", str(out)])
    assert result.exit_code == 0, result.output
    import json

    figures = json.loads(out.read_text())
    assert figures["num_images"] == 6 and figures["distinct_kept_sets"]["first"] == 1
    assert len(figures["object_share"]) == 32 and 0 < figures["object_patch_share"] < 1
    assert not math.isnan(figures["effective_rank"])


def test_diagnose_shows_its_progress(capsys):
    """A bar over the images (on a CPU the reference model's 500 images take over a minute), and none when asked."""
    model, processor = tiny_model("blip2-opt"), tiny_processor()
    images = [Image.new("RGB", (32, 32), color) for color in ("red", "green", "blue")]
    diagnose(model, processor, images, methods=["first"], keep=3, batch_size=2, progress=True)
    bar = capsys.readouterr().err
    assert "diagnose" in bar and "3/3" in bar
    diagnose(model, processor, images, methods=["first"], keep=3, batch_size=2, progress=False)
    assert "diagnose" not in capsys.readouterr().err
