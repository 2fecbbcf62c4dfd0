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
