"""Attach pruning methods to stock Hugging Face BLIP-2 / InstructBLIP models.

Nothing here forks model code. Inside :func:`pruned`:

* forward hooks on the Q-Former's attention modules (and, for ``catp-image``, a
  pre-hook on the last vision block) capture what the method needs while the stock
  code runs the vision tower and the Q-Former once;
* a forward hook on ``language_projection`` lets the method choose (:func:`catp.methods.choose`:
  top-``k`` scores, or a selector's picks) and returns only the ``k`` kept rows, in their
  original order;
* ``model.generate`` / ``model.forward`` see ``input_ids`` with only the first ``k`` of
  the ``num_query_tokens`` image placeholders of each sample, so the stock
  ``masked_scatter`` puts the kept rows into ``k`` placeholders. Every sample loses the
  same number of tokens, so a padded batch stays rectangular whatever its layout.
* outputs are mapped back to the caller's layout: ``generate`` returns the caller's
  own ``input_ids`` followed by the new tokens (decoder-only LLMs), ``forward`` returns
  logits at the caller's positions (pruned placeholder positions hold zeros).

The language model keeps its attention implementation; only the Q-Former is switched
to eager (for methods that read its probabilities) and switched back on exit.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from catp.methods import Captures, PruningMethod, choose, get_method

__all__ = ["PruningSession", "cross_attention_layers", "eager_qformer", "pruned", "select_queries", "resolve_keep", "shorten_placeholders"]

_SUPPORTED = ("Blip2ForConditionalGeneration", "InstructBlipForConditionalGeneration")
_MODEL_INPUT_KWARGS = ("qformer_input_ids", "qformer_attention_mask", "interpolate_pos_encoding")


def resolve_keep(keep: int | float, num_query_tokens: int) -> int:
    """Turn ``keep`` into a token count.

    An ``int`` is a count in ``1..num_query_tokens``; a ``float`` is a fraction in
    ``(0, 1]`` meaning ``round(fraction * num_query_tokens)``, at least 1.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise TypeError(f"keep must be an int count or a float fraction, got {type(keep).__name__} {keep!r}")
    if isinstance(keep, int):
        if not 1 <= keep <= num_query_tokens:
            raise ValueError(f"keep={keep} is out of range: the model has {num_query_tokens} query tokens, keep 1..{num_query_tokens}")
        return keep
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep={keep} is out of range: a float keep is a fraction in (0, 1]")
    return max(1, round(keep * num_query_tokens))


def shorten_placeholders(
    input_ids: torch.Tensor, image_token_id: int, num_query_tokens: int, keep: int
) -> torch.Tensor:
    """Positions to keep when each sample's image placeholders go from ``num_query_tokens`` to ``keep``.

    Args:
        input_ids: ``(B, L)``; each row must hold exactly ``num_query_tokens`` placeholders.

    Returns:
        ``(B, L - num_query_tokens + keep)`` long tensor of kept positions, ascending per
        row: every non-placeholder token and the first ``keep`` placeholders.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, sequence), got shape {tuple(input_ids.shape)}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    bad = (counts != num_query_tokens).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"input_ids must hold exactly {num_query_tokens} image placeholder tokens (id {image_token_id}) per sample, "
            f"as the processor inserts them; sample {bad[0]} has {int(counts[bad[0]])}"
        )
    keep_mask = ~is_image | (is_image.cumsum(dim=1) <= keep)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    return positions[keep_mask].view(input_ids.shape[0], -1)


@dataclass
class PruningSession:
    """The state of one :func:`pruned` context; yielded to the caller.

    Attributes:
        method: the pruning method.
        keep: tokens kept per sample.
        keep_indices: ``(B, keep)`` indices kept by the most recent call, ascending.
        pick_order: ``(B, keep)`` the same indices in the order the method picked them
            (a selector's greedy order; a scorer's by descending score).
        scores: ``(B, Q)`` scores of the most recent call; ``None`` for a selector.
    """

    model: nn.Module = field(repr=False)
    method: PruningMethod
    keep: int
    keep_indices: torch.Tensor | None = None
    pick_order: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    _captures: dict[str, Any] = field(default_factory=dict, repr=False)
    _handles: list[Any] = field(default_factory=list, repr=False)
    _positions: torch.Tensor | None = field(default=None, repr=False)
    _caller_length: int = field(default=0, repr=False)

    @property
    def num_query_tokens(self) -> int:
        return int(self.model.config.num_query_tokens)

    @property
    def keep_fraction(self) -> float:
        return self.keep / self.num_query_tokens

    # -- capture hooks -------------------------------------------------------------
    def _install_hooks(self) -> None:
        needs = self.method.needs
        layers = cross_attention_layers(self.model)
        watched = layers[-1:] if needs.cross_attention == "last" else layers if needs.cross_attention == "all" else []
        for layer in watched:
            self._handles.append(layer.crossattention.attention.register_forward_hook(self._capture("cross")))
        if needs.self_attention:
            for layer in self.model.qformer.encoder.layer:
                self._handles.append(layer.attention.attention.register_forward_hook(self._capture("self")))
        if needs.vision_last_block:
            block = self.model.vision_model.encoder.layers[-1].self_attn
            self._handles.append(block.register_forward_pre_hook(self._capture_vision, with_kwargs=True))
        self._handles.append(self.model.vision_model.register_forward_pre_hook(self._reset))
        self._handles.append(self.model.language_projection.register_forward_hook(self._select))

    def _reset(self, module: nn.Module, args: tuple) -> None:
        self._captures = {"cross": [], "self": [], "vision": None}

    def _capture(self, kind: str):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            probs = output[1]
            if probs is None:
                raise RuntimeError(
                    "the Q-Former attention returned no probabilities; catp needs its eager attention "
                    f"(current: {self.model.qformer.config._attn_implementation!r})"
                )
            self._captures.setdefault(kind, []).append(probs.detach())

        return hook

    def _capture_vision(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._captures["vision"] = vision_block_probabilities(module, hidden)

    def _select(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        query_output = args[0]
        batch, num_queries = query_output.shape[:2]
        if num_queries != self.num_query_tokens:
            raise ValueError(
                f"language_projection got {num_queries} tokens per sample, expected num_query_tokens="
                f"{self.num_query_tokens}; video models are not supported yet"
            )
        captures = Captures(
            num_queries=num_queries,
            batch_size=batch,
            device=query_output.device,
            cross_attentions=self._captures.get("cross", []),
            self_attentions=self._captures.get("self", []),
            vision_attention=self._captures.get("vision"),
            query_output=query_output.detach(),
            projected=output.detach(),
        )
        choice = choose(self.method, captures, self.keep)
        self._reset(module, ())
        self.keep_indices, self.pick_order, self.scores = choice.keep_indices, choice.pick_order, choice.scores
        index = self.keep_indices.unsqueeze(-1).expand(-1, -1, output.shape[-1]).to(output.device)
        return output.gather(1, index)

    # -- input / output rewriting ----------------------------------------------------
    def _short_inputs(self, input_ids: torch.Tensor, **aligned: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        """Shorten ``input_ids`` and every tensor aligned with it (attention mask, labels)."""
        positions = shorten_placeholders(input_ids, self.model.config.image_token_id, self.num_query_tokens, self.keep)
        out: dict[str, Any] = {}
        for name, tensor in aligned.items():
            if tensor is not None and tensor.dim() >= 2 and tensor.shape[:2] == input_ids.shape:
                tensor = tensor.gather(1, positions.to(tensor.device))
            out[name] = tensor
        return positions, {"input_ids": input_ids.gather(1, positions), **out}

    def _generate(self, original_generate, pixel_values: torch.Tensor | None = None, **kwargs: Any):
        if kwargs.get("inputs_embeds") is not None:
            raise ValueError("pruned generate() locates the image placeholders in input_ids; pass input_ids, not inputs_embeds")
        if pixel_values is None:
            raise ValueError("generate() needs pixel_values")
        input_ids = kwargs.pop("input_ids", None)
        if input_ids is None:
            # Same default prompt as the stock generate(): the placeholders and BOS.
            config = self.model.config
            start = [config.image_token_index] * config.num_query_tokens + [config.text_config.bos_token_id]
            input_ids = torch.tensor([start], dtype=torch.long, device=pixel_values.device).repeat(pixel_values.shape[0], 1)
        positions, short = self._short_inputs(input_ids, attention_mask=kwargs.pop("attention_mask", None))
        outputs = original_generate(pixel_values=pixel_values, **short, **kwargs)
        if self.model.config.use_decoder_only_language_model:
            outputs = _restore_prompt(outputs, input_ids, short["input_ids"].shape[1])
        return outputs

    def _forward_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        call = _bind_call(inspect.signature(module.forward), args, kwargs)
        if call.get("inputs_embeds") is not None:
            raise ValueError("pruned forward() locates the image placeholders in input_ids; pass input_ids, not inputs_embeds")
        if call.get("input_ids") is None:
            raise ValueError("forward() needs input_ids with the image placeholder tokens")
        decoder_only = self.model.config.use_decoder_only_language_model
        aligned = {"attention_mask": call.pop("attention_mask", None)}
        if decoder_only:
            aligned["labels"] = call.pop("labels", None)
        caller_ids = call.pop("input_ids")
        positions, short = self._short_inputs(caller_ids, **aligned)
        # Remember where the kept positions sit in the caller's sequence, to map logits back.
        self._positions = positions if decoder_only else None
        self._caller_length = caller_ids.shape[1]
        return (), {**call, **short}

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        positions, self._positions = self._positions, None
        logits = getattr(output, "logits", None)
        if positions is None or logits is None or logits.shape[1] != positions.shape[1]:
            return output
        full = logits.new_zeros(logits.shape[0], self._caller_length, logits.shape[-1])
        full.scatter_(1, positions.to(logits.device).unsqueeze(-1).expand(-1, -1, logits.shape[-1]), logits)
        output.logits = full
        return output


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
    """Recompute one ViT block's self-attention probabilities from its input.

    Lets ``catp-image`` read the last block's probabilities while the vision tower stays
    on SDPA. Works for the BLIP-2 / InstructBLIP attention (a fused ``qkv`` projection).

    Args:
        attention: the block's ``self_attn`` module.
        hidden_states: its input ``(B, N, D)`` (after ``layer_norm1``).

    Returns:
        ``(B, H, N, N)`` probabilities in fp32.
    """
    batch, tokens, width = hidden_states.shape
    heads = attention.num_heads
    qkv = attention.qkv(hidden_states).reshape(batch, tokens, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    logits = torch.matmul(qkv[0].float(), qkv[1].float().transpose(-1, -2)) * attention.scale
    return logits.softmax(dim=-1)


def cross_attention_layers(model: nn.Module) -> list[nn.Module]:
    """The Q-Former layers that have a cross-attention block, in order."""
    return [layer for layer in model.qformer.encoder.layer if getattr(layer, "has_cross_attention", False)]


@contextlib.contextmanager
def eager_qformer(model: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run the Q-Former on the eager attention (SDPA returns no probabilities) and restore it on exit."""
    saved = model.qformer.config._attn_implementation
    try:
        if enabled and saved != "eager":
            model.qformer.set_attn_implementation("eager")
        yield
    finally:
        if model.qformer.config._attn_implementation != saved:
            model.qformer.set_attn_implementation(saved)


def check_model(model: nn.Module) -> None:
    """Raise a clear error unless ``model`` is a supported Q-Former model."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model, got {type(model).__name__}")
    if not all(hasattr(model, name) for name in ("qformer", "query_tokens", "language_projection", "vision_model")):
        raise ValueError(
            f"{type(model).__name__} has no Q-Former: catp prunes the query tokens of BLIP-2-family models "
            f"({', '.join(_SUPPORTED)})"
        )
    if type(model).__name__ not in _SUPPORTED and not any(c.__name__ in _SUPPORTED for c in type(model).__mro__):
        raise ValueError(f"{type(model).__name__} is not supported yet; supported: {', '.join(_SUPPORTED)}")


@contextlib.contextmanager
def pruned(model: nn.Module, method: str | PruningMethod = "catp", keep: int | float = 8, **options: Any) -> Iterator[PruningSession]:
    """Run an unchanged ``model.generate(...)`` / ``model(...)`` with only ``keep`` query tokens.

    Example::

        with catp.pruned(model, method="catp", keep=8) as session:
            out = model.generate(**processor(images, prompts, return_tensors="pt"), max_new_tokens=10)
        session.keep_indices  # (batch, 8): which query tokens the last call kept

    Args:
        model: a ``Blip2ForConditionalGeneration`` or ``InstructBlipForConditionalGeneration``.
        method: a name from :data:`catp.METHODS` or a :class:`~catp.methods.PruningMethod`.
        keep: an int count in ``1..num_query_tokens`` or a float fraction in ``(0, 1]``.
        **options: method options, e.g. ``layer_weights=[...]`` for ``catp-layer`` or
            ``seed=0`` for ``random``. Unknown options are a ``TypeError``.

    Yields:
        A :class:`PruningSession` whose ``keep_indices`` / ``pick_order`` / ``scores`` describe the last call.

    On exit (also when the body raises) every hook is removed and the Q-Former's
    attention implementation is restored.
    """
    check_model(model)
    method = get_method(method, **options)
    num_query_tokens = int(model.config.num_query_tokens)
    k = resolve_keep(keep, num_query_tokens)
    method.validate(len(cross_attention_layers(model)), k)
    if getattr(model, "_catp_session", None) is not None:
        raise ValueError("pruned() is already active on this model; nesting it on the same model is not supported")

    session = PruningSession(model=model, method=method, keep=k)
    had_generate = "generate" in model.__dict__
    saved_generate = model.__dict__.get("generate")
    original_generate = model.generate
    model._catp_session = session
    try:
        with eager_qformer(model, enabled=method.needs.eager_qformer):
            session._reset(model, ())
            session._install_hooks()
            session._handles.append(model.register_forward_pre_hook(session._forward_pre_hook, with_kwargs=True))
            session._handles.append(model.register_forward_hook(session._forward_hook, with_kwargs=True))

            signature = inspect.signature(original_generate)

            def generate(*args: Any, **kwargs: Any) -> Any:
                return session._generate(original_generate, **_bind_call(signature, args, kwargs))

            model.generate = generate
            yield session
    finally:
        for handle in session._handles:
            handle.remove()
        session._handles.clear()
        if had_generate:
            model.generate = saved_generate
        else:
            model.__dict__.pop("generate", None)
        model._catp_session = None
        del model._catp_session


def select_queries(
    model: nn.Module, pixel_values: torch.Tensor, method: str | PruningMethod = "catp", keep: int | float = 8, **kwargs: Any
) -> torch.LongTensor:
    """Indices of the query tokens a method keeps, without running the language model.

    Args:
        model: a BLIP-2 / InstructBLIP model.
        pixel_values: ``(B, C, H, W)``.
        method, keep: as in :func:`pruned`.
        **kwargs: ``qformer_input_ids`` / ``qformer_attention_mask`` (InstructBLIP) and
            method options (``layer_weights=...``, ``seed=...``).

    Returns:
        ``(B, k)`` long tensor, each row ascending.
    """
    model_inputs = {name: kwargs.pop(name) for name in _MODEL_INPUT_KWARGS if name in kwargs}
    with pruned(model, method=method, keep=keep, **kwargs) as session, torch.no_grad():
        if "qformer_input_ids" in inspect.signature(model.get_image_features).parameters:
            if model_inputs.get("qformer_input_ids") is None:
                raise ValueError(f"{type(model).__name__} needs qformer_input_ids (the instruction for its Q-Former)")
        model.get_image_features(pixel_values, **model_inputs)
        assert session.keep_indices is not None
        return session.keep_indices
