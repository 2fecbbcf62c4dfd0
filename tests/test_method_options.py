"""Every method checks its options in its constructor: a method object that exists can run.

The vLLM plugin relies on this to refuse a bad request before it reaches the engine process,
and the Hugging Face path fails at once instead of inside a forward pass.
"""

from __future__ import annotations

import pytest
import torch

import catp
from catp.methods import Captures


@pytest.mark.parametrize(
    ("method", "options", "error", "match"),
    [
        ("random", {"seed": "x"}, TypeError, "seed must be an int"),
        ("random", {"seed": None}, TypeError, "seed must be an int"),
        ("random", {"seed": 1.0}, TypeError, "seed must be an int"),
        ("random", {"seed": True}, TypeError, "seed must be an int"),
        ("random", {"seed": -1}, ValueError, "seed=-1 is out of range"),
        ("random", {"seed": 2**63}, ValueError, "out of range"),
        ("random", {"seed": []}, ValueError, "empty"),
        ("random", {"seed": [1, "2"]}, TypeError, "a seed must be an int"),
        ("random", {"seed": {"a": 1}}, TypeError, "seed must be an int"),
        ("catp-layer", {"layer_weights": "abc"}, TypeError, "list of numbers"),
        ("catp-layer", {"layer_weights": [1, None]}, TypeError, "list of numbers"),
        ("catp-layer", {"layer_weights": [[1, 2]]}, TypeError, "list of numbers"),
        ("catp-layer", {"layer_weights": [True] * 6}, TypeError, "list of numbers"),
        ("catp-layer", {"layer_weights": []}, ValueError, "empty"),
        ("catp-layer", {"layer_weights": [-1.0, 1.0]}, ValueError, "non-negative"),
        ("catp-layer", {"layer_weights": [10**400]}, ValueError, "finite"),
        ("catp-layer", {"layer_weights": [0, 0]}, ValueError, "all be zero"),
        ("dart", {"pivots": "2"}, TypeError, "pivots must be an int"),
        ("dart", {"pivots": 0}, ValueError, "pivots=0"),
        ("dart", {"features": None}, ValueError, "features must be one of"),
        ("catp-diverse", {"lam": "1"}, TypeError, "must be a number"),
        ("catp-diverse", {"lam": float("inf")}, ValueError, "finite"),
        ("divprune", {"features": ["projected"]}, ValueError, "features must be one of"),
    ],
)
def test_constructor_refuses_bad_options(method, options, error, match):
    with pytest.raises(error, match=match):
        catp.get_method(method, **options)


def test_long_values_are_shortened_in_messages():
    with pytest.raises(ValueError) as info:
        catp.get_method("catp-layer", layer_weights=[-1.0] * 100_000)
    assert len(str(info.value)) < 200


def test_seed_list_fixes_the_rows():
    assert catp.get_method("random", seed=[1, 2, 3]).rows() == 3
    assert catp.get_method("random", seed=3).rows() is None
    assert catp.get_method("catp").rows() is None
    captures = Captures(num_queries=8, batch_size=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="got 3 seeds for a batch of 2 rows"):
        catp.get_method("random", seed=[1, 2, 3]).score(captures, 0.5)
