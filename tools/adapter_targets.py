"""The adapter's targets (issue 33), paired per question against the unadapted model with all its
query tokens, written as one committed JSON that ``tools/readme_results.py`` and docs/results.md quote.

    python tools/adapter_targets.py --out docs/results/adapter-targets.json \\
        --baseline easy-vqa=out/unadapted-easy-vqa --baseline scenes=out/unadapted-scenes \\
        --row "adapted=easy-vqa:out/adapted-easy-vqa" --row "adapted=scenes:out/adapted-scenes" \\
        --row "export=scenes:out/export-8-scenes@8"

Each ``--baseline DATASET=RUN`` names a ``catp eval`` run of the unadapted model (its ``unpruned``
configuration). Each ``--row LABEL=DATASET:RUN[@KEEP]`` adds the configurations of a ``catp eval``
run: every ``first@k`` and ``unpruned`` in it (``unpruned`` counts as all the tokens), or, with
``@KEEP``, its one ``unpruned`` configuration as keep ``KEEP`` (an exported checkpoint with
``KEEP`` query tokens). The comparison is on the questions both runs answered (a run on a
fraction of a split is paired on that fraction).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: the repo root
from tools.paired import paired  # noqa: E402

#: The issue's targets: ``(dataset, keep) -> (kind, value)``; ``retention`` is a share of the
#: baseline's accuracy in %, ``points`` the largest loss in points. Keep ``None``: every keep of 2
#: or more.
TARGETS: dict[tuple[str, int | None], tuple[str, float]] = {
    ("scenes", 8): ("retention", 99.0),
    ("scenes", 4): ("retention", 98.0),
    ("scenes", 2): ("retention", 95.0),
    ("scenes", 1): ("retention", 90.0),
    ("easy-vqa", None): ("retention", 99.5),
    ("scenes", 32): ("points", 0.5),
    ("easy-vqa", 32): ("points", 0.5),
}


def target(dataset: str, keep: int, all_tokens: int) -> tuple[str, float] | None:
    """The target a row at ``keep`` (``all_tokens``: the unpruned count) must meet, if any."""
    if keep == all_tokens:
        return TARGETS.get((dataset, 32))
    return TARGETS.get((dataset, keep)) or (TARGETS.get((dataset, None)) if keep >= 2 else None)


def _configs(run: Path, keep: int | None, all_tokens: int) -> list[tuple[str, int]]:
    """The ``(config, keep)`` pairs a row takes from ``run``'s summary."""
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    if keep is not None:
        return [("unpruned", keep)]
    rows = [r for r in summary["rows"] if r["method"] in ("unpruned", "first") and not r["budget"]]
    return [(r["config"], all_tokens if r["method"] == "unpruned" else int(r["keep"])) for r in rows]


def measure(baselines: dict[str, Path], rows: list[tuple[str, str, Path, int | None]], all_tokens: int = 32) -> dict[str, Any]:
    """Every row's paired comparison and whether it meets its target."""
    out = []
    for label, dataset, run, keep in rows:
        for config, k in _configs(run, keep, all_tokens):
            r = paired(run, config, baselines[dataset], "unpruned")
            retention = 100 * r["accuracy_a"] / r["accuracy_b"]
            goal = target(dataset, k, all_tokens)
            met = None
            if goal:
                kind, value = goal
                met = retention >= value if kind == "retention" else r["difference"] >= -value
            out.append({"label": label, "dataset": dataset, "keep": k, "run": run.name, "config": config, "n": r["n"],
                        "accuracy": round(r["accuracy_a"], 2), "baseline": round(r["accuracy_b"], 2),
                        "difference": round(r["difference"], 2), "ci95": round(r["ci95"], 2), "retention_pct": round(retention, 1),
                        "same_pct": round(r["same_pct"], 1), "target": None if not goal else {"kind": goal[0], "value": goal[1]},
                        "met": met})
    return {"baseline": {d: p.name for d, p in baselines.items()}, "rows": out}


def _row(text: str) -> tuple[str, str, Path, int | None]:
    label, _, rest = text.partition("=")
    dataset, _, run = rest.partition(":")
    keep = None
    if "@" in run:
        run, _, k = run.rpartition("@")
        keep = int(k)
    if not (label and dataset and run):
        raise argparse.ArgumentTypeError(f"--row must be LABEL=DATASET:RUN[@KEEP], got {text!r}")
    return label, dataset, Path(run), keep


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", action="append", required=True, help="DATASET=RUN of the unadapted model")
    parser.add_argument("--row", action="append", type=_row, required=True, help="LABEL=DATASET:RUN[@KEEP]")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    baselines = {d: Path(p) for d, _, p in (b.partition("=") for b in args.baseline)}
    result = measure(baselines, args.row)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    for r in result["rows"]:
        print(f"{r['label']:>10} {r['dataset']:>9} keep {r['keep']:>2}: {r['accuracy']:6.2f} {r['difference']:+.2f} ± {r['ci95']:.2f} "
              f"({r['retention_pct']:.1f}%){'' if r['met'] is None else ' met' if r['met'] else ' MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
