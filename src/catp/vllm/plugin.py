"""The ``vllm.general_plugins`` entry point: registers catp's BLIP-2 architecture with vLLM.

vLLM calls :func:`register` in every process it starts (the front end and each engine
core), possibly more than once; registering again is harmless. The model class is
registered by import path, so vLLM imports :mod:`catp.vllm.model` only when an engine asks
for :data:`~catp.vllm.ARCHITECTURE`: stock BLIP-2 serving is untouched.
"""

from __future__ import annotations

from catp.vllm import ARCHITECTURE

__all__ = ["register"]


def register() -> None:
    """Register :data:`~catp.vllm.ARCHITECTURE` and its engine-config check with vLLM."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, "catp.vllm.model:CatpBlip2ForConditionalGeneration")
    try:
        # Checks the settings when the engine's config is built, in the front end.
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # another vLLM layout: the model checks them when it is built
        return
    MODELS_CONFIG_MAP[ARCHITECTURE] = _config_check()


def _config_check() -> type:
    from catp.vllm.model import CatpBlip2Config

    return CatpBlip2Config
