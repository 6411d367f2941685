"""Interpretability of the super weight (issue 11, phase 5.3): activation tracing, the stop-word
probability shift, and attention sinks.

- ``trace_activations``: one forward pass over windows ``ids`` [W, T] with hooks on every layer's
  down projection (``esa.analyses.detect.down_proj_sites``, per-layer linear sites) and on every
  decoder block (``esa.models.params.decoder_layers``). Per window w and layer l it records

      down_max[w, l] = max_{t, c} |x_l[w, t, c]|        (x_l: input of layer l's down_proj)
      resid[w, k]    = max_{t, c} |h_k[w, t, c]|        (h_0: stream entering layer 0, h_{l+1}: after l)

  and the token position / id of each maximum. Run inside ``esa.perturb.perturbed`` it traces the
  model with the super weight zeroed.
- ``stopword_ids`` / ``stopword_mass``: the token ids of a stop-word list (" word", single tokens),
  and per window the mean over positions of Σ_{v ∈ stop} softmax(logits)[v] (the paper's finding:
  removing the super weight moves probability mass onto stop words).
- ``first_token_attention``: eager attention (``output_attentions``) over windows; per layer l and
  head h the mean over windows and query positions t ≥ 1 of attn[l, h, t, 0] (the first-token
  "attention sink" share).
- ``plot_trace`` / ``plot_attention``: per-layer figures for the report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from esa import plots
from esa.analyses.detect import down_proj_sites
from esa.errors import ConfigError
from esa.metrics.curvature import eager_kernels
from esa.models.params import decoder_layers

__all__ = [
    "ActivationTrace",
    "first_token_attention",
    "plot_attention",
    "plot_trace",
    "stopword_ids",
    "stopword_mass",
    "trace_activations",
]


@dataclass
class ActivationTrace:
    """Per-window, per-layer maxima of one traced forward pass (arrays of plain numbers).

    down_max [W, L], down_pos [W, L], down_token [W, L]: down_proj input maxima, their position, token id;
    resid_max [W, L + 1], resid_pos [W, L + 1]: residual-stream maxima (index 0: entering layer 0).
    """

    down_max: np.ndarray
    down_pos: np.ndarray
    down_token: np.ndarray
    resid_max: np.ndarray
    resid_pos: np.ndarray

    def peak_layer(self) -> int:
        """The layer whose down_proj input holds the largest |activation| over all windows."""
        return int(np.argmax(self.down_max.max(axis=0)))

    def summary(self) -> dict:
        """Plain per-layer maxima over windows (for claim context / reports)."""
        return {
            "down_max": [float(v) for v in self.down_max.max(axis=0)],
            "resid_max": [float(v) for v in self.resid_max.max(axis=0)],
            "peak_layer": self.peak_layer(),
        }


def _device(lm) -> torch.device:
    return lm.model.get_input_embeddings().weight.device


def _batch(ids) -> torch.Tensor:
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.numel() == 0:
        raise ConfigError(f"windows must be token ids [W, T], got shape {tuple(ids.shape)}")
    return ids


def _window_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """max_{t, c} |x[w, t, c]| and its position t, per window w, of x [W, T, C]."""
    per_tok = x.detach().float().abs().amax(dim=-1)  # [W, T]
    val, pos = per_tok.max(dim=-1)
    return val.cpu(), pos.cpu()


def trace_activations(lm, ids) -> ActivationTrace:
    """Trace down_proj-input and residual-stream maxima of ``lm`` on windows ``ids`` (module doc)."""
    ids = _batch(ids)
    sites = [s for s in down_proj_sites(lm) if s.kind == "linear" and s.expert is None]
    blocks = decoder_layers(lm.model)
    if not sites or not blocks:
        raise ConfigError(f"{lm.name!r} has no dense down_proj / decoder layers to trace; use a dense LM")
    n = len(blocks)
    down: dict[int, tuple] = {}
    resid: dict[int, tuple] = {}

    def block_out(k):
        return lambda m, a, out: resid.__setitem__(
            k + 1, _window_max(out[0] if isinstance(out, tuple) else out)
        )

    hooks = [
        blocks[0].register_forward_pre_hook(
            lambda m, a, kw: resid.__setitem__(0, _window_max(a[0] if a else kw["hidden_states"])),
            with_kwargs=True,
        )
    ]
    hooks += [b.register_forward_hook(block_out(k)) for k, b in enumerate(blocks)]
    hooks += [
        s.module.register_forward_hook(
            lambda m, a, out, layer=s.layer: down.__setitem__(layer, _window_max(a[0]))
        )
        for s in sites
    ]
    try:
        with torch.inference_mode():
            lm.model(input_ids=ids.to(_device(lm)), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    nan = (torch.full((ids.shape[0],), math.nan), torch.zeros(ids.shape[0], dtype=torch.long))
    d = [down.get(layer, nan) for layer in range(n)]
    r = [resid.get(k, nan) for k in range(n + 1)]
    d_pos = torch.stack([p for _, p in d], dim=1)
    return ActivationTrace(
        down_max=torch.stack([v for v, _ in d], dim=1).numpy().astype(float),
        down_pos=d_pos.numpy(),
        down_token=ids.gather(1, d_pos).numpy(),
        resid_max=torch.stack([v for v, _ in r], dim=1).numpy().astype(float),
        resid_pos=torch.stack([p for _, p in r], dim=1).numpy(),
    )


def stopword_ids(tokenizer, words) -> list[int]:
    """Token ids of the stop words (an iterable, or one space-separated string) that encode as one
    token, each as " word" (the mid-sentence form)."""
    words = words.split() if isinstance(words, str) else words
    ids = set()
    for w in words:
        enc = tokenizer(" " + w, add_special_tokens=False)["input_ids"]
        if len(enc) == 1:
            ids.add(int(enc[0]))
    if not ids:
        raise ConfigError("no stop word encodes as a single token; give a stop-word list of common words")
    return sorted(ids)


def stopword_mass(lm, ids, stop_ids, batch_size: int = 4) -> np.ndarray:
    """[W] mean over positions of the next-token probability mass on ``stop_ids``, per window."""
    ids = _batch(ids)
    stop = torch.as_tensor(list(stop_ids), dtype=torch.long)
    out = []
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            logits = lm.model(input_ids=ids[i : i + batch_size].to(_device(lm)), use_cache=False).logits
            probs = torch.softmax(logits.float(), dim=-1)
            out.append(probs[..., stop.to(probs.device)].sum(dim=-1).mean(dim=-1).cpu())
    return torch.cat(out).numpy().astype(float)


def first_token_attention(lm, ids) -> np.ndarray:
    """[L, H] first-token attention share: mean over windows and query positions t >= 1 of
    attn[l, h, t, 0] (eager attention; the model's kernel is restored afterwards)."""
    ids = _batch(ids)
    if ids.shape[1] < 2:
        raise ConfigError("first-token attention needs windows of >= 2 tokens")
    with eager_kernels(lm.model), torch.inference_mode():
        att = lm.model(input_ids=ids.to(_device(lm)), use_cache=False, output_attentions=True).attentions
    if not att or any(a is None for a in att):
        raise ConfigError(f"{lm.name!r} returned no attention weights; it needs eager attention support")
    return np.stack([a[:, :, 1:, 0].float().mean(dim=(0, 2)).cpu().numpy() for a in att]).astype(float)


def plot_trace(original: ActivationTrace, zeroed: ActivationTrace | None, super_layer: int, title: str = ""):
    """Per-layer max |activation| (log y): down_proj input and residual stream, original and with
    the super weight zeroed (dashed); the super layer marked."""
    fig, ax = plots.figure(7.0, 4.0)
    layers = np.arange(original.down_max.shape[1])
    runs = [("original", original, "-")] + ([("super weight zeroed", zeroed, "--")] if zeroed else [])
    for label, tr, ls in runs:
        ax.plot(
            layers,
            tr.down_max.max(axis=0),
            ls,
            color="#cf222e",
            marker="o",
            ms=3,
            label=f"down_proj input, {label}",
        )
        ax.plot(
            np.arange(-1, len(layers)),
            tr.resid_max.max(axis=0),
            ls,
            color="#0969da",
            marker="s",
            ms=3,
            label=f"residual stream, {label}",
        )
    ax.axvline(super_layer, color="#57606a", ls=":", lw=1, label=f"super layer {super_layer}")
    ax.set_yscale("log")
    ax.set_xlabel("layer (residual: after the layer; -1 = embeddings)")
    ax.set_ylabel("max |activation| over windows")
    ax.set_title(title or "super-activation trace")
    ax.legend(fontsize=7)
    return fig


def plot_attention(share: np.ndarray, super_layer: int, title: str = ""):
    """First-token attention share per layer: head mean (line) and every head (dots)."""
    fig, ax = plots.figure(7.0, 4.0)
    share = np.asarray(share, dtype=float)
    layers = np.arange(share.shape[0])
    ax.scatter(np.repeat(layers, share.shape[1]), share.reshape(-1), s=6, color="#8c959f", label="heads")
    ax.plot(layers, share.mean(axis=1), color="#0969da", marker="o", ms=3, label="head mean")
    ax.axvline(super_layer, color="#cf222e", ls=":", lw=1, label=f"super layer {super_layer}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer")
    ax.set_ylabel("attention on the first token")
    ax.set_title(title or "attention sink by layer")
    ax.legend(fontsize=7)
    return fig
