"""Random-init models of published architectures (exact configs), for speed and scale work.

Weight values do not change compute cost, so benchmarks run on these: no download needed. They
are registered as ``arch-pythia-1.4b``, ``arch-llama-3.1-8b``, ``arch-mistral-7b``,
``arch-phi-3-mini`` and ``arch-mixtral-8x7b`` (source ``"arch"``).

Weights are built on the meta device and materialised parameter by parameter directly on their
target device in the target dtype (never an fp32 copy on the CPU): matrices and embeddings
~ N(0, initializer_range²) from a generator seeded by ``(seed, parameter name)``, norm weights 1,
biases 0. With ``device_map`` ("auto", "balanced" or an explicit dict) the decoder layers are split
over the visible GPUs and accelerate's hooks move activations between them.

Token ids: the builtin tokenizer (1 024 ids) is attached so text-based paths work, but benchmark
windows should cover the real vocabulary: :func:`random_windows` / :func:`random_data`.
"""

from __future__ import annotations

import logging
import zlib

import torch

from esa.models.loaded import LoadedModel, from_module
from esa.models.params import decoder_layers
from esa.models.registry import register_model
from esa.models.tokenizer import builtin_tokenizer

log = logging.getLogger("esa")

# The published config.json values (hub ids in esa.models.HUB_ALIASES).
CONFIGS: dict[str, tuple[str, dict]] = {
    "pythia-1.4b": (
        "GPTNeoXConfig",
        dict(
            vocab_size=50304,
            hidden_size=2048,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=8192,
            hidden_act="gelu",
            rotary_pct=0.25,
            rotary_emb_base=10000,
            max_position_embeddings=2048,
            initializer_range=0.02,
            layer_norm_eps=1e-5,
            use_parallel_residual=True,
            tie_word_embeddings=False,
            bos_token_id=0,
            eos_token_id=0,
            attention_dropout=0.0,
            hidden_dropout=0.0,
        ),
    ),
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=131072,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            rope_scaling={
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            bos_token_id=128000,
            eos_token_id=128001,
        ),
    ),
    "mistral-7b": (
        "MistralConfig",
        dict(
            vocab_size=32768,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            hidden_act="silu",
            max_position_embeddings=32768,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
    "phi-3-mini": (
        "Phi3Config",
        dict(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            hidden_act="silu",
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            sliding_window=2047,
            tie_word_embeddings=False,
            attention_dropout=0.0,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=32000,
            pad_token_id=32000,
        ),
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            hidden_act="silu",
            max_position_embeddings=32768,
            initializer_range=0.02,
            rms_norm_eps=1e-5,
            rope_theta=1000000.0,
            sliding_window=None,
            router_aux_loss_coef=0.02,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
        ),
    ),
}


def make_config(arch: str, **overrides):
    """The transformers config of ``arch`` (a key of CONFIGS), with optional overrides (tests)."""
    import transformers

    cls_name, values = CONFIGS[arch]
    return getattr(transformers, cls_name)(**{**values, **overrides})


def build_random(
    config,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    device_map=None,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> torch.nn.Module:
    """A random-init causal LM of ``config``, materialised on its device(s) in ``dtype``."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    placement = _placement(model, device, device_map)
    std = float(getattr(config, "initializer_range", 0.02))
    with torch.no_grad():
        for name, param in list(model.named_parameters()):
            target = _device_of(name, placement)
            param_module, attr = _owner(model, name)
            value = _init_value(name, tuple(param.shape), dtype, target, std, seed)
            param_module._parameters[attr] = torch.nn.Parameter(value, requires_grad=param.requires_grad)
        for name, buf in list(model.named_buffers()):
            owner, attr = _owner(model, name)
            owner._buffers[attr] = buf.to(_device_of(name, placement))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    devices = {str(d) for d in placement.values()}
    if len(devices) > 1:
        from accelerate import dispatch_model

        dispatch_model(model, device_map={k: str(v) for k, v in placement.items()})
    model.eval()
    return model


def _owner(model, name: str):
    mod_name, _, attr = name.rpartition(".")
    return (model.get_submodule(mod_name) if mod_name else model), attr


def _init_value(name, shape, dtype, device, std, seed) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    is_norm = any(t in name.lower() for t in ("norm", "ln_f", "layernorm"))
    if name.endswith(".bias"):
        return out.zero_()
    if is_norm and len(shape) == 1:
        return out.fill_(1.0)
    gen = torch.Generator(device=device)
    gen.manual_seed((int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    return out.normal_(0.0, std, generator=gen)


def _placement(model, device, device_map) -> dict[str, torch.device]:
    """module prefix -> device. ``device_map`` None: everything on ``device``; "auto"/"balanced":
    decoder layers split evenly over the visible GPUs (embeddings first, norm + head last)."""
    if device_map is None:
        return {"": torch.device(device)}
    if isinstance(device_map, dict):
        return {k: torch.device(v if not isinstance(v, int) else f"cuda:{v}") for k, v in device_map.items()}
    if device_map not in ("auto", "balanced", "sequential"):
        raise ValueError(f"device_map {device_map!r}: use 'auto' or a dict module -> device")
    n_gpu = torch.cuda.device_count()
    if n_gpu < 2:
        return {"": torch.device("cuda:0" if n_gpu else device)}
    return layer_device_map(model, [torch.device(f"cuda:{i}") for i in range(n_gpu)])


def layer_device_map(model, devices: list[torch.device]) -> dict[str, torch.device]:
    """Split the decoder layers evenly over ``devices``; other top-level modules go with the first
    (before the layers: embeddings) or the last (after: final norm, lm head) device."""
    layers, prefix = decoder_layers(model, with_prefix=True)
    n = len(layers)
    out: dict[str, torch.device] = {}
    for i in range(n):
        out[f"{prefix}.{i}"] = devices[min(len(devices) - 1, i * len(devices) // n)]
    for name, _ in model.named_parameters():
        if not name.startswith(prefix + "."):
            key = name.rsplit(".", 1)[0]
            first = "embed" in name or "wte" in name or name.endswith("embed_in.weight")
            out.setdefault(key, devices[0] if first else devices[-1])
    for name, _ in model.named_buffers():
        if not name.startswith(prefix + "."):
            out.setdefault(name.rsplit(".", 1)[0], devices[0])
    return out


def _device_of(name: str, placement: dict[str, torch.device]) -> torch.device:
    best, best_len = None, -1
    for key, dev in placement.items():
        if (key == "" or name == key or name.startswith(key + ".")) and len(key) > best_len:
            best, best_len = dev, len(key)
    if best is None:
        raise ValueError(f"device_map places no module holding {name}")
    return best


def build_arch(
    arch: str, name: str, dtype: torch.dtype, device: torch.device, seed: int, device_map=None
) -> LoadedModel:
    config = make_config(arch)
    model = build_random(config, dtype=dtype, device=device, device_map=device_map, seed=seed)
    lm = from_module(
        name,
        model,
        builtin_tokenizer(),
        "arch",
        {"name": name, "seed": seed, "config": arch, "vocab_size": config.vocab_size},
    )
    if device_map is not None:
        lm.identity["device_map"] = sorted({str(d) for d in _placement(model, device, device_map).values()})
    return lm


def _register(arch: str) -> None:
    name = f"arch-{arch}"
    _, _values = CONFIGS[arch]

    @register_model(
        name,
        source="arch",
        description=f"{arch} published config, random init (benchmarks; random-id windows)",
    )
    def _build(dtype, device, seed, device_map=None):
        return build_arch(arch, name, dtype, device, seed, device_map)


for _arch in CONFIGS:
    _register(_arch)
