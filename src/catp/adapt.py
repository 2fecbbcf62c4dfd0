"""Win back the accuracy that pruning costs: a small adapter trained with the pruning in the loop.

The frozen language model of a BLIP-2 (or of any family of :mod:`catp.families`) only ever saw
all of its connector's tokens, and the connector never learnt to put what matters into the
tokens a method keeps. A short fine-tune teaches it:

* **Method in the loop** (default). Each batch draws a keep ``k`` from ``keeps`` (elastic, as
  the Matryoshka Query Transformer trains, so one adapter serves every keep, all tokens
  included). The loss is ``model(**inputs, labels=...)`` inside :func:`catp.pruned`, on the
  answer and EOS only: exactly what inference computes, with the kept set the adapted model
  itself chooses from the same forward pass. Training runs with dropout off (the modules in
  eval mode, gradients on): HF's eager attention returns its probabilities after dropout in
  training mode, so a choice made with dropout on would differ from the one made at
  inference, call after call.
* **Truncate** (MQT's own mode). The connector runs on its first ``k`` learned queries only
  (:func:`truncated`), so its outputs no longer depend on the dropped queries; an adapter
  trained so is exported as a stock checkpoint with ``k`` learned queries
  (:func:`export_truncated`: BLIP-2's ``num_query_tokens=K``), which stock Hugging Face (and
  for BLIP-2 stock vLLM) serve with no catp at all. A family whose query count is more than one
  config field (Aria's depends on the resolution) refuses it
  (:meth:`~catp.families.base.Family.truncation_refusal`).

What trains (:func:`add_adapter`): LoRA (``peft``) on the connector's layers that see the
queries (:attr:`~catp.families.base.Family.adapter_targets`; BLIP-2: the Q-Former's attention,
self and cross, and its query feed-forward layers), the modules the family trains whole
(BLIP-2's ``language_projection``), and the learned queries
(:meth:`~catp.families.base.Family.learned_queries`: BLIP-2's ``query_tokens``, Idefics2's
``latents``, Kosmos-2's ``latent_query``, Aria's ``query``; peft cannot train a bare
parameter, so they train as a plain parameter and are saved beside the adapter as
:data:`QUERY_TOKENS_FILE`). The vision tower and the language model stay frozen, as BLIP-2
keeps them; ``lm_lora`` adds LoRA on the language model's linear layers.

The loop (:func:`train_adapter`) keeps the adapter state that does best on the validation
questions (mean accuracy over the keeps), checkpoints every ``checkpoint_every`` steps and
on Ctrl-C (after the step under way), and resumes from the last checkpoint when rerun with
the same settings (the checkpoint interval may differ).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import re
import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from catp.evaluation.harness import on_model, prepare_batch, question_seed
from catp.evaluation.metric import vqa_accuracy
from catp.evaluation.questions import Question
from catp.extras import import_extra
from catp.families import Family, family_of_type
from catp.hf import base_model, check_model, pruned
from catp.layout import kept_positions, take_positions
from catp.methods import get_method, seed_options
from catp.models import ADAPTER_SETTINGS_FILE, QUERY_TOKENS_FILE, QUERY_TOKENS_KEY, adapter_info, load_adapter
from catp.protocol import PAPER_PROMPT, check_prompt
from catp.selection import resolve_keep
from catp.training import answer_batch, optimization_step, optimizer_and_schedule, progress

__all__ = [
    "ADAPTER_SETTINGS_FILE",
    "QUERY_TOKENS_FILE",
    "CHECKPOINT_DIR",
    "AdaptSettings",
    "add_adapter",
    "check_export",
    "check_out",
    "export_truncated",
    "load_adapter",
    "train_adapter",
    "trainable_parameters",
    "truncated",
    "truncating_family",
    "validate",
]

#: The folder in an adapter directory that holds the resumable state while it trains.
CHECKPOINT_DIR = "checkpoint"

# The linear layers of the language models catp meets (OPT, LLaMA, Mistral, Kosmos-2's, Aria's; attention and MLP),
# below the module the family names as its language model.
_LM_LAYERS = r"(q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class AdaptSettings:
    """Everything that determines an adapter's training (the run is a function of this and the data).

    Attributes:
        method: the pruning method in the loop (a name of :data:`catp.METHODS`); ignored with ``truncate``.
        keeps: the keeps a batch draws from, counts of query tokens (all of them included for an
            adapter that never hurts the full model).
        full_every_step: each step also takes the loss with all query tokens and trains on the
            mean of the two (the "sandwich rule" of slimmable networks): the full model is
            anchored at every step, however many small keeps ``keeps`` lists.
        truncate: MQT's mode: the connector runs on its first ``k`` learned queries.
        rank, alpha, dropout: LoRA's rank, scale and dropout.
        lm_lora: also LoRA on the language model's linear layers.
        query_tokens: whether the learned queries train (BLIP-2's query tokens, the latents of the other families).
        lr: peak learning rate (AdamW, 5% warm-up, cosine decay to 10%).
        batch_size: questions per step.
        steps: optimisation steps.
        validate_every: steps between validations (and at the end).
        checkpoint_every: steps between resumable checkpoints (not part of what a rerun must
            match: a run may resume with another interval).
        seed: the data order, the keep drawn per step, the initial LoRA weights.
        prompt: the VQA prompt (``{}`` is the question).
        max_new_tokens: greedy answer length at validation.
    """

    method: str = "first"
    keeps: tuple[int, ...] = (4, 8, 16, 32)
    full_every_step: bool = False
    truncate: bool = False
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    lm_lora: bool = False
    query_tokens: bool = True
    lr: float = 5e-4
    batch_size: int = 32
    steps: int = 1200
    validate_every: int = 300
    checkpoint_every: int = 50
    seed: int = 0
    prompt: str = PAPER_PROMPT
    max_new_tokens: int = 5

    def check(self, num_query_tokens: int) -> None:
        """Raise a ``ValueError`` (or ``TypeError``) naming the first bad setting."""
        if not self.truncate:
            get_method(self.method)  # an unknown method is named
        if not self.keeps:
            raise ValueError("give at least one keep")
        for k in self.keeps:
            if isinstance(k, float):
                raise ValueError(f"keeps are counts of query tokens, got the fraction {k!r} (resolve it with catp.resolve_keep)")
            resolve_keep(k, num_query_tokens)
        for name in ("rank", "batch_size", "steps", "validate_every", "checkpoint_every", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (self.lr > 0 and self.alpha > 0 and 0 <= self.dropout < 1):
            raise ValueError(f"need lr > 0, alpha > 0 and 0 <= dropout < 1, got lr={self.lr}, alpha={self.alpha}, dropout={self.dropout}")
        check_prompt(self.prompt)

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "keeps": list(self.keeps)}


# -- the adapter ------------------------------------------------------------------------------

def add_adapter(model: nn.Module, settings: AdaptSettings) -> nn.Module:
    """Wrap ``model`` in a ``peft.PeftModel`` with the trainable parts of ``settings`` (see the module docstring).

    Every other parameter is frozen. Returns the ``PeftModel``; ``catp.pruned`` and
    :func:`catp.select_queries` take it as they take the model.
    """
    peft = import_extra("peft", "adapt", "catp adapt")
    inner = base_model(model)
    family = check_model(inner)
    targets = family.adapter_targets + (f"|{_lm_targets(inner, family)}" if settings.lm_lora else "")
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets,
                             modules_to_save=list(family.adapter_modules_to_save) or None)
    torch.manual_seed(settings.seed)  # LoRA's A matrices start random
    adapted = peft.get_peft_model(model, config)
    # peft trains LoRA and modules_to_save only; the learned queries are a bare parameter it cannot wrap.
    family.learned_queries(base_model(adapted)).requires_grad_(settings.query_tokens)
    return adapted


def _lm_targets(model: nn.Module, family: Family) -> str:
    """A regex of the language model's linear layers (:data:`_LM_LAYERS`), under its module name in ``model``
    (BLIP-2: ``language_model``, Idefics2: ``model.text_model``)."""
    language_model = family.language_model(model)
    prefix = next(name for name, module in model.named_modules() if module is language_model)
    return re.escape(prefix) + r"\..*\." + _LM_LAYERS


def trainable_parameters(model: nn.Module) -> dict[str, int]:
    """Names and sizes of the parameters that train."""
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


def save_adapter(model: nn.Module, out: Path, info: dict[str, Any]) -> None:
    """A standard peft adapter directory (``PeftModel.from_pretrained`` loads it), plus the learned queries
    (:data:`QUERY_TOKENS_FILE`, their parameter's shape) and ``info``."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    inner = base_model(model)
    queries = check_model(inner).learned_queries(inner)
    save_file({QUERY_TOKENS_KEY: queries.detach().float().cpu().contiguous()}, str(out / QUERY_TOKENS_FILE))
    (out / ADAPTER_SETTINGS_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


# -- choosing and truncating ------------------------------------------------------------------

def truncating_family(config: Any) -> Family:
    """The family of a model of ``config``, where its connector can run on its first ``k`` learned queries alone.

    Raises:
        ValueError: why it cannot (:meth:`~catp.families.base.Family.truncation_refusal`), in one line.
    """
    family = family_of_type(config.model_type)
    refusal = family.truncation_refusal(config)
    if refusal is not None:
        raise ValueError(refusal)
    return family


@contextlib.contextmanager
def truncated(model: nn.Module, k: int) -> Iterator[None]:
    """Run the connector on its first ``k`` learned queries only (MQT), inside the block.

    The stock forward reads the queries as an attribute of their module
    (:meth:`~catp.families.base.Family.learned_queries_at`); inside the block an instance attribute
    holding their first ``k`` rows shadows the registered parameter, so the connector returns ``k``
    tokens per image and the gradient reaches those rows (the parameter stays registered, and
    ``named_parameters`` unchanged). The prompt must then hold ``k`` placeholders per image
    (:func:`shorten_placeholders`).

    Raises:
        ValueError: a family or model that cannot run its first ``k`` queries alone
            (:meth:`~catp.families.base.Family.truncation_refusal`), or ``k`` out of range.
    """
    inner = base_model(model)
    family = truncating_family(inner.config)
    resolve_keep(k, family.num_queries(inner.config))
    module, attribute = family.learned_queries_at(inner)
    vars(module)[attribute] = family.learned_queries(inner).narrow(family.query_axis, 0, k)
    try:
        yield
    finally:
        del vars(module)[attribute]


def shorten_placeholders(model: nn.Module, inputs: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Keep only the first ``k`` placeholders of each image (each crop) of each prompt, as the family's processor lays
    out a prompt for ``k`` learned queries: in ``input_ids``, ``attention_mask``, ``labels`` and the family's
    per-position inputs (Kosmos-2's ``image_embeds_position_mask``); every other input as it is."""
    inner = base_model(model)
    family = check_model(inner)
    ids = inputs["input_ids"]
    q = family.num_queries(inner.config)
    groups = family.groups_per_sample(inner, inputs["pixel_values"], ids).to(ids.device)  # (B,)
    slot = torch.arange(int(groups.max()) * k, device=ids.device)
    first = (slot // k) * q + slot % k  # (G*k,) the first k placeholders of each group, flat over a sample's
    keep = first.expand(ids.shape[0], -1).masked_fill(slot >= groups[:, None] * k, -1)  # (B, G*k), -1 padded
    positions = kept_positions(family.placeholder_mask(inner, inputs), keep, "left")
    fills = {"input_ids": inner.config.text_config.pad_token_id or 0, "attention_mask": 0, "labels": -100,
             **{name: 0 for name in family.position_inputs}}
    return {name: take_positions(value, positions, fills[name]) if name in fills else value for name, value in inputs.items()}


# -- one step and the loop -----------------------------------------------------------------------

def _loss(model: nn.Module, inputs: dict[str, torch.Tensor], settings: AdaptSettings, k: int, q: int,
          options: dict[str, Any]) -> torch.Tensor:
    """The language-modelling loss on the answers with ``k`` query tokens, as inference would feed them
    (with ``settings.full_every_step``, the mean of that and the loss with all ``q`` tokens)."""
    with _inference(model, inputs, settings, k, q, options) as ready:
        loss = model(**ready).loss
    if settings.full_every_step and k != q:
        loss = (loss + model(**inputs).loss) / 2
    return loss


def target_answer(question: Question) -> str:
    """The answer to train on: the most frequent of the human answers (the first among equals)."""
    return Counter(a.strip() for a in question.answers).most_common(1)[0][0]


def _batches(questions: Sequence[Question], batch_size: int, seed: int, step: int) -> list[Question]:
    """The questions of ``step``: epochs of a seeded permutation, so a resumed run sees the same batches."""
    per_epoch = max(1, len(questions) // batch_size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(len(questions)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [questions[i] for i in order[index * batch_size:(index + 1) * batch_size]]


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _any_process(flag: bool, world: int, device: torch.device) -> bool:
    """Whether ``flag`` is set in any process: all of them stop after the same step (one that
    went on alone would wait for the others' gradients forever)."""
    if world == 1:
        return flag
    value = torch.tensor([float(flag)], device=device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def _process() -> tuple[int, int]:
    """``(rank, world size)`` of a ``torch.distributed`` run (``accelerate launch``, ``torchrun``), else ``(0, 1)``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _method_options(method: str, questions: Sequence[Question], seed: int) -> dict[str, Any]:
    # A seeded method draws per question, as the eval harness does.
    return seed_options(method, [question_seed(seed, q.id) for q in questions])


def validate(model: nn.Module, processor: Any, questions: Sequence[Question], settings: AdaptSettings,
             batch_size: int = 64) -> dict[int, float]:
    """Greedy VQA accuracy (%) on ``questions`` at every keep, as inference runs it (eval mode).

    In a ``torch.distributed`` run each process answers its share and the sums are added up.
    """
    rank, world = _process()
    mine = list(questions)[rank::world]
    inner = base_model(model)
    q = check_model(inner).num_queries(inner.config)
    was_training = inner.training
    inner.eval()
    totals = torch.zeros(len(settings.keeps), dtype=torch.float64)
    generate = dict(max_new_tokens=settings.max_new_tokens, do_sample=False, num_beams=1)
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            inputs = prepare_batch(processor, chunk, settings.prompt, inner)
            options = _method_options(settings.method, chunk, settings.seed)
            for i, k in enumerate(settings.keeps):
                with torch.no_grad(), _inference(inner, inputs, settings, k, q, options) as ready:
                    out = inner.generate(**ready, **generate)
                answers = processor.batch_decode(out[:, ready["input_ids"].shape[1]:], skip_special_tokens=True)
                totals[i] += sum(vqa_accuracy(a.strip(), x.answers) for a, x in zip(answers, chunk))
    finally:
        inner.train(was_training)
    if world > 1:
        torch.distributed.all_reduce(totals)
    return {k: float(100 * total / len(questions)) for k, total in zip(settings.keeps, totals)}


@contextlib.contextmanager
def _inference(model: nn.Module, inputs: dict[str, torch.Tensor], settings: AdaptSettings, k: int, q: int,
               options: dict[str, Any]) -> Iterator[dict[str, torch.Tensor]]:
    """The inputs and context of a call at keep ``k``, in training and at inference alike: unpruned
    (all ``q`` tokens), truncated or pruned (``options``: the method's)."""
    if k == q:
        yield inputs
    elif settings.truncate:
        with truncated(model, k):
            yield shorten_placeholders(model, inputs, k)
    else:
        with pruned(model, method=settings.method, keep=k, **options):
            yield inputs


@dataclass
class AdaptResult:
    """What :func:`train_adapter` did.

    Attributes:
        out: the adapter directory.
        steps: optimisation steps done in all (this call and the ones it resumed).
        seconds: training time in all, validation excluded.
        validation: per validation step, ``{"step", "accuracy": {keep: %}, "mean"}``.
        best: the entry of ``validation`` whose adapter state was saved.
        resumed_from: the step this call started at.
    """

    out: Path
    steps: int
    seconds: float
    validation: list[dict[str, Any]]
    best: dict[str, Any]
    resumed_from: int = 0


def train_adapter(model: nn.Module, processor: Any, train: Sequence[Question], val: Sequence[Question], settings: AdaptSettings,
                  out: Path, show_progress: bool = True, data: dict[str, Any] | None = None,
                  log: Callable[[str], None] = print) -> AdaptResult:
    """Train an adapter on ``train``, keep the state that does best on ``val``, write it to ``out``.

    Args:
        model: a model of a family of :mod:`catp.families` with a decoder-only language model, without an
            adapter; it is wrapped in place (:func:`add_adapter`).
        processor: its processor, padding on the left.
        train, val: questions with their answers (never a test split).
        out: the adapter directory; ``out/checkpoint`` holds the resumable state until the run ends.
        data: a description of the training and validation data, saved with the adapter.

    Returns:
        An :class:`AdaptResult`; the adapter is in ``out`` (:func:`load_adapter`).
    """
    inner = base_model(model)
    family = check_model(inner)
    q = family.num_queries(inner.config)
    settings.check(q)
    if not family.decoder_only(inner):
        raise ValueError("catp adapt trains models with a decoder-only language model (OPT, LLaMA, Vicuna, Mistral), "
                         f"not {type(family.language_model(inner)).__name__}")
    if settings.truncate:
        truncating_family(inner.config)
    if not train or not val:
        raise ValueError(f"need training and validation questions, got {len(train)} and {len(val)}")
    if check_out(out, settings):
        finished = adapter_info(out)
        log(f"{out} already holds this adapter, trained to the end; nothing to do")
        return AdaptResult(out=out, steps=finished["steps"], seconds=finished["train_seconds"], validation=finished["validation"],
                           best=finished["best"], resumed_from=finished["steps"])
    adapted = add_adapter(model, settings)
    params = [p for p in adapted.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_and_schedule(params, settings.lr, settings.steps)
    state = _resume(adapted, optimizer, scheduler, out, settings, log)
    start, seconds, history, best = state["step"], state["seconds"], state["validation"], state["best"]
    draw = random.Random(f"keeps:{settings.seed}")
    keeps = [draw.choice(settings.keeps) for _ in range(settings.steps)]
    # Dropout off everywhere (gradients still flow): the kept set chosen in the loop is the one
    # inference chooses (see the module docstring).
    inner.eval()
    bar = progress(settings.steps, "adapt", show_progress)
    bar.update(start)
    template = family.prompt_for(settings.prompt)  # the image where the family's processor expects it, as validate()
    rank, world = _process()
    with _deferred_interrupt() as stop:
        for step in range(start, settings.steps):
            started = time.perf_counter()
            batch = _batches(train, settings.batch_size, settings.seed, step)
            mine = batch[rank::world]  # each process its share; the gradients are summed
            inputs = on_model(answer_batch(processor, [x.load_image() for x in mine], [template.format(x.question) for x in mine],
                                           [target_answer(x) for x in mine], family.position_inputs), inner)
            loss = _loss(adapted, inputs, settings, keeps[step], q, _method_options(settings.method, mine, settings.seed))
            optimization_step(loss * len(mine) / len(batch), params, optimizer, scheduler, sum_gradients=world > 1)
            seconds += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", k=keeps[step])
            done = step + 1
            if done % settings.validate_every == 0 or done == settings.steps:
                accuracy = validate(adapted, processor, val, settings)
                entry = {"step": done, "accuracy": accuracy, "mean": sum(accuracy.values()) / len(accuracy)}
                history.append(entry)
                log(f"step {done}: validation accuracy " + ", ".join(f"keep {k}: {a:.1f}" for k, a in accuracy.items()))
                if best is None or entry["mean"] > best["mean"]:
                    best = entry
                    if rank == 0:
                        _save_tensors(adapted, out / CHECKPOINT_DIR / "best.safetensors")
            stopping = _any_process(stop.is_set(), world, params[0].device)
            if (done % settings.checkpoint_every == 0 or done == settings.steps or stopping) and rank == 0:
                _checkpoint(adapted, optimizer, scheduler, out, settings, done, seconds, history, best)
            _barrier(world)
            if stopping:
                bar.close()
                log(f"stopped after step {done} of {settings.steps}; the checkpoint in {out / CHECKPOINT_DIR} resumes there")
                raise KeyboardInterrupt
    bar.close()
    _load_tensors(adapted, out / CHECKPOINT_DIR / "best.safetensors")
    info = {"settings": settings.to_json(), "data": data or {}, "steps": settings.steps, "train_seconds": round(seconds, 1),
            "validation": history, "best": best, "trainable_parameters": sum(trainable_parameters(adapted).values())}
    _barrier(world)  # every process has read the best state
    if rank == 0:
        save_adapter(adapted, out, info)
        shutil.rmtree(out / CHECKPOINT_DIR)  # the adapter is whole: the resumable state is spent
    _barrier(world)
    return AdaptResult(out=out, steps=settings.steps, seconds=seconds, validation=history, best=best, resumed_from=start)


# -- checkpoints ----------------------------------------------------------------------------------

def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _save_tensors(model: nn.Module, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(_trainable_state(model), str(path))


def _load_tensors(model: nn.Module, path: Path) -> None:
    saved = load_file(str(path))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in saved:
                p.copy_(saved[name].to(p.dtype))


def _checkpoint(model: nn.Module, optimizer: Any, scheduler: Any, out: Path, settings: AdaptSettings, step: int, seconds: float,
                history: list[dict[str, Any]], best: dict[str, Any] | None) -> None:
    """Everything a rerun needs to continue at ``step`` as if never stopped (the file written last marks it whole)."""
    folder = out / CHECKPOINT_DIR
    _save_tensors(model, folder / "weights.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()},
               folder / "optimizer.pt")
    state = {"settings": settings.to_json(), "step": step, "seconds": seconds, "validation": history, "best": best}
    (folder / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")


#: Settings a rerun may change and still resume: how often it checkpoints does not change the result.
_RESUMABLE_CHANGES = frozenset({"checkpoint_every"})


def _changed(saved: dict[str, Any], settings: AdaptSettings) -> list[str]:
    """The settings in which ``saved`` (a run's ``settings.to_json()``) differs from ``settings``."""
    now = settings.to_json()
    default = AdaptSettings().to_json()  # a setting added after ``saved`` was written had its default then
    return sorted(k for k in saved.keys() | now.keys() if k not in _RESUMABLE_CHANGES and saved.get(k, default.get(k)) != now.get(k))


def check_out(out: Path, settings: AdaptSettings) -> bool:
    """Whether ``out`` already holds the finished adapter of ``settings`` (``False``: empty, or a
    checkpoint of the same settings to resume).

    Raises:
        ValueError: ``out`` holds an adapter or a checkpoint trained with other settings (named).
    """
    finished = adapter_info(out)
    if finished:
        changed = _changed(finished.get("settings", {}), settings)
        if changed:
            raise ValueError(f"{out} holds an adapter trained with other settings ({', '.join(changed)}); use another --out")
        return True
    state_file = out / CHECKPOINT_DIR / "state.json"
    if state_file.is_file():
        changed = _changed(json.loads(state_file.read_text(encoding="utf-8"))["settings"], settings)
        if changed:
            raise ValueError(f"{out} holds a checkpoint of a run with other settings ({', '.join(changed)}); "
                             "resume with the same settings or use another --out")
    return False


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[threading.Event]:
    """Ctrl-C while training: the first one sets the event (the loop finishes its step,
    checkpoints and stops), a second one stops at once. Outside the main thread signals
    cannot be caught: Ctrl-C is left alone there."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handle(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _resume(model: nn.Module, optimizer: Any, scheduler: Any, out: Path, settings: AdaptSettings,
            log: Callable[[str], None]) -> dict[str, Any]:
    """The state to start from: a fresh one, or the last checkpoint (of a run with the same settings: :func:`check_out`)."""
    fresh = {"step": 0, "seconds": 0.0, "validation": [], "best": None}
    state_file = out / CHECKPOINT_DIR / "state.json"
    if not state_file.is_file():
        return fresh
    state = json.loads(state_file.read_text(encoding="utf-8"))
    _load_tensors(model, out / CHECKPOINT_DIR / "weights.safetensors")
    saved = torch.load(out / CHECKPOINT_DIR / "optimizer.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"])
    for entry in state["validation"]:
        entry["accuracy"] = {int(k): v for k, v in entry["accuracy"].items()}
    if state["best"] is not None:
        state["best"]["accuracy"] = {int(k): v for k, v in state["best"]["accuracy"].items()}
    log(f"resuming {out} at step {state['step']} of {settings.steps}")
    return state


# -- export ---------------------------------------------------------------------------------------

def check_export(config: Any, k: int) -> None:
    """Raise a ``ValueError`` unless a model of ``config`` can be exported with its first ``k`` learned queries
    (:func:`export_truncated`): a family that truncates (:meth:`~catp.families.base.Family.truncation_refusal`),
    ``k`` in ``1..Q``."""
    q = truncating_family(config).num_queries(config)
    if not 1 <= k <= q:
        raise ValueError(f"--export {k} is out of range: the model has {q} query tokens, export 1..{q}")


def export_truncated(model: nn.Module, processor: Any, k: int, out: Path) -> Path:
    """A stock checkpoint of the model's family with its first ``k`` learned queries and the (merged) adapted weights.

    The family sets the config field(s) that count the queries (BLIP-2: ``num_query_tokens=k``, Idefics2:
    ``perceiver_config.resampler_n_latents``, Kosmos-2: ``latent_query_num``) and makes the processor insert ``k``
    placeholders per image, saved with it (:meth:`~catp.families.base.Family.truncate_processor`). Stock Hugging Face
    (the model class and ``AutoProcessor``) and, for BLIP-2, stock vLLM load and serve it, no catp needed; its
    connector runs on ``k`` queries, which is what :func:`truncated` trains.

    Args:
        model: an adapted model (a ``PeftModel`` is merged first) or a plain one. It is changed in place (merged,
            its learned queries cut to ``k``): load it again to use it.
        processor: its processor; changed in place to insert ``k`` placeholders.

    Raises:
        ValueError: see :func:`check_export`.
    """
    inner = base_model(model)
    if hasattr(model, "merge_and_unload"):
        inner = model.merge_and_unload()
    family = check_model(inner)
    check_export(inner.config, k)
    module, attribute = family.learned_queries_at(inner)
    with torch.no_grad():
        setattr(module, attribute, nn.Parameter(family.learned_queries(inner).narrow(family.query_axis, 0, k).detach().clone()))
    family.truncate_config(inner.config, k)
    out.mkdir(parents=True, exist_ok=True)
    inner.save_pretrained(str(out))
    family.truncate_processor(processor, k)
    processor.save_pretrained(str(out))
    return out
