"""Write Llama models as GGUF files, and a random-init one of a chosen size for memory runs.

``write_llama_gguf`` lays out a ``LlamaForCausalLM`` as llama.cpp's converter does (q/k rows
permuted for its rotary layout; ``output.weight`` only when the embeddings are untied) with its
byte-level BPE tokenizer, in float32 (a bit-exact round trip through ``esa.models.gguf``) or
float16. The tests write tiny GGUFs with it.

No pretrained model near 0.5B parameters can be had offline here, and memory does not depend on
what the weights learned, only on the shapes. ``python -m esa.bench.random_gguf OUT.gguf``
writes a random-init Llama (the transformers initialization, untied embeddings) with the
embedded SmolLM2's tokenizer, so that ``esa`` and the claims load it like any GGUF. Its verdicts
are not research results (random weights).

    python -m esa.bench.random_gguf OUT.gguf --hidden 1024 --layers 24 --ffn 4864   # 0.52B
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from esa.models import load_model
from esa.util.runtime import seeded


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(
    model, tokenizer, path, add_bos: bool = False, arch: str = "llama", dtype: str = "f32"
) -> None:
    """Write ``model`` (a LlamaForCausalLM) and its byte-level BPE tokenizer as a GGUF of
    ``dtype`` ("f32" or "f16") tensors; written to ``path.tmp`` and renamed, so a failed
    write leaves no half-written file."""
    import gguf

    cfg = model.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", 1e4))
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"llama {cfg.hidden_size}x{cfg.num_hidden_layers}")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_embedding_length(cfg.hidden_size)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
    w.add_rope_freq_base(float(rope))
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv_: kv_[1])
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    special = set(tokenizer.all_special_tokens)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in special else 1 for t, _ in vocab])
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(add_bos)
    np_dtype = {"f32": np.float32, "f16": np.float16}[dtype]

    def add(name: str, t: torch.Tensor, n_head: int | None = None) -> None:
        a = t.detach().float().numpy()
        a = _permute(a, n_head) if n_head else a
        w.add_tensor(name, a if a.ndim == 1 else a.astype(np_dtype))  # norms stay float32

    sd = model.state_dict()
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.attn_q.weight", sd[p + "self_attn.q_proj.weight"], heads)
        add(f"blk.{i}.attn_k.weight", sd[p + "self_attn.k_proj.weight"], kv)
        add(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        add(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        add(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        add(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def random_llama(tokenizer, hidden: int, layers: int, ffn: int, heads: int, kv_heads: int, seed: int):
    """A random-init LlamaForCausalLM (transformers' initialization) with untied embeddings and
    ``tokenizer``'s vocabulary and special tokens."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    with seeded(seed):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m esa.bench.random_gguf", description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--ffn", type=int, default=4864)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("f16", "f32"), default="f16")
    a = ap.parse_args(argv)
    tokenizer = load_model("smollm2-135m", device="cpu").tokenizer
    model = random_llama(tokenizer, a.hidden, a.layers, a.ffn, a.heads, a.kv_heads, a.seed)
    n = sum(p.numel() for p in model.parameters())
    write_llama_gguf(model, tokenizer, a.out, add_bos=False, dtype=a.dtype)
    print(f"{a.out}: random-init llama, {n / 1e6:.0f}M parameters ({4 * n / 2**30:.2f} GiB in fp32)")


if __name__ == "__main__":
    main()
