"""``catp demo`` runs offline on the embedded model and writes its PNG."""

from __future__ import annotations

from typer.testing import CliRunner

from catp.cli.app import app


def test_demo_prints_table_and_writes_png(tmp_path):
    out = tmp_path / "demo.png"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--methods", "catp,first", "--keep", "4", "--per-task", "2"])
    assert result.exit_code == 0, result.output
    assert "keep 4 of 32" in result.output and "catp" in result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_demo_rejects_unknown_method(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "x.png"), "--methods", "nope"])
    assert result.exit_code != 0
    assert not (tmp_path / "x.png").exists()


def test_the_demo_shows_an_adapted_model_beside_the_pruned_ones():
    import catp
    from catp.demo import demo_examples, run_demo

    model, processor = catp.reference.load()
    examples = demo_examples(1, ("easy-vqa",))
    result = run_demo(model, processor, examples, ("catp",), (4,), adapted=(model, "first"))
    assert ("first+adapter", 4) in result.runs
    assert result.kept[("first+adapter", 4)] == [[0, 1, 2, 3]]  # the adapted model runs the adapter's own method
    assert result.answers[("first+adapter", 4)] == run_demo(model, processor, examples, ("first",), (4,)).answers[("first", 4)]


def test_the_demo_runs_without_peft_and_says_so(tmp_path, monkeypatch):
    """`pip install -e . && catp demo` (no adapt extra) must still work: the shipped adapter is skipped with a note."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d.png"), "--methods", "first", "--keep", "4", "--per-task", "1"])
    assert result.exit_code == 0, result.output
    assert "needs peft" in result.output and "+adapter" not in result.output


def test_the_demo_figure_goes_to_a_temporary_folder_unless_out_is_given(tmp_path, monkeypatch):
    """`catp demo` leaves the working folder as it was: the figure goes to a new temporary folder, whose path it prints."""
    import catp.cli.demo as demo_cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo_cli, "run_demo", lambda *args, **kwargs: "result")
    monkeypatch.setattr(demo_cli, "print_demo", lambda *args, **kwargs: None)
    drawn = []
    monkeypatch.setattr(demo_cli, "draw_demo", lambda result, path: drawn.append(path) or path)
    result = CliRunner().invoke(app, ["demo", "--no-adapter", "--methods", "first", "--keep", "4", "--per-task", "1"])
    assert result.exit_code == 0, result.output
    (path,) = drawn
    assert path.name == "catp-demo.png" and path.parent.is_dir() and path.parent.parent != tmp_path
    assert f"wrote {path}" in result.output and not list(tmp_path.iterdir())
    path.parent.rmdir()
