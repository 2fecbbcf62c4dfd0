"""The catp model of lmms-eval on every family beyond BLIP-2 (Idefics2, Kosmos-2, Aria), on a tiny checkpoint of
each saved with its processor (:func:`tiny_families.save_tiny_checkpoint`): ``pretrained=<dir>`` reads the family
from the config, ``generate_until`` answers equal ``catp.pruned()`` + a stock ``generate()`` on the processor's
inputs for the family's prompt, ``loglikelihood`` scores equal a forward pass inside ``catp.pruned()`` (and differ
from the unpruned ones), the cost counts each family's query tokens, and one ``python -m lmms_eval`` run on
Idefics2 answers the local task as ``catp.pruned()`` + ``generate()`` does."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lmms_eval.api.model", reason='needs lmms-eval: pip install -e ".[lmms-eval]" && pip install --no-deps lmms-eval==0.7.3')

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tiny_families import FAMILIES, needs_family_transformers, placeholder_mask, save_tiny_checkpoint, saved_num_queries  # noqa: E402

import catp  # noqa: E402
from catp.families import family_of  # noqa: E402
from catp.models import load_model  # noqa: E402

pytestmark = needs_family_transformers

TASK, SPLIT = "tiny", "test"
KEEP = 2
#: Two documents: an image and a question each; the first context holds lmms-eval's ``<image>`` tag, which goes.
DOCS = [{"image": Image.new("RGB", (32, 32), "red"), "question": "<image>what color is the shape ?"},
        {"image": Image.new("RGB", (48, 32), "blue"), "question": "what shape is it ?"}]
GENERATE = {"max_new_tokens": 4, "min_new_tokens": 1, "num_beams": 1, "do_sample": False, "until": ["\n\n"]}
CONTINUATIONS = (" red", " circle")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, tmp_path_factory) -> Path:
    """A tiny checkpoint of the family, model and processor saved with ``save_pretrained``."""
    return save_tiny_checkpoint(family, tmp_path_factory.mktemp(f"tiny-{family}"), seed=0)


def lmms_model(checkpoint: Path, method: str = "catp") -> Any:
    """lmms-eval's ``catp`` model on the checkpoint (fp32, CPU, batch 2), with the documents as its task."""
    from catp.lmms_eval.model import CatpLMM

    args = dict(method=method) if method == "none" else dict(method=method, keep=KEEP)
    model = CatpLMM(pretrained=str(checkpoint), dtype="float32", device="cpu", batch_size=2, **args)
    model.task_dict = {TASK: {SPLIT: DOCS}}
    return model


def instances(kind: str, second: Any) -> list[Any]:
    """One lmms-eval request per document: ``second`` is the generation settings or the continuations."""
    from lmms_eval.api.instance import Instance

    return [Instance(request_type=kind, arguments=(doc["question"], second if kind == "generate_until" else second[i],
                                                   lambda d: [d["image"]], i, TASK, SPLIT),
                     idx=0, metadata={"task": TASK, "doc_id": i, "repeats": 1})
            for i, doc in enumerate(DOCS)]


def stock_inputs(model: Any, processor: Any, docs: list[dict[str, Any]], continuation: str = "") -> dict[str, Any]:
    """The processor's inputs for documents (padded on the left), each question behind the family's image text (none
    for Kosmos-2, whose processor puts the image in front)."""
    image_text = family_of(model).prompt_image or ""
    texts = [image_text + doc["question"].replace("<image>", "").strip() + continuation for doc in docs]
    return dict(processor(images=[doc["image"] for doc in docs], text=texts, return_tensors="pt", padding=True))


def test_generate_until_equals_pruned_generate(family, checkpoint):
    lmm = lmms_model(checkpoint)
    got = lmm.generate_until(instances("generate_until", GENERATE))
    model, processor = load_model(checkpoint, "float32", "cpu")
    # One batch of both, as lmms-eval batches them (longest context first: the documents' order). Batched answers
    # need not equal one-by-one answers (Kosmos-2's do not, pruned or not).
    inputs = stock_inputs(model, processor, DOCS)
    with torch.no_grad(), catp.pruned(model, method="catp", keep=KEEP):
        out = model.generate(**inputs, **{k: v for k, v in GENERATE.items() if k != "until"})
    expected = [text.strip() for text in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]
    assert got == expected and all(got)
    # The cost: KEEP kept of the placeholders the processor wrote for each document (Aria: per its resolution).
    queries = [int(count) for count in placeholder_mask(family, inputs).sum(dim=1)]
    assert sorted(c.queries for c in lmm.costs) == sorted(queries) and {c.kept for c in lmm.costs} == {KEEP}
    summary = lmm.cost()
    assert summary["mean_kept_tokens"] == KEEP and summary["mean_query_tokens"] == sum(queries) / len(queries)
    assert 0 < summary["flops_ratio"] < 1


def test_loglikelihood_equals_a_pruned_forward_pass(checkpoint):
    pruned_scores = [result.text for result in lmms_model(checkpoint).loglikelihood(instances("loglikelihood", CONTINUATIONS))]
    unpruned_scores = [result.text for result in lmms_model(checkpoint, "none").loglikelihood(instances("loglikelihood", CONTINUATIONS))]
    model, processor = load_model(checkpoint, "float32", "cpu")
    for doc, continuation, (score, greedy) in zip(DOCS, CONTINUATIONS, pruned_scores):
        inputs = stock_inputs(model, processor, [doc], continuation)
        prompt = stock_inputs(model, processor, [doc])
        tokens = inputs["input_ids"].shape[1] - prompt["input_ids"].shape[1]
        with torch.no_grad(), catp.pruned(model, method="catp", keep=KEEP):
            logits = model(**inputs).logits[0, -tokens - 1:-1].float()
        targets = inputs["input_ids"][0, -tokens:]
        expected = torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None]).sum()
        assert score == pytest.approx(expected.item(), abs=1e-4)
        assert greedy == bool((logits.argmax(dim=-1) == targets).all())
    assert [p[0] for p in pruned_scores] != pytest.approx([u[0] for u in unpruned_scores], abs=1e-4), (pruned_scores, unpruned_scores)


def test_an_lmms_eval_run_on_idefics2_answers_as_pruned_generate(lmms_run, questions, tmp_path_factory):
    """``python -m lmms_eval --model catp --model_args pretrained=<an Idefics2 folder>`` on the local task (batch 1, the
    task's 5 beams and 10 new tokens): each answer is ``catp.pruned()`` + ``generate()`` on the processor's inputs for
    ``<image>`` and the question."""
    checkpoint = save_tiny_checkpoint("idefics2", tmp_path_factory.mktemp("tiny-idefics2-cli"), seed=0)
    run = lmms_run(f"pretrained={checkpoint},method=catp,keep={KEEP},dtype=float32,device=cpu", batch_size=1)
    model, processor = load_model(checkpoint, "float32", "cpu")
    expected = []
    for q in questions:
        inputs = processor(images=[q.load_image()], text=["<image>" + q.question], return_tensors="pt")
        with torch.no_grad(), catp.pruned(model, method="catp", keep=KEEP):
            out = model.generate(**inputs, num_beams=5, max_new_tokens=10, min_new_tokens=1, do_sample=False)
        expected.append(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0].strip())
    assert [run.answers["catp_easy_vqa"][i] for i in range(len(questions))] == expected
    assert run.cost["mean_kept_tokens"] == KEEP and run.cost["mean_query_tokens"] == saved_num_queries("idefics2")
    assert run.results["throughput"]["avg_catp_mean_kept_tokens"] == KEEP
