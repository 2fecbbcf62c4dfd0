"""Measure pruning where the field measures: a ``catp`` model for lmms-eval.

    python -m lmms_eval --model catp --model_args pretrained=Salesforce/blip2-opt-2.7b,method=catp,keep=8 \\
        --tasks vqav2_val_lite --batch_size 8 --output_path logs/

Installing catp with lmms-eval (README, "Evaluate with lmms-eval") registers the model
``catp`` through lmms-eval's ``lmms_eval.models`` entry point (:func:`manifest`): no
environment variable, no fork, no file copied into lmms-eval. The pieces:

* :mod:`catp.lmms_eval.settings`: ``--model_args`` parsed with the command line's parsers,
  one :class:`~catp.lmms_eval.settings.ModelArgsError` naming the bad argument;
* :mod:`catp.lmms_eval.runner`: prompts and visuals to model inputs, batched generation and
  continuation log-likelihoods inside :func:`catp.pruned`, and each sample's cost record
  (no lmms-eval import: it runs on a loaded model and processor);
* :mod:`catp.lmms_eval.cost`: the run's cost beside its score (mean kept tokens, FLOPs ratio
  against unpruned from :mod:`catp.bench.flops`, wall time);
* :mod:`catp.lmms_eval.model`: the lmms-eval model class (``lmms`` subclass, "simple" requests).
"""

from __future__ import annotations

from typing import Any

__all__ = ["MODEL_ID", "MODEL_CLASS", "manifest"]

#: The name lmms-eval knows the model by (``--model catp``).
MODEL_ID = "catp"
#: The model class, as lmms-eval's registry imports it (a dotted path).
MODEL_CLASS = "catp.lmms_eval.model.CatpLMM"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: the ``ModelManifest`` of the ``catp`` model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
