"""Paper-shaped BLIP-2 / InstructBLIP models with random weights, built without a download.

Shapes are those of the released Hugging Face checkpoints (``Salesforce/<name>``):

=========================  =====================  ===============  =============================
arch                       vision (EVA ViT-g/14)  Q-Former         language model
=========================  =====================  ===============  =============================
blip2-opt-2.7b             39 x 1408, F 6144      12 x 768, F 3072  OPT-2.7b: 32 x 2560, F 10240
blip2-opt-6.7b             same                   same              OPT-6.7b: 32 x 4096, F 16384
blip2-flan-t5-xl           same                   same              Flan-T5-XL: 24+24 x 2048, F 5120
instructblip-vicuna-7b     same                   same (+ text)     Vicuna-7b: 32 x 4096, F 11008
instructblip-video-vicuna-7b  same, per frame     same, per frame  Vicuna-7b (frames x 32 query tokens)
=========================  =====================  ===============  =============================

All at 224 px, patch 14 (257 image tokens), 32 query tokens, cross-attention every
second Q-Former layer. The video arch is InstructBLIP-Video
(``InstructBlipVideoForConditionalGeneration``) with the Vicuna-7b shapes: one
``generate`` on 4 frames costs several TFLOPs, so time it with few repeats. Latency does not depend on the weights, so the models are built
on the meta device (no init), materialised empty in the target dtype and filled with a
cheap repeated random pattern (no NaN or denormal slow paths).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from catp.bench.flops import parameter_count
from catp.models import dtype_bytes, model_class

__all__ = ["ARCHS", "arch_config", "build_arch", "check_fits", "available_memory_bytes"]

_VISION = dict(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39, num_attention_heads=16, image_size=224,
               patch_size=14, qkv_bias=True, layer_norm_eps=1e-6)
_QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                cross_attention_frequency=2, encoder_hidden_size=1408, max_position_embeddings=512)
_OPT = dict(model_type="opt", ffn_dim=None, num_hidden_layers=32, num_attention_heads=32, vocab_size=50304,
            max_position_embeddings=2048, pad_token_id=1, bos_token_id=2, eos_token_id=50118, do_layer_norm_before=True)


_VICUNA_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=32, vocab_size=32002, max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _opt(width: int) -> dict[str, Any]:
    return {**_OPT, "hidden_size": width, "word_embed_proj_dim": width, "ffn_dim": 4 * width}


# One entry per arch: (family, text config, extra top-level config). One place per fact.
_SPECS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "blip2-opt-2.7b": ("blip2", _opt(2560), {"image_token_index": 50265}),
    "blip2-opt-6.7b": ("blip2", _opt(4096), {"image_token_index": 50265}),
    "blip2-flan-t5-xl": ("blip2", dict(model_type="t5", d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                                       num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                       pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, bos_token_id=1),
                         {"image_token_index": 32100}),
    "instructblip-vicuna-7b": ("instructblip", _VICUNA_7B, {"image_token_index": 32001}),
    "instructblip-video-vicuna-7b": ("instructblipvideo", _VICUNA_7B, {"video_token_index": 32001}),
}
ARCHS: tuple[str, ...] = tuple(_SPECS)

def arch_config(name: str) -> Any:
    """The transformers config of a paper-shaped arch (see the module table)."""
    from transformers import Blip2Config, InstructBlipConfig, InstructBlipVideoConfig

    if name not in _SPECS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    family, text, extra = _SPECS[name]
    qformer = dict(_QFORMER, vocab_size=30522 if family == "blip2" else 30523)
    cls: Callable[..., Any] = {"blip2": Blip2Config, "instructblip": InstructBlipConfig, "instructblipvideo": InstructBlipVideoConfig}[family]
    return cls(vision_config=dict(_VISION), qformer_config=qformer, text_config=dict(text), num_query_tokens=32, **extra)


def available_memory_bytes(device: str) -> int:
    """Memory a new model may use on ``device``: free GPU memory, or ``MemAvailable`` on CPU."""
    if device.startswith("cuda"):

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_fits(config: Any, dtype: str, device: str, available: int | None = None, headroom: float = 1.15) -> int:
    """Refuse, before allocating, a model whose weights cannot fit.

    The estimate is ``parameters x bytes per element x headroom`` (activations, KV
    cache and the allocator need the rest). Returns the weight bytes.

    Raises:
        MemoryError: with the numbers, when the estimate exceeds ``available``.
    """
    params = parameter_count(config)["total"]
    weights = params * dtype_bytes(dtype)
    available = available_memory_bytes(device) if available is None else available
    if weights * headroom > available:
        gib = 1024**3
        raise MemoryError(
            f"the model has {params / 1e9:.2f} B parameters: {weights / gib:.1f} GiB of weights in {dtype}, "
            f"{weights * headroom / gib:.1f} GiB with {headroom - 1:.0%} headroom, but only {available / gib:.1f} GiB is "
            f"available on {device}; use --dtype bfloat16/float16, a smaller --arch, or another device"
        )
    return weights


def _fill_random(model: Any, seed: int) -> None:
    """Give every materialised parameter cheap, finite, non-degenerate values.

    Norm weights 1 and biases 0; everything else a repeated block of N(0, 0.02) draws
    (latency does not depend on the values, and ``normal_`` on billions of elements
    would take longer than the benchmark).
    """
    generator = torch.Generator().manual_seed(seed)
    block = torch.randn(1 << 20, generator=generator) * 0.02
    with torch.no_grad():
        for name, param in model.named_parameters():
            flat = param.data.view(-1)
            if name.endswith("bias") or ".bias" in name:
                flat.zero_()
            elif "norm" in name.lower() and param.dim() == 1:
                flat.fill_(1.0)
            else:
                source = block.to(device=flat.device, dtype=flat.dtype)
                for start in range(0, flat.numel(), source.numel()):
                    chunk = flat[start:start + source.numel()]
                    chunk.copy_(source[: chunk.numel()])


def build_arch(name: str, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0) -> Any:
    """Build ``name`` with random weights directly in ``dtype`` on ``device``.

    The model is created on the meta device (no random init, no memory), then its
    parameters are materialised empty on ``device`` and filled by :func:`_fill_random`;
    buffers (position ids, rotary frequencies) are computed on the CPU at construction and
    kept. As ``from_pretrained`` does, float16 keeps the Q-Former and query tokens in fp32.

    Raises:
        MemoryError: before allocating, when the weights cannot fit (:func:`check_fits`).
    """
    from accelerate import init_empty_weights

    config = arch_config(name)
    check_fits(config, dtype, device)
    torch_dtype = getattr(torch, dtype)
    cls = model_class(config.model_type)
    with init_empty_weights(include_buffers=False):
        model = cls._from_config(config, dtype=torch_dtype)
    keep_fp32 = set(cls._keep_in_fp32_modules or []) if dtype == "float16" else set()
    for module_name, module in model.named_modules():
        for param_name, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            full = f"{module_name}.{param_name}" if module_name else param_name
            target = torch.float32 if any(full == k or full.startswith(k + ".") for k in keep_fp32) else torch_dtype
            module._parameters[param_name] = torch.nn.Parameter(torch.empty(param.shape, dtype=target, device=device),
                                                                requires_grad=False)
    model.tie_weights()  # materialising broke the meta-level tie of LM head and embeddings
    model.to(device)  # buffers built on the CPU
    _fill_random(model, seed)
    return model.eval()
