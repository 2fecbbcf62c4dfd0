"""How image-dependent are a method's kept sets, and how good are they? (docs/results.md)

    python -m catp.evaluation.diagnose [--images 1000] [--questions 2000] [--keep 8]

For each method: the number of distinct kept sets over the first ``--images`` easy-VQA test
images (``catp.select_queries``), and greedy exact match on the first ``--questions`` test
questions inside ``catp.pruned`` (greedy, not the paper's 5 beams: a quick diagnostic).
Runs on the embedded reference model.
"""

from __future__ import annotations

import argparse

import torch

import catp
from catp.methods import CATPLayer, PruningMethod
from catp.reference import load
from catp.reference.evaluate import answer, exact_match
from catp.reference.train import task_examples

#: The methods compared, by label; layer 1 only isolates the first cross-attention layer.
CANDIDATES: dict[str, str | PruningMethod] = {
    "catp (last layer)": "catp",
    "catp-layer, layer_weights=[1, 0] (first layer only)": CATPLayer(layer_weights=[1.0, 0.0]),
    "catp-all": "catp-all",
    "selfattn": "selfattn",
    "first": "first",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--questions", type=int, default=2000)
    parser.add_argument("--keep", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load()
    examples = task_examples("easy-vqa", "test", max(args.images, args.questions))
    pixel_values = processor.image_processor([e.image for e in examples[: args.images]], return_tensors="pt")["pixel_values"]
    print(f"| method (keep {args.keep}) | distinct kept sets over {args.images} images | greedy exact match, first {args.questions} questions |")
    print("|---|---|---|")
    for label, method in CANDIDATES.items():
        kept = catp.select_queries(model, pixel_values, method=method, keep=args.keep)
        distinct = len({tuple(row) for row in kept.tolist()})
        accuracy = exact_match(answer(model, processor, examples[: args.questions], method=method, keep=args.keep), examples[: args.questions])
        print(f"| {label} | {distinct} | {accuracy:.3f} |", flush=True)


if __name__ == "__main__":
    main()
