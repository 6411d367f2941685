"""Random-init tiny architectures (seeded) for architecture coverage without downloads."""

from __future__ import annotations

from typing import Any

import torch

from esa.models.loaded import LoadedModel, from_module
from esa.models.registry import register_model
from esa.models.tokenizer import BUILTIN_VOCAB_SIZE, builtin_tokenizer
from esa.util.runtime import seeded

_COMMON: dict[str, Any] = dict(
    vocab_size=BUILTIN_VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=2048,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=1,
    tie_word_embeddings=False,
)


def _config(arch: str):
    import transformers as tf

    if arch == "pythia":
        kw = {k: v for k, v in _COMMON.items() if k != "tie_word_embeddings"}
        return tf.GPTNeoXConfig(**kw, use_parallel_residual=True, rotary_pct=0.25, tie_word_embeddings=False)  # type: ignore[call-arg]
    if arch == "llama":
        return tf.LlamaConfig(**_COMMON, num_key_value_heads=2)
    if arch == "mistral":
        return tf.MistralConfig(**_COMMON, num_key_value_heads=2, sliding_window=32)
    if arch == "phi3":
        return tf.Phi3Config(**_COMMON, num_key_value_heads=2)
    if arch == "mixtral":
        kw = dict(_COMMON, intermediate_size=64)
        return tf.MixtralConfig(**kw, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    raise KeyError(arch)


def build_tiny(arch: str, name: str, dtype: torch.dtype, device: torch.device, seed: int) -> LoadedModel:
    """Build the tiny ``arch`` model with weights drawn from ``seed``."""
    from transformers import AutoModelForCausalLM

    config = _config(arch)
    with seeded(seed):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(device=device, dtype=dtype)
    return from_module(name, model, builtin_tokenizer(), "tiny", {"name": name, "seed": seed})


_DESCRIPTIONS = {
    "pythia": "GPT-NeoX (fused query_key_value, parallel residual), random init",
    "llama": "Llama (GQA, SwiGLU), random init",
    "mistral": "Mistral (GQA, sliding window), random init",
    "phi3": "Phi-3 (fused qkv_proj and gate_up_proj), random init",
    "mixtral": "Mixtral MoE (4 experts, top-2 router), random init",
}


def tiny_models() -> list[str]:
    """Names of the registered tiny random-init architectures (``tiny-pythia``, ...)."""
    return [f"tiny-{arch}" for arch in _DESCRIPTIONS]


def _register(arch: str) -> None:
    name = f"tiny-{arch}"

    @register_model(name, source="tiny", description=_DESCRIPTIONS[arch])
    def _build(dtype, device, seed):
        return build_tiny(arch, name, dtype, device, seed)


for _arch in _DESCRIPTIONS:
    _register(_arch)
