"""catp eval: the sweep, resume after a kill, 2 processes vs 1, reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tiny_models import BOS, IMAGE_TOKEN, NUM_QUERY, PAD, VOCAB, tiny_model
from typer.testing import CliRunner

import catp
from catp.cli.app import app
from catp.evaluation import harness, report
from catp.evaluation.datasets import load_dataset

WORDS = "what color is the shape circle square red blue green yes no there a".split()
# Small sweep on the 8-query tiny model: short generations keep the tests fast.
FAST = ["--keep", "4,2", "--num-beams", "2", "--max-new-tokens", "3", "--no-progress"]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": PAD, "</s>": BOS}
    vocab.update({word: 3 + i for i, word in enumerate(WORDS + ["?", ":", "Question", "Short", "answer"])})
    vocab.update({f"w{i}": i for i in range(len(vocab), VOCAB) if i != IMAGE_TOKEN})  # every id the model can emit decodes
    vocab["<image>"] = IMAGE_TOKEN
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")
    core.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="</s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"}, padding_side="left")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A tiny BLIP-2 (OPT) with a processor, saved like a hub checkpoint."""
    from transformers import Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    path = tmp_path_factory.mktemp("tiny-blip2")
    tiny_model("blip2-opt").save_pretrained(path)
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    Blip2Processor(image_processor=image_processor, tokenizer=_tokenizer(), num_query_tokens=NUM_QUERY).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def jsonl_dataset(tmp_path_factory) -> Path:
    """10 questions of varied length over 4 generated images, as a JSONL file."""
    root = tmp_path_factory.mktemp("data")
    colors = ["red", "blue", "green", "red"]
    for i, color in enumerate(colors):
        Image.new("RGB", (32, 32), color).save(root / f"{i}.png")
    lines = []
    for i in range(10):
        question = "what color is the shape ?" if i % 2 else "is there a red circle ?" + " shape" * (i % 3)
        answers = [colors[i % 4]] if i % 2 else ["yes", "no", "yes"]
        lines.append(json.dumps({"id": f"q{i}", "image": f"{i % 4}.png", "question": question, "answers": answers}))
    (root / "questions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "questions.jsonl"


def said(output: str, text: str) -> bool:
    """Whether a command's ``output`` holds ``text``, however rich's error box wrapped it
    (borders and all whitespace are ignored)."""
    def squash(s: str) -> str:
        return "".join(s.replace("│", "").split())

    return squash(text) in squash(output)


def _records(out: Path) -> dict:
    return {key: (r["prediction"], r["accuracy"], r["llm_tokens"]) for key, r in harness.read_predictions(out).items()}


def _eval(model_dir: Path, data: Path, out: Path, *extra: str):
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", str(data), "--out", str(out), *FAST, *extra])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert torch.is_grad_enabled()  # the command leaves autograd as it found it (training tests share the process)
    return result


@pytest.fixture(scope="session")
def full_run(model_dir, jsonl_dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    _eval(model_dir, jsonl_dataset, out, "--batch-size", "3")
    return out


def test_eval_writes_every_config_and_the_reports(full_run):
    records = harness.read_predictions(full_run)
    configs = {name for name, _ in records}
    assert configs == {"unpruned"} | {f"{m}@{k}" for m in catp.METHODS for k in (4, 2)}
    assert len(records) == len(configs) * 10
    for name in ("summary.json", "summary.csv", "summary.md", "accuracy.png"):
        assert (full_run / name).stat().st_size > 0
    summary = json.loads((full_run / "summary.json").read_text())
    rows = {r["config"]: r for r in summary["rows"]}
    # Tokens into the LLM: kept queries + the text tokens of each prompt.
    assert rows["catp@2"]["llm_tokens"] == pytest.approx(rows["unpruned"]["llm_tokens"] - (NUM_QUERY - 2))
    mean = 100 * sum(r["accuracy"] for (name, _), r in records.items() if name == "catp@4") / 10
    assert rows["catp@4"]["accuracy"] == pytest.approx(mean)
    assert "| catp |" in (full_run / "summary.md").read_text()


def test_predictions_match_a_direct_generate(full_run, model_dir, jsonl_dataset):
    """One record checked against catp.pruned + generate by hand."""
    from catp.models import load_model

    model, processor = load_model(str(model_dir), "float32", "cpu")
    question = load_dataset(str(jsonl_dataset))[1]
    inputs = processor(images=[question.load_image()], text=[f"Question: {question.question} Short answer:"], return_tensors="pt")
    with catp.pruned(model, method="catp", keep=2), torch.no_grad():
        out = model.generate(**inputs, num_beams=2, max_new_tokens=3, min_new_tokens=1)
    expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip()
    assert harness.read_predictions(full_run)[("catp@2", question.id)]["prediction"] == expected


def test_killed_run_resumes_to_the_uninterrupted_result(full_run, model_dir, jsonl_dataset, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = {"n": 0}
    real = harness._generate

    configs = 1 + 2 * len(catp.METHODS)  # unpruned + every method at keep 4 and 2
    stop_after = configs + configs // 2  # mid-way through the second batch of 3 questions

    def dies_after_some_batches(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > stop_after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "_generate", dies_after_some_batches)
    with pytest.raises(BaseException):
        _eval(model_dir, jsonl_dataset, out, "--batch-size", "3")
    partial = harness.read_predictions(out)
    assert 0 < len(partial) < len(_records(full_run))
    # A kill in the middle of a write leaves half a line behind.
    with (out / "predictions-0.jsonl").open("a") as f:
        f.write('{"config": "catp@4", "id": "q')
    monkeypatch.setattr(harness, "_generate", real)
    counted = {"n": 0}

    def counting(*args, **kwargs):
        counted["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(harness, "_generate", counting)
    _eval(model_dir, jsonl_dataset, out, "--batch-size", "3")
    assert _records(out) == _records(full_run)
    # Nothing already written was recomputed: only the interrupted batch's missing configs and later batches.
    assert counted["n"] == configs * 4 - stop_after
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads((full_run / "summary.json").read_text())["rows"]


def test_resume_refuses_other_settings(full_run, model_dir, jsonl_dataset, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_run, out)
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--out", str(out),
                                      *FAST, "--seed", "1"])
    assert result.exit_code == 2 and said(result.output, "seed: 0 -> 1")


def test_random_method_seeds_per_question_not_per_batch(full_run, model_dir, jsonl_dataset, tmp_path):
    out = tmp_path / "run"
    _eval(model_dir, jsonl_dataset, out, "--batch-size", "4", "--methods", "random")
    mine = _records(out)
    assert {k[0] for k in mine} == {"unpruned", "random@4", "random@2"}
    assert mine == {k: v for k, v in _records(full_run).items() if k in mine}
    # The seed is a function of (run seed, question id) only.
    assert harness.question_seed(0, "q1") == harness.question_seed(0, "q1") != harness.question_seed(0, "q2")
    assert harness.question_seed(0, "q1") != harness.question_seed(1, "q1")


def test_two_processes_equal_one(model_dir, jsonl_dataset, tmp_path):
    """Two processes write one predictions file each, and together they hold what one process
    writes. Both runs take one question per batch on one thread each, so every question's numbers
    are computed alike in both: a near-tie between two queries' scores in this tiny random model
    (``l2norm``) otherwise flips with the batch's shape or the thread count on some CPUs."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "catp", "eval", "--device", "cpu", "--model", str(model_dir), "--dataset", str(jsonl_dataset),
            "--batch-size", "1", *FAST]
    one = tmp_path / "one"
    done = subprocess.run([sys.executable, *args, "--out", str(one)], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    # On CPUs accelerate's own launcher starts one process (multi-CPU needs MPI); torchrun is the
    # equivalent launcher and sets up the same torch.distributed (gloo) group that accelerate reads.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               *args, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in out.glob("predictions-*.jsonl")) == ["predictions-0.jsonl", "predictions-1.jsonl"], done.stderr[-2000:]
    assert _records(out) == _records(one)
    assert json.loads((out / "summary.json").read_text())["rows"] == json.loads((one / "summary.json").read_text())["rows"]


def test_summary_statistics():
    config_a, config_b = harness.Config("catp", 4), harness.Config("l2norm", 4)
    records_a = [{"id": str(i), "accuracy": float(i % 2), "llm_tokens": 10} for i in range(100)]
    records_b = [{"id": str(i), "accuracy": float(i % 4 == 0), "llm_tokens": 10} for i in range(100)]
    summary = report.summarize([(config_a, records_a), (config_b, records_b)], 100)
    row = summary["rows"][0]
    # 50 of 100 correct: sd 0.5025 (n-1), half-width 1.96 * 50.25 / 10.
    assert row["accuracy"] == pytest.approx(50.0) and row["ci95"] == pytest.approx(1.959964 * 50.2519 / 10, rel=1e-4)
    assert row["x_l2norm"] == pytest.approx(2.0)
    (comparison,) = summary["comparisons"]
    assert comparison["difference"] == pytest.approx(25.0) and comparison["verdict"] == "win"


def test_retention_loyalty_and_clipped_intervals():
    """Loyalty: the share of answers the same as unpruned (after normalisation), which accuracy can hide."""
    unpruned, pruned = harness.Config(None, 8), harness.Config("catp", 4)
    truth = ["two", "red", "yes", "no"]
    base = [{"id": str(i), "accuracy": 1.0, "prediction": truth[i], "llm_tokens": 10} for i in range(4)]
    # right on 0 and 1 (one by another spelling), wrong on 2, and a different answer on 3 that is right too
    answers = ["2", "Red.", "no", "maybe"]
    other = [{"id": str(i), "accuracy": float(i != 2), "prediction": answers[i], "llm_tokens": 6} for i in range(4)]
    rows = {r["config"]: r for r in report.summarize([(unpruned, base), (pruned, other)], 4)["rows"]}
    assert rows["catp@4"]["retention_pct"] == 75.0
    assert rows["catp@4"]["loyalty_pct"] == 50.0  # "2" = "two" and "Red." = "red" after normalisation
    assert rows["unpruned"]["loyalty_pct"] == 100.0
    assert rows["unpruned"]["ci_high"] == 100.0 and rows["catp@4"]["ci_low"] >= 0.0  # clipped to [0, 100]
    assert "(75.0%, 50% same)" in report.markdown_table(report.summarize([(unpruned, base), (pruned, other)], 4))


def test_comparisons_follow_each_methods_kind(full_run):
    """A selector is compared with every CATP variant and every baseline; a CATP variant with the baselines."""
    summary = json.loads((full_run / "summary.json").read_text())
    pairs = {(c["method"], c["baseline"], c["keep"]) for c in summary["comparisons"]}
    variants, baselines = ("catp", "catp-all", "catp-layer", "catp-image"), ("l2norm", "selfattn", "first", "random")
    for method in ("divprune", "dart", "catp-diverse"):
        assert {(method, b, k) for b in variants + baselines for k in (4, 2)} <= pairs
        assert not any(p[0] == method and p[1] in ("divprune", "dart", "catp-diverse") for p in pairs)
    for method in variants:
        assert {p[1] for p in pairs if p[0] == method} == set(baselines)
    assert not any(p[0] in baselines for p in pairs)
    rows = {r["config"]: r for r in summary["rows"]}
    assert "x_catp" in rows["divprune@4"] and "x_random" in rows["divprune@4"]
    table = (full_run / "summary.md").read_text()
    assert "| divprune | catp |" in table and "| catp-diverse | random |" in table and "| catp | l2norm |" in table


def test_compare_adds_paired_differences_against_chosen_methods():
    def records(pattern):
        return [{"id": str(i), "accuracy": float(pattern(i)), "llm_tokens": 10} for i in range(40)]

    configs = [(harness.Config("l2norm", 4), records(lambda i: i % 2)), (harness.Config("catp", 4), records(lambda i: i % 4 == 0)),
               (harness.Config("random", 4), records(lambda i: i % 3 == 0))]
    built_in = {(c["method"], c["baseline"]) for c in report.summarize(configs, 40)["comparisons"]}
    assert built_in == {("catp", "l2norm"), ("catp", "random")}
    chosen = report.summarize(configs, 40, compare=["catp", "random"])
    assert {(c["method"], c["baseline"]) for c in chosen["comparisons"]} == built_in | {("l2norm", "catp"), ("l2norm", "random"),
                                                                                        ("random", "catp")}
    assert "| l2norm | catp |" in report.markdown_table(chosen)


def test_bad_options(model_dir, jsonl_dataset, tmp_path):
    runner = CliRunner()
    base = ["eval", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--out", str(tmp_path / "x"), "--no-progress"]
    for option, value, named in (("--methods", "catpp", "catpp"), ("--keep", "four", "four"), ("--keep", "16", "out of range")):
        result = runner.invoke(app, [*base, option, value])
        assert result.exit_code == 2 and said(result.output, named), result.output
    bad_compare = runner.invoke(app, [*base, "--compare", "catp,randomm"])
    assert bad_compare.exit_code == 2 and said(bad_compare.output, "randomm"), bad_compare.output


def test_eval_with_budgets(model_dir, jsonl_dataset, tmp_path):
    """Budgets next to fixed counts: real tokens fed, kept-token distribution, budget vs fixed k at the same mean."""
    out = tmp_path / "budgets"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--out", str(out),
                                      "--methods", "catp-all,first", "--keep", "mass:0.9,fence:0:max=3,6", "--match-budgets",
                                      "--num-beams", "1", "--max-new-tokens", "2", "--no-progress", "--batch-size", "4"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "method 'first' cannot carry a Budget" in result.output
    records = harness.read_predictions(out)
    configs = {name for name, _ in records}
    assert {"catp-all@mass:0.9", "catp-all@fence:0:max=3", "first@6"} <= configs and "first@mass:0.9" not in configs
    unpruned = {i: r for (name, i), r in records.items() if name == "unpruned"}
    budget = {i: r for (name, i), r in records.items() if name == "catp-all@mass:0.9"}
    assert all(r["kept"] == NUM_QUERY for r in unpruned.values())
    # Real tokens only: the kept query tokens + the same text tokens as unpruned.
    assert all(r["llm_tokens"] - r["kept"] == unpruned[i]["llm_tokens"] - NUM_QUERY for i, r in budget.items())
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["config"]: r for r in summary["rows"]}
    kept = [r["kept"] for r in budget.values()]
    assert rows["catp-all@mass:0.9"]["kept_mean"] == pytest.approx(sum(kept) / len(kept))
    assert sum(rows["catp-all@mass:0.9"]["kept_histogram"].values()) == 10 and rows["catp-all@mass:0.9"]["budget"]
    assert rows["catp-all@fence:0:max=3"]["kept_max"] <= 3
    # --match-budgets ran the fixed counts on both sides of each budget's mean.
    mean = rows["catp-all@mass:0.9"]["kept_mean"]
    assert {f"catp-all@{int(mean)}", f"catp-all@{-int(-mean // 1)}"} <= set(rows)
    (versus,) = [c for c in summary["budget_comparisons"] if c["budget"] == "mass:0.9"]
    assert versus["fixed_low"] <= mean <= versus["fixed_high"] and versus["n"] == 10
    assert "Per-sample budgets" in (out / "summary.md").read_text()


def test_budget_comparison_is_a_paired_mix_of_the_bracketing_counts():
    budget = harness.Config("catp", catp.Budget(mass=0.8))
    low, high = harness.Config("catp", 2), harness.Config("catp", 4)
    # The budget keeps 3 tokens on average: half-way between 2 and 4.
    records = {
        budget: [{"id": str(i), "accuracy": 1.0, "kept": 2 + 2 * (i % 2), "llm_tokens": 9} for i in range(10)],
        low: [{"id": str(i), "accuracy": 0.0, "kept": 2, "llm_tokens": 8} for i in range(10)],
        high: [{"id": str(i), "accuracy": 1.0, "kept": 4, "llm_tokens": 10} for i in range(10)],
    }
    summary = report.summarize(list(records.items()), 10)
    (versus,) = summary["budget_comparisons"]
    assert (versus["fixed_low"], versus["fixed_high"], versus["weight_high"]) == (2, 4, 0.5)
    assert versus["fixed_accuracy"] == pytest.approx(50.0) and versus["difference"] == pytest.approx(50.0)
    row = next(r for r in summary["rows"] if r["budget"])
    assert (row["kept_mean"], row["kept_min"], row["kept_median"], row["kept_max"]) == (3.0, 2, 3.0, 4)


def test_methods_none_measures_the_unpruned_model_alone(model_dir, jsonl_dataset, tmp_path):
    out = tmp_path / "alone"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--out", str(out),
                                      "--methods", "none", *FAST[2:]])  # FAST without its --keep: the unpruned model takes none
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    assert [r["config"] for r in summary["rows"]] == ["unpruned"] and summary["rows"][0]["n"] == 10
    table = (out / "summary.md").read_text().splitlines()
    assert table[0] == "| model | accuracy |" and table[2].startswith("| unpruned (8 tokens) |")


def test_paired_difference_across_two_runs(tmp_path):
    from tools.paired import paired

    for name, accuracies, answers in (("a", [1, 1, 0, 1], ["red", "2", "no", "x"]), ("b", [1, 0, 0, 0], ["red", "two", "yes", "y"])):
        (tmp_path / name).mkdir()
        lines = [json.dumps({"config": "c", "id": f"q{i}", "accuracy": float(acc), "prediction": ans})
                 for i, (acc, ans) in enumerate(zip(accuracies, answers))]
        (tmp_path / name / "predictions-0.jsonl").write_text("\n".join(lines) + "\n")
    result = paired(tmp_path / "a", "c", tmp_path / "b", "c")
    assert result["n"] == 4 and result["difference"] == pytest.approx(50.0)
    assert result["accuracy_a"] == 75.0 and result["same_pct"] == 50.0  # "2" = "two" after normalisation
    with pytest.raises(ValueError, match="no question answered by both"):
        paired(tmp_path / "a", "c", tmp_path / "b", "other")


def test_a_paired_difference_every_question_shares_has_a_real_interval():
    """Two configs that score alike on all 40 questions differ by 0, but not by 0 ± 0.00: the interval bounds what
    the share of questions not seen (at most the Wilson upper bound for 0 of 40) could move."""
    from catp.evaluation.report import paired_difference

    mean, half = paired_difference([0.0] * 40)
    assert mean == 0.0 and half == pytest.approx(100 * 1.959963984540054**2 / (40 + 1.959963984540054**2))  # 8.76
    assert paired_difference([0.0] * 600)[1] < 1.0  # shrinks with n
    assert paired_difference([100.0] * 40)[1] == pytest.approx(2 * half)  # a shared difference of 100 can move by up to 200
    mean, half = paired_difference([100.0, 0.0, 0.0, 100.0])  # the normal interval where the differences vary
    assert mean == 50.0 and half == pytest.approx(1.959963984540054 * (100 / 3**0.5) / 2)


def test_summary_legend_intervals_and_the_adapted_label():
    """summary.md says what each figure is; an accuracy every question shares has a real interval, not ± 0.00;
    with an adapter, the row of all tokens is the adapted model, not "unpruned"."""
    full, pruned = harness.Config(None, 8), harness.Config("catp", 4)
    right = [{"id": str(i), "accuracy": 1.0, "prediction": "red", "llm_tokens": 10} for i in range(40)]
    mixed = [{"id": str(i), "accuracy": float(i % 5 != 0), "prediction": "red" if i % 5 else "blue", "llm_tokens": 6} for i in range(40)]
    summary = report.summarize([(full, right), (pruned, mixed)], 40)
    rows = {r["config"]: r for r in summary["rows"]}
    assert rows["unpruned"]["ci_method"] == "wilson" and rows["catp@4"]["ci_method"] == "normal"
    assert rows["unpruned"]["ci_low"] == pytest.approx(100 * 40 / (40 + 1.959964**2), abs=1e-3)  # Wilson at p = 1: n / (n + z^2)
    assert rows["unpruned"]["ci_high"] == 100.0 and rows["unpruned"]["ci95"] > 8
    table = report.markdown_table(summary)
    assert "± 0.00" not in table and "| unpruned (8 tokens) | 100.00 [91.2, 100.0] |" in table
    assert "(80.0%, 80% same)" in table
    assert "How to read this" in table and "`(R%, S% same)`: R is the retention" in table and "Wilson" in table
    summary["run"] = {"adapter": "runs/adapter"}
    adapted = report.markdown_table(summary)
    assert "| adapted, all tokens (8 tokens) |" in adapted and "unpruned" not in adapted
    assert "the accuracy in the `adapted, all tokens` row" in adapted


def test_adapter_targets_pair_each_keep_with_the_unadapted_model_and_judge_its_target(tmp_path):
    """tools/adapter_targets.py: each ``first@k`` and ``unpruned`` row of a run, paired per question
    against the unadapted run's ``unpruned``, with retention and the issue's target for that keep."""
    from tools.adapter_targets import measure

    def run(name: str, configs: dict[str, list[float]]) -> Path:
        out = tmp_path / name
        out.mkdir()
        lines = [json.dumps({"config": c, "id": str(i), "accuracy": a, "prediction": "x" if a else "y"})
                 for c, accs in configs.items() for i, a in enumerate(accs)]
        (out / "predictions-0.jsonl").write_text("\n".join(lines) + "\n")
        rows = [{"config": c, "method": c.split("@")[0], "keep": int(c.split("@")[1]) if "@" in c else 32, "budget": False}
                for c in configs]
        (out / "summary.json").write_text(json.dumps({"rows": rows}))
        return out

    base = run("unadapted", {"unpruned": [1.0] * 100})
    adapted = run("adapted", {"unpruned": [1.0] * 100, "first@8": [1.0] * 99 + [0.0], "first@1": [1.0] * 80 + [0.0] * 20})
    rows = {r["keep"]: r for r in measure({"scenes": base}, [("adapted", "scenes", adapted, None)])["rows"]}
    assert rows[32]["difference"] == 0 and rows[32]["met"] is True  # within 0.5 points
    assert rows[8]["retention_pct"] == 99.0 and rows[8]["met"] is True  # scenes keep 8: at least 99%
    assert rows[1]["retention_pct"] == 80.0 and rows[1]["met"] is False  # scenes keep 1: at least 90%
    export = measure({"easy-vqa": base}, [("export", "easy-vqa", base, 4)])["rows"]
    assert [(r["keep"], r["met"]) for r in export] == [(4, True)]  # an exported checkpoint at K=4: its unpruned row


def test_kinds_split_a_runs_accuracy_by_question_kind():
    """tools/kinds.py: each configuration's accuracy per kind of question (easy-VQA templates, scenes' first words)."""
    from tools.kinds import kind_accuracy, question_kind, table

    assert question_kind("easy-vqa", "what color is the shape?") == "color"
    assert question_kind("scenes", "How many circles are there?") == "how many"
    with pytest.raises(ValueError, match="vqav2"):
        question_kind("vqav2", "What is it?")
    kinds = {"a": "color", "b": "color", "c": "shape"}
    rows = [{"config": "unpruned", "id": i, "accuracy": 1.0} for i in "abc"]
    rows += [{"config": "first@1", "id": "a", "accuracy": 0.0}, {"config": "first@1", "id": "b", "accuracy": 1.0},
             {"config": "first@1", "id": "c", "accuracy": 1.0}]
    result = kind_accuracy(rows, kinds)
    assert result["first@1"] == {"all": (200 / 3, 3), "color": (50.0, 2), "shape": (100.0, 1)}
    assert "| color (2) | 100.0 | 50.0 |" in table(result, ["unpruned", "first@1"])
