"""The work behind the lmms-eval model, on a loaded model and processor (no lmms-eval import).

:class:`Runner` takes a model of any family catp prunes (:mod:`catp.families`: BLIP-2, InstructBLIP,
InstructBLIP-Video, Idefics2, Kosmos-2, Aria) and turns a batch of requests (a context, its visuals)
into the model's inputs as ``catp eval`` does (:func:`catp.evaluation.harness.family_prompts`: the
family's image text in the prompt; :func:`catp.evaluation.harness.image_inputs`: the processor padding
on the left for a decoder-only language model), runs ``generate`` or a forward pass with labels inside
:func:`catp.pruned` (or unpruned, ``method=none``) and returns the answers or the continuation
log-likelihoods with one :class:`~catp.lmms_eval.cost.SampleCost` per request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from catp.evaluation.harness import family_prompts, image_inputs, on_model, question_seed
from catp.families import family_of
from catp.hf import PruningSession, pruned, takes_frames
from catp.lmms_eval.cost import SampleCost
from catp.lmms_eval.settings import Settings
from catp.methods import options_of, method_class, seed_options
from catp.protocol import PAPER_PROMPT

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "GENERATE_KEYS", "Request", "Runner", "default_prompt", "generation_settings"]

#: The prompt template per ``config.model_type`` where a family needs one; others take the task's context as it is.
#: BLIP-2 was evaluated on VQA with the paper's prompt (and the shipped reference model is trained on it).
DEFAULT_PROMPTS: dict[str, str] = {"blip-2": PAPER_PROMPT}
#: New tokens when a task's ``generation_kwargs`` set no ``max_new_tokens``.
DEFAULT_MAX_NEW_TOKENS = 128
#: ``generation_kwargs`` passed on to ``generate`` as they are (besides ``max_new_tokens``,
#: ``temperature``, ``do_sample`` and ``until``, read below).
GENERATE_KEYS = ("min_new_tokens", "num_beams", "top_p", "top_k", "length_penalty", "repetition_penalty", "no_repeat_ngram_size")
#: lmms-eval's image tag in some tasks' contexts, taken out: the family's own image text goes in front of the prompt
#: (:meth:`~catp.families.base.Family.prompt_for`; none for BLIP-2, whose processor places the queries).
IMAGE_TAG = "<image>"


def default_prompt(model_type: str) -> str:
    """The prompt template of a model type: :data:`DEFAULT_PROMPTS`, else ``"{}"`` (the context alone)."""
    return DEFAULT_PROMPTS.get(model_type, "{}")


@dataclass(frozen=True)
class Request:
    """One request: its context, its visuals (one image; a video's frames), and where it comes from."""

    context: str
    visuals: Sequence[Any]
    task: str
    doc_id: int


def generation_settings(gen_kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], list[str], list[str]]:
    """``generate`` keyword arguments from a task's ``generation_kwargs``.

    Greedy unless ``do_sample`` or a ``temperature`` above 0 asks to sample (``temperature`` and
    ``top_p`` / ``top_k`` then go to ``generate``).

    Returns:
        The ``generate`` settings, the stop strings (``until``), and the keys that were not used.

    Raises:
        ValueError: ``until`` that is neither a string nor a list of strings.
    """
    until = gen_kwargs.get("until") or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise ValueError(f"generation_kwargs until must be a string or a list of strings, got {until!r}")
    temperature = float(gen_kwargs.get("temperature") or 0)
    sample = bool(gen_kwargs.get("do_sample", temperature > 0))
    settings: dict[str, Any] = {"max_new_tokens": int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS), "do_sample": sample}
    for key in GENERATE_KEYS:
        if gen_kwargs.get(key) is not None and (sample or key not in ("top_p", "top_k")):
            settings[key] = gen_kwargs[key]
    if sample and temperature > 0:
        settings["temperature"] = temperature
    used = {"until", "max_new_tokens", "temperature", "do_sample", *GENERATE_KEYS}
    return settings, until, sorted(k for k in gen_kwargs if k not in used)


class Runner:
    """A loaded model and processor, run under the settings' pruning.

    Args:
        model: a model of a family catp prunes (:func:`catp.families.family_of`) in eval mode
            (:func:`catp.models.load_model`); video: InstructBLIP-Video only.
        processor: its processor (padding on the left for a decoder-only language model).
        settings: the parsed ``--model_args``.

    Attributes:
        prompt: the template around each request's context (one ``{}``), before the family's image text.
        decoder_only: the language model is decoder-only (every family but BLIP-2 / InstructBLIP on T5).
    """

    def __init__(self, model: Any, processor: Any, settings: Settings) -> None:
        self.model = model
        self.processor = processor
        self.settings = settings
        self.family = family_of(model)
        self.prompt = settings.prompt or default_prompt(model.config.model_type)
        self.video = takes_frames(model)
        self.decoder_only = self.family.decoder_only(model)

    def check(self) -> None:
        """Enter and leave :func:`catp.pruned` once with the settings, so that what it refuses for this
        model (a keep above its query tokens, a method option out of range, a budget with ``first``,
        a selector on a whole video, ``scope`` on an image model) fails before any request runs."""
        with self.pruning([0]):
            pass

    @contextlib.contextmanager
    def pruning(self, seeds: Sequence[int]) -> Iterator[PruningSession | None]:
        """:func:`catp.pruned` with the settings (``None`` when unpruned); ``random`` draws one seed per row,
        ``seeds``, unless the settings give its ``seed``."""
        s = self.settings
        if s.method is None:
            yield None
            return
        options = dict(s.options)
        if "seed" not in options:
            options.update(seed_options(s.method, list(seeds)))
        with pruned(self.model, method=s.method, keep=s.keep, scope=s.scope, **options) as session:
            yield session

    def prompts(self, requests: Sequence[Request]) -> list[str]:
        """Each request's context (lmms-eval's ``<image>`` tag taken out) in :attr:`prompt`, with the family's image
        text (:func:`catp.evaluation.harness.family_prompts`)."""
        return family_prompts(self.model, self.prompt, [r.context.replace(IMAGE_TAG, "") for r in requests])

    def encode(self, requests: Sequence[Request], texts: Sequence[str]) -> tuple[dict[str, Any], int]:
        """The model inputs for ``texts`` with each request's visuals, on the model's device; and the frames per sample."""
        if self.video:
            inputs, frames = self._video_inputs(requests, texts)
            return on_model(inputs, self.model), frames
        return image_inputs(self.processor, self.model, [_one_image(r) for r in requests], texts), 1

    def _video_inputs(self, requests: Sequence[Request], texts: Sequence[str]) -> tuple[dict[str, Any], int]:
        """InstructBLIP-Video inputs for clips of any frame count ``T`` (the stock processor's text assumes 4):
        ``T x Q`` video placeholders before each text, the Q-Former's instruction, the video processor's pixels."""
        clips = [[_rgb(frame) for frame in r.visuals] for r in requests]
        frames = {len(c) for c in clips}
        if len(frames) != 1 or 0 in frames:
            raise ValueError(f"the clips of one batch must have the same number of frames (at least 1), got {sorted(frames)}")
        count = frames.pop()
        tokenizer, processor = self.processor.tokenizer, self.processor
        token = getattr(processor.video_token, "content", processor.video_token)
        per_frame = self.family.num_queries(self.model.config)
        placeholders = tokenizer(token * (count * per_frame), add_special_tokens=False)["input_ids"]
        rows = [placeholders + ids for ids in tokenizer(list(texts))["input_ids"]]
        inputs = dict(tokenizer.pad({"input_ids": rows}, padding=True, return_tensors="pt"))
        qformer = processor.qformer_tokenizer(list(texts), padding=True, return_tensors="pt")
        inputs.update(qformer_input_ids=qformer["input_ids"], qformer_attention_mask=qformer["attention_mask"])
        inputs["pixel_values"] = processor.video_processor(videos=clips, return_tensors="pt")["pixel_values"]
        return inputs, count

    def generate(self, requests: Sequence[Request], settings: Mapping[str, Any], until: Sequence[str]) -> tuple[list[str], list[SampleCost]]:
        """Answers to a batch under one set of ``generate`` settings (:func:`generation_settings`): the
        new tokens only, decoded, cut at the first stop string, stripped."""
        inputs, frames = self.encode(requests, self.prompts(requests))
        with self.pruning(self._seeds(requests)) as session:
            output = self.model.generate(**inputs, **settings)
        new = output[:, inputs["input_ids"].shape[1]:] if self.decoder_only else output[:, 1:]  # T5: after the start token
        answers = [_cut(text, until).strip() for text in self.processor.batch_decode(new, skip_special_tokens=True)]
        lengths = self._new_tokens(new)
        costs = self._costs(requests, inputs, frames, session, lengths, beams=int(settings.get("num_beams", 1)))
        return answers, costs

    def loglikelihood(self, requests: Sequence[Request], continuations: Sequence[str]) -> tuple[list[tuple[float, bool]], list[SampleCost]]:
        """``(log p(continuation | context), whether greedy decoding gives it)`` per request, from one
        forward pass with labels on the continuation, inside :func:`catp.pruned`."""
        prompts = self.prompts(requests)
        if self.decoder_only:
            inputs, frames = self.encode(requests, [p + c for p, c in zip(prompts, continuations)])
            labels = _continuation_labels(self.processor.tokenizer, inputs["input_ids"], prompts, continuations)
        else:
            inputs, frames = self.encode(requests, prompts)
            target = self.processor.tokenizer(list(continuations), add_special_tokens=False, padding=True, return_tensors="pt")
            labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, -100).to(self.model.device)
        if bool((labels != -100).sum(dim=1).eq(0).any()):
            raise ValueError(f"an empty continuation has no log-likelihood: {list(continuations)!r}")
        with self.pruning(self._seeds(requests)) as session:
            output = self.model(**inputs, labels=labels)
        logits = output.logits[:, :-1] if self.decoder_only else output.logits
        targets = labels[:, 1:] if self.decoder_only else labels
        logits = logits[:, -targets.shape[1]:].float()
        mask = targets != -100
        picked = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores = (picked * mask).sum(dim=1)
        greedy = ((logits.argmax(dim=-1) == targets) | ~mask).all(dim=1)
        counts = mask.sum(dim=1)
        extra = [] if self.decoder_only else counts.tolist()  # T5: the continuation runs in the decoder
        costs = self._costs(requests, inputs, frames, session, [1] * len(requests), beams=1, decoder_tokens=extra)
        return [(float(s), bool(g)) for s, g in zip(scores.tolist(), greedy.tolist())], costs

    def _seeds(self, requests: Sequence[Request]) -> list[int]:
        """One seed per request from its task and document (``random`` then does not depend on batching)."""
        if self.settings.method is None or "seed" not in options_of(method_class(self.settings.method)):
            return [0] * len(requests)
        return [question_seed(0, f"{r.task}/{r.doc_id}") for r in requests]

    def _new_tokens(self, new: torch.Tensor) -> list[int]:
        """Generated tokens per row: up to and with the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos_ids = torch.tensor(eos if isinstance(eos, list) else [eos], device=new.device)
        ended = torch.isin(new, eos_ids)
        first = torch.where(ended.any(dim=1), ended.int().argmax(dim=1) + 1, torch.full_like(ended[:, 0], new.shape[1], dtype=torch.long))
        return first.tolist()

    def _costs(self, requests: Sequence[Request], inputs: Mapping[str, Any], frames: int, session: PruningSession | None,
               new_tokens: Sequence[int], beams: int, decoder_tokens: Sequence[int] = ()) -> list[SampleCost]:
        """One record per request; its query tokens are the placeholders of its row (``frames x Q``; Aria's ``Q`` at the
        call's resolution, per crop), its text the rest of its attention mask."""
        placeholders = self.family.placeholder_mask(self.model, inputs).sum(dim=1)
        queries = placeholders.tolist()
        kept = queries if session is None else session.keep_counts.tolist()
        text = (inputs["attention_mask"].sum(dim=1) - placeholders).tolist()
        instruction = inputs["qformer_attention_mask"].sum(dim=1).tolist() if "qformer_attention_mask" in inputs else [0] * len(requests)
        extra = list(decoder_tokens) or [0] * len(requests)
        return [SampleCost(task=r.task, kept=int(k), queries=int(q), prompt_tokens=int(t) + int(e), new_tokens=int(n), beams=beams,
                           instruction_tokens=int(i), frames=frames)
                for r, k, q, t, e, n, i in zip(requests, kept, queries, text, extra, new_tokens, instruction)]


def _continuation_labels(tokenizer: Any, input_ids: torch.Tensor, prompts: Sequence[str], continuations: Sequence[str]) -> torch.Tensor:
    """Labels on each row's continuation (the last tokens of a left-padded row), ``-100`` elsewhere. The
    continuation's token count is ``len(tokens(prompt + continuation)) - len(tokens(prompt))`` (as
    :func:`catp.training.answer_batch` counts an answer's)."""
    if tokenizer.padding_side != "left":
        raise ValueError("continuation labels need a processor that pads on the left (a decoder-only language model)")
    lengths = [len(tokenizer(p + c)["input_ids"]) - len(tokenizer(p)["input_ids"]) for p, c in zip(prompts, continuations)]
    width = input_ids.shape[1]
    positions = torch.arange(width, device=input_ids.device)
    tail = positions >= width - torch.tensor(lengths, device=input_ids.device)[:, None]
    return input_ids.masked_fill(~tail, -100)


def _one_image(request: Request) -> Any:
    if len(request.visuals) != 1:
        raise ValueError(f"task {request.task!r} document {request.doc_id}: the catp model takes one image per question, "
                         f"got {len(request.visuals)} visuals")
    return _rgb(request.visuals[0])


def _rgb(image: Any) -> Any:
    """A PIL image in RGB (lmms-eval hands over PIL images; a frame may come as an array)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if hasattr(image, "shape"):
        return Image.fromarray(_as_uint8(image)).convert("RGB")
    raise ValueError(f"cannot read a visual of type {type(image).__name__}: give a PIL image or an (H, W, 3) array")


def _as_uint8(array: Any) -> Any:
    import numpy as np

    array = np.asarray(array)
    return array if array.dtype == np.uint8 else array.clip(0, 255).astype(np.uint8)


def _cut(text: str, until: Sequence[str]) -> str:
    """``text`` up to the first of the stop strings."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text
