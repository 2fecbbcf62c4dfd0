"""Selectors (divprune, dart, catp-diverse) against plain per-sample reference loops, and the selection contract."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import NUM_QUERY, tiny_inputs, tiny_model, top_k, top_order

import catp
from catp import scoring
from catp.methods import Captures, PruningMethod, get_method
from catp.selection import choose

SELECTORS = ("divprune", "dart", "catp-diverse")
B, Q, D = 3, 12, 7


# ---- reference implementations: one sample at a time, plain Python floats ---------------------


def ref_cos(a: list[float], b: list[float]) -> float:
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 0.0
    return sum(x * y for x, y in zip(a, b)) / (na * nb)


def ref_argmax(values: dict[int, float]) -> int:
    """Index of the largest value; the lower index on ties (candidates visited in index order)."""
    best = None
    for i in sorted(values):
        if best is None or values[i] > values[best]:
            best = i
    return best


def ref_divprune(tokens: list[list[float]], k: int) -> list[int]:
    n = len(tokens)
    dist = [[1 - ref_cos(tokens[i], tokens[j]) for j in range(n)] for i in range(n)]
    isolation = {i: min((dist[i][j] for j in range(n) if j != i), default=math.inf) for i in range(n)}
    kept = [ref_argmax(isolation)]
    while len(kept) < k:
        kept.append(ref_argmax({j: min(dist[j][i] for i in kept) for j in range(n) if j not in kept}))
    return kept


def ref_dart(tokens: list[list[float]], k: int, pivots: int) -> list[int]:
    n = len(tokens)
    norms = [math.sqrt(sum(x * x for x in t)) for t in tokens]
    chosen = sorted(range(n), key=lambda i: (-norms[i], i))[:pivots]
    others = [j for j in range(n) if j not in chosen]
    duplication = {j: max(ref_cos(tokens[j], tokens[p]) for p in chosen) for j in others}
    return chosen + sorted(others, key=lambda j: (duplication[j], j))[: k - pivots]


def ref_catp_diverse(votes: list[float], tokens: list[list[float]], k: int, lam: float) -> list[int]:
    n = len(tokens)
    low, high = min(votes), max(votes)
    value = [(v - low) / (high - low) if high > low else 0.0 for v in votes]
    kept = [ref_argmax(dict(enumerate(value)))]
    while len(kept) < k:
        kept.append(ref_argmax({j: value[j] - lam * max(ref_cos(tokens[j], tokens[i]) for i in kept)
                                for j in range(n) if j not in kept}))
    return kept


def batched_and_reference(name: str, tokens: torch.Tensor, votes: torch.Tensor, k: int, **options):
    """The batched function's picks and the reference's, per sample."""
    rows = tokens.double().tolist()
    if name == "divprune":
        return scoring.divprune_select(tokens, k).tolist(), [ref_divprune(r, k) for r in rows]
    if name == "dart":
        pivots = options.get("pivots") or scoring.default_dart_pivots(k)
        return scoring.dart_select(tokens, k, options.get("pivots")).tolist(), [ref_dart(r, k, pivots) for r in rows]
    lam = options.get("lam", 1.0)
    return (scoring.catp_diverse_select(votes, tokens, k, lam).tolist(),
            [ref_catp_diverse(v, r, k, lam) for v, r in zip(votes.tolist(), rows)])


def random_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, Q, D, generator=g), torch.randint(0, 200, (B, Q), generator=g).float()


# ---- picks equal the reference ------------------------------------------------------------------


@pytest.mark.parametrize("name, options", [
    ("divprune", {}), ("dart", {}), ("dart", {"pivots": 3}), ("catp-diverse", {}), ("catp-diverse", {"lam": 0.3}),
    ("catp-diverse", {"lam": 5.0}),
])
@pytest.mark.parametrize("k", [1, 4, 9, Q])
def test_picks_equal_reference(name, options, k):
    if "pivots" in options:
        options = {**options, "pivots": min(options["pivots"], k)}  # more pivots than k is an error (tested below)
    for seed in range(3):
        tokens, votes = random_case(seed)
        batched, reference = batched_and_reference(name, tokens, votes, k, **options)
        assert batched == reference, (seed, batched, reference)


def duplicates() -> torch.Tensor:
    """Six tokens on three axes, each twice: cosine exactly 1 (same axis) or 0, so every choice is a tie."""
    axes = torch.eye(3)
    return torch.stack([axes[0], axes[0], axes[1], axes[1], axes[2], axes[2]])[None]


def test_ties_go_to_the_lower_index():
    tokens = duplicates()
    # Every token has a duplicate (isolation 0): start at 0, then one per axis, then the duplicates.
    assert scoring.divprune_select(tokens, 6).tolist() == [[0, 2, 4, 1, 3, 5]]
    # Equal norms: pivot 0; tokens 2..5 tie at similarity 0 to it.
    assert scoring.dart_select(tokens, 4, pivots=1).tolist() == [[0, 2, 3, 4]]
    votes = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    assert scoring.catp_diverse_select(votes, tokens, 4, lam=2.0).tolist() == [[0, 2, 4, 1]]
    flat = torch.zeros(1, 6)
    assert scoring.catp_diverse_select(flat, tokens, 3, lam=1.0).tolist() == [[0, 2, 4]]  # equal votes: diversity alone
    for name in SELECTORS:
        batched, reference = batched_and_reference(name, tokens, votes, 4, pivots=1, lam=2.0)
        assert batched == reference, name


def test_near_duplicates_are_masked_not_repicked():
    # Scaled copies: 1 - cos can round to 0 or below; a kept token must never be picked again.
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 1, 16, generator=g)
    tokens = base * torch.tensor([1.0, 3.0, 1e-3, 7.0, 0.1]).view(1, 5, 1)
    for picks in (scoring.divprune_select(tokens, 5), scoring.dart_select(tokens, 5, pivots=2),
                  scoring.catp_diverse_select(torch.zeros(1, 5), tokens, 5, lam=1.0)):
        assert sorted(picks[0].tolist()) == list(range(5))


def test_lambda_zero_is_plain_catp():
    for seed in range(3):
        tokens, votes = random_case(seed)
        votes[:, 3] = votes[:, 5]  # a tie in the vote
        picks = scoring.catp_diverse_select(votes, tokens, 5, lam=0.0)
        assert torch.equal(picks, top_order(votes, 5))
        assert torch.equal(picks.sort(dim=1).values, top_k(votes, 5))


def test_keep_all_keeps_everything():
    tokens, votes = random_case(0)
    for picks in (scoring.divprune_select(tokens, Q), scoring.dart_select(tokens, Q),
                  scoring.catp_diverse_select(votes, tokens, Q, lam=1.0)):
        assert torch.equal(picks.sort(dim=1).values, torch.arange(Q).expand(B, -1))


def test_batched_equals_one_by_one_and_exact_k():
    tokens, votes = random_case(1)
    for k in (1, 5, Q):
        for name in SELECTORS:
            batched, _ = batched_and_reference(name, tokens, votes, k)
            alone = [batched_and_reference(name, tokens[i:i + 1], votes[i:i + 1], k)[0][0] for i in range(B)]
            assert batched == alone, name
            assert all(len(set(row)) == k for row in batched)


def test_default_dart_pivots():
    assert [scoring.default_dart_pivots(k) for k in (1, 4, 8, 12, 16, 20, 32)] == [1, 1, 1, 2, 2, 2, 4]


# ---- bad options ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, options, error, match", [
    ("catp-diverse", {"lam": -0.1}, ValueError, r"lam \(λ\) must be finite and >= 0"),
    ("catp-diverse", {"lam": float("nan")}, ValueError, "finite"),
    ("catp-diverse", {"lam": "1"}, TypeError, "must be a number"),
    ("dart", {"pivots": 0}, ValueError, "pivots=0 is out of range"),
    ("dart", {"pivots": 2.0}, TypeError, "pivots must be an int"),
    ("divprune", {"features": "vision"}, ValueError, "features must be one of 'projected', 'qformer'"),
    ("divprune", {"lam": 1.0}, TypeError, "unknown option"),
])
def test_bad_options(name, options, error, match):
    with pytest.raises(error, match=match):
        get_method(name, **options)


def test_bad_arguments_of_the_functions():
    tokens, votes = random_case(0)
    with pytest.raises(ValueError, match="pivots=5 is out of range; it must be in 1..4"):
        scoring.dart_select(tokens, 4, pivots=5)
    with pytest.raises(ValueError, match="must be finite and >= 0"):
        scoring.catp_diverse_select(votes, tokens, 4, lam=-1.0)
    with pytest.raises(ValueError, match=r"k must be an int in 1..12"):
        scoring.divprune_select(tokens, 0)
    with pytest.raises(ValueError, match=r"k must be an int in 1..12"):
        scoring.dart_select(tokens, Q + 1)
    with pytest.raises(ValueError, match="do not match"):
        scoring.catp_diverse_select(votes[:, :5], tokens, 4, lam=1.0)
    with pytest.raises(ValueError, match="shape"):
        scoring.divprune_select(tokens[0], 3)


@pytest.fixture(scope="module")
def opt_model():
    return tiny_model("blip2-opt")


def test_pivots_above_keep_fail_before_running(opt_model):
    with pytest.raises(ValueError, match="pivots=4 is out of range; it must be in 1..3"):
        with catp.pruned(opt_model, method="dart", keep=3, pivots=4):
            pytest.fail("entered the context")


# ---- the contract ------------------------------------------------------------------------------


class _Fixed(PruningMethod):
    """A selector returning whatever it is given."""

    name = "fixed"
    kind = "selector"

    def __init__(self, picks: torch.Tensor) -> None:
        self.picks = picks

    def select(self, captures: Captures, k: int) -> torch.Tensor:
        return self.picks


def _captures(batch: int = 2) -> Captures:
    return Captures(num_queries=NUM_QUERY, batch_size=batch, device=torch.device("cpu"))


def test_choose_sorts_a_selectors_picks_and_keeps_their_order():
    choice = choose(_Fixed(torch.tensor([[5, 1, 3], [0, 7, 2]])), _captures(), 3)
    assert choice.pick_order.tolist() == [[5, 1, 3], [0, 7, 2]]
    assert choice.keep_indices.tolist() == [[1, 3, 5], [0, 2, 7]]
    assert choice.scores is None


@pytest.mark.parametrize("picks, match", [
    (torch.tensor([[5, 1, 1], [0, 7, 2]]), "twice"),
    (torch.tensor([[5, 1, 8], [0, 7, 2]]), "outside 0..7"),
    (torch.tensor([[5, 1], [0, 7]]), r"shape \(rows, k\) = \(2, 3\)"),
    (torch.tensor([[5.0, 1.0, 3.0], [0.0, 7.0, 2.0]]), "integer indices"),
])
def test_choose_rejects_bad_picks(picks, match):
    with pytest.raises(ValueError, match=match):
        choose(_Fixed(picks), _captures(), 3)


def test_a_method_must_implement_score_or_select():
    class Nothing(PruningMethod):
        name = "nothing"

    with pytest.raises(NotImplementedError, match="neither score"):
        choose(Nothing(), _captures(), 3)


@pytest.mark.parametrize("family", ["blip2-opt", "instructblip-t5"])
@pytest.mark.parametrize("features", ["projected", "qformer"])
def test_selectors_on_a_model_select_among_the_right_tokens(family, features):
    """pick_order on a model = the selection function on the tokens it should select among (and catp's votes).

    (The functions equal the reference loops above; here the Q-Former outputs end with a
    LayerNorm, so their norms tie up to rounding and float32 and float64 may order them apart.)
    """
    model = tiny_model(family)
    inputs = tiny_inputs(family)
    qformer = {k: v for k, v in inputs.items() if k.startswith("qformer_")}
    with torch.no_grad():
        out = model.get_image_features(inputs["pixel_values"], **qformer)
    tokens = out.pooler_output if features == "projected" else out.qformer_outputs.last_hidden_state[:, :NUM_QUERY]
    k = 5
    with catp.pruned(model, method="catp", keep=k) as plain, torch.no_grad():
        model.get_image_features(inputs["pixel_values"], **qformer)
    votes = plain.scores  # catp's votes, which catp-diverse normalises
    for name in SELECTORS:
        with catp.pruned(model, method=get_method(name, features=features), keep=k) as session, torch.no_grad():
            model.get_image_features(inputs["pixel_values"], **qformer)
        expected, _ = batched_and_reference(name, tokens, votes, k)
        assert session.pick_order.tolist() == expected, name
        assert torch.equal(session.keep_indices, session.pick_order.sort(dim=1).values)
        assert session.scores is None


def test_catp_methods_lists_every_method_with_its_kind_in_plain_text():
    from typer.testing import CliRunner

    from catp.cli.app import app

    result = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    lines = {line.split("│")[1].strip(): line for line in result.output.splitlines() if line.count("│") >= 3}
    assert set(catp.METHODS) <= set(lines)
    for name in catp.METHODS:
        assert catp.methods.method_class(name).kind in lines[name], name
        assert ("selector" in lines[name]) == (name in SELECTORS), name
    assert "``" not in result.output and ":func:" not in result.output  # no reST markup
    assert "DivPrune, CVPR 2025" in lines["divprune"] and "DART, arXiv 2502.11494" in lines["dart"]
