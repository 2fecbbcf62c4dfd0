"""Attach pruning methods to stock Hugging Face models of every family in :mod:`catp.families`.

Nothing here forks model code, and no model class is named: every fact about a model comes
from its family (:func:`catp.families.family_of`). Inside :func:`pruned`:

* forward hooks on the connector's attention modules (and, for ``catp-image``, a
  pre-hook on the last vision block) capture what the method needs (:mod:`catp.capture`)
  while the stock code runs the vision tower and the connector once (once per frame for video);
* a forward hook on the family's output module (BLIP-2: ``language_projection``) lets the method choose which queries to keep
  (a scorer's top ``k`` or per-sample :class:`~catp.budget.Budget`; a selector's picks),
  through :func:`catp.selection.choose`, the one path every engine takes. It leaves the output
  alone, so the stock code writes every query row into its placeholder as usual (for
  video, the stock reshape to ``(B, T*Q, D)`` stays valid);
* just before the language model runs (a wrapper on ``language_model.generate``, a
  forward pre-hook on ``language_model``), the sequence is shortened: every text token
  and the placeholders of the kept queries stay, in their order. Samples that keep fewer
  tokens than the batch's largest get masked fillers: at the left, where left padding
  goes, for a decoder-only LLM (its generate derives positions from the mask); at the
  right, after the text, for T5 (its relative positions between real tokens do not
  change). A fixed ``k`` needs no fillers.
* outputs are mapped back to the caller's layout: ``generate`` returns the caller's
  own ``input_ids`` followed by the new tokens (decoder-only LLMs), ``forward`` returns
  logits at the caller's positions (pruned placeholder positions hold zeros) and the loss
  of the shortened sequence.

The language model keeps its attention implementation; only the connector is switched
to eager (for methods that read its probabilities) and switched back on exit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from catp.budget import Budget
from catp.capture import Recorder, watch
from catp.families import Family, family_of
from catp.layout import kept_positions, put_positions, take_positions
from catp.methods import PruningMethod, budget_refusal, get_method
from catp.selection import SAMPLE_SCOPES, SCOPES, Choice, Keep, check_keep_type, check_keep_value, choose, resolve_keep, selector_refusal

__all__ = [
    "PruningSession",
    "base_model",
    "capture_connector",
    "cross_attention_layers",
    "eager_connector",
    "is_video_model",
    "placeholder_token_id",
    "pruned",
    "select_queries",
    "takes_frames",
]

def is_video_model(model: nn.Module) -> bool:
    """Whether a sample of ``model`` holds several groups of query tokens (video frames), so that ``scope=`` applies."""
    return family_of(model).has_groups(model)


def takes_frames(model: nn.Module) -> bool:
    """Whether a sample of ``model`` is a sequence of frames (a video model), rather than one image (whose crops, where
    the family splits images, its processor makes)."""
    return is_video_model(model) and family_of(model).group == "frame"


def placeholder_token_id(model: nn.Module) -> int | None:
    """The id of the placeholder token that stands for one query token in ``input_ids``
    (:meth:`~catp.families.base.Family.placeholder_token_id`; a ``ValueError`` when the config leaves it unset;
    ``None`` where the family marks the positions otherwise, as Kosmos-2's ``image_embeds_position_mask``)."""
    return family_of(model).placeholder_token_id(model)


def check_placeholders(input_ids: torch.Tensor, is_placeholder: torch.Tensor, num_queries: int, groups: torch.Tensor,
                       group: str | None = None, placeholder_id: int | None = None) -> None:
    """Raise unless each row ``b`` of ``input_ids`` ``(B, L)`` holds exactly ``groups[b] * num_queries`` placeholders.

    Args:
        is_placeholder: ``(B, L)`` bool, the placeholder positions
            (:meth:`~catp.families.base.Family.placeholder_mask`).
        groups: ``(B,)`` groups per sample (frames, crops; 1 for an image).
        group: what a group is called (``"frame"``), where a sample holds several; ``None`` for images.
        placeholder_id: the placeholder token's id, for the message (``None``: marked otherwise).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    counts = is_placeholder.sum(dim=1)
    expected = groups.to(counts.device) * num_queries
    bad = (counts != expected).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        kind = "video" if group == "frame" else "image"
        per = "" if group is None else f" ({int(groups[b])} {group}s x {num_queries} query tokens)"
        raise ValueError(
            f"input_ids must hold exactly {int(expected[b])} {kind} placeholder tokens"
            f"{'' if placeholder_id is None else f' (id {placeholder_id})'} per sample{per}, "
            f"as the processor inserts them; sample {b} has {int(counts[b])}"
        )


@dataclass
class _Call:
    """One ``generate`` / ``forward`` / :func:`select_queries` call in flight.

    Attributes:
        input_ids: the caller's ``(B, L)`` (``None`` when only the features are computed).
        placeholders: ``(B, L)`` bool, where ``input_ids`` holds the placeholders (``None`` with it).
        groups: ``(B,)`` groups per sample: frames, crops (1 for an image).
        num_queries: ``Q`` of each group at this call's resolution (:meth:`~catp.families.base.Family.queries_for`).
        mode: which entry point made the call.
        labels: a decoder-only forward's labels, taken out of the stock call: the loss
            is computed on the shortened sequence.
        scored: the query tokens of this call were scored (a failed call's state is never used).
        positions: ``(B, L')`` from :func:`kept_positions`, once the sequence was shortened.
    """

    input_ids: torch.Tensor | None
    placeholders: torch.Tensor | None
    groups: torch.Tensor
    num_queries: int
    mode: Literal["generate", "forward", "features"]
    labels: torch.Tensor | None = None
    scored: bool = False
    positions: torch.Tensor | None = None


@dataclass
class PruningSession:
    """The state of one :func:`pruned` context; yielded to the caller.

    Query indices are flat over a video's ``T*Q`` tokens, frame-major: index ``i`` is query
    ``i % Q`` of frame ``i // Q``. For an image ``T = 1``. The same holds for a sample's crops and
    images where a family splits them (Idefics2): group ``i // Q``, in the order of the placeholders.

    Attributes:
        method: the pruning method.
        keep: what the caller asked for: a count (resolved from a fraction where the number
            of tokens is known up front), a fraction (``scope="video"``: resolved per call,
            once ``T`` is known) or a :class:`~catp.budget.Budget`.
        scope: on a model whose samples hold several groups: ``"video"``/``"sample"`` (``keep`` counts over a
            sample) or ``"frame"``/``"group"`` (over each group); ``None`` on an image model.
        keep_indices: ``(B, K)`` indices kept by the most recent call, ascending, padded with
            ``-1`` where a sample keeps fewer than the batch's largest ``K``.
        keep_counts: ``(B,)`` tokens each sample kept in the most recent call (all frames).
        pick_order: ``(B, K)`` the same indices in the order the method picked them (a
            selector's greedy order, frame by frame on video; a scorer's by descending score),
            padded with ``-1`` like ``keep_indices``.
        scores: ``(B, T*Q)`` scores of the most recent call (NaN past a sample's own groups); ``None`` for a selector.
        num_frames: ``T`` of the most recent call (the largest, where samples hold different numbers of groups).
    """

    model: nn.Module = field(repr=False)
    method: PruningMethod
    keep: Keep
    scope: str | None = None
    keep_indices: torch.Tensor | None = None
    keep_counts: torch.Tensor | None = None
    pick_order: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    num_frames: int = 1
    _recorder: Recorder = field(default_factory=Recorder, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _call: _Call | None = field(default=None, repr=False)

    @property
    def family(self) -> Family:
        """The model's family (:mod:`catp.families`)."""
        return family_of(self.model)

    @property
    def num_query_tokens(self) -> int:
        """``Q`` of the call in flight (it may depend on the resolution), else the model's."""
        return self._call.num_queries if self._call is not None else self.family.num_queries(self.model.config)

    @property
    def is_video(self) -> bool:
        """Whether samples hold several groups (``scope=`` applies)."""
        return self.scope is not None

    @property
    def per_sample(self) -> bool:
        """Whether ``keep`` counts over a whole sample's groups."""
        return self.scope in SAMPLE_SCOPES

    @property
    def decoder_only(self) -> bool:
        return self.family.decoder_only(self.model)

    # -- capture hooks -------------------------------------------------------------
    def _install_hooks(self) -> None:
        family, model = self.family, self.model
        watched = watch(family, model, self.method.needs)
        for module in watched.cross:
            self._handles.append(module.register_forward_hook(self._capture_cross, with_kwargs=True))
        for module in watched.self_attention:
            self._handles.append(module.register_forward_hook(self._capture_self, with_kwargs=True))
        if watched.vision is not None:
            self._handles.append(watched.vision.register_forward_pre_hook(self._capture_vision, with_kwargs=True))
        self._handles.append(family.vision_tower(model).register_forward_pre_hook(self._reset))
        self._handles.append(family.output_module(model).register_forward_hook(self._select, with_kwargs=True))
        query_output = family.query_output_module(model)
        if query_output is not None:
            self._handles.append(query_output.register_forward_hook(self._capture_query_output))
        if watched.image_mask is not None:
            self._handles.append(watched.image_mask.register_forward_pre_hook(self._capture_image_mask, with_kwargs=True))
        if not family.encodes_first:
            llm = family.language_model(model)
            self._handles.append(llm.register_forward_pre_hook(self._language_model_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_pre_hook(self._forward_pre_hook, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._forward_hook, with_kwargs=True))

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._recorder.reset()

    def _probabilities(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> torch.Tensor:
        """The probabilities of an attention module's call, ``(rows, H, Q, K)``
        (:meth:`~catp.families.base.Family.probabilities`); an error where it returned none."""
        probs = self.family.probabilities(module, args, kwargs, output)
        if probs is None:
            raise RuntimeError(
                f"the {self.family.connector}' attention returned no probabilities; catp needs the connector's eager "
                "attention (it is switched inside pruned(); was the attention implementation changed meanwhile?)"
            )
        return probs.detach()

    def _capture_cross(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        self._recorder.cross.append(self.family.image_probabilities(self._probabilities(module, args, kwargs, output)))

    def _capture_self(self, module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        probabilities = self._probabilities(module, args, kwargs, output)
        block = self.family.latent_probabilities(probabilities, self.num_query_tokens)
        self._recorder.self_attention.append(block)

    def _capture_vision(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self._recorder.vision = self.family.vision_probabilities(module, hidden, mask)

    def _capture_query_output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self._recorder.query_output = output.detach()

    def _capture_image_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._recorder.image_mask = self.family.image_mask(args, kwargs)

    # -- choosing the kept queries ---------------------------------------------------
    def _group_size(self, frames: int) -> int:
        """How many tokens one ``keep`` counts over: a sample's ``T*Q`` (``scope="video"``) or ``Q``."""
        return frames * self.num_query_tokens if self.per_sample else self.num_query_tokens

    def _group_keep(self, frames: int) -> int | Budget:
        """``keep`` for one group of :meth:`_group_size` tokens: a count, or the Budget."""
        if isinstance(self.keep, Budget):
            return self.keep
        n = self._group_size(frames)
        group = self.family.group
        of = f"the sample has {frames} {group}s x {self.num_query_tokens} query tokens" if self.per_sample else None
        if of is not None and group == "frame":
            of = f"the video has {frames} frames x {self.num_query_tokens} query tokens"
        return resolve_keep(self.keep, n, of=of)

    def _select(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        query_output, output = self.family.output_tokens(args, kwargs, output)
        if self.family.query_output_module(self.model) is not None:
            query_output = None  # recorded by _capture_query_output
        if self._call is None and self.is_video:
            raise RuntimeError(
                "inside pruned(), run the model through model.generate(...), model(...) or catp.select_queries(...): "
                f"they tell the pruning layer the number of {self.family.group}s"
            )
        rows, num_queries = output.shape[:2]
        if num_queries != self.num_query_tokens:
            raise ValueError(f"{type(module).__name__} got {num_queries} tokens per image, expected "
                             f"{self.num_query_tokens} {self.family.connector}")
        groups = self._call.groups if self._call is not None else torch.ones(rows, dtype=torch.long)
        if int(groups.sum()) != rows:
            raise ValueError(f"{type(module).__name__} got {rows} rows, but the call's samples hold {int(groups.sum())} "
                             f"{self.family.group}s")
        uniform = bool((groups == groups[0]).all())
        if not uniform and self.per_sample:
            raise ValueError(f"scope={self.scope!r} counts over a whole sample, which needs the same number of "
                             f"{self.family.group}s in every sample of a batch (got {groups.tolist()}); "
                             f"use scope='group', or batch samples with equal counts")
        frames = int(groups[0]) if uniform else 1
        captures = self._recorder.captures(self.method.needs, output, frames, query_output=query_output,
                                           published_layer_weights=self.family.published_layer_weights)
        try:
            choice = choose(self.method, captures, self._group_keep(frames), scope=self.scope)
        finally:
            self._reset(module, ())
        if not uniform:
            choice = _by_sample(choice, groups, num_queries)
        self.keep_indices, self.pick_order, self.keep_counts, self.scores = (
            choice.keep_indices, choice.pick_order, choice.counts, choice.scores)
        self.num_frames = int(groups.max())
        if self._call is not None:
            self._call.scored = True

    # -- calls: input checks, shortening before the LLM, outputs back ----------------
    def _start(self, inputs: Mapping[str, Any], pixel_values: torch.Tensor | None, mode: str, **extra: Any) -> None:
        """Check a call's inputs (``input_ids`` and the family's :attr:`~catp.families.base.Family.position_inputs`,
        by name; no ``input_ids`` when only the features are computed) and remember it until the language model runs."""
        if pixel_values is None:
            raise ValueError(f"{mode}() needs pixel_values")
        input_ids, placeholders = inputs.get("input_ids"), None
        groups = self.family.groups_per_sample(self.model, pixel_values, input_ids)
        num_queries = self.family.queries_for(self.model, pixel_values)
        if input_ids is not None:
            placeholders = self.family.placeholder_mask(self.model, inputs)
            check_placeholders(input_ids, placeholders, num_queries, groups,
                               self.family.group if self.is_video else None, placeholder_token_id(self.model))
        self._call = _Call(input_ids=input_ids, placeholders=placeholders, groups=groups, num_queries=num_queries,
                           mode=mode, **extra)  # type: ignore[arg-type]

    def _encode_first(self, call: dict[str, Any]) -> dict[str, Any]:
        """For a family that encodes its images first (:attr:`~catp.families.base.Family.encodes_first`):
        encode them (the hooks choose the kept queries), shorten ``input_ids`` / ``attention_mask``, and
        hand the stock call the kept rows in place of the images."""
        self.family.check_transformers()  # the hand-off below is newer than the bottom of the declared range
        images = {name: call.pop(name) for name in self.family.image_inputs if name in call}
        encoded = self.family.encode(self.model, **images)
        if self._call is None or not self._call.scored or self.keep_indices is None:
            raise RuntimeError(f"encoding the images did not reach the {self.family.connector}' output: nothing was scored")
        if call.get("attention_mask") is None:
            call["attention_mask"] = torch.ones_like(call["input_ids"])
        sequence = ("input_ids", "attention_mask", *self.family.position_inputs)
        call.update(self._shorten({name: call[name] for name in sequence if call.get(name) is not None}))
        call.update(self.family.pruned_inputs(encoded, self.keep_indices, self._call.groups))
        return call

    def _shorten(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Shorten the language model's inputs of the call in flight (once per call)."""
        call = self._call
        if call is None or call.input_ids is None or not call.scored or call.positions is not None:
            return inputs  # not a call of ours, or already shortened
        assert self.keep_indices is not None
        fillers = "left" if self.decoder_only else "right"
        assert call.placeholders is not None
        call.positions = kept_positions(call.placeholders, self.keep_indices, fillers)
        pad = self.model.config.text_config.pad_token_id
        fill_id = placeholder_token_id(self.model) if pad is None else pad
        fills = {"inputs_embeds": 0.0, "attention_mask": 0, "input_ids": 0 if fill_id is None else fill_id,
                 **self.family.position_inputs}
        return {name: take_positions(value, call.positions, fills[name]) if name in fills and value is not None else value
                for name, value in inputs.items()}

    def _language_model_generate(self, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return original(*args, **self._shorten(kwargs))

    def _language_model_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._call is None or self._call.mode != "forward":
            return None  # generate() shortens in _language_model_generate
        return (), self._shorten(_bind_call(inspect.signature(module.forward), args, kwargs))

    def _generate(self, original_generate: Callable[..., Any], pixel_values: torch.Tensor | None = None, **kwargs: Any) -> Any:
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pruned generate() locates the placeholders in input_ids; pass input_ids, not inputs_embeds")
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None and pixel_values is not None:
            input_ids = self.family.default_input_ids(self.model, pixel_values)
        self._start({**kwargs, "input_ids": input_ids}, pixel_values, "generate")
        try:
            kwargs.update(pixel_values=pixel_values, input_ids=input_ids)
            if self.family.encodes_first:
                kwargs = self._encode_first(kwargs)
            outputs = original_generate(**kwargs)
            call = self._call
        finally:
            self._call = None
        if self.decoder_only and call is not None and call.positions is not None:
            outputs = _restore_prompt(outputs, input_ids, call.positions.shape[1])
        return outputs

    def _forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._call is not None and self._call.mode == "generate":
            return None  # a step of a pruned generate() (a family that encodes first): already shortened
        call = _bind_call(inspect.signature(module.forward), args, kwargs)
        if call.get("inputs_embeds") is not None:
            raise ValueError("pruned forward() locates the placeholders in input_ids; pass input_ids, not inputs_embeds")
        if call.get("input_ids") is None:
            raise ValueError("forward() needs input_ids with the placeholder tokens")
        # A decoder-only loss must be taken on the shortened sequence: computed in _forward_hook.
        labels = call.pop("labels", None) if self.decoder_only else None
        self._start(call, call.get("pixel_values"), "forward", labels=labels)
        if self.family.encodes_first:
            try:
                call = self._encode_first(call)
            except BaseException:
                self._call = None
                raise
        return (), call

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if self._call is None or self._call.mode != "forward":
            return output  # a step of a pruned generate()
        call, self._call = self._call, None
        logits = getattr(output, "logits", None)
        if call is None or call.positions is None or logits is None or not self.decoder_only:
            return output
        if call.labels is not None:
            labels = call.labels
            if labels.shape[1] == call.input_ids.shape[1]:
                labels = take_positions(labels, call.positions, -100)
            labels = labels.to(logits.device)
            # As the stock forward: the labels align with the last positions.
            output.loss = self.model.loss_function(logits=logits[:, -labels.shape[1]:], labels=labels,
                                                   vocab_size=self.model.config.text_config.vocab_size)
        output.logits = put_positions(logits, call.positions, call.input_ids.shape[1])
        return output


def _by_sample(choice: Choice, groups: torch.Tensor, num_queries: int) -> Choice:
    """A per-group :class:`~catp.selection.Choice` (one row per group) regrouped per sample, where samples
    hold different numbers of groups: indices flat over each sample's ``groups[b] * Q`` tokens, group after
    group, padded with ``-1``; scores padded with NaN.

    Args:
        choice: ``keep_indices`` / ``pick_order`` ``(R, K)``, ``scores`` ``(R, Q)``, ``R = groups.sum()``.
        groups: ``(B,)`` groups per sample.
    """
    device = choice.keep_indices.device
    offsets = torch.arange(len(choice.keep_indices), device=device)
    sample_of = torch.repeat_interleave(torch.arange(len(groups), device=device), groups.to(device))
    first_row = torch.cumsum(groups.to(device), 0) - groups.to(device)
    flat_base = ((offsets - first_row[sample_of]) * num_queries)[:, None]  # (R, 1): the group's first flat index

    def per_sample(rows: torch.Tensor) -> torch.Tensor:
        """``(R, K)`` row-local indices (``-1`` padded) -> ``(B, K')`` flat, in row order, ``-1`` padded."""
        flat = torch.where(rows >= 0, rows + flat_base, rows)
        parts = [flat[sample_of == b].flatten() for b in range(len(groups))]
        parts = [p[p >= 0] for p in parts]
        width = max(len(p) for p in parts)
        return torch.stack([torch.cat([p, p.new_full((width - len(p),), -1)]) for p in parts])

    scores = None
    if choice.scores is not None:
        width = int(groups.max()) * num_queries
        scores = torch.full((len(groups), width), float("nan"), device=device)
        for b in range(len(groups)):
            rows = choice.scores[sample_of == b].flatten()
            scores[b, : len(rows)] = rows
    keep = per_sample(choice.keep_indices)
    counts = (keep >= 0).sum(dim=1)
    return Choice(keep_indices=keep, pick_order=per_sample(choice.pick_order), counts=counts, scores=scores)


def _bind_call(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Every argument of a call by name, with ``**kwargs``-style extras flattened in."""
    call = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            call.update(call.pop(name, {}))
    return call


def _restore_prompt(outputs: Any, caller_ids: torch.Tensor, short_length: int) -> Any:
    """Replace the shortened prompt at the head of generated sequences by the caller's own."""
    sequences = outputs if isinstance(outputs, torch.Tensor) else outputs.sequences
    repeats = sequences.shape[0] // caller_ids.shape[0]
    prompt = caller_ids.to(sequences.device).repeat_interleave(repeats, dim=0)
    restored = torch.cat([prompt, sequences[:, short_length:]], dim=1)
    if isinstance(outputs, torch.Tensor):
        return restored
    outputs.sequences = restored
    return outputs


def vision_block_probabilities(attention: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Recompute the last vision block's self-attention probabilities ``(B, H, N, N)`` (fp32) from its input
    ``(B, N, D)``, for a BLIP-2-family model (:meth:`catp.families.blip2.Blip2Family.vision_probabilities`).

    Lets ``catp-image`` read the last block's probabilities while the vision tower stays on SDPA.
    """
    from catp.families.blip2 import BLIP2

    return BLIP2.vision_probabilities(attention, hidden_states)


def cross_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The connector's cross-attention modules, in layer order (one per cross-attention layer)."""
    return family_of(model).cross_attention_modules(model)


def eager_connector(model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Run only the connector on the eager attention (SDPA returns no probabilities) and restore it on exit."""
    return family_of(model).eager_connector(model, enabled)


@contextlib.contextmanager
def capture_connector(model: nn.Module) -> Iterator[dict[str, list[torch.Tensor]]]:
    """Collect what each connector run inside the block computes, for inspection (not for pruning).

    The connector runs eager meanwhile (SDPA returns no probabilities); hooks and the
    attention implementation are restored on exit, also when the block raises.

    Yields:
        ``{"outputs": [...], "cross": [...]}``: per run, the connector outputs before the LLM projection
        ``(B, Q, D)``, and per run and cross-attention layer, in order, the image columns of the probabilities
        ``(B, H, Q, N)``; float32, on the CPU.
    """
    family = family_of(model)
    captured: dict[str, list[torch.Tensor]] = {"outputs": [], "cross": []}

    def on_output(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        captured["outputs"].append(family.output_tokens(args, kwargs, output)[0].detach().float().cpu())

    def on_query_output(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        captured["outputs"].append(output.detach().float().cpu())

    def on_cross(module: nn.Module, args: tuple, kwargs: dict, output: tuple) -> None:
        probabilities = family.probabilities(module, args, kwargs, output)
        captured["cross"].append(family.image_probabilities(probabilities.detach()).float().cpu())

    handles = []
    with family.eager_connector(model):
        try:
            query_output = family.query_output_module(model)
            if query_output is None:
                handles.append(family.output_module(model).register_forward_hook(on_output, with_kwargs=True))
            else:
                handles.append(query_output.register_forward_hook(on_query_output))
            handles += [module.register_forward_hook(on_cross, with_kwargs=True)
                        for module in family.cross_attention_modules(model)]
            yield captured
        finally:
            for handle in handles:
                handle.remove()


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a wrapper that adapts it (a ``peft.PeftModel``), else ``model`` itself.

    A LoRA adapter lives inside the base model's modules, so hooks on them see the adapted
    computation; the wrapper only forwards calls.
    """
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and isinstance(model, nn.Module) else model


def check_model(model: nn.Module) -> Family:
    """The family of ``model``; a clear error unless it is a supported model (:func:`catp.families.family_of`)."""
    return family_of(model)


def _check_scope(model: nn.Module, scope: str | None) -> str | None:
    """The scope of a call: ``"video"`` by default on a model whose samples hold several groups; ``None``
    (and none allowed) on an image model."""
    family = family_of(model)
    if not family.has_groups(model):
        if scope is not None:
            raise TypeError(f"scope= applies to video models (and others whose samples hold several groups of "
                            f"{family.connector}); {type(model).__name__} takes images")
        return None
    scope = family.default_scope if scope is None else scope
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(map(repr, SCOPES))}, got {scope!r}")
    return scope


@contextlib.contextmanager
def _patched(obj: object, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """Set ``obj.name`` (an instance attribute hiding the class's method) and restore what was there on exit."""
    had, saved = name in obj.__dict__, obj.__dict__.get(name)
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, saved)
        else:
            obj.__dict__.pop(name, None)


def _wrap(session_method: Callable[..., Any], original: Callable[..., Any]) -> Callable[..., Any]:
    """``original``'s arguments, bound by name, handed to ``session_method(original, **arguments)``."""
    signature = inspect.signature(original)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return session_method(original, **_bind_call(signature, args, kwargs))

    return wrapper


@contextlib.contextmanager
def pruned(
    model: nn.Module, method: str | PruningMethod = "catp", keep: Keep = 8, scope: str | None = None, **options: Any
) -> Iterator[PruningSession]:
    """Run an unchanged ``model.generate(...)`` / ``model(...)`` with only ``keep`` query tokens.

    Example::

        with catp.pruned(model, method="catp", keep=8) as session:
            out = model.generate(**processor(images, prompts, return_tensors="pt"), max_new_tokens=10)
        session.keep_indices  # (batch, 8): which query tokens the last call kept

    Args:
        model: a model of a supported family (:data:`catp.families.MODEL_TYPES`): ``Blip2ForConditionalGeneration``,
            ``InstructBlipForConditionalGeneration``, ``InstructBlipVideoForConditionalGeneration``, ...
        method: a name from :data:`catp.METHODS` or a :class:`~catp.methods.PruningMethod`.
        keep: an int count, a float fraction in ``(0, 1]`` of the tokens it counts over, or a
            :class:`~catp.budget.Budget` (a per-sample count from the sample's scores).
        scope: video models only (a ``TypeError`` otherwise). ``"video"`` (default): ``keep``
            counts over each sample's ``T*Q`` tokens, chosen by one top-k over all frames;
            an int above ``T*Q`` is an error at call time. ``"frame"``: ``keep`` counts over
            each frame's ``Q`` tokens.
        **options: method options, e.g. ``layer_weights=[...]`` for ``catp-layer`` or
            ``seed=0`` for ``random``. Unknown options are a ``TypeError``.

    Yields:
        A :class:`PruningSession` whose ``keep_indices`` / ``keep_counts`` / ``pick_order`` / ``scores`` describe the last call.

    On exit (also when the body raises) every hook is removed and the connector's
    attention implementation is restored. A ``peft.PeftModel`` is pruned through its base
    model (:func:`base_model`); call ``generate`` / ``forward`` on either.
    """
    model = base_model(model)
    family = check_model(model)
    scope = _check_scope(model, scope)
    method = get_method(method, **options)
    refusal = family.refusal(model.config, method.needs)
    if refusal is not None:
        raise ValueError(f"method {method.name!r} cannot run on {type(model).__name__}: {refusal}")
    check_keep_type(keep)
    if method.selects() and scope in SAMPLE_SCOPES:
        raise ValueError(selector_refusal(method.name))
    if isinstance(keep, Budget):
        refusal = budget_refusal(method)
        if refusal is not None:
            raise ValueError(refusal)
        if scope not in SAMPLE_SCOPES:
            keep.check_tokens(family.num_queries(model.config))  # a min above Q fails here, not mid-call
    elif scope in SAMPLE_SCOPES or not family.fixed_queries(model.config):
        check_keep_value(keep)  # the upper bound, T*Q or the resolution's Q, once a call gives them
    else:
        keep = resolve_keep(keep, family.num_queries(model.config))
    method.validate(family.num_cross_layers(model.config), keep if isinstance(keep, int) else None)
    family.placeholder_token_id(model)
    if getattr(model, "_catp_session", None) is not None:
        raise ValueError("pruned() is already active on this model; nesting it on the same model is not supported")

    session = PruningSession(model=model, method=method, keep=keep, scope=scope)
    model._catp_session = session
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(family.eager_connector(model, enabled=method.needs.eager_connector))
            session._reset(model, ())
            session._install_hooks()
            stack.enter_context(_patched(model, "generate", _wrap(session._generate, model.generate)))
            if not family.encodes_first:
                llm = family.language_model(model)
                stack.enter_context(_patched(llm, "generate", _wrap(session._language_model_generate, llm.generate)))
            yield session
    finally:
        for handle in session._handles:
            handle.remove()
        session._handles.clear()
        model._catp_session = None
        del model._catp_session


def select_queries(
    model: nn.Module,
    pixel_values: torch.Tensor,
    method: str | PruningMethod = "catp",
    keep: Keep = 8,
    scope: str | None = None,
    **kwargs: Any,
) -> torch.LongTensor:
    """Indices of the query tokens a method keeps, without running the language model.

    Args:
        model: a model of a supported family, as in :func:`pruned`.
        pixel_values: ``(B, C, H, W)``, or ``(B, T, C, H, W)`` for video.
        method, keep, scope: as in :func:`pruned`.
        **kwargs: the family's encoder inputs (:attr:`~catp.families.base.Family.model_inputs`:
            ``qformer_input_ids`` / ``qformer_attention_mask`` for InstructBLIP) and
            method options (``layer_weights=...``, ``seed=...``).

    Returns:
        ``(B, K)`` long tensor, each row ascending, padded with ``-1`` where a sample keeps
        fewer (a Budget). Video indices are flat over ``T*Q``, frame-major.
    """
    model = base_model(model)
    family = check_model(model)
    model_inputs = {name: kwargs.pop(name) for name in family.model_inputs if name in kwargs}
    with pruned(model, method=method, keep=keep, scope=scope, **kwargs) as session, torch.no_grad():
        session._start({}, pixel_values, "features")
        try:
            family.encode(model, pixel_values, **model_inputs)
        finally:
            session._call = None
        assert session.keep_indices is not None
        return session.keep_indices
