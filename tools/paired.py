"""Paired difference of two configurations measured in two ``catp eval`` runs, on the questions both answered.

    python tools/paired.py RUN_A CONFIG_A RUN_B CONFIG_B
    python tools/paired.py out/adapted-first-scenes first@8 out/unadapted-scenes unpruned

Prints each accuracy, the difference A - B in points with its 95% CI (``catp eval``'s paired
interval, :func:`catp.evaluation.report.paired_difference`) and the share of questions
answered the same (after the VQA answer normalisation). For comparisons across models (an adapted model against the
unadapted one), which one ``catp eval`` run cannot hold.
"""

from __future__ import annotations

import sys
from pathlib import Path

from catp.evaluation.harness import read_predictions
from catp.evaluation.metric import normalize_answer
from catp.evaluation.report import paired_difference


def paired(run_a: Path, config_a: str, run_b: Path, config_b: str) -> dict[str, float]:
    """Accuracy of each, the paired difference and its 95% CI half-width (points), agreement (%), n."""
    a = {qid: r for (config, qid), r in read_predictions(run_a).items() if config == config_a}
    b = {qid: r for (config, qid), r in read_predictions(run_b).items() if config == config_b}
    shared = sorted(set(a) & set(b))
    if not shared:
        raise ValueError(f"no question answered by both {run_a}:{config_a} and {run_b}:{config_b}")
    mean, half = paired_difference([100 * (a[i]["accuracy"] - b[i]["accuracy"]) for i in shared])
    same = sum(normalize_answer(a[i]["prediction"]) == normalize_answer(b[i]["prediction"]) for i in shared)
    return {"n": len(shared), "accuracy_a": 100 * sum(a[i]["accuracy"] for i in shared) / len(shared),
            "accuracy_b": 100 * sum(b[i]["accuracy"] for i in shared) / len(shared),
            "difference": mean, "ci95": half, "same_pct": 100 * same / len(shared)}


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    r = paired(Path(argv[0]), argv[1], Path(argv[2]), argv[3])
    print(f"n={r['n']}  A {r['accuracy_a']:.2f}  B {r['accuracy_b']:.2f}  A-B {r['difference']:+.2f} ± {r['ci95']:.2f} points  "
          f"retention {100 * r['accuracy_a'] / r['accuracy_b']:.1f}%  same answers {r['same_pct']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
