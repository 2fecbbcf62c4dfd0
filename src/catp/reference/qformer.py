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
scene. ITM, BLIP-2's third objective, is left out (optional in our recipe).

The shared weights (query tokens, Q-Former attention, cross-attention and query
feed-forward blocks) are then copied into the ``Blip2ForConditionalGeneration``; the text
parts stay behind, as the stock model for generation has none.
"""

from __future__ import annotations

import logging
import math
from typing import Any

__all__ = ["itg_mask", "pretrain_qformer"]


def itg_mask(num_queries: int, text_mask: Any):
    """BLIP-2's ITG self-attention mask, additive, ``(B, 1, Q + T, Q + T)``.

    Query rows see the queries only; text row ``t`` sees every query and text ``0..t``
    that is not padding (``text_mask`` (B, T), 1 = token).
    """
    import torch

    b, t = text_mask.shape
    allowed = torch.zeros(b, num_queries + t, num_queries + t, dtype=torch.bool)
    allowed[:, :num_queries, :num_queries] = True
    allowed[:, num_queries:, :num_queries] = True
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    allowed[:, num_queries:, num_queries:] = causal & text_mask[:, None, :].bool()
    return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None]


def pretrain_qformer(model, config, tokenizer, features, captions: list[str], settings: Any, log: logging.Logger, show: bool) -> float:
    """Train ``model.query_tokens`` and a text-capable copy of ``model.qformer`` with ITC + ITG.

    Args:
        model: the ``Blip2ForConditionalGeneration`` (its Q-Former and query tokens get the result).
        config: its ``Blip2Config``.
        tokenizer: the shared word-level tokenizer.
        features: cached vision outputs ``(N, 257, D)`` of the captioned images.
        captions: one caption per image.
        settings: a :class:`catp.reference.train.TrainSettings` (``stage1_*``, ``seed``).

    Returns:
        The last epoch's mean loss (ITC + ITG).
    """
    import copy

    import torch
    from torch import nn
    from transformers.models.blip_2.modeling_blip_2 import Blip2QFormerModel, Blip2TextEmbeddings

    from catp.reference.train import optimization_step, optimizer_and_schedule, progress

    q_config = copy.deepcopy(config.qformer_config)
    q_config.use_qformer_text_input = True
    q_config._attn_implementation = "sdpa"
    qformer = Blip2QFormerModel(q_config)
    embeddings = Blip2TextEmbeddings(q_config)
    width, q = q_config.hidden_size, config.num_query_tokens
    vision_projection, text_projection = nn.Linear(width, width), nn.Linear(width, width)
    lm_head = nn.Linear(width, len(tokenizer))
    log_temperature = nn.Parameter(torch.tensor(math.log(0.07)))
    parts = [qformer, embeddings, vision_projection, text_projection, lm_head]
    params = [model.query_tokens, log_temperature, *(p for part in parts for p in part.parameters())]

    # [BOS] caption, padded on the right (the tokenizer pads on the left for generation).
    tokens = tokenizer(captions, add_special_tokens=True, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    caption_ids = torch.tensor([{c: i for i, c in enumerate(dict.fromkeys(captions))}[c] for c in captions])  # equal captions match
    n = len(captions)
    steps_per_epoch = math.ceil(n / settings.stage1_batch_size)
    optimizer, scheduler = optimizer_and_schedule(params, settings.stage1_lr, steps_per_epoch * settings.stage1_epochs)
    generator = torch.Generator().manual_seed(settings.seed + 8)
    for part in parts:
        part.train()
    bar = progress(steps_per_epoch * settings.stage1_epochs, "stage 1", show)
    mean = 0.0
    for epoch in range(settings.stage1_epochs):
        order = torch.randperm(n, generator=generator)
        sums = torch.zeros(2)
        for step, i in enumerate(range(0, n, settings.stage1_batch_size)):
            idx = order[i : i + settings.stage1_batch_size]
            width_t = int(mask[idx].sum(1).max())
            text, text_mask, image = ids[idx, :width_t], mask[idx, :width_t], features[idx]
            queries = model.query_tokens.expand(len(idx), -1, -1)
            # ITG: queries see queries; text sees queries and earlier text.
            joint = qformer(
                query_embeds=embeddings(input_ids=text, query_embeds=queries), query_length=q,
                attention_mask=itg_mask(q, text_mask), encoder_hidden_states=image,
            ).last_hidden_state
            logits = lm_head(joint[:, q:-1])
            labels = text[:, 1:].masked_fill(text_mask[:, 1:] == 0, -100)
            itg = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            # ITC: the query outputs of the ITG pass saw no text (the same as a queries-only pass).
            image_embeds = nn.functional.normalize(vision_projection(joint[:, :q]), dim=-1)  # (B, Q, E)
            text_out = qformer(query_embeds=embeddings(input_ids=text), query_length=0, attention_mask=text_mask).last_hidden_state
            text_embeds = nn.functional.normalize(text_projection(text_out[:, 0]), dim=-1)  # (B, E)
            similarity = torch.einsum("iqe,je->ijq", image_embeds, text_embeds).amax(dim=-1) / log_temperature.exp().clamp(min=1e-2)
            match = (caption_ids[idx, None] == caption_ids[None, idx]).float()
            match = match / match.sum(1, keepdim=True)
            itc = (nn.functional.cross_entropy(similarity, match) + nn.functional.cross_entropy(similarity.t(), match)) / 2
            loss = itc + itg
            optimization_step(loss, params, optimizer, scheduler)
            sums += torch.tensor([itc.item(), itg.item()])
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, itc=f"{sums[0] / (step + 1):.3f}", itg=f"{sums[1] / (step + 1):.3f}")
        mean = float(sums.sum()) / (step + 1)
        log.info("stage 1 epoch %d/%d: ITC %.4f, ITG %.4f", epoch + 1, settings.stage1_epochs, sums[0] / (step + 1), sums[1] / (step + 1))
    bar.close()
    missing, unexpected = model.qformer.load_state_dict(qformer.state_dict(), strict=False)
    text_only = [k for k in unexpected if ".intermediate." not in k and ".output." not in k]
    if missing or text_only:
        raise RuntimeError(f"stage-1 Q-Former does not match the model's: missing {missing}, unexpected {text_only}")
    return mean

