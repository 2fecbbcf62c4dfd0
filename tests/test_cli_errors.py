"""Every ``catp`` command answers bad input with one usage error (exit 2, the bad value named,
no traceback), and a bug past the input checks still shows its traceback."""

from __future__ import annotations

import importlib

import pytest
from test_eval import said
from typer.testing import CliRunner

from catp.cli import app


@pytest.mark.parametrize(("args", "named"), [
    (["eval", "--methods", "foo"], "unknown method(s) foo"),
    (["eval", "--keep", "99"], "keep=99 is out of range"),
    (["eval", "--dataset", "vqav2"], "dataset 'vqav2' needs --questions"),
    (["eval", "--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["eval", "--dataset", "hf:./no/such.parquet"], "dataset 'hf:./no/such.parquet': no such file or directory"),
    (["eval", "--dataset", "easy-vqa", "--config", "x"], "--config and --columns apply to hf:NAME datasets"),
    (["eval", "--columns", "picture=img"], "unknown role 'picture'"),
    (["eval", "--model", "./no-such-model"], "no-such-model"),
    (["eval", "--prompt", "no slot"], "prompt must contain '{}'"),
    (["eval", "--dtype", "fp8"], "got 'fp8'"),
    (["bench", "--arch", "nope"], "unknown arch 'nope'"),
    (["bench", "--methods", "nope"], "unknown method 'nope'"),
    (["bench", "--dtype", "fp8"], "unknown dtype 'fp8'"),
    (["demo", "--methods", "nope"], "unknown method 'nope'"),
    (["demo", "--keeps", "99"], "keep=99 is out of range"),
    (["explain", "--out", "x.png", "--keep", "99"], "keep=99 is out of range"),
    (["explain", "--out", "x.png", "--methods", "catp,catp"], "each method may appear once"),
    (["explain", "--out", "x.png", "--image", "no-such.png", "--question", "what?"], "image file not found: no-such.png"),
    (["diagnose", "--methods", "nope"], "unknown method 'nope'"),
    (["diagnose", "--keep", "99"], "keep=99 is out of range"),
    (["diagnose", "--dtype", "fp8"], "got 'fp8'"),
    (["diagnose", "--dataset", "nope"], "got 'nope'"),
    (["diagnose", "--instruction", "look"], "has no instruction input"),
    (["methods", "--verbose"], "No such option: --verbose"),
])
def test_bad_input_is_one_usage_error(args, named, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert said(result.output, named), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "never-written").exists() and not (tmp_path / "x.png").exists()


def test_a_bug_after_the_input_checks_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError from the work itself (here: generation) is not reported as bad input."""
    module = importlib.import_module("catp.explain")  # (the package's `catp.explain` is the function)

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(module, "explain", broken)
    result = CliRunner().invoke(app, ["explain", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError) and str(result.exception) == "a bug"
