"""Every ``catp`` command answers bad input with one usage error (exit 2, the bad value named,
no traceback), before any model runs; nothing to run is an error; and a bug past the input
checks still shows its traceback."""

from __future__ import annotations

import importlib
import json

import pytest
from test_eval import FAST, jsonl_dataset, model_dir, said  # noqa: F401 (fixtures)
from typer.testing import CliRunner

from catp.cli.app import app

# {tmp}: the test's folder (also the working directory); {model}: a tiny BLIP-2 checkpoint;
# {data}: a 10-question JSONL dataset for it. Each case: the arguments, then text the one-line
# error must hold (the bad value or the option it names).
CASES = [
    # names a method, a keep, a dataset, a model, a prompt, a dtype, a device that is not there
    (["eval", "--methods", "foo"], "unknown method 'foo'"),
    (["eval", "--methods", ""], "no method given"),
    (["eval", "--methods", "no_such_module:X"], "cannot import module 'no_such_module'"),
    (["eval", "--compare", "catp,randomm"], "unknown method 'randomm'"),
    (["eval", "--keep", "99"], "keep=99 is out of range"),
    (["eval", "--keep", "0"], "keep=0 is out of range"),
    (["eval", "--keep", "half"], "cannot read keep 'half'"),
    (["eval", "--keep", "mass:2"], "Budget mass=2.0 is out of range"),
    (["eval", "--dataset", "vqav2"], "dataset 'vqav2' needs --questions"),
    (["eval", "--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["eval", "--dataset", "hf:./no/such.parquet"], "dataset 'hf:./no/such.parquet': no such file or directory"),
    (["eval", "--dataset", "easy-vqa", "--config", "x"], "--config and --columns apply to hf:NAME datasets"),
    (["eval", "--columns", "picture=img"], "unknown role 'picture'"),
    (["eval", "--model", "./no-such-model"], "./no-such-model: no such directory"),
    (["eval", "--model", "/path/that/does/not/exist"], "/path/that/does/not/exist: no such directory"),
    (["eval", "--model", "{tmp}/bert"], "a 'bert' model has no Q-Former"),
    (["eval", "--prompt", "no slot"], "prompt must contain exactly one '{}'"),
    (["eval", "--dtype", "fp8"], "got 'fp8'"),
    (["eval", "--dtype", "fp16"], "dtype must be one of auto, float32, float16, bfloat16, got 'fp16'"),
    (["eval", "--device", "cuda"], "CUDA is not available"),
    (["eval", "--device", "gpu"], "device must be cpu, cuda or cuda:N"),
    (["eval", "--out", "{tmp}/a-file"], "is a file"),
    # nothing to run
    (["eval", "--model", "{model}", "--dataset", "{tmp}/empty.jsonl", "--keep", "4"], "has no questions: nothing to run"),
    (["eval", "--model", "{model}", "--dataset", "{data}", "--methods", "first", "--keep", "mass:0.8"], "nothing to run"),
    # bench
    (["bench", "--arch", "nope"], "unknown arch 'nope'"),
    (["bench", "--methods", "nope"], "unknown method 'nope'"),
    (["bench", "--dtype", "fp8"], "got 'fp8'"),
    (["bench", "--dtype", "bf16"], "got 'bf16'"),
    (["bench", "--device", "cuda"], "CUDA is not available"),
    (["bench", "--model", "{tmp}/bert"], "a 'bert' model has no Q-Former"),
    (["bench", "--batch", "0"], "--batch must be positive integers"),
    (["bench", "--plot", "{tmp}/p.txt"], "cannot write a figure to"),
    (["bench", "--engine", "vllm", "--adapter", "{tmp}/adapter"], "--adapter: not used by --engine vllm"),
    (["bench", "--engine", "trt"], "--engine must be one of hf, vllm"),
    (["bench", "--requests", "8"], "--requests 8 would be ignored: it applies to --engine vllm"),
    (["bench", "--engine", "vllm", "--beams", "3"], "--beams: not used by --engine vllm"),
    (["bench", "--engine", "vllm", "--methods", "catp,first"], "--engine vllm times one method"),
    (["bench", "--engine", "vllm", "--keep", "8,mass:0.8"], "before the vision encoder"),
    (["bench", "--engine", "vllm", "--keep", "99"], "keep=99 is out of range"),
    (["bench", "--engine", "vllm", "--requests", "0"], "--requests': Input should be greater than or equal to 1"),
    (["bench", "--engine", "vllm", "--arch", "nope"], "unknown arch 'nope'"),
    # demo
    (["demo", "--methods", "nope"], "unknown method 'nope'"),
    (["demo", "--keep", "99"], "keep=99 is out of range"),
    (["demo", "--keeps", "8"], "No such option: --keeps"),
    (["demo", "--out", "{tmp}/d.txt"], "cannot write a figure to"),
    (["demo", "--out", "{tmp}/a-file/d.png"], "a file is in the way"),
    # explain
    (["explain", "--out", "x.png", "--keep", "99"], "keep=99 is out of range"),
    (["explain", "--out", "x.png", "--keep", "mass:0.8"], "not a budget"),
    (["explain", "--out", "x.png", "--keep", "8,4"], "give one keep value"),
    (["explain", "--out", "x.png", "--image", "no-such.png", "--question", "what?"], "image file not found: no-such.png"),
    (["explain", "--out", "x.png", "--image", "missing.png"], "image file not found: missing.png"),
    (["explain", "--out", "x.png", "--image", "{tmp}/a-file", "--question", "what?"], "as an image"),
    (["explain", "--out", "e.txt"], "cannot write a figure to 'e.txt'"),
    (["explain", "--out", "{tmp}/a-file/e.png"], "a file is in the way"),
    (["explain", "--out", "x.png", "--model", "/path/that/does/not/exist"], "no such directory"),
    # diagnose
    (["diagnose", "--methods", "nope"], "unknown method 'nope'"),
    (["diagnose", "--keep", "99"], "keep=99 is out of range"),
    (["diagnose", "--dtype", "fp8"], "got 'fp8'"),
    (["diagnose", "--dtype", "fp16"], "--dtype"),
    (["diagnose", "--device", "cuda"], "CUDA is not available"),
    (["diagnose", "--dataset", "nope"], "got 'nope'"),
    (["diagnose", "--instruction", "look"], "has no instruction input"),
    (["diagnose", "--images", "{tmp}/no-such-folder"], "must be a folder of images"),
    (["methods", "--verbose"], "No such option: --verbose"),
]


@pytest.fixture
def workdir(tmp_path, monkeypatch, model_dir, jsonl_dataset):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not an image, not a folder")
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    return {"tmp": str(tmp_path), "model": str(model_dir), "data": str(jsonl_dataset)}


@pytest.mark.parametrize(("args", "named"), CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input_is_one_usage_error(args, named, workdir, tmp_path):
    def fill(text: str) -> str:
        for key, value in workdir.items():
            text = text.replace("{" + key + "}", value)
        return text

    result = CliRunner().invoke(app, [fill(a) for a in args])
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert said(result.output, fill(named)), result.output
    assert "Traceback" not in result.output and "BytesIO" not in result.output
    written = {p.name for p in tmp_path.iterdir()} - {"a-file", "empty.jsonl", "bert"}
    assert not written & {"x.png", "e.txt", "d.txt", "catp-eval", "bench.json", "catp-demo.png"}


def test_a_bug_after_the_input_checks_keeps_its_traceback(tmp_path, monkeypatch):
    """A ValueError from the work itself (here: generation) is not reported as bad input."""
    module = importlib.import_module("catp.cli.explain")

    def broken(*args, **kwargs):
        raise ValueError("a bug")

    monkeypatch.setattr(module, "explain", broken)
    result = CliRunner().invoke(app, ["explain", "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError) and str(result.exception) == "a bug"


def test_output_paths_are_checked_and_their_folders_made(tmp_path):
    from catp.cli.options import check_figure_path, output_dir, output_file

    assert check_figure_path(tmp_path / "no" / "such" / "dir" / "e.png").parent.is_dir()
    assert output_dir(tmp_path / "run" / "a").is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        output_dir(tmp_path / "f")
    with pytest.raises(ValueError, match="is a folder"):
        output_file(tmp_path / "run")
