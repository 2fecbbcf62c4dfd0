"""Paper-shaped models of every family with random weights, built without a download.

Shapes are those of the released Hugging Face checkpoints (``Salesforce/<name>`` for BLIP-2 and
InstructBLIP; ``HuggingFaceM4/idefics2-8b``, ``microsoft/kosmos-2-patch14-224``, ``rhymes-ai/Aria``),
written from their published ``config.json`` (no checkpoint reaches this machine):

============================  ==========================  ==========================  =====================================
arch                          vision                      connector                   language model
============================  ==========================  ==========================  =====================================
blip2-opt-2.7b                EVA ViT-g/14: 39 x 1408,    Q-Former 12 x 768, F 3072,  OPT-2.7b: 32 x 2560, F 10240
                              F 6144, 224 px (257 tok.)   32 queries
blip2-opt-6.7b                same                        same                        OPT-6.7b: 32 x 4096, F 16384
blip2-flan-t5-xl              same                        same                        Flan-T5-XL: 24+24 x 2048, F 5120
instructblip-vicuna-7b        same                        same (+ text)               Vicuna-7b: 32 x 4096, F 11008
instructblip-video-vicuna-7b  same, per frame             same, per frame             Vicuna-7b (frames x 32 query tokens)
idefics2-8b                   SigLIP-so400m/14: 27 x      MLP 1152 -> 14336 -> 4096,  Mistral-7B: 32 x 4096, F 14336,
                              1152, F 4304, 980 px        perceiver 3 layers x 4096,  32 heads, 8 key/value heads,
                              (4900 tokens, no CLS)       16 x 96 heads (4 kv), 64    V 32003
                                                          latents
kosmos-2                      CLIP ViT-L/14: 24 x 1024,   dense 1024 -> 2048, one     Kosmos-2 decoder: 24 x 2048, F 8192,
                              F 4096, 224 px (257 tok.)   x_attn (32 heads), 64       32 heads, V 65037 (tied head)
                                                          latent queries
aria                          SigLIP-so400m/14, 980 px    projector: 256 queries (128 MoE: 28 x 2560, 20 heads; 64 experts
                              (4900 tokens)               at 490 px), one 16-head     of F 1664, top-6 + 2 shared; V 100352
                                                          attention, MLP 1152 -> 2560
============================  ==========================  ==========================  =====================================

BLIP-2 archs: cross-attention every second Q-Former layer. The video arch is InstructBLIP-Video
(``InstructBlipVideoForConditionalGeneration``) with the Vicuna-7b shapes: one ``generate`` on 4
frames costs several TFLOPs, so time it with few repeats. Idefics2 is fed one 980 px image (no
splitting: 64 tokens), Aria one 980 px image (256 tokens). Parameters: idefics2-8b 8.40 B,
kosmos-2 1.66 B, aria 25.3 B (3.9 B active per token): aria needs about 50 GiB in bf16, and
:func:`check_fits` refuses it on a smaller machine before anything is allocated (its FLOPs:
``catp bench --arch aria --flops-only``). Latency does not depend on the weights, so the models
are built on the meta device (no init), materialised empty in the target dtype and filled with
a cheap repeated random pattern (no NaN or denormal slow paths).
"""

from __future__ import annotations

import copy
import os
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
#: SigLIP-so400m/14 at 980 px, the vision tower of Idefics2 and Aria.
_SIGLIP_980 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=980,
                   patch_size=14)
_MISTRAL_7B = dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=32003, max_position_embeddings=32768, sliding_window=4096,
                   rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
_KOSMOS2_TEXT = dict(vocab_size=65037, max_position_embeddings=2048, embed_dim=2048, layers=24, ffn_dim=8192, attention_heads=32)
_ARIA_TEXT = dict(model_type="aria_text", hidden_size=2560, intermediate_size=1664, num_hidden_layers=28, num_attention_heads=20,
                  num_key_value_heads=20, vocab_size=100352, max_position_embeddings=65536, moe_num_experts=64, moe_topk=6,
                  moe_num_shared_experts=2, tie_word_embeddings=False)


def _opt(width: int) -> dict[str, Any]:
    return {**_OPT, "hidden_size": width, "word_embed_proj_dim": width, "ffn_dim": 4 * width}


#: The model types whose archs share BLIP-2's EVA ViT-g and Q-Former (:func:`arch_config` adds them).
_QFORMER_TYPES = ("blip-2", "instructblip", "instructblipvideo")

# One entry per arch: (config model type, text config, the rest of the config). One place per fact.
_SPECS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "blip2-opt-2.7b": ("blip-2", _opt(2560), {"image_token_index": 50265}),
    "blip2-opt-6.7b": ("blip-2", _opt(4096), {"image_token_index": 50265}),
    "blip2-flan-t5-xl": ("blip-2", dict(model_type="t5", d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24,
                                        num_heads=32, vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, bos_token_id=1),
                         {"image_token_index": 32100}),
    "instructblip-vicuna-7b": ("instructblip", _VICUNA_7B, {"image_token_index": 32001}),
    "instructblip-video-vicuna-7b": ("instructblipvideo", _VICUNA_7B, {"video_token_index": 32001}),
    "idefics2-8b": ("idefics2", _MISTRAL_7B, {
        "vision_config": _SIGLIP_980, "image_token_id": 32001, "tie_word_embeddings": False,
        "perceiver_config": dict(hidden_size=4096, rms_norm_eps=1e-5, resampler_n_latents=64, resampler_depth=3,
                                 resampler_n_heads=16, resampler_head_dim=96, num_key_value_heads=4)}),
    "kosmos-2": ("kosmos-2", _KOSMOS2_TEXT, {
        "vision_config": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14),
        "latent_query_num": 64}),
    "aria": ("aria", _ARIA_TEXT, {
        "vision_config": {"model_type": "idefics3_vision", **_SIGLIP_980},
        "projector_patch_to_query_dict": {1225: 128, 4900: 256}, "image_token_index": 9}),
}
ARCHS: tuple[str, ...] = tuple(_SPECS)


def arch_config(name: str) -> Any:
    """The transformers config of a paper-shaped arch (see the module table)."""
    from transformers import CONFIG_MAPPING

    if name not in _SPECS:
        raise ValueError(f"unknown arch {name!r}; choose one of {', '.join(ARCHS)}")
    model_type, text, extra = _SPECS[name]
    extra = copy.deepcopy(extra)  # the config keeps (and may change) what it gets
    if model_type in _QFORMER_TYPES:
        qformer = dict(_QFORMER, vocab_size=30522 if model_type == "blip-2" else 30523)
        extra.update(vision_config=dict(_VISION), qformer_config=qformer, num_query_tokens=32)
    return CONFIG_MAPPING[model_type](text_config=dict(text), **extra)


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
            f"available on {device}; use {'--dtype bfloat16/float16, ' if dtype_bytes(dtype) > 2 else ''}a smaller --arch, or another device"
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
