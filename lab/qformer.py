"""Stage 1 of BLIP-2 in miniature: the Q-Former learns image-text representations.

Against the frozen vision tower's cached outputs, one Q-Former (with text feed-forward
blocks and text embeddings, as ``Blip2ForImageTextRetrieval`` has) learns two of BLIP-2's
three objectives, each with its own self-attention mask:

* **ITC** (image-text contrastive): the 32 query outputs and the caption's first-token
  output are projected and L2-normalised; an image-caption similarity is the **max over
  the queries**; an in-batch contrastive loss (captions that are equal count as matches).
  Queries and text do not see each other.
* **ITG** (image-grounded text generation): the caption is generated from the queries;
  the queries attend to each other only, each text token to every query and the earlier
  text, so everything about the image must pass through the queries.

The captions name every object of a scene, so the 32 queries must jointly carry the whole
scene. ITM, BLIP-2's third objective, is optional (``itm=True``; on in the recipe by
default, ``TrainSettings.stage1_itm``):

* **ITM** (image-text matching): queries and text see each other; a linear head on each
  query output, the two logits averaged over the queries; for each image a hard negative
  caption, and for each caption a hard negative image, drawn in proportion to their ITC
  similarity.

The shared weights (query tokens, Q-Former attention, cross-attention and query
feed-forward blocks) are then copied into the ``Blip2ForConditionalGeneration``; the text
parts stay behind, as the stock model for generation has none.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from catp.training import optimization_step, optimizer_and_schedule, progress

__all__ = ["Stage1QFormer", "caption_batches", "itg_mask", "pretrain_qformer"]


def itg_mask(num_queries: int, text_mask: Any):
    """BLIP-2's ITG self-attention mask, additive, ``(B, 1, Q + T, Q + T)``.

    Query rows see the queries only; text row ``t`` sees every query and text ``0..t``
    that is not padding (``text_mask`` (B, T), 1 = token).
    """
    b, t = text_mask.shape
    allowed = torch.zeros(b, num_queries + t, num_queries + t, dtype=torch.bool)
    allowed[:, :num_queries, :num_queries] = True
    allowed[:, num_queries:, :num_queries] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed[:, num_queries:, num_queries:] = causal & text_mask[:, None, :].bool()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


class Stage1QFormer(nn.Module):
    """The stage-1 training graph: a text-capable Q-Former and BLIP-2's ITC and ITG heads.

    Built from the model's ``Blip2Config`` (``layers``, ``dropout`` and
    ``initializer_range`` override the Q-Former's, for probes). Its parameters are
    everything stage 1 trains except the query tokens.
    """

    def __init__(self, config, vocabulary_size: int, layers: int | None = None, dropout: float | None = None, initializer_range: float | None = None,
                 itm: bool = False) -> None:
        import copy

        from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

        super().__init__()

        q_config = copy.deepcopy(config.qformer_config)
        q_config.use_qformer_text_input = True
        q_config._attn_implementation = "sdpa"
        if layers is not None:
            q_config.num_hidden_layers = layers
        if dropout is not None:
            q_config.hidden_dropout_prob = q_config.attention_probs_dropout_prob = dropout
        if initializer_range is not None:
            q_config.initializer_range = initializer_range
        width = q_config.hidden_size
        self.num_queries = config.num_query_tokens
        self.qformer = Blip2QFormerModel(q_config)
        self.embeddings = Blip2TextEmbeddings(q_config)
        self.vision_projection, self.text_projection = nn.Linear(width, width), nn.Linear(width, width)
        self.lm_head = nn.Linear(width, vocabulary_size)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))
        # Built last and only when asked for: without ITM, the random draws (and weights) are those of a graph with no ITM head.
        self.itm_head = nn.Linear(width, 2) if itm else None

    def losses(self, query_tokens, text, text_mask, image, caption_ids, itc: bool = True, itg: bool = True, itm: bool = False) -> dict[str, Any]:
        """The asked-for objectives' losses for one batch, by name (``"itc"``, ``"itg"``, ``"itm"``).

        Args:
            query_tokens: ``(1, Q, D)``.
            text: right-padded ``[BOS] caption`` ids ``(B, T)``; ``text_mask`` ``(B, T)``.
            image: cached vision outputs ``(B, N, D)``.
            caption_ids: ``(B,)``; rows with equal ids are matches for ITC and ITM.
        """
        if itm and self.itm_head is None:
            raise ValueError("ITM needs a Stage1QFormer built with itm=True")
        q = self.num_queries
        queries = query_tokens.expand(len(text), -1, -1)
        # ITG: queries see queries; text sees queries and earlier text.
        joint = self.qformer(
            query_embeds=self.embeddings(input_ids=text, query_embeds=queries), query_length=q,
            attention_mask=itg_mask(q, text_mask), encoder_hidden_states=image,
        ).last_hidden_state
        out: dict[str, Any] = {}
        if itg:
            logits = self.lm_head(joint[:, q:-1])
            labels = text[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
            out["itg"] = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        match = (caption_ids[:, None] == caption_ids[None, :]).float()
        if itc or itm:
            # The query outputs of the ITG pass saw no text (the same as a queries-only pass).
            image_embeds = nn.functional.normalize(self.vision_projection(joint[:, :q]), dim=-1)  # (B, Q, E)
            text_out = self.qformer(query_embeds=self.embeddings(input_ids=text), query_length=0, attention_mask=text_mask).last_hidden_state
            text_embeds = nn.functional.normalize(self.text_projection(text_out[:, 0]), dim=-1)  # (B, E)
            similarity = torch.einsum("iqe,je->ijq", image_embeds, text_embeds).amax(dim=-1) / self.log_temperature.exp().clamp(min=1e-2)
        if itc:
            targets = match / match.sum(1, keepdim=True)
            out["itc"] = (nn.functional.cross_entropy(similarity, targets) + nn.functional.cross_entropy(similarity.t(), targets)) / 2
        if itm:
            out["itm"] = self._itm_loss(query_tokens, text, text_mask, image, similarity.detach(), match)
        return out

    def _itm_loss(self, query_tokens, text, text_mask, image, similarity, match):
        """BLIP-2's ITM on the batch's pairs and one hard negative per image and per caption."""
        # Hard negatives: image -> caption and caption -> image, each drawn by its own softmax
        # of the ITC similarity over the pairs that do not match (match is symmetric).
        image_to_text = similarity.softmax(dim=1).masked_fill(match.bool(), 0.0)
        text_to_image = similarity.t().softmax(dim=1).masked_fill(match.bool(), 0.0)
        rows = torch.arange(len(text))[image_to_text.sum(1) > 0]
        if len(rows) == 0:  # every caption in the batch is the same: nothing to tell apart
            return self.itm_head.weight.sum() * 0.0  # a zero the optimizer step accepts
        negative_text = torch.multinomial(image_to_text[rows], 1).squeeze(1)
        negative_image = torch.multinomial(text_to_image[rows], 1).squeeze(1)
        texts = torch.cat([text, text[negative_text], text[rows]])
        masks = torch.cat([text_mask, text_mask[negative_text], text_mask[rows]])
        images = torch.cat([image, image[rows], image[negative_image]])
        q = self.num_queries
        output = self.qformer(
            query_embeds=self.embeddings(input_ids=texts, query_embeds=query_tokens.expand(len(texts), -1, -1)), query_length=q,
            attention_mask=torch.cat([torch.ones(len(texts), q, dtype=masks.dtype), masks], dim=1), encoder_hidden_states=images,
        ).last_hidden_state
        logits = self.itm_head(output[:, :q]).mean(dim=1)  # (3B', 2), averaged over the queries
        labels = torch.cat([torch.ones(len(text), dtype=torch.long), torch.zeros(2 * len(rows), dtype=torch.long)])
        return nn.functional.cross_entropy(logits, labels)


def caption_batches(tokenizer, captions: list[str]) -> tuple[Any, Any, Any]:
    """``(ids, mask, caption_ids)``: ``[BOS] caption`` padded on the right, and one id per distinct caption."""
    # The tokenizer pads on the left for generation; ITG reads captions left-aligned.
    tokens = tokenizer(captions, add_special_tokens=True, padding=True, padding_side="right", return_tensors="pt")
    caption_ids = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(captions))}[c] for c in captions])
    return tokens["input_ids"], tokens["attention_mask"], caption_ids


def pretrain_qformer(model, config, tokenizer, features, captions: list[str], settings: Any, log: logging.Logger, show: bool) -> float:
    """Train ``model.query_tokens`` and a text-capable copy of ``model.qformer`` with ITC + ITG.

    Args:
        model: the ``Blip2ForConditionalGeneration`` (its Q-Former and query tokens get the result).
        config: its ``Blip2Config``.
        tokenizer: the shared word-level tokenizer.
        features: cached vision outputs ``(N, 257, D)`` of the captioned images.
        captions: one caption per image.
        settings: a :class:`lab.train.TrainSettings` (``stage1_*``, ``seed``).

    Returns:
        The last epoch's mean loss (ITC + ITG, + ITM with ``settings.stage1_itm``).
    """
    graph = Stage1QFormer(config, len(tokenizer), itm=settings.stage1_itm)
    params = [model.query_tokens, *graph.parameters()]  # the module's own log-temperature first, then its parts
    ids, mask, caption_ids = caption_batches(tokenizer, captions)
    n = len(captions)
    steps_per_epoch = math.ceil(n / settings.stage1_batch_size)
    optimizer, scheduler = optimizer_and_schedule(params, settings.stage1_lr, steps_per_epoch * settings.stage1_epochs)
    generator = torch.Generator().manual_seed(settings.seed + 8)
    graph.train()
    bar = progress(steps_per_epoch * settings.stage1_epochs, "stage 1", show)
    mean = 0.0
    for epoch in range(settings.stage1_epochs):
        order = torch.randperm(n, generator=generator)
        sums: dict[str, float] = {}
        for step, i in enumerate(range(0, n, settings.stage1_batch_size)):
            idx = order[i : i + settings.stage1_batch_size]
            width_t = int(mask[idx].sum(1).max())
            losses = graph.losses(model.query_tokens, ids[idx, :width_t], mask[idx, :width_t], features[idx], caption_ids[idx], itm=settings.stage1_itm)
            total = losses["itc"] + losses["itg"]  # in this order: float sums depend on it, and the shipped checkpoint was trained so
            if "itm" in losses:
                total = total + losses["itm"]
            optimization_step(total, params, optimizer, scheduler)
            for name in ("itc", "itg", "itm"):
                if name in losses:
                    sums[name] = sums.get(name, 0.0) + losses[name].item()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, **{name: f"{value / (step + 1):.3f}" for name, value in sums.items()})
        mean = sum(sums.values()) / (step + 1)
        log.info("stage 1 epoch %d/%d: %s", epoch + 1, settings.stage1_epochs, ", ".join(f"{name.upper()} {value / (step + 1):.4f}" for name, value in sums.items()))
    bar.close()
    missing, unexpected = model.qformer.load_state_dict(graph.qformer.state_dict(), strict=False)
    text_only = [k for k in unexpected if ".intermediate." not in k and ".output." not in k]
    if missing or text_only:
        raise RuntimeError(f"stage-1 Q-Former does not match the model's: missing {missing}, unexpected {text_only}")
    return mean
