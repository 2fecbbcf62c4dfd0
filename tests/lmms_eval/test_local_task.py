"""The catp model in lmms-eval, on a local task over the reference model's easy-VQA test questions:
its answers equal ``catp.pruned()`` + ``generate()`` and ``catp eval``'s, batch 1 equals batch 8, keeping
every token equals unpruned, multiple choice goes through log-likelihoods, and the cost lands beside the score."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval.api.model", reason='needs lmms-eval: pip install -e ".[lmms-eval]" && pip install --no-deps lmms-eval==0.7.3')

import torch  # noqa: E402
from lmms_runs import BATCH, OFFLINE, QUESTIONS, lmms_eval_command  # noqa: E402
from local_task import choices  # noqa: E402

import catp  # noqa: E402
from catp.protocol import PAPER_MAX_NEW_TOKENS, PAPER_NUM_BEAMS, PAPER_PROMPT  # noqa: E402

GENERATE = "catp_easy_vqa"
CHOICE = "catp_easy_vqa_mc"
#: (model_args, the catp eval config of the same run).
RUNS = [("method=catp,keep=8", "catp@8"), ("method=l2norm,keep=8", "l2norm@8"), ("method=none", "unpruned")]


def pruned_answers(model: Any, processor: Any, questions: list[Any], method: str | None) -> list[str]:
    """The answers of ``catp.pruned()`` (or the bare model) + an unchanged ``generate()``, in batches of 8, the paper's protocol."""
    answers: list[str] = []
    for start in range(0, len(questions), BATCH):
        batch = questions[start:start + BATCH]
        inputs = processor(images=[q.load_image() for q in batch], text=[PAPER_PROMPT.format(q.question) for q in batch],
                           return_tensors="pt", padding=True)
        settings = dict(num_beams=PAPER_NUM_BEAMS, max_new_tokens=PAPER_MAX_NEW_TOKENS, min_new_tokens=1, do_sample=False)
        with torch.no_grad():
            if method is None:
                out = model.generate(**inputs, **settings)
            else:
                with catp.pruned(model, method=method, keep=8):
                    out = model.generate(**inputs, **settings)
        answers += [a.strip() for a in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    return answers


@pytest.fixture(scope="module")
def catp_eval_answers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, str]]:
    """``catp eval``'s answers on the same questions: config -> question id -> prediction."""
    out = tmp_path_factory.mktemp("catp-eval")
    subprocess.run([sys.executable, "-m", "catp", "eval", "--methods", "catp,l2norm", "--keep", "8", "--limit", str(QUESTIONS),
                    "--device", "cpu", "--dtype", "float32", "--no-progress", "--out", str(out)],
                   check=True, capture_output=True, env={**os.environ, **OFFLINE})
    answers: dict[str, dict[str, str]] = {}
    for line in (out / "predictions-0.jsonl").read_text().splitlines():
        record = json.loads(line)
        answers.setdefault(record["config"], {})[record["id"]] = record["prediction"]
    return answers


@pytest.mark.parametrize("model_args, config", RUNS)
def test_answers_equal_pruned_generate_and_catp_eval(lmms_run, reference, questions, catp_eval_answers, model_args, config):
    run = lmms_run(model_args)
    got = [run.answers[GENERATE][i] for i in range(len(questions))]
    method = None if config == "unpruned" else config.split("@")[0]
    assert got == pruned_answers(*reference, questions, method)
    assert got == [catp_eval_answers[config][q.id] for q in questions]
    accuracy = run.results["results"][GENERATE]["accuracy,none"]
    assert accuracy == pytest.approx(sum(a == q.answers[0] for a, q in zip(got, questions)) / len(questions))


def test_batch_1_equals_batch_8(lmms_run):
    assert lmms_run("method=catp,keep=8", batch_size=1).answers[GENERATE] == lmms_run("method=catp,keep=8").answers[GENERATE]


def test_keeping_every_token_equals_unpruned(lmms_run):
    every = lmms_run("method=first,keep=32")
    assert every.answers[GENERATE] == lmms_run("method=none").answers[GENERATE]
    assert every.cost["mean_kept_tokens"] == 32 and every.cost["flops_ratio"] == pytest.approx(1.0)


def test_the_cost_lands_beside_the_score(lmms_run):
    run, full = lmms_run("method=catp,keep=8"), lmms_run("method=none")
    throughput = run.results["throughput"]
    assert throughput["avg_catp_mean_kept_tokens"] == 8 and throughput["avg_catp_samples"] == QUESTIONS
    assert 0 < throughput["avg_catp_flops_ratio"] < 1 and throughput["avg_catp_wall_time_s"] > 0
    assert run.cost["tasks"][GENERATE]["mean_kept_tokens"] == 8 and run.cost["settings"]["method"] == "catp"
    assert run.cost["flops_ratio"] == pytest.approx(throughput["avg_catp_flops_ratio"])
    assert full.cost["mean_kept_tokens"] == 32 and full.cost["flops_ratio"] == pytest.approx(1.0)
    assert run.cost["mean_llm_tokens"] == pytest.approx(full.cost["mean_llm_tokens"] - 24)  # the same text, 24 fewer queries


def test_multiple_choice_scores_the_choices_by_log_likelihood(lmms_run, reference, questions):
    """The multiple-choice task's pick per question is the choice with the highest log-likelihood that the
    catp model computes in-process, and that log-likelihood is ``-loss x tokens`` of a forward pass with labels."""
    from catp.lmms_eval.runner import Request, Runner
    from catp.lmms_eval.settings import parse_model_args

    run = lmms_run("method=catp,keep=8", tasks=CHOICE)
    runner = Runner(*reference, parse_model_args(method="catp", keep=8))
    for doc_id, q in enumerate(questions[:6]):
        options = choices(q)
        requests = [Request(q.question, [q.load_image()], CHOICE, doc_id)] * len(options)
        with torch.no_grad():
            scores, _ = runner.loglikelihood(requests, [" " + c for c in options])
        logged = run.answers[CHOICE][doc_id]  # lmms-eval's log: one [log-likelihood, is greedy] per choice, as text
        assert [float(pair[0]) for pair in logged] == pytest.approx([s for s, _ in scores], abs=1e-3)
        assert [str(pair[1]) for pair in logged] == [str(g) for _, g in scores]
    # One continuation by hand: the loss of the forward pass with labels, inside pruned().
    model, processor = reference
    prompt = PAPER_PROMPT.format(questions[0].question)
    inputs = processor(images=[questions[0].load_image()], text=[prompt + " yes"], return_tensors="pt")
    tokens = len(processor.tokenizer(prompt + " yes")["input_ids"]) - len(processor.tokenizer(prompt)["input_ids"])
    labels = inputs["input_ids"].clone()
    labels[:, :-tokens] = -100
    with torch.no_grad(), catp.pruned(model, method="catp", keep=8):
        loss = model(**inputs, labels=labels).loss
    with torch.no_grad():
        (score, _), = runner.loglikelihood([Request(questions[0].question, [questions[0].load_image()], CHOICE, 0)], [" yes"])[0]
    assert score == pytest.approx(-loss.item() * tokens, rel=1e-4)


def test_bad_model_args_fail_with_a_message_that_names_them(task_dir, tmp_path):
    out = tmp_path / "out"
    completed = subprocess.run(lmms_eval_command("method=catp,keep=lots", GENERATE, task_dir, out, 1), capture_output=True,
                               text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert "--model_args keep=lots: cannot read keep 'lots'" in completed.stdout + completed.stderr
    assert not list(out.rglob("*_results.json"))


@pytest.mark.parametrize("model_args, message", [
    (dict(method="catp", keep=64), "--model_args method=catp,keep=64: keep=64 is out of range"),
    (dict(method="nope"), "--model_args method=nope: unknown method 'nope'"),
    (dict(method="none", keep=8), "--model_args keep=8 would be ignored: method=none"),
    (dict(method="catp", kep=8), "--model_args kep=8: not an argument of the catp model"),
    (dict(method="dart", keep=8, pivots=20), "--model_args method=dart,keep=8,pivots=20:"),
    (dict(method="first", keep="mass:0.8"), "--model_args method=first,keep=mass:0.8:"),
    (dict(dtype="half"), "--model_args dtype=half: dtype must be one of"),
    (dict(device="tpu"), "--model_args device=tpu:"),
    (dict(pretrained="/no/such/model"), "--model_args pretrained=/no/such/model: /no/such/model: no such directory"),
    (dict(adapter="/no/such/adapter"), "--model_args adapter=/no/such/adapter: /no/such/adapter: no such adapter directory"),
    (dict(prompt="Question:"), "--model_args prompt=Question:: prompt must contain exactly one '{}'"),
    (dict(batch_size="auto"), "--batch_size auto: batch_size must be a positive int"),
    (dict(scope="clip"), "--model_args scope=clip: scope must be video or frame"),
    (dict(scope="video"), "--model_args method=catp,keep=8,scope=video:"),
])
def test_each_bad_model_arg_is_one_error_from_the_constructor(model_args, message):
    from catp.lmms_eval.model import CatpLMM
    from catp.lmms_eval.settings import ModelArgsError

    with pytest.raises(ModelArgsError) as error:
        CatpLMM(**model_args)
    assert str(error.value).startswith(message), str(error.value)


def test_the_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from catp.lmms_eval.model import CatpLMM

    assert get_model("catp") is CatpLMM and CatpLMM.is_simple
