"""The one path from a method to the kept set (``catp.selection.choose``), the method registry,
and a user's own method run through ``pruned()`` and ``catp eval``."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from typing import ClassVar

import pytest
import torch
from test_eval import FAST, jsonl_dataset, model_dir  # noqa: F401 (fixtures)
from tiny_models import NUM_QUERY, tiny_inputs, tiny_model, top_k, top_order
from typer.testing import CliRunner

import catp
from catp import methods as methods_module
from catp.budget import Budget
from catp.cli.app import app
from catp.methods import Captures, PruningMethod, get_method, register_method
from catp.selection import choose

Q = NUM_QUERY


@pytest.fixture(autouse=True)
def restore_registry():
    """Methods registered by a test leave the registry as it was."""
    saved = dict(methods_module._REGISTRY)
    yield
    methods_module._REGISTRY.clear()
    methods_module._REGISTRY.update(saved)


def _captures(rows: int, frames: int = 1, seed: int = 0) -> Captures:
    """Random tokens; ``query_output[:, 0, 0]`` holds each row's index, so a subset of rows is traceable."""
    g = torch.Generator().manual_seed(seed)
    query_output = torch.randn(rows, Q, 6, generator=g)
    query_output[:, 0, 0] = torch.arange(rows)
    return Captures(num_queries=Q, batch_size=rows, num_frames=frames, device=torch.device("cpu"),
                    query_output=query_output, projected=torch.randn(rows, Q, 5, generator=g))


@dataclasses.dataclass
class Fixed(PruningMethod):
    """A scorer that returns given scores and records its calls (rows, keep fraction)."""

    name: ClassVar[str] = "fixed-scores"
    scores: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(1, Q))
    by_keep: bool = False
    calls: list = dataclasses.field(default_factory=list)

    def depends_on_keep(self) -> bool:
        return self.by_keep

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        self.calls.append((captures.batch_size, keep_fraction))
        rows = captures.query_output[:, 0, 0].long()  # which rows these are (see _captures)
        return self.scores[rows] + (keep_fraction if self.by_keep else 0.0) * torch.arange(Q)


def test_a_count_per_row_keeps_each_rows_own_top_k_padded_with_minus_one():
    scores = torch.randn(3, Q, generator=torch.Generator().manual_seed(1))
    method = Fixed(scores=scores)
    choice = choose(method, _captures(3), torch.tensor([2, 5, 3]))
    assert choice.counts.tolist() == [2, 5, 3]
    for row, k in enumerate((2, 5, 3)):
        assert choice.keep_indices[row, :k].tolist() == top_k(scores[row:row + 1], k)[0].tolist()
        assert choice.pick_order[row, :k].tolist() == top_order(scores[row:row + 1], k)[0].tolist()
        assert (choice.keep_indices[row, k:] == -1).all() and (choice.pick_order[row, k:] == -1).all()
    assert len(method.calls) == 1  # scores that do not depend on k: one call for the batch
    assert torch.equal(choice.scores, scores)


def test_scores_that_depend_on_the_count_are_computed_once_per_distinct_count_on_its_rows():
    scores = torch.randn(4, Q, generator=torch.Generator().manual_seed(2))
    method = Fixed(scores=scores, by_keep=True)
    choice = choose(method, _captures(4), torch.tensor([2, 4, 2, 4]))
    assert sorted(method.calls) == [(2, 2 / Q), (2, 4 / Q)]
    for row, k in enumerate((2, 4, 2, 4)):
        expected = top_k(scores[row:row + 1] + k / Q * torch.arange(Q), k)[0]
        assert choice.keep_indices[row, :k].tolist() == expected.tolist()


def test_catp_layer_default_weights_follow_each_rows_own_count():
    """The weights of catp-layer's default depend on the keep fraction: one batch with two counts
    equals two batches with one count each."""
    g = torch.Generator().manual_seed(3)
    layers = [torch.rand(2, 2, 32, 9, generator=g).softmax(dim=-1) for _ in range(6)]
    captures = Captures(num_queries=32, batch_size=2, device=torch.device("cpu"), cross_attentions=layers)
    method = get_method("catp-layer")
    mixed = choose(method, captures, torch.tensor([16, 4]))
    for row, k in enumerate((16, 4)):
        alone = choose(method, captures.take_rows(torch.tensor([row])), k)
        assert mixed.keep_indices[row, :k].tolist() == alone.keep_indices[0].tolist()
    # (and the two fractions do weigh the layers differently)
    assert not torch.equal(method.weights_for(6, 0.5), method.weights_for(6, 0.125))


def test_a_selector_runs_once_per_distinct_count_and_matches_single_calls():
    captures = _captures(4, seed=4)
    mixed = choose(get_method("divprune"), captures, torch.tensor([3, 6, 3, 1]))
    for row, k in enumerate((3, 6, 3, 1)):
        alone = choose(get_method("divprune"), captures.take_rows(torch.tensor([row])), k)
        assert mixed.pick_order[row, :k].tolist() == alone.pick_order[0].tolist()
        assert mixed.keep_indices[row, :k].tolist() == alone.keep_indices[0].tolist()
    assert mixed.scores is None and mixed.counts.tolist() == [3, 6, 3, 1]


def test_a_budget_goes_through_the_same_path():
    scores = torch.tensor([[9.0, 1, 1, 1, 1, 1, 1, 1], [5, 5, 5, 5, 0, 0, 0, 0]])
    choice = choose(Fixed(scores=scores), _captures(2), Budget(mass=1.0))
    assert choice.counts.tolist() == [1, 4]
    assert choice.keep_indices.tolist() == [[0, -1, -1, -1], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match="is a selector"):
        choose(get_method("divprune"), _captures(2), Budget(mass=0.8))


def test_video_groups_are_samples_or_frames():
    frames = 3
    scores = torch.randn(2 * frames, Q, generator=torch.Generator().manual_seed(5))
    per_sample = choose(Fixed(scores=scores), _captures(2 * frames, frames), torch.tensor([4, 7]), scope="video")
    flat = scores.reshape(2, frames * Q)
    assert per_sample.keep_indices[0, :4].tolist() == top_k(flat[:1], 4)[0].tolist()
    assert per_sample.keep_indices[1].tolist() == top_k(flat[1:], 7)[0].tolist()
    per_frame = choose(Fixed(scores=scores), _captures(2 * frames, frames), 2, scope="frame")
    expected = top_k(scores, 2) + (torch.arange(2 * frames) % frames * Q)[:, None]
    assert per_frame.keep_indices.tolist() == expected.reshape(2, -1).tolist()
    assert per_frame.counts.tolist() == [2 * frames] * 2
    with pytest.raises(ValueError, match="use scope='frame'"):
        choose(get_method("dart"), _captures(2 * frames, frames), 2, scope="video")


@pytest.mark.parametrize(("keep", "error", "match"), [
    (0, ValueError, "keep=0 is out of range"),
    (Q + 1, ValueError, f"keep={Q + 1} is out of range"),
    (torch.tensor([2, 0]), ValueError, "keep=0 is out of range"),
    (torch.tensor([2, 3, 4]), ValueError, "one count per group"),
    (torch.tensor([0.5, 0.5]), TypeError, "counts must be integers"),
    (True, TypeError, "keep must be an int count"),
])
def test_bad_counts_are_named(keep, error, match):
    with pytest.raises(error, match=match):
        choose(get_method("first"), _captures(2), keep)


# ---- the registry ----------------------------------------------------------------------------


@dataclasses.dataclass
class EveryOther(PruningMethod):
    """A user's method: keeps the even-numbered query tokens first (a fixed pattern)."""

    name: ClassVar[str] = "every-other"
    kind: ClassVar[str] = "baseline"
    carries_budget: ClassVar[bool] = False
    offset: int = 0

    def score(self, captures: Captures, keep_fraction: float) -> torch.Tensor:
        even = (torch.arange(captures.num_queries) + self.offset) % 2 == 0
        return even.float().expand(captures.batch_size, -1).clone()


def test_register_method_puts_a_class_in_the_live_registry_once():
    assert "every-other" not in catp.METHODS
    assert register_method(EveryOther) is EveryOther
    assert "every-other" in catp.METHODS and catp.METHODS[-1] == "every-other"
    register_method(EveryOther)  # again: nothing changes
    assert list(catp.METHODS).count("every-other") == 1
    assert get_method("every-other", offset=1).offset == 1
    with pytest.raises(TypeError, match="got unknown option"):
        get_method("every-other", ofset=1)


def test_register_method_refuses_bad_classes():
    class Taken(EveryOther):
        name: ClassVar[str] = "catp"

    class BadKind(EveryOther):
        name: ClassVar[str] = "bad-kind"
        kind: ClassVar[str] = "magic"

    class Both(EveryOther):
        name: ClassVar[str] = "both"

        def select(self, captures: Captures, k: int) -> torch.Tensor:
            return torch.zeros(captures.batch_size, k, dtype=torch.long)

    with pytest.raises(ValueError, match="method name 'catp' is taken"):
        register_method(Taken)
    with pytest.raises(ValueError, match="kind must be one of catp, baseline, selector"):
        register_method(BadKind)
    with pytest.raises(TypeError, match="exactly one of score"):
        register_method(Both)
    with pytest.raises(TypeError, match="subclass of catp.PruningMethod"):
        register_method(dict)


def test_a_method_by_import_path_is_registered_on_first_use():
    method = get_method("test_choose:EveryOther")
    assert isinstance(method, EveryOther) and "every-other" in catp.METHODS
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        get_method("no_such_module:X")
    with pytest.raises(ValueError, match="has no PruningMethod subclass named 'Nope'"):
        get_method("test_choose:Nope")


def test_comparisons_follow_the_kind():
    from catp.methods import compared_with

    assert compared_with("catp") == ("l2norm", "selfattn", "first", "random")
    assert set(compared_with("divprune")) == {"catp", "catp-all", "catp-layer", "catp-image", "l2norm", "selfattn", "first", "random"}
    assert compared_with("l2norm") == () and compared_with("l2norm", extra=["catp"]) == ("catp",)
    register_method(EveryOther)
    assert "every-other" in compared_with("catp")  # a user's baseline is compared with at once
    assert compared_with("catp", present=["catp", "first"]) == ("first",)


def test_a_users_method_runs_in_pruned_and_in_catp_eval(model_dir, jsonl_dataset, tmp_path):  # noqa: F811
    """Defined here, named on the command line as module:Class, run by catp eval, reported by its kind."""
    out = tmp_path / "run"
    args = ["eval", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--out", str(out),
            "--methods", "test_choose:EveryOther,first", *FAST, "--keep", "4"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["config"]: r for r in summary["rows"]}
    assert rows["every-other@4"]["n"] == 10 and rows["every-other@4"]["kept_mean"] == 4
    # kind "baseline": compared with nothing by default, and first (a baseline too) is not compared with it
    assert not any(c["method"] == "every-other" or c["baseline"] == "every-other" for c in summary["comparisons"])
    records = [json.loads(line) for line in (out / "predictions-0.jsonl").read_text().splitlines()]
    assert {r["method"] for r in records} == {"unpruned", "every-other", "first"}
    model = tiny_model("blip2-opt")
    with catp.pruned(model, method=EveryOther(offset=1), keep=3) as session, torch.no_grad():
        model.generate(**tiny_inputs("blip2-opt"), max_new_tokens=2)
    assert session.keep_indices.tolist() == [[1, 3, 5]] * session.keep_indices.shape[0]


def test_import_catp_is_lean():
    code = ("import catp, sys; print(sorted(m for m in ('typer', 'rich', 'matplotlib', 'datasets', 'easy_vqa', 'peft', 'vllm', "
            "'transformers.models.blip_2.modeling_blip_2', 'transformers.modeling_utils') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
