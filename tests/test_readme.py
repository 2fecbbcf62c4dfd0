"""The README quotes what is measured now: its results block is what the committed summaries give,
and its code example runs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import torch
from tiny_models import tiny_inputs, tiny_model

import catp
from catp import methods as methods_module
from tools.readme_results import load_summaries, readme_block, results_block

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_results_block_is_what_the_summaries_give():
    assert readme_block(README.read_text(encoding="utf-8")) == results_block(load_summaries()), (
        "README.md's results block is stale: run python tools/readme_results.py")


def test_a_changed_figure_or_winner_changes_the_block():
    """The check above can fail: a figure changed in a summary changes the block, and so does a new winner."""
    summaries = load_summaries()
    block = results_block(summaries)
    changed = copy.deepcopy(summaries)
    row = next(r for r in changed["easy-vqa"]["rows"] if r["config"] == "catp@8")
    row["accuracy"] += 0.3
    assert results_block(changed) != block
    winner = copy.deepcopy(summaries)
    row = next(r for r in winner["scenes"]["rows"] if r["config"] == "first@4")
    row["accuracy"], row["ci_high"] = 99.0, 99.5
    new = results_block(winner)
    assert "`first` 99.0" in new and "`first` 99.0" not in block
    verdicts = copy.deepcopy(summaries)
    for comparison in verdicts["budgets-easy-vqa"]["budget_comparisons"]:
        comparison["verdict"] = "win"
    assert "9 wins, 0 ties, 0 losses in 9" in results_block(verdicts)
    adapter = copy.deepcopy(summaries)  # the adapter's rows: a target now met leaves the list of those missed
    for row in adapter["adapter-targets.json"]["rows"]:
        row["met"] = row["met"] if row["met"] is None else True
    met = results_block(adapter)
    assert "missed:" in block and "missed:" not in met and met != block


def test_the_readme_example_of_a_method_runs():
    code = next(block for block in re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
                if "class Central" in block)
    saved = dict(methods_module._REGISTRY)
    try:
        namespace: dict = {}
        exec(code, namespace)
        assert "central" in catp.METHODS
        model = tiny_model("blip2-opt")
        with catp.pruned(model, method="central", keep=3) as session, torch.no_grad():
            model.generate(**tiny_inputs("blip2-opt"), max_new_tokens=2)
        assert session.keep_counts.tolist() == [3] * session.keep_counts.shape[0]
    finally:
        methods_module._REGISTRY.clear()
        methods_module._REGISTRY.update(saved)


def test_ci_runs_the_readme_test_command_and_the_readme_states_the_declared_range():
    """`.ci/run` runs the README's test command word for word and installs with its lmms-eval recipe,
    and the transformers range the README states is the one pyproject.toml declares (and .ci/run tests at its bottom)."""
    import tomllib

    root = README.parent
    readme = README.read_text(encoding="utf-8")
    commands = re.findall(r"```bash\n(pip install torch[^\n]*)\n```", readme)
    assert len(commands) == 3 and all("download.pytorch.org/whl/cpu" in c for c in commands)  # the CPU build
    test_command = next(c for c in commands if "pytest" in c)
    ci = (root / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci.splitlines()
    lmms_recipe = next(c for c in commands if "lmms-eval" in c)
    assert "--no-deps lmms-eval==" in lmms_recipe and lmms_recipe in ci.splitlines()
    declared = next(d for d in tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
                    if d.startswith("transformers"))
    low, high = re.fullmatch(r"transformers>=([\d.]+),<([\d.]+)", declared).groups()
    assert f"Tested range: `{declared}`" in readme
    assert f'pip install "transformers=={low}.0"' in ci
