"""Hand-built references for the cross-attention families (Idefics2, Kosmos-2, Aria), not catp's code.

Two references per family, built only from the stock modules of transformers:

* the CATP vote (``SPEC.md`` §2/§3) computed from the probabilities the stock connector
  attention itself returns (an eager copy of the model, or ``need_weights`` on Aria's
  ``nn.MultiheadAttention``), over the real image columns only;
* the stock model fed only the kept connector rows, with ``k`` placeholders per image:
  the rows go in through the stock entry points (``mm_encoder_outputs`` for Idefics2 and
  Aria, ``image_embeds`` for Kosmos-2) and the inputs lose the placeholders of the dropped rows.

Notation: ``I`` images (connector groups) of the batch in order (sample by sample, image by
image; Idefics2 drops all-zero padding images as the stock model does), ``H`` heads, ``Q``
queries of an image, ``N`` image columns, ``K`` the key axis (``N`` for Aria, ``N + Q`` for
Idefics2 and Kosmos-2, whose softmax also spans the latents), ``D`` the LLM width.
"""

from __future__ import annotations

import copy

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from tiny_families import PAD, family_of, placeholder_mask

PIXEL_KEYS = ("pixel_values", "pixel_attention_mask", "pixel_mask")


def pixel_inputs(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The image inputs of a batch (what ``get_image_features`` takes)."""
    return {k: v for k, v in inputs.items() if k in PIXEL_KEYS}


# -- the vote ------------------------------------------------------------------------------


def connector_probabilities(model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The connector's attention probabilities, as the stock modules compute them.

    Idefics2 and Kosmos-2 run on a deep copy whose connector attention is eager (Kosmos-2's
    shares the LLM's setting, so the copy's LLM goes eager too); Aria's
    ``nn.MultiheadAttention`` is asked for per-head weights (``average_attn_weights=False``).

    Returns:
        one ``(I, H, Q, K)`` float tensor per connector attention layer, first layer first.
    """
    family = family_of(model)
    pixels = pixel_inputs(inputs)
    captured: list[torch.Tensor] = []
    if family == "kosmos2":
        eager = copy.deepcopy(model)
        eager.config.text_config._attn_implementation = "eager"
        with torch.no_grad():
            out = eager.get_image_features(pixels["pixel_values"], return_dict=True)
        return [out.projection_attentions]
    if family == "idefics2":
        eager = copy.deepcopy(model)
        eager.config.perceiver_config._attn_implementation = "eager"
        layers = eager.model.connector.perceiver_resampler.layers
        handles = [layer.self_attn.register_forward_hook(lambda _m, _a, out: captured.append(out[1])) for layer in layers]
        try:
            with torch.no_grad():
                eager.get_image_features(**pixels)
        finally:
            for handle in handles:
                handle.remove()
        return captured
    attention = model.model.multi_modal_projector.cross_attn.multihead_attn

    def per_head(_module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": False}

    handles = [attention.register_forward_pre_hook(per_head, with_kwargs=True),
               attention.register_forward_hook(lambda _m, _a, out: captured.append(out[1]))]
    try:
        with torch.no_grad():
            model.get_image_features(**pixels)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def image_columns(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(I, N)`` bool: the key columns that are real image tokens (padding patches are not).

    Idefics2: a patch is real when all its pixels are (``pixel_attention_mask``); Aria: when
    any is (``pixel_mask``); Kosmos-2: every column (CLS and patches).
    """
    family = family_of(model)
    patch = model.config.vision_config.patch_size
    pixels = inputs["pixel_values"]
    if family == "kosmos2":
        side = pixels.shape[-1] // patch
        return torch.ones(pixels.shape[0], side * side + 1, dtype=torch.bool)
    if family == "idefics2":
        flat = pixels.flatten(0, 1)
        real_image = ~(flat == 0).all(dim=(1, 2, 3))
        mask = inputs.get("pixel_attention_mask")
        mask = torch.ones(flat.shape[0], *flat.shape[-2:], dtype=torch.long) if mask is None else mask.flatten(0, 1)
        rule = "all"
        mask = mask[real_image]
    else:
        mask = inputs.get("pixel_mask")
        mask = torch.ones(pixels.shape[0], *pixels.shape[-2:], dtype=torch.long) if mask is None else mask
        rule = "any"
    images, height, width = mask.shape
    per_patch = mask.reshape(images, height // patch, patch, width // patch, patch).sum(dim=(2, 4))
    real = per_patch == patch * patch if rule == "all" else per_patch > 0
    return real.flatten(1)


def plain_vote(probabilities: torch.Tensor, columns: torch.Tensor, renormalise: bool = False) -> torch.Tensor:
    """The CATP vote on one layer: every (head, real image column) ranks the queries.

    A query gets 0 points for the smallest probability in a column and ``Q - 1`` for the
    largest; ties go to the lower query index (a stable sort). Columns past ``N`` (the latents)
    and padding columns do not vote.

    Args:
        probabilities: ``(I, H, Q, K)``.
        columns: ``(I, N)`` bool, :func:`image_columns`.
        renormalise: divide each query's image probabilities by their sum over the real image
            columns first (per head), so that the latent block of the softmax does not scale them.

    Returns:
        ``(I, Q)`` float64 points.
    """
    images, _, queries, _ = probabilities.shape
    n = columns.shape[1]
    scores = torch.zeros(images, queries, dtype=torch.float64)
    for i in range(images):
        image = probabilities[i, :, :, :n][:, :, columns[i]].double()  # (H, Q, n_real)
        if renormalise:
            image = image / image.sum(dim=-1, keepdim=True)
        order = torch.argsort(image, dim=1, stable=True)  # queries by probability, per (head, column)
        ranks = torch.argsort(order, dim=1)  # the rank of each query
        scores[i] = ranks.sum(dim=(0, 2)).double()
    return scores


def reference_votes(model, inputs: dict[str, torch.Tensor], layer: int = -1, renormalise: bool = False) -> torch.Tensor:
    """``(I, Q)``: the ``catp`` vote (one connector attention layer, the last by default) of every image."""
    return plain_vote(connector_probabilities(model, inputs)[layer], image_columns(model, inputs), renormalise)


def top_k(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Per row, the ``k`` highest scores' indices in ascending order (ties to the lower index)."""
    return [sorted(sorted(range(len(row)), key=lambda q: (-float(row[q]), q))[:k]) for row in scores]


# -- the pruned LLM input ------------------------------------------------------------------


def connector_rows(model, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The stock connector's output rows, one ``(Q_i, D)`` tensor per image (what fills its placeholders)."""
    family = family_of(model)
    with torch.no_grad():
        out = model.get_image_features(**pixel_inputs(inputs), return_dict=True).pooler_output
    if family == "idefics2":
        queries = model.config.perceiver_config.resampler_n_latents
        return list(torch.cat(list(out)).view(-1, queries, out[0].shape[-1]))
    return list(out)


def reference_inputs(model, inputs: dict[str, torch.Tensor], kept: list[list[int]]) -> dict:
    """The stock model's inputs when it is fed only the ``kept`` connector rows of each image.

    Each image keeps the first ``len(kept[i])`` of its placeholders (they are alike; Kosmos-2's
    distinct ids only set nothing but positions, from ``input_ids``) and drops the rest; the
    batch is left-padded again. The kept rows go in through the stock entry point:
    ``mm_encoder_outputs`` (Idefics2, Aria) or ``image_embeds`` (Kosmos-2, one row block per
    sample, so every sample must keep as many). Aria's rows support beam search only when every
    image keeps as many.

    Args:
        kept: one list of query indices per image (``I`` lists).

    Returns:
        keyword arguments for the stock ``forward`` and ``generate``, plus ``"positions"``: per
        sample, the caller positions that remain (a list of ``(S_b,)`` long tensors).
    """
    family = family_of(model)
    rows = connector_rows(model, inputs)
    if len(kept) != len(rows):
        raise ValueError(f"{len(kept)} kept lists for {len(rows)} images")
    slots = placeholder_mask(family, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image = 0
    short_ids, short_masks, short_marks, positions = [], [], [], []
    for b in range(ids.shape[0]):
        where = slots[b].nonzero().flatten().tolist()
        keep = torch.ones(ids.shape[1], dtype=torch.bool)
        start = 0
        while start < len(where):
            q = rows[image].shape[0]
            block = where[start : start + q]
            keep[block[len(kept[image]):]] = False
            start += q
            image += 1
        short_ids.append(ids[b, keep])
        short_masks.append(mask[b, keep])
        short_marks.append(slots[b, keep])
        positions.append(keep.nonzero().flatten())
    if image != len(rows):
        raise ValueError(f"the batch has placeholders for {image} images but the connector returned {len(rows)}")
    longest = max(len(x) for x in short_ids)

    def left_pad(rows_: list[torch.Tensor], value: int) -> torch.Tensor:
        return torch.stack([torch.cat([torch.full((longest - len(r),), value, dtype=r.dtype), r]) for r in rows_])

    built: dict = {"input_ids": left_pad(short_ids, PAD), "attention_mask": left_pad(short_masks, 0), "positions": positions}
    chosen = [r[torch.tensor(k, dtype=torch.long)] for r, k in zip(rows, kept)]
    if family == "kosmos2":
        counts = {len(k) for k in kept}
        if len(counts) != 1:
            raise ValueError("the Kosmos-2 reference needs the same keep for every sample (image_embeds is (B, k, D))")
        built["image_embeds"] = torch.stack(chosen)
        built["image_embeds_position_mask"] = left_pad([m.long() for m in short_marks], 0)
    elif family == "idefics2":
        # One (rows of the sample, D) tensor per sample, as the stock model returns them: beam search
        # splits the rows per sample by matching their counts to the placeholders'.
        per_sample, image = [], 0
        for b in range(ids.shape[0]):
            count = int(slots[b].sum())
            take = []
            while count > 0:
                count -= rows[image].shape[0]
                take.append(chosen[image])
                image += 1
            per_sample.append(torch.cat(take) if take else rows[0][:0])
        built["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=per_sample)}
    else:
        # Aria's forward takes a tensor: (I, k, D) where every image keeps k (beam search splits it per
        # image), else all rows as one (1, total, D) block (enough for greedy and sampling).
        same = len({len(k) for k in kept}) == 1
        features = torch.stack(chosen) if same else torch.cat(chosen)[None]
        built["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features)}
    return built


def reference_generate(model, inputs: dict[str, torch.Tensor], kept: list[list[int]], **generate_kwargs):
    """The stock ``generate`` on :func:`reference_inputs`; returns only the new tokens ``(B, T)``
    (or, with ``return_dict_in_generate=True``, the output with ``sequences`` cut the same way).
    """
    built = reference_inputs(model, inputs, kept)
    built.pop("positions")
    length = built["input_ids"].shape[1]
    with torch.no_grad():
        out = model.generate(**built, **generate_kwargs)
    if isinstance(out, torch.Tensor):
        return out[:, length:]
    out.sequences = out.sequences[:, length:]
    return out


def reference_forward(model, inputs: dict[str, torch.Tensor], kept: list[list[int]], **forward_kwargs):
    """The stock ``forward`` on :func:`reference_inputs`; returns ``(output, positions)``."""
    built = reference_inputs(model, inputs, kept)
    positions = built.pop("positions")
    with torch.no_grad():
        return model(**built, **forward_kwargs), positions
