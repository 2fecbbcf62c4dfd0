"""The contract every model family states: :class:`Family`.

A *family* is a set of transformers models that share one cross-attention connector: a
fixed set of ``Q`` learned queries (BLIP-2's Q-Former query tokens, Idefics2's perceiver
latents) that cross-attend to the image and hand ``Q`` tokens per image (or per frame, per
crop) to the language model. Everything the pruning engines (:mod:`catp.hf`,
:mod:`catp.vllm`) need to know about a family is stated here, in one small module per
family; the engines never name a model class.

Notation: ``rows`` connector runs in a batch (images, frames or crops), ``H`` heads, ``Q``
queries, ``K`` keys of the connector's attention, ``N`` image tokens among them, ``D`` width.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from catp.methods import Needs


class Family(ABC):
    """One model family: how to recognise it, where its connector is, what a method reads.

    A family object is stateless; every method takes the model (or its config). Subclasses
    set the class attributes and implement the abstract methods; the defaults fit a family
    whose connector runs once per image.

    Attributes:
        name: a short name (``"blip2"``).
        model_classes: ``config.model_type`` -> the transformers class catp prunes.
        connector: what is pruned, for messages (``"Q-Former query tokens"``).
        group: what one connector run of a sample is called where a sample has several
            (``"frame"``, ``"crop"``); ``"image"`` otherwise.
        model_inputs: keyword arguments of :func:`catp.select_queries` that go to the model's
            image encoder (:meth:`encode`) rather than to the method.
        vllm_model_types: the model types catp's vLLM plugin serves (empty: none).
        vllm_architecture: the architecture catp's vLLM plugin registers for them (a class of
            :mod:`catp.vllm.model`: vLLM's stock model of the family, with pruning), else ``None``.
        encodes_first: the model encodes its images before its language model runs, in a call of
            its own (:meth:`encode`; in ``generate`` before the prefill, as transformers 5.25 does for
            a ``forward`` that takes ``mm_encoder_outputs``). The engine then encodes first, shortens
            ``input_ids`` and hands the kept rows to the stock call (:meth:`pruned_inputs`). Otherwise
            (BLIP-2) the stock call encodes and the engine shortens the language model's inputs.
        image_inputs: the call's keyword arguments that carry the images (replaced by
            :meth:`pruned_inputs` where :attr:`encodes_first`).
        position_inputs: per-position inputs of the call besides ``input_ids`` and ``attention_mask``
            (Kosmos-2's ``image_embeds_position_mask``), shortened with them, and the value their
            fillers get.
        published_layer_weights: whether the paper's layer-importance measurements (``catp-layer``'s default
            weights) are of this family's connector (only BLIP-2's Q-Former).
        default_scope: what ``keep`` counts over where a sample holds several groups
            (:data:`catp.selection.SCOPES`): a whole sample, or each group.
        class_tokens: image columns of the connector's attention before the patches (a ViT's class token), which
            the patch grid of a map (``catp explain``, ``catp diagnose``) leaves out.
        prompt_image: the text a prompt holds where an image goes, which the family's processor expands
            into the placeholders (Idefics2's ``<image>``); ``None`` where the processor puts the
            placeholders in front of the prompt itself (BLIP-2).
        adapter_targets: the connector's linear layers that ``catp adapt`` puts LoRA on: a regex that peft
            matches in full against the module names of the transformers model
            (``qformer.encoder.layer.0.crossattention.attention.query``).
        adapter_modules_to_save: modules of the model that ``catp adapt`` trains whole beside the LoRA
            (BLIP-2's ``language_projection``); empty where LoRA covers the connector.
        query_axis: the axis of :meth:`learned_queries` that counts the queries (BLIP-2's ``query_tokens``
            are ``(1, Q, D)``: 1; a ``(Q, D)`` parameter: 0).
        vision_patch_bias: the vision tower's patch convolution has a bias (EVA, SigLIP; not CLIP's).
        vision_pre_norm: the vision tower has a LayerNorm before its blocks (CLIP's ``pre_layrnorm``).
    """

    name: ClassVar[str]
    model_classes: ClassVar[Mapping[str, str]]
    connector: ClassVar[str]
    group: ClassVar[str] = "image"
    model_inputs: ClassVar[tuple[str, ...]] = ()
    vllm_model_types: ClassVar[tuple[str, ...]] = ()
    vllm_architecture: ClassVar[str | None] = None
    encodes_first: ClassVar[bool] = False
    image_inputs: ClassVar[tuple[str, ...]] = ("pixel_values",)
    position_inputs: ClassVar[Mapping[str, int]] = MappingProxyType({})
    default_scope: ClassVar[str] = "sample"
    published_layer_weights: ClassVar[bool] = False
    #: The oldest transformers release catp runs this family on (the encoder hand-off it uses is newer).
    min_transformers: ClassVar[str] = "5.17"
    prompt_image: ClassVar[str | None] = None
    class_tokens: ClassVar[int] = 0
    adapter_targets: ClassVar[str]
    adapter_modules_to_save: ClassVar[tuple[str, ...]] = ()
    query_axis: ClassVar[int] = 0
    vision_patch_bias: ClassVar[bool] = True
    vision_pre_norm: ClassVar[bool] = False

    # -- recognising ------------------------------------------------------------------
    def recognises(self, model: nn.Module) -> bool:
        """Whether ``model`` is (a subclass of) one of :attr:`model_classes`."""
        names = set(self.model_classes.values())
        return any(c.__name__ in names for c in type(model).__mro__)

    def check_transformers(self) -> None:
        """Raise a ``ValueError`` when the installed transformers is older than :attr:`min_transformers`."""
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version(self.min_transformers):
            raise ValueError(f"catp prunes {self.name} models with transformers >= {self.min_transformers} (its images reach "
                             f"the language model through generate's encoder hand-off); this is transformers "
                             f"{transformers.__version__}: pip install 'transformers>={self.min_transformers}'")

    # -- sizes ------------------------------------------------------------------------
    @abstractmethod
    def num_queries(self, config: Any) -> int:
        """``Q``: the connector's tokens per image (per frame, per crop) before pruning."""

    def fixed_queries(self, config: Any) -> bool:
        """Whether every image gets the same ``Q`` (:meth:`num_queries`); where not (Aria), ``Q`` depends on the
        resolution (:meth:`queries_for`) and a fractional ``keep`` is resolved per call."""
        return True

    def queries_for(self, model: nn.Module, pixel_values: torch.Tensor) -> int:
        """``Q`` of each group of a call with these ``pixel_values`` (default: :meth:`num_queries`), after checking
        that the connector takes them (``ValueError``)."""
        return self.num_queries(model.config)

    def image_side(self, config: Any) -> int:
        """The side in pixels of the square image ``catp bench`` feeds (default: the vision config's ``image_size``,
        the resolution the vision tower's position table is built for)."""
        return int(config.vision_config.image_size)

    def image_tokens(self, config: Any) -> int:
        """``N``: the vision tokens of one image of :meth:`image_side` px, as the connector reads them: its patches
        and :attr:`class_tokens`."""
        return (self.image_side(config) // int(config.vision_config.patch_size)) ** 2 + self.class_tokens

    def connector_flops(self, config: Any, image_tokens: int, instruction_tokens: int = 0) -> int:
        """FLOPs of one connector run (one image, frame or crop) over ``image_tokens`` vision tokens, up to the tokens
        the LLM receives, all ``Q`` queries (pruning comes after): matrix products only, 2 per multiply-accumulate, as
        :mod:`catp.bench.flops` counts. ``instruction_tokens``: text the connector also reads (InstructBLIP's
        Q-Former); no other connector reads any."""
        raise NotImplementedError(f"{self.name}: no connector FLOPs stated")

    def connector_parameters(self, config: Any) -> int:
        """Parameters of the connector (from the vision tower's output to the tokens the LLM receives, projections
        included), from the config; :func:`catp.bench.flops.parameter_count` adds the vision tower and the LLM."""
        raise NotImplementedError(f"{self.name}: no connector parameter count stated")

    @abstractmethod
    def num_cross_layers(self, config: Any) -> int:
        """How many connector layers cross-attend to the image (what ``catp-layer`` weights)."""

    # -- the connector's attention ----------------------------------------------------
    @abstractmethod
    def cross_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention modules whose probabilities are voted on, in layer order (one per cross layer).

        Each returns ``(output, probabilities)`` and, run eager, probabilities ``(rows, H, Q, K)``.
        """

    @abstractmethod
    def self_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules whose probabilities ``selfattn`` reads (empty where the queries never attend to each other)."""

    def probabilities(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> torch.Tensor | None:
        """The probabilities ``(rows, H, S, K)`` of one call of a :meth:`cross_attention_modules` or
        :meth:`self_attention_modules` module, from its arguments and output (a forward hook's view).

        Default: the second output, which an eager attention returns (``None`` on SDPA). A family whose
        connector cannot go eager alone recomputes them from the module's projections instead.
        """
        return output[1]

    def recomputed_probabilities(self, module: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        """A :meth:`cross_attention_modules` (or :meth:`self_attention_modules`) module's probabilities
        ``(rows, H, Q, K)`` recomputed in fp32 from the arguments of its call (a forward pre-hook's ``args`` and
        ``kwargs``: BLIP-2's ``hidden_states`` and ``encoder_hidden_states``, Aria's ``query``, ``key`` and
        ``attn_mask``), for an engine whose attention returns none (vLLM's SDPA)."""
        raise NotImplementedError(f"{self.name}: no engine recomputes this family's connector attention")

    def image_probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """The image columns of a cross-attention module's probabilities.

        Args:
            probabilities: ``(rows, H, Q, K)``.

        Returns:
            ``(rows, H, Q, N)`` (default: every key is an image token).
        """
        return probabilities

    def latent_probabilities(self, probabilities: torch.Tensor, num_queries: int) -> torch.Tensor:
        """The block of a self-attention module's probabilities that ``selfattn`` sums.

        Args:
            probabilities: ``(rows, H, S, S')`` from a :meth:`self_attention_modules` module.

        Returns:
            ``(rows, H, Q, Q)``: attention from each query to each query (default: the leading block).
        """
        return probabilities[:, :, :num_queries, :num_queries]

    def vision_block(self, model: nn.Module) -> nn.Module | None:
        """The last vision block's attention, whose probabilities ``catp-image`` reads; ``None`` where
        catp cannot recompute them (then :meth:`vision_refusal` says why)."""
        return None

    def vision_probabilities(self, block: nn.Module, hidden_states: torch.Tensor,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``(rows, H, N, N)`` fp32 probabilities of :meth:`vision_block`, recomputed from its input ``(rows, N, D)``
        and the mask it got (additive or bool, broadcastable to ``(rows, H, N, N)``; ``None``: none)."""
        raise NotImplementedError(f"{self.name}: no vision block to recompute")

    def image_mask_module(self, model: nn.Module) -> nn.Module | None:
        """A module whose forward pre-hook sees which image tokens are real (:meth:`image_mask`); ``None``
        where every image token is real."""
        return None

    def image_mask(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """``(rows, N)`` bool, ``True`` for a real image token, from the arguments of :meth:`image_mask_module`."""
        raise NotImplementedError(f"{self.name}: every image token is real")

    def vision_refusal(self, config: Any) -> str | None:
        """Why ``catp-image`` cannot run on a model of this config, or ``None`` when it can."""
        return None

    def self_attention_refusal(self, config: Any) -> str | None:
        """Why ``selfattn`` cannot run on a model of this config (its queries never attend to each other), or
        ``None`` when it can."""
        return None

    def refusal(self, config: Any, needs: Needs) -> str | None:
        """Why a method with ``needs`` cannot run on a model of this config (:meth:`vision_refusal`,
        :meth:`self_attention_refusal`), or ``None`` when it can; read off the config alone, so that vLLM's
        front end can refuse a request before the engine runs it."""
        reasons = (self.vision_refusal(config) if needs.vision_last_block else None,
                   self.self_attention_refusal(config) if needs.self_attention else None)
        return next((reason for reason in reasons if reason is not None), None)

    @abstractmethod
    def eager_connector(self, model: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
        """A context that runs only the connector on the eager attention (SDPA returns no probabilities)
        and restores its setting on exit; the vision tower and the language model keep theirs."""

    # -- the connector's output -------------------------------------------------------
    @abstractmethod
    def vision_tower(self, model: nn.Module) -> nn.Module:
        """The module that starts each connector run (a forward pre-hook on it starts a new capture)."""

    @abstractmethod
    def output_module(self, model: nn.Module) -> nn.Module:
        """The module a forward hook on which sees the connector's output (:meth:`output_tokens`); BLIP-2: the
        LLM projection, whose input is the connector output ``(rows, Q, D)`` and whose output the LLM's tokens."""

    def output_tokens(self, args: tuple, kwargs: dict, output: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """From a forward hook on :meth:`output_module`: the connector output before the LLM projection
        ``(rows, Q, D)`` (what ``l2norm`` reads) and the tokens the LLM receives ``(rows, Q, D_llm)``.

        Default: the module's first positional input and its output.
        """
        return args[0], output

    def query_output_module(self, model: nn.Module) -> nn.Module | None:
        """A module whose *output* is the connector output before the LLM projection ``(rows, Q, D)``, where that
        is not :meth:`output_module`'s input (Aria: a norm and an MLP follow its cross-attention); ``None``
        (default) where it is."""
        return None

    @abstractmethod
    def language_model(self, model: nn.Module) -> nn.Module:
        """The language model the kept tokens go to."""

    def text_generator(self, model: nn.Module) -> nn.Module:
        """A module whose ``generate(inputs_embeds=..., attention_mask=...)`` runs the language model alone, with no
        image (``catp bench``'s ``llm-only`` reference); default: :meth:`language_model`, where it has an LM head."""
        return self.language_model(model)

    def decoder_only(self, model: nn.Module) -> bool:
        """Whether the language model is decoder-only (left fillers) rather than an encoder-decoder (right fillers)."""
        return True

    # -- prompts and placeholders -----------------------------------------------------
    def prompt_for(self, template: str) -> str:
        """A one-image prompt ``template`` as this family's processor takes it: :attr:`prompt_image` in front
        unless the template already holds it."""
        if self.prompt_image is None or self.prompt_image in template:
            return template
        return self.prompt_image + template

    def image_batch(self, images: list[Any]) -> Any:
        """One image per sample, as the family's image processor takes a batch (default: the flat list)."""
        return images

    def prepare_processor(self, processor: Any) -> Any:
        """Settle what a processor loaded from a checkpoint needs before it runs (default: nothing); returns it."""
        return processor

    @abstractmethod
    def placeholder_token_id(self, model: nn.Module) -> int | None:
        """The id that stands for one connector token in ``input_ids`` (``ValueError`` when unset);
        ``None`` where the call marks the positions otherwise (:meth:`placeholder_mask`)."""

    def placeholder_mask(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """``(B, L)`` bool: the positions of a call's sequence that the connector rows fill.

        Args:
            inputs: the call's arguments by name (``input_ids``, and the family's :attr:`position_inputs`).

        Default: ``input_ids == placeholder_token_id``. ``ValueError`` when the call lacks what marks them.
        """
        token = self.placeholder_token_id(model)
        if token is None:
            raise NotImplementedError(f"{self.name}: placeholder_token_id is None, so placeholder_mask must be stated")
        return inputs["input_ids"] == token

    @abstractmethod
    def groups_per_sample(self, model: nn.Module, pixel_values: torch.Tensor,
                          input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``(B,)`` long: how many connector runs (frames, crops, images) each sample of ``pixel_values``
        makes, after checking its shape (``ValueError``); 1 for a single image. ``input_ids`` ``(B, L)``:
        the call's prompts, where the family reads the groups off its placeholders (Aria's ``pixel_values``
        stack the crops of the whole batch); ``None`` without a prompt."""

    def has_groups(self, model: nn.Module) -> bool:
        """Whether a sample may hold several groups, so that ``scope=`` applies."""
        return False

    @abstractmethod
    def default_input_ids(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """The prompt stock ``generate()`` builds when it gets no ``input_ids``: ``(B, L)``."""

    def synthetic_inputs(self, model: nn.Module, batch: int, prompt_tokens: int, generator: torch.Generator,
                         groups: int = 1, instruction_tokens: int = 0) -> dict[str, torch.Tensor]:
        """A processor-shaped ``generate`` call with random pixels and text (``catp bench``), on the CPU, pixels in
        fp32: per sample :meth:`num_queries` placeholders per group, laid out as the family's processor lays them,
        and text ids drawn from ``[10, min(V, 1000))`` (never the placeholder id), ``prompt_tokens`` tokens besides
        the placeholders in all (BOS and the family's image delimiters included). Images of :meth:`image_side` px.

        Args:
            groups: connector runs per sample (video frames, crops); 1 for one image.
            instruction_tokens: text for a connector that reads one (InstructBLIP's Q-Former).

        Raises:
            ValueError: ``prompt_tokens`` too few for the family's delimiters, or ``groups`` the family cannot take.
        """
        raise NotImplementedError(f"{self.name}: no synthetic inputs stated")

    # -- running the connector alone --------------------------------------------------
    @abstractmethod
    def encode(self, model: nn.Module, pixel_values: torch.Tensor, **inputs: Any) -> Any:
        """Run the stock vision tower and connector (and projection) on ``pixel_values``, as the model
        does before its language model; ``inputs``: :attr:`model_inputs` (``ValueError`` when one is missing)."""

    def pruned_inputs(self, encoded: Any, keep_indices: torch.Tensor, groups: torch.Tensor) -> dict[str, Any]:
        """Where :attr:`encodes_first`: the stock call's keyword arguments that replace :attr:`image_inputs`,
        with only the kept rows of :meth:`encode`'s output.

        Args:
            encoded: what :meth:`encode` returned.
            keep_indices: ``(B, K)`` kept indices, flat over each sample's placeholders, ascending, ``-1`` padded.
            groups: ``(B,)`` groups per sample (:meth:`groups_per_sample`).
        """
        raise NotImplementedError(f"{self.name}: the stock call encodes the images itself")

    # -- adapting (catp adapt) --------------------------------------------------------
    @abstractmethod
    def learned_queries_at(self, model: nn.Module) -> tuple[nn.Module, str]:
        """Where the connector's learned queries live: ``(module, attribute)``, the parameter the stock forward
        reads as ``module.<attribute>`` (:meth:`learned_queries`)."""

    def learned_queries(self, model: nn.Module) -> nn.Parameter:
        """The connector's learned queries: ``Q`` rows along :attr:`query_axis` (``(Q, D)``; BLIP-2 ``(1, Q, D)``;
        Aria ``(Q_max, D)``, the largest resolution's)."""
        module, attribute = self.learned_queries_at(model)
        return getattr(module, attribute)

    def truncation_refusal(self, config: Any) -> str | None:
        """Why the connector of a model of this config cannot run on its first ``k`` learned queries alone, or be
        exported with ``k`` (``catp adapt --truncate``); ``None`` when it can (:meth:`truncate_config`,
        :meth:`truncate_processor`). Default: a family that states no truncation."""
        return f"catp adapt --truncate is not stated for {self.name} models (no config field and processor setting to cut)"

    def truncate_config(self, config: Any, k: int) -> None:
        """Set the config field(s) that give the number of learned queries to ``k`` (an export's config)."""
        raise NotImplementedError(f"{self.name}: {self.truncation_refusal(config)}")

    def truncate_processor(self, processor: Any, k: int) -> None:
        """Make ``processor`` insert ``k`` placeholders per image (per crop), also once saved and loaded again."""
        raise NotImplementedError(f"{self.name}: no processor setting for the placeholder count")


@dataclass
class LatentSoftmaxFamily(Family):
    """A family whose latents attend to ``[N image tokens ; Q latents]`` in one softmax (Idefics2, Kosmos-2):
    the image is the first ``N`` columns, and ``selfattn`` reads the latent block of the same softmax.

    Attributes:
        renormalise: the vote ranks each query's image probabilities renormalised over the image
            columns (``True``, the default: a softmax over the image alone, as BLIP-2's cross-attention
            has; docs/families.md), or as the softmax over ``[image ; latents]`` gave them.
    """

    renormalise: bool = True

    def self_attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return self.cross_attention_modules(model)  # the latent block of the same softmax

    def image_probabilities(self, probabilities: torch.Tensor) -> torch.Tensor:
        """``(rows, H, Q, N + Q)`` -> the image columns ``(rows, H, Q, N)``, renormalised per (head, query) over
        them where :attr:`renormalise` (padded columns stay 0)."""
        image = probabilities[..., : probabilities.shape[-1] - probabilities.shape[-2]].float()
        if not self.renormalise:
            return image
        return image / image.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(image.dtype).tiny)

    def latent_probabilities(self, probabilities: torch.Tensor, num_queries: int) -> torch.Tensor:
        """``(rows, H, Q, N + Q)`` -> the latent block ``A[..., N:]``, ``(rows, H, Q, Q)``."""
        return probabilities[..., -num_queries:]


@contextlib.contextmanager
def sub_config_attention(module: nn.Module, implementation: str, enabled: bool = True) -> Iterator[None]:
    """Set ``module``'s attention implementation (its own sub-config) to ``implementation`` inside the
    block, and restore it on exit, also when the block raises."""
    saved = module.config._attn_implementation
    try:
        if enabled and saved != implementation:
            module.set_attn_implementation(implementation)
        yield
    finally:
        if module.config._attn_implementation != saved:
            module.set_attn_implementation(saved)


def random_text_ids(vocab_size: int, shape: tuple[int, ...], generator: torch.Generator,
                    avoid: int | None = None) -> torch.Tensor:
    """Random text token ids of ``shape``, drawn from ``[10, min(vocab_size, 1000))`` (past the special tokens of
    the tokenizers catp meets), with ``avoid`` (a placeholder id) replaced by 10 (:meth:`Family.synthetic_inputs`)."""
    ids = torch.randint(10, min(int(vocab_size), 1000), shape, generator=generator)
    if avoid is not None:
        ids[ids == avoid] = 10
    return ids
