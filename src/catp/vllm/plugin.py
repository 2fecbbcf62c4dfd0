"""The ``vllm.general_plugins`` entry point: registers catp's architectures (BLIP-2, Aria) with vLLM.

vLLM calls :func:`register` in every process it starts (the front end and each engine
core), possibly more than once; registering again is harmless. The model class is
registered by import path, so vLLM imports :mod:`catp.vllm.model` only when an engine asks
for one of them (:attr:`~catp.families.base.Family.vllm_architecture`): stock serving is untouched.
"""

from __future__ import annotations

from catp.families import FAMILIES

__all__ = ["register"]


def register() -> None:
    """Register each served family's architecture and its engine-config check with vLLM."""
    from vllm import ModelRegistry

    architectures = [f.vllm_architecture for f in FAMILIES if f.vllm_architecture is not None]
    for name in architectures:
        ModelRegistry.register_model(name, f"catp.vllm.model:{name}")
    try:
        # Checks the settings when the engine's config is built, in the front end.
        from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    except ImportError:  # another vLLM layout: the model checks them when it is built
        return
    for name in architectures:
        MODELS_CONFIG_MAP[name] = _config_check()


def _config_check() -> type:
    from catp.vllm.model import CatpBlip2Config

    return CatpBlip2Config
