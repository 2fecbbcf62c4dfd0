"""Stage 4 of the reference training: make the language model a general reader of query tokens.

A BLIP-2 language model is a large pretrained LLM that reads any prefix length; the
reference model's 2-layer OPT, trained from scratch on prompts that always start with 32
query tokens, is not: fed fewer tokens, it answers "yes" to everything, whichever tokens
are kept (measured: every method, ``first`` and ``random`` included, fell to 36-50% on
easy-VQA at keep 16, 8 and 4). That tells nothing about *which* tokens matter.

So, with the vision tower, the Q-Former and the projection frozen (what each query token
carries stays as stage 2 left it), the language model is fine-tuned briefly on random
subsets of the projected query tokens, in their original order, and on the full 32.
Uniformly random subsets favour no scoring method (they are the ``random`` baseline's
distribution, which may flatter that baseline a little; docs/reference-model.md says so).
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["READER_KEEPS", "finetune_reader"]

#: Kept-token counts drawn per batch (32 three times: half the batches see every token).
READER_KEEPS: tuple[int, ...] = (4, 8, 16, 32, 32, 32)


def finetune_reader(model: Any, data: Any, *, seed: int, epochs: int, lr: float, batch_size: int, log: logging.Logger, bar: Any) -> float:
    """Fine-tune ``model.language_model`` on random subsets of the query tokens.

    Args:
        model: the stage-2 model; only its language model is updated.
        data: the encoded training set of :func:`catp.reference.train._encode` (rows are
            ``[32 placeholders][prompt][answer][EOS]``, right-padded).
        seed, epochs, lr, batch_size: the run's settings.
        log, bar: where progress goes (a logger and a tqdm-like bar).

    Returns:
        The mean training loss of the last epoch.
    """
    import torch

    from catp.reference.train import projected_queries

    q = model.config.num_query_tokens
    with torch.no_grad():
        queries = torch.cat([projected_queries(model, chunk) for chunk in data.features.split(256)])
    lm = model.language_model
    optimizer = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed + 5)
    lm.train()
    mean_loss = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(data.input_ids), generator=generator)
        loss_sum, steps = 0.0, 0
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            keep = READER_KEEPS[int(torch.randint(len(READER_KEEPS), (1,), generator=generator))]
            subset = torch.rand(len(idx), q, generator=generator).argsort(dim=1)[:, :keep].sort(dim=1).values
            rows = queries[data.image_index[idx]]
            kept = rows.gather(1, subset[..., None].expand(-1, -1, rows.shape[-1]))
            length = int(data.lengths[idx].max())
            text = data.input_ids[idx, q:length]
            embeds = torch.cat([kept, lm.get_input_embeddings()(text)], dim=1)
            mask = (torch.arange(embeds.shape[1]) < (data.lengths[idx, None] - q + keep)).long()
            logits = lm(inputs_embeds=embeds, attention_mask=mask).logits
            # Position keep-1 (the last query token) predicts the first text token.
            labels = data.labels[idx, q:length]
            loss = torch.nn.functional.cross_entropy(logits[:, keep - 1 : -1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
            optimizer.step()
            loss_sum += loss.item()
            steps += 1
            bar.update(1)
            bar.set_postfix(stage="reader", epoch=epoch + 1, loss=f"{loss_sum / steps:.3f}")
        mean_loss = loss_sum / max(1, steps)
        log.info("reader epoch %d/%d done: loss %.4f", epoch + 1, epochs, mean_loss)
    lm.eval()
    return mean_loss
