"""How many query tokens do per-sample budgets keep? (before an accuracy sweep with them)

    python -m catp.evaluation.budgets [--model DIR] [--images 1000] [--budgets fence:1.5,mass:0.8]

For each method that can carry a budget and each budget, over the first ``--images``
easy-VQA test images (``catp.select_queries``, no language model): the mean count, its
quartiles and range, and how often the count is the budget's ``min`` (for ``fence``, how
often no score is an outlier). Use it to choose budgets whose means fall where the fixed
counts of a sweep are, then run ``catp eval --keep ...,BUDGETS --match-budgets``.
BLIP-2 only (an InstructBLIP model's scores depend on the question too).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch

from catp.budget import Budget
from catp.evaluation.report import kept_distribution
from catp.hf import select_queries
from catp.reference import load
from catp.reference.data import easy_vqa_images

__all__ = ["budget_counts_table", "main"]

DEFAULT_BUDGETS = "fence:1.5,fence:1,fence:0.5,fence:0,mass:0.5,mass:0.8,mass:0.9"


def budget_counts_table(model: Any, pixel_values: torch.Tensor, methods: Sequence[str], budgets: Sequence[Budget],
                        batch_size: int = 64) -> list[dict[str, Any]]:
    """One row per (method, budget): the kept counts' distribution and the share at ``min``.

    Args:
        pixel_values: ``(N, C, H, W)`` images, run ``batch_size`` at a time.
    """
    rows = []
    for method in methods:
        for budget in budgets:
            counts: list[int] = []
            for start in range(0, pixel_values.shape[0], batch_size):
                kept = select_queries(model, pixel_values[start:start + batch_size], method=method, keep=budget)
                counts += (kept >= 0).sum(dim=1).tolist()
            at_min = sum(c == budget.min for c in counts) / len(counts)
            rows.append({"method": method, "budget": str(budget), "images": len(counts), "at_min": at_min,
                         **kept_distribution(counts)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="BLIP-2 checkpoint (default: the embedded reference model)")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--methods", default="catp,catp-all,catp-layer,catp-image,l2norm,selfattn")
    parser.add_argument("--budgets", default=DEFAULT_BUDGETS)
    args = parser.parse_args()

    torch.set_num_threads(1)
    model, processor = load(args.model)
    images = easy_vqa_images("test", args.images)
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    budgets = [Budget.parse(text) for text in args.budgets.split(",") if text.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    q = int(model.config.num_query_tokens)
    print(f"| method | budget | mean kept of {q} (min / p25 / median / p75 / max) | at min, share of {args.images} images |")
    print("|---|---|---|---|")
    for row in budget_counts_table(model, pixel_values, methods, budgets):
        print(f"| {row['method']} | {row['budget']} | {row['kept_mean']:.2f} ({row['kept_min']} / {row['kept_p25']:g} / "
              f"{row['kept_median']:g} / {row['kept_p75']:g} / {row['kept_max']}) | {row['at_min']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
