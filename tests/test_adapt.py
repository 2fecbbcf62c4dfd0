"""catp adapt: what trains, how the kept set is chosen in the loop, the loss, resume, loading,
truncation and export, the PeftModel path of pruned(), and the command line."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval import FAST, jsonl_dataset, model_dir, said  # noqa: F401 (fixtures)
from tiny_models import NUM_QUERY, tiny_inputs, tiny_model
from typer.testing import CliRunner

import catp
from catp.adapt import (
    QUERY_TOKENS_FILE,
    AdaptSettings,
    _loss,
    add_adapter,
    export_truncated,
    load_adapter,
    shorten_placeholders,
    train_adapter,
    trainable_parameters,
    truncated,
)
from catp.cli.app import app
from catp.evaluation.datasets import load_dataset
from catp.hf import base_model
from catp.models import load_model
from catp.training import answer_batch

peft = pytest.importorskip("peft")

TINY = dict(batch_size=4, steps=4, validate_every=2, checkpoint_every=1, keeps=(2, 4, NUM_QUERY))


@pytest.fixture
def loaded(model_dir):  # noqa: F811
    return load_model(str(model_dir), "float32", "cpu")


@pytest.fixture
def questions(jsonl_dataset):  # noqa: F811
    return load_dataset(str(jsonl_dataset))


def _batch(processor, questions, n=4):
    chunk = questions[:n]
    return answer_batch(processor, [q.load_image() for q in chunk], [f"Question: {q.question} Short answer:" for q in chunk],
                        [q.answers[0] for q in chunk])


def test_answer_labels_cover_the_answer_and_eos_only(loaded, questions):
    model, processor = loaded
    batch = _batch(processor, questions)
    for row, q in enumerate(questions[:4]):
        labelled = batch["labels"][row][batch["labels"][row] != -100].tolist()
        expected = processor.tokenizer(q.answers[0], add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
        assert labelled == expected
    assert (batch["labels"][batch["input_ids"] == model.config.image_token_index] == -100).all()


def test_the_trainable_parameters_are_exactly_lora_on_the_qformer_the_projection_and_the_query_tokens():
    model = add_adapter(tiny_model("blip2-opt"), AdaptSettings())
    names = trainable_parameters(model)
    assert "base_model.model.query_tokens" in names
    projection = {n for n in names if "language_projection" in n}
    assert projection == {"base_model.model.language_projection.modules_to_save.default.weight",
                          "base_model.model.language_projection.modules_to_save.default.bias"}
    lora = set(names) - projection - {"base_model.model.query_tokens"}
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    assert all(n.startswith("base_model.model.qformer.encoder.layer.") for n in lora)
    wrapped = {n.split(".lora_")[0].removeprefix("base_model.model.qformer.encoder.layer.").split(".", 1)[1] for n in lora}
    assert wrapped == {"attention.attention.query", "attention.attention.key", "attention.attention.value", "attention.output.dense",
                       "crossattention.attention.query", "crossattention.attention.key", "crossattention.attention.value",
                       "crossattention.output.dense", "intermediate_query.dense", "output_query.dense"}
    assert not any("vision_model" in n or "language_model" in n for n in names)
    with_lm = trainable_parameters(add_adapter(tiny_model("blip2-opt"), AdaptSettings(lm_lora=True)))
    assert any("language_model" in n and "lora_" in n for n in with_lm)
    frozen = trainable_parameters(add_adapter(tiny_model("blip2-opt"), AdaptSettings(query_tokens=False)))
    assert "base_model.model.query_tokens" not in frozen


def test_training_chooses_the_set_inference_chooses_and_the_loss_is_prunings_own(loaded, questions):
    """The loop's loss is model(**inputs, labels) inside pruned(), with dropout off: its kept set is the
    inference-time set. With dropout on (training mode), the choice would change from call to call."""
    model, processor = loaded
    settings = AdaptSettings(method="catp", keeps=(3,))
    adapted = add_adapter(model, settings)
    batch = _batch(processor, questions)
    inference = catp.select_queries(adapted, batch["pixel_values"], method="catp", keep=3)
    base_model(adapted).eval()  # as train_adapter trains: dropout off, gradients on
    with catp.pruned(adapted, method="catp", keep=3) as session:
        loss = adapted(**batch).loss
    assert loss.requires_grad and torch.equal(session.keep_indices, inference)
    assert torch.allclose(_loss(adapted, batch, settings, 3, NUM_QUERY, {}), loss)
    assert torch.allclose(_loss(adapted, batch, settings, NUM_QUERY, NUM_QUERY, {}), adapted(**batch).loss)  # all tokens: unpruned
    base_model(adapted).train()
    in_training_mode = []
    for _ in range(4):
        with catp.pruned(adapted, method="catp", keep=3) as session, torch.no_grad():
            adapted(**batch)
        in_training_mode.append(session.keep_indices)
    assert any(not torch.equal(s, inference) for s in in_training_mode)  # dropout changes the choice


def test_full_every_step_trains_on_the_mean_of_the_pruned_and_the_full_loss(loaded, questions):
    """The sandwich rule: at a keep below all, the loss is the mean of the pruned loss and the loss
    with every query token; at all tokens it is that loss alone."""
    model, processor = loaded
    settings = AdaptSettings(method="first", keeps=(1, NUM_QUERY), full_every_step=True)
    adapted = add_adapter(model, settings)
    base_model(adapted).eval()
    batch = _batch(processor, questions)
    full = adapted(**batch).loss
    with catp.pruned(adapted, method="first", keep=1):
        one = adapted(**batch).loss
    assert not torch.allclose(one, full)  # the two terms differ, so the mean is a real mix
    assert torch.allclose(_loss(adapted, batch, settings, 1, NUM_QUERY, {}), (one + full) / 2)
    assert torch.allclose(_loss(adapted, batch, settings, NUM_QUERY, NUM_QUERY, {}), full)
    plain = AdaptSettings(method="first", keeps=(1, NUM_QUERY))
    assert torch.allclose(_loss(adapted, batch, plain, 1, NUM_QUERY, {}), one)


def test_a_setting_added_later_compares_at_its_default():
    """An adapter saved before ``full_every_step`` existed is the same run as one with it off, not another."""
    from catp.adapt import _changed

    older = {k: v for k, v in AdaptSettings().to_json().items() if k != "full_every_step"}
    assert _changed(older, AdaptSettings()) == []
    assert _changed(older, AdaptSettings(full_every_step=True)) == ["full_every_step"]


def test_pruned_takes_a_peft_model_and_restores_it(loaded, questions):
    model, processor = loaded
    adapted = add_adapter(model, AdaptSettings())
    base_model(adapted).eval()
    inputs = {k: v for k, v in _batch(processor, questions).items() if k != "labels"}
    with catp.pruned(adapted, method="catp", keep=3) as session, torch.no_grad():
        through_peft = adapted.generate(**inputs, max_new_tokens=2)
    with catp.pruned(base_model(adapted), method="catp", keep=3), torch.no_grad():
        through_base = base_model(adapted).generate(**inputs, max_new_tokens=2)
    assert torch.equal(through_peft, through_base) and session.keep_indices.shape == (4, 3)
    assert through_peft.shape[1] > inputs["input_ids"].shape[1]  # the caller's prompt, then new tokens
    assert "generate" not in vars(base_model(adapted)) and getattr(base_model(adapted), "_catp_session", None) is None


def test_train_resume_and_load(loaded, questions, model_dir, tmp_path, monkeypatch):  # noqa: F811
    """A run killed after step 2 and rerun gives the weights of an uninterrupted run; the adapter loads."""
    settings = AdaptSettings(method="catp", **TINY)
    model, processor = loaded
    straight = train_adapter(model, processor, questions[:8], questions[8:], settings, tmp_path / "a", show_progress=False,
                             log=lambda _: None)
    assert [e["step"] for e in straight.validation] == [2, 4] and not (tmp_path / "a" / "checkpoint").exists()
    info = json.loads((tmp_path / "a" / "catp_adapter.json").read_text())
    assert info["settings"]["method"] == "catp" and info["trainable_parameters"] > 0 and (tmp_path / "a" / QUERY_TOKENS_FILE).is_file()

    import catp.adapt as adapt_module

    real, calls = adapt_module._loss, []

    def dies_after_two(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "_loss", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        train_adapter(load_model(str(model_dir), "float32", "cpu")[0], processor, questions[:8], questions[8:], settings,
                      tmp_path / "b", show_progress=False, log=lambda _: None)
    monkeypatch.setattr(adapt_module, "_loss", real)
    resumed = train_adapter(load_model(str(model_dir), "float32", "cpu")[0], processor, questions[:8], questions[8:], settings,
                            tmp_path / "b", show_progress=False, log=lambda _: None)
    assert resumed.resumed_from == 2 and resumed.validation == straight.validation
    a = load_adapter(load_model(str(model_dir), "float32", "cpu")[0], tmp_path / "a")
    b = load_adapter(load_model(str(model_dir), "float32", "cpu")[0], tmp_path / "b")
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), name
    base = load_model(str(model_dir), "float32", "cpu")[0]
    assert not torch.equal(base_model(a).query_tokens, base.query_tokens)  # the trained query tokens came back
    plain = peft.PeftModel.from_pretrained(load_model(str(model_dir), "float32", "cpu")[0], str(tmp_path / "a"))
    assert isinstance(plain, peft.PeftModel)  # a standard peft adapter directory
    with pytest.raises(ValueError, match="other settings"):
        train_adapter(load_model(str(model_dir), "float32", "cpu")[0], processor, questions[:8], questions[8:],
                      AdaptSettings(method="first", **TINY), tmp_path / "a", show_progress=False, log=lambda _: None)


def test_truncation_export_answers_as_the_truncated_adapter(loaded, questions, tmp_path):
    """An export with K query tokens, loaded by stock transformers, answers as the adapted model run truncated to K."""
    from tokenizers import AddedToken
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    model, processor = loaded
    k = 3
    batch = {n: v for n, v in _batch(processor, questions).items() if n != "labels"}
    with truncated(model, k), torch.no_grad():
        short = shorten_placeholders(model, batch, k)
        expected = model.generate(**short, max_new_tokens=3)
    assert int((short["input_ids"][0] == model.config.image_token_index).sum()) == k
    export_truncated(model, processor, k, tmp_path / "export")
    stock = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    stock_processor = Blip2Processor.from_pretrained(tmp_path / "export")
    stock_processor.tokenizer.padding_side = "left"
    # (this test tokenizer declares its image token in extra_special_tokens, which reloads as a str)
    stock_processor.image_token = AddedToken(stock_processor.image_token, normalized=False, special=True)
    assert stock.config.num_query_tokens == k and stock.query_tokens.shape[1] == k
    again = stock_processor(images=[q.load_image() for q in questions[:4]],
                            text=[f"Question: {q.question} Short answer: {q.answers[0]}" for q in questions[:4]],
                            return_tensors="pt", padding=True)
    assert torch.equal(again["input_ids"], short["input_ids"][:, :-1])  # k placeholders from the stock processor
    with torch.no_grad():
        assert torch.equal(stock.generate(**short, max_new_tokens=3), expected)


@pytest.mark.parametrize(("args", "named"), [
    (["--split", "test"], "never on 'test'"),
    (["--export", "4"], "only a --truncate adapter"),
    (["--method", "nope"], "unknown method 'nope'"),
    (["--method", "catp,first"], "give one method"),
    (["--keep", "99"], "keep=99 is out of range"),
    (["--dtype", "fp16"], "got 'fp16'"),
    (["--dataset", "nosuchset"], "unknown dataset 'nosuchset'"),
    (["--truncate", "--export", "99"], "--export 99 is out of range"),
])
def test_adapt_bad_input_is_one_usage_error(args, named, tmp_path):
    result = CliRunner().invoke(app, ["adapt", "--out", str(tmp_path / "never"), *args])
    assert result.exit_code == 2, result.output
    assert said(result.output, named) and "Traceback" not in result.output
    assert not (tmp_path / "never").exists()


def test_adapt_command_trains_and_eval_takes_the_adapter(model_dir, jsonl_dataset, tmp_path):  # noqa: F811
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["adapt", "--model", str(model_dir), "--dataset", str(jsonl_dataset),
                                      "--val-fraction", "0.3", "--out", str(out), "--method", "first", "--keep", "2,8",
                                      "--steps", "2", "--batch-size", "4", "--no-progress", "--merge"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((out / "catp_adapter.json").read_text())
    (source,) = info["data"]["sources"]
    assert "held out by image" in source["validation"] and source["train_questions"] + source["validation_questions"] == 10
    assert (out / "merged" / "config.json").is_file()
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--model", str(model_dir), "--adapter", str(out), "--dataset", str(jsonl_dataset),
                                      "--out", str(run), "--methods", "first", *FAST])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((run / "run.json").read_text())["adapter"] == str(out)


def test_two_processes_train_the_adapter_one_trains(model_dir, jsonl_dataset, tmp_path):  # noqa: F811
    """Under torchrun each process takes half of every batch; the summed gradients give the one-process adapter."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    args = ["--model", str(model_dir), "--dataset", str(jsonl_dataset), "--val-fraction", "0.3",
            "--method", "catp", "--keep", "2,8", "--steps", "3", "--batch-size", "4", "--validate-every", "3", "--no-progress"]
    result = CliRunner().invoke(app, ["adapt", "--out", str(tmp_path / "one"), *args])
    assert result.exit_code == 0, result.output
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
               "-m", "catp", "adapt", "--out", str(tmp_path / "two"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / name / "adapter_model.safetensors")) for name in ("one", "two"))
    assert one.keys() == two.keys() and all(torch.allclose(one[k], two[k], atol=1e-6) for k in one)
    assert json.loads((tmp_path / "two" / "catp_adapter.json").read_text())["best"] == \
        json.loads((tmp_path / "one" / "catp_adapter.json").read_text())["best"]


def _adapt_args(model_dir, jsonl_dataset, out, *extra):  # noqa: F811
    return ["adapt", "--model", str(model_dir), "--dataset", str(jsonl_dataset), "--val-fraction", "0.3", "--out", str(out),
            "--method", "first", "--keep", "2,8", "--steps", "4", "--batch-size", "4", "--validate-every", "4", "--no-progress", *extra]


def test_checkpoint_every_sets_where_a_killed_run_resumes(model_dir, jsonl_dataset, tmp_path, monkeypatch):  # noqa: F811
    """A run that dies in step 4 (no chance to save, as with SIGKILL) resumes from the last --checkpoint-every step."""
    import catp.adapt as adapt_module

    real, calls = adapt_module._loss, []

    def dies_in_step_four(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # raised inside the step: nothing is written for it
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "_loss", dies_in_step_four)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, _adapt_args(model_dir, jsonl_dataset, out, "--checkpoint-every", "2"))
    assert result.exit_code == 130, result.output + repr(result.exception)
    assert result.output.strip().splitlines()[-1] == (f"interrupted: the checkpoint in {out / 'checkpoint'} resumes it: "
                                                       "rerun the same command")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.setattr(adapt_module, "_loss", real)
    result = CliRunner().invoke(app, _adapt_args(model_dir, jsonl_dataset, out, "--checkpoint-every", "2"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"resuming {out} at step 2 of 4" in result.output  # not at step 0


def test_ctrl_c_checkpoints_the_step_under_way(model_dir, jsonl_dataset, tmp_path, monkeypatch):  # noqa: F811
    """Ctrl-C before the first periodic checkpoint: the step under way finishes, is checkpointed, and a rerun
    (with another --checkpoint-every, which does not change the result) resumes after it instead of at step 0."""
    import os
    import signal
    import threading

    import catp.adapt as adapt_module

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    real, calls = adapt_module._loss, []

    def ctrl_c_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(adapt_module, "_loss", ctrl_c_in_step_two)
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, _adapt_args(model_dir, jsonl_dataset, out, "--checkpoint-every", "100"))
    assert result.exit_code == 130, result.output + repr(result.exception)
    assert "interrupted: the checkpoint in" in result.output.strip().splitlines()[-1] and "Traceback" not in result.output
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C is Python's own again
    monkeypatch.setattr(adapt_module, "_loss", real)
    result = CliRunner().invoke(app, _adapt_args(model_dir, jsonl_dataset, out, "--checkpoint-every", "1"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert f"resuming {out} at step 2 of 4" in result.output
    assert json.loads((out / "catp_adapter.json").read_text())["steps"] == 4
