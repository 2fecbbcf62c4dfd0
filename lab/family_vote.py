"""What should the CATP vote rank where one softmax spans the image and the latents?

In Kosmos-2's image-to-text projection (and Idefics2's perceiver) the latent queries attend to
``[N image tokens ; Q latents]`` in one softmax (``SPEC.md`` §10.2, §10.4). A query's image
probabilities then share its ``1/Z_q``, and ``Z_q`` includes the image-independent latent block.
Two candidate votes, both over the image columns only:

* ``raw``: every (head, image column) ranks the queries by their probabilities as they are;
* ``renormalised``: by their probabilities divided by the query's image mass (its row
  renormalised over the image columns, i.e. the softmax a cross-attention over the image alone
  would give).

This probe trains a tiny stock ``Kosmos2ForConditionalGeneration`` from scratch on easy-VQA's
training questions for a fixed number of steps (one thread), then, on easy-VQA VALIDATION
questions (training images 3600-3999; never the test split), feeds the language model only the
kept connector rows with ``k`` placeholders (the stock entry point ``image_embeds``), and reports
per keep: the answer's LM loss and first-token exact match for ``raw``, ``renormalised``,
``first`` and ``random`` (and the unpruned model), the paired loss difference raw - renormalised
with a 95% interval, the loss of each vote's bottom k against its top k (same k, so what pruning
itself costs cancels), and the Spearman correlation of each vote with each query's image mass,
its attention entropy (over the image columns, per head, then averaged over heads) and its
leave-one-out importance (how much the answer's loss grows without that query alone).

    OMP_NUM_THREADS=1 python -m lab.family_vote --steps 2500 --questions 1000 --save DIR
    OMP_NUM_THREADS=1 python -m lab.family_vote --load DIR

It prints one line per figure; ``docs/families.md`` has the results.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["VoteSettings", "build_model", "encode", "votes", "main"]

IMAGE_END = "</image>"


@dataclass(frozen=True)
class VoteSettings:
    """The probe's model and run."""

    width: int = 64
    vision_layers: int = 2
    text_layers: int = 2
    heads: int = 4
    image_size: int = 64
    patch_size: int = 8  # 8 x 8 patches + CLS = 65 image columns
    latents: int = 64
    steps: int = 3000
    batch: int = 32
    lr: float = 1e-3
    seed: int = 0
    questions: int = 1000  # validation questions evaluated
    #: Standard deviation of the projection's query and key weights, and of ``dense``. At the stock
    #: 0.02 every latent attends almost uniformly, all 64 outputs are nearly one vector, and no
    #: kept set differs from another (measured: every method's loss equal to 4 decimals after 250 steps).
    attention_std: float = 0.3
    dense_std: float = 1.0
    keeps: tuple[int, ...] = (8, 16)
    #: Validation questions (the first ones, in batches of 100) whose per-query leave-one-out importance is measured.
    loo_questions: int = 200


def build_tokenizer():
    """The reference model's word-level tokenizer plus ``</image>`` (offline)."""
    from transformers import PreTrainedTokenizerFast

    from catp.reference import reference_model_path

    tokenizer = PreTrainedTokenizerFast.from_pretrained(reference_model_path())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>", IMAGE_END]})
    return tokenizer


def build_model(settings: VoteSettings, tokenizer):
    """A stock Kosmos-2 of the probe's size, eager (its connector shares the LLM's attention setting).

    Untied embeddings (tied ones make a tiny LM repeat one token, §10.4). The vocabulary has a
    row for every placeholder id the processor would write (``unk + 1 .. unk + Q``).
    """
    from transformers import Kosmos2Config, Kosmos2ForConditionalGeneration

    torch.manual_seed(settings.seed)
    w = settings.width
    vocab = max(len(tokenizer), tokenizer.unk_token_id + settings.latents + 1)
    text = dict(vocab_size=vocab, max_position_embeddings=256, embed_dim=w, layers=settings.text_layers, ffn_dim=4 * w,
                attention_heads=settings.heads, dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=w, intermediate_size=4 * w, num_hidden_layers=settings.vision_layers,
                  num_attention_heads=settings.heads, image_size=settings.image_size, patch_size=settings.patch_size)
    config = Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=settings.latents, tie_word_embeddings=False)
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    model = Kosmos2ForConditionalGeneration(config)
    projection = model.image_to_text_projection
    with torch.no_grad():
        projection.x_attn.q_proj.weight.normal_(0.0, settings.attention_std)
        projection.x_attn.k_proj.weight.normal_(0.0, settings.attention_std)
        projection.dense.weight.normal_(0.0, settings.dense_std)
    return model


def pixels(images, size: int) -> torch.Tensor:
    """``(B, 3, size, size)`` in [-1, 1] from PIL images."""
    arrays = [np.asarray(im.resize((size, size))) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def encode(tokenizer, questions: list[str], answers: list[str], keep: int, q: int) -> dict[str, torch.Tensor]:
    """The LLM input as Kosmos-2's processor lays it out, with ``keep`` of the ``q`` placeholders, right-padded.

    ``<s> <image> (unk+1 .. unk+keep) </image> Question: ... Short answer: ANSWER``.

    Returns:
        ``input_ids``, ``attention_mask``, ``image_embeds_position_mask`` ``(B, S)``; ``labels``
        ``(B, S)`` with only the answer token kept; ``answer_at`` ``(B,)`` the answer's position.
    """
    from catp.reference.data import format_prompt

    unk, bos, pad = tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.pad_token_id
    head = [bos, tokenizer.convert_tokens_to_ids("<image>")] + [unk + 1 + i for i in range(keep)] + [tokenizer.convert_tokens_to_ids(IMAGE_END)]
    rows = []
    for question, answer in zip(questions, answers):
        text = tokenizer(format_prompt(question) + " " + answer, add_special_tokens=False).input_ids
        rows.append(head + text)
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        labels[i, len(row) - 1] = row[-1]
    marks = torch.zeros_like(ids)
    marks[:, 2 : 2 + keep] = 1
    return {"input_ids": ids, "attention_mask": mask, "image_embeds_position_mask": marks, "labels": labels,
            "answer_at": torch.tensor([len(r) - 1 for r in rows])}


def votes(probabilities: torch.Tensor, n_image: int) -> dict[str, torch.Tensor]:
    """The raw and renormalised votes of a batch, and the per-query figures they are compared with.

    Args:
        probabilities: ``(B, H, Q, N + Q)`` the projection's attention.
        n_image: ``N``.

    Returns:
        ``(B, Q)`` tensors: ``raw`` and ``renormalised`` points, ``mass`` (the image columns' share
        of each query's row, mean over heads) and ``entropy`` (of the row renormalised over the
        image columns, mean over heads).
    """
    image = probabilities[..., :n_image].double()
    mass = image.sum(dim=-1, keepdim=True)
    renormalised = image / mass

    def vote(p: torch.Tensor) -> torch.Tensor:
        return torch.argsort(torch.argsort(p, dim=2, stable=True), dim=2).double().sum(dim=(1, 3))

    entropy = -(renormalised * renormalised.clamp_min(1e-30).log()).sum(dim=-1)
    return {"raw": vote(image), "renormalised": vote(renormalised), "mass": mass[..., 0].mean(dim=1), "entropy": entropy.mean(dim=1)}


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(B, k)`` the highest scores' indices, ascending; ties to the lower index."""
    order = torch.argsort(-scores, dim=1, stable=True)[:, :k]
    return order.sort(dim=1).values


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of ``a`` and ``b`` ``(B, Q)`` (ranks by stable sort)."""
    ra = torch.argsort(torch.argsort(a, dim=1, stable=True), dim=1).double()
    rb = torch.argsort(torch.argsort(b, dim=1, stable=True), dim=1).double()
    ra, rb = ra - ra.mean(dim=1, keepdim=True), rb - rb.mean(dim=1, keepdim=True)
    corr = (ra * rb).sum(dim=1) / (ra.norm(dim=1) * rb.norm(dim=1)).clamp_min(1e-12)
    return float(corr.mean())


def train(model, tokenizer, settings: VoteSettings) -> None:
    """AdamW on the answer token's loss, linear warm-up (100 steps) and decay, ``settings.steps`` batches."""
    from catp.reference.data import easy_vqa_split

    examples = easy_vqa_split("train")
    images = {}
    for ex in examples:
        images.setdefault(ex.image_id, ex.image)
    ids = sorted(images)
    table = pixels([images[i] for i in ids], settings.image_size)
    row_of = {image_id: i for i, image_id in enumerate(ids)}
    rng = random.Random(settings.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)
    warmup = 100
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, 1 - s / settings.steps))
    model.train()
    start = time.time()
    running = 0.0
    for step in range(settings.steps):
        batch = rng.sample(examples, settings.batch)
        enc = encode(tokenizer, [b.question for b in batch], [b.answer for b in batch], settings.latents, settings.latents)
        enc.pop("answer_at")
        out = model(pixel_values=table[[row_of[b.image_id] for b in batch]], **enc)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        loss = float(out.loss.detach())
        running = 0.98 * running + 0.02 * loss if step else loss
        if (step + 1) % 250 == 0:
            print(f"step {step + 1} loss {running:.4f} ({time.time() - start:.0f} s)", flush=True)
    model.eval()


@torch.no_grad()
def evaluate(model, tokenizer, settings: VoteSettings) -> None:
    """Pruned answer loss and accuracy per method and keep on validation questions, and the vote figures."""
    from catp.reference.data import easy_vqa_split

    examples = easy_vqa_split("validation", limit=settings.questions)
    q = settings.latents
    n_image = (settings.image_size // settings.patch_size) ** 2 + 1
    results: dict[tuple[str, int], list[torch.Tensor]] = {}
    figures: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(examples), 100):
        batch = examples[start : start + 100]
        questions, answers = [b.question for b in batch], [b.answer for b in batch]
        out = model.get_image_features(pixels([b.image for b in batch], settings.image_size), return_dict=True)
        rows, probabilities = out.pooler_output, out.projection_attentions
        v = votes(probabilities, n_image)
        for name, value in v.items():
            figures.setdefault(name, []).append(value)
        generator = torch.Generator().manual_seed(settings.seed + start)
        chosen: dict[tuple[str, int], torch.Tensor] = {("unpruned", q): torch.arange(q).expand(len(batch), -1)}
        for k in settings.keeps:
            chosen[("raw", k)] = top_k(v["raw"], k)
            chosen[("renormalised", k)] = top_k(v["renormalised"], k)
            # The k queries each vote ranks last: the same k, the same shift of the prompt, so the gap
            # to the top k is what the ranking is worth, apart from what pruning itself costs.
            chosen[("raw-bottom", k)] = top_k(-v["raw"], k)
            chosen[("renormalised-bottom", k)] = top_k(-v["renormalised"], k)
            chosen[("first", k)] = torch.arange(k).expand(len(batch), -1)
            chosen[("random", k)] = torch.rand(len(batch), q, generator=generator).argsort(dim=1)[:, :k].sort(dim=1).values
        for key, kept in chosen.items():
            loss, correct = answer_loss(model, tokenizer, questions, answers, rows, kept, q)
            results.setdefault(key, []).append(torch.stack([loss, correct]))
        if start < settings.loo_questions:
            # Leave-one-out importance: how much the answer's loss grows without query j alone.
            full = answer_loss(model, tokenizer, questions, answers, rows, torch.arange(q).expand(len(batch), -1), q)[0]
            grown = torch.stack([
                answer_loss(model, tokenizer, questions, answers, rows,
                            torch.cat([torch.arange(j), torch.arange(j + 1, q)]).expand(len(batch), -1), q)[0] - full
                for j in range(q)], dim=1)
            figures.setdefault("importance", []).append(grown)
    merged = {key: torch.cat(parts, dim=1) for key, parts in results.items()}
    for (name, k), values in sorted(merged.items(), key=lambda item: (item[0][1], item[0][0])):
        print(f"keep {k:>2} {name:<13} loss {values[0].mean():.4f}  exact match {values[1].mean():.4f}  (n={values.shape[1]})")
    for k in settings.keeps:
        diff = merged[("raw", k)][0] - merged[("renormalised", k)][0]
        half = 1.96 * float(diff.std()) / math.sqrt(len(diff))
        acc = merged[("raw", k)][1] - merged[("renormalised", k)][1]
        acc_half = 1.96 * float(acc.std()) / math.sqrt(len(acc))
        print(f"keep {k:>2} raw - renormalised: loss {diff.mean():+.4f} ± {half:.4f}, exact match {acc.mean():+.4f} ± {acc_half:.4f}")
    f = {name: torch.cat(parts) for name, parts in figures.items()}
    n_loo = f["importance"].shape[0]
    for name in ("raw", "renormalised", "mass", "entropy"):
        print(f"leave-one-out importance (first {n_loo} questions): spearman with {name} {spearman(f[name][:n_loo], f['importance']):+.3f}")
    for k in settings.keeps:
        for name in ("raw", "renormalised"):
            gap = merged[(f"{name}-bottom", k)][0] - merged[(name, k)][0]
            half = 1.96 * float(gap.std()) / math.sqrt(len(gap))
            print(f"keep {k:>2} {name}: bottom-k loss - top-k loss {gap.mean():+.4f} ± {half:.4f}")
    print(f"image mass per query: mean {f['mass'].mean():.3f}, spread over queries (std within an image) {f['mass'].std(dim=1).mean():.3f}")
    for name in ("raw", "renormalised"):
        print(f"vote {name:<13} spearman with image mass {spearman(f[name], f['mass']):+.3f}, with entropy {spearman(f[name], f['entropy']):+.3f}")
    print(f"raw vs renormalised votes: spearman {spearman(f['raw'], f['renormalised']):+.3f}")
    for k in settings.keeps:
        raw, ren = top_k(f["raw"], k), top_k(f["renormalised"], k)
        same = [len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(raw, ren)]
        distinct = {name: len({tuple(r.tolist()) for r in top_k(f[name], k)}) for name in ("raw", "renormalised")}
        print(f"keep {k:>2}: kept sets overlap {np.mean(same):.3f}; distinct sets over {len(raw)} questions: raw {distinct['raw']}, renormalised {distinct['renormalised']}")


def answer_loss(model, tokenizer, questions: list[str], answers: list[str], rows: torch.Tensor, kept: torch.Tensor,
                q: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer token's loss and first-token exact match when the LLM gets only the ``kept`` rows.

    Args:
        rows: ``(B, Q, D)`` the projection's output.
        kept: ``(B, k)`` query indices, ascending.

    Returns:
        ``(B,)`` float64 losses and ``(B,)`` float64 0/1 exact matches.
    """
    enc = encode(tokenizer, questions, answers, kept.shape[1], q)
    at = enc.pop("answer_at")
    labels = enc.pop("labels")
    embeds = rows.gather(1, kept[..., None].expand(-1, -1, rows.shape[-1]))
    logits = model(image_embeds=embeds, **enc).logits
    before = logits[torch.arange(len(questions)), at - 1].float()  # the prediction of the answer token
    target = labels[torch.arange(len(questions)), at]
    loss = torch.nn.functional.cross_entropy(before, target, reduction="none")
    return loss.double(), (before.argmax(dim=-1) == target).double()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lab.family_vote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=VoteSettings.steps)
    parser.add_argument("--questions", type=int, default=VoteSettings.questions)
    parser.add_argument("--seed", type=int, default=VoteSettings.seed)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--eval-untrained", action="store_true", help="also evaluate the model before training")
    parser.add_argument("--save", help="save the trained model here")
    parser.add_argument("--load", help="evaluate this saved model instead of training one")
    parser.add_argument("--loo-questions", type=int, default=VoteSettings.loo_questions)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = VoteSettings(steps=args.steps, questions=args.questions, seed=args.seed, loo_questions=args.loo_questions)
    print(settings, flush=True)
    tokenizer = build_tokenizer()
    model = build_model(settings, tokenizer)
    if args.eval_untrained:
        model.eval()
        print("-- untrained", flush=True)
        evaluate(model, tokenizer, settings)
    if args.load:
        from transformers import Kosmos2ForConditionalGeneration

        model = Kosmos2ForConditionalGeneration.from_pretrained(args.load, attn_implementation="eager").eval()
        print(f"-- loaded {args.load}", flush=True)
    else:
        start = time.time()
        train(model, tokenizer, settings)
        print(f"-- trained {settings.steps} steps in {time.time() - start:.0f} s", flush=True)
        if args.save:
            model.save_pretrained(args.save)
    evaluate(model, tokenizer, settings)


if __name__ == "__main__":
    main()
