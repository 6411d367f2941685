"""Evaluation: token perplexity, next-token accuracy, tokens/s and peak memory.

Perplexity is exp(mean NLL over every predicted token): for a window of L tokens the L-1 tokens
after the first are predicted (labels are the inputs shifted by one). Windows are full length, so
no padding exists to be scored. The loss is computed from the final hidden states in chunks of
positions, so the full-vocabulary logits of a batch never exist at once in fp32.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from esa.models.params import decoder_layers
from esa.util.runtime import peak_memory

log = logging.getLogger("esa")

LEAK_PPL = 1.5
_CHUNK_TOKENS = 4096
COMPILE_MIN_PARAMS = 100_000_000
_BATCH_TOKENS = 16384  # tokens per evaluation forward on CUDA (auto_batch_size)


class SuspiciousPerplexityWarning(UserWarning):
    """A baseline perplexity too low for natural text."""


@dataclass
class EvalResult:
    """Evaluation numbers (plain Python types; NaN/inf kept as such)."""

    ppl: float
    nll: float
    accuracy: float
    n_tokens: int
    n_windows: int
    tokens_per_s: float
    seconds: float
    peak_memory_bytes: int
    finite: bool
    nonfinite_tokens: int = 0
    window_nll: list[float] = field(default_factory=list)

    def to_dict(self, with_windows: bool = False) -> dict:
        out = asdict(self)
        if not with_windows:
            out.pop("window_nll")
        return out


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    batch_size: int = 8,
    progress: bool = True,
    check_leak: bool = False,
    desc: str = "eval",
    compile: bool | None = None,
) -> EvalResult:
    """Evaluate a causal LM on ``windows`` ``[n, L]`` of token ids.

    Runs under ``inference_mode``; sums stay on the device and are read once at the end (no
    per-batch host sync). ``compile`` runs the decoder layers and the loss chunks through
    ``torch.compile`` (regional: one compiled layer serves all layers; weights stay inputs, so
    in-place perturbations are seen): True, False, or None = auto (see :func:`use_compile`). A
    compilation failure falls back to eager with a warning.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be [n, L] with L >= 2")
    if windows.shape[0] == 0:
        raise ValueError("no windows to evaluate: pass at least one window")
    if use_compile(model, compile):
        try:
            return _evaluate(model, windows, batch_size, progress, check_leak, desc, True)
        except Exception as exc:
            log.warning(
                "esa: compiled evaluation failed (%s: %s); evaluating eagerly",
                type(exc).__name__,
                str(exc).splitlines()[0][:200] if str(exc) else "",
            )
            model.__dict__["_esa_compile_failed"] = True
    return _evaluate(model, windows, batch_size, progress, check_leak, desc, False)


def use_compile(model: torch.nn.Module, compile: bool | None) -> bool:
    """Whether evaluation runs compiled. Auto (None): on one CUDA device, for models of at least
    ``COMPILE_MIN_PARAMS`` weights (compiling takes seconds and pays back on large models; see
    BENCHMARKS.md), unless a compilation failed before."""
    if compile is False or model.__dict__.get("_esa_compile_failed"):
        return False
    if _input_device(model).type != "cuda" or not hasattr(torch, "compile") or not decoder_layers(model):
        return False
    dynamo_config = getattr(getattr(torch, "_dynamo", None), "config", None)
    if dynamo_config is not None and getattr(dynamo_config, "inline_inbuilt_nn_modules", True) is False:
        return False  # weights would be baked into the graph as constants: perturbations unseen
    if compile is True:
        return True
    device_map = getattr(model, "hf_device_map", None)
    if isinstance(device_map, dict) and len({str(d) for d in device_map.values()}) > 1:
        return False  # split over devices (accelerate hooks): eager
    return sum(p.numel() for p in model.parameters()) >= COMPILE_MIN_PARAMS


def _evaluate(model, windows, batch_size, progress, check_leak, desc, compile) -> EvalResult:
    device = _input_device(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    batches = range(0, windows.shape[0], batch_size)
    on_device = windows.to(device, non_blocking=True)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # NLL, correct, non-finite
    per_window = []
    with torch.inference_mode(), compiled(model, compile and cuda):
        for i in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
            nll, hits = token_nll(model, on_device[i : i + batch_size])
            nll64 = nll.double()
            sums += torch.stack((nll64.sum(), hits.sum().double(), (~torch.isfinite(nll64)).sum().double()))
            per_window.append(nll64.mean(dim=1))
        if not per_window:  # no windows
            nll_total, correct, nonfinite, window_nll = math.nan, 0, 0, []
        else:
            nll_total, correct, nonfinite = float(sums[0]), int(sums[1]), int(sums[2])
            window_nll = [float(v) for v in torch.cat(per_window).cpu()]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = nll_total / n_tokens
    ppl = (
        math.exp(mean_nll)
        if math.isfinite(mean_nll) and mean_nll < 700
        else (math.inf if mean_nll == math.inf or (math.isfinite(mean_nll) and mean_nll >= 700) else math.nan)
    )
    result = EvalResult(
        ppl=ppl,
        nll=mean_nll,
        accuracy=correct / n_tokens,
        n_tokens=n_tokens,
        n_windows=int(windows.shape[0]),
        tokens_per_s=windows.numel() / max(seconds, 1e-9),
        seconds=seconds,
        peak_memory_bytes=peak_memory(device),
        finite=math.isfinite(ppl),
        nonfinite_tokens=nonfinite,
        window_nll=window_nll,
    )
    if check_leak and result.finite and result.ppl < LEAK_PPL:
        warnings.warn(
            f"baseline perplexity {result.ppl:.3f} < {LEAK_PPL} on natural text: likely a bug "
            "(repeated text in the windows, or labels leaking into the inputs)",
            SuspiciousPerplexityWarning,
            stacklevel=3,
        )
    return result


def auto_batch_size(
    model: torch.nn.Module, n_windows: int, length: int, fallback: int = 8, tokens: int = _BATCH_TOKENS
) -> int:
    """Evaluation batch size: on CUDA about ``tokens`` tokens per forward (large matmuls; the
    loss is chunked so logits never scale with it), preferring a divisor of ``n_windows`` so every
    batch has one shape; on the CPU ``fallback``."""
    if _input_device(model).type != "cuda":
        return max(1, fallback)
    cap = max(1, min(n_windows, tokens // max(1, length)))
    for b in range(cap, max(1, cap // 2) - 1, -1):
        if n_windows % b == 0:
            return b
    return cap


def token_nll(
    model: torch.nn.Module, batch: torch.Tensor, checkpoint: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``[B, L-1]`` (fp32) and next-token hits, computed in position chunks.

    ``checkpoint=True`` (gradients only) keeps no logits for the backward pass: each chunk's
    logits are recomputed there, so the loss costs O(chunk x vocab) memory whatever the batch.
    """
    hidden = _final_hidden(model, batch)
    head: Any = model.get_output_embeddings()  # type: ignore[operator]
    B, T = batch.shape[0], batch.shape[1] - 1
    hidden = hidden[:, :-1].to(head.weight.device).reshape(B * T, -1)
    targets = batch[:, 1:].to(head.weight.device).reshape(B * T)
    step = _CHUNK_TOKENS // 4 if checkpoint else _CHUNK_TOKENS
    fn = _COMPILED.get("chunk") if _COMPILED.get("active") else None
    nll_parts, hit_parts = [], []
    for s in range(0, B * T, step):
        h, tgt = hidden[s : s + step], targets[s : s + step]
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            nll, hits = ckpt(_chunk_nll, model, head, h, tgt, use_reentrant=False)
        elif fn is not None:
            nll, hits = fn(model, head, h, tgt)
        else:
            nll, hits = _chunk_nll(model, head, h, tgt)
        nll_parts.append(nll)
        hit_parts.append(hits)
    return torch.cat(nll_parts).view(B, T), torch.cat(hit_parts).view(B, T)


def _chunk_nll(model, head, hidden, targets):
    logits = _logits(model, head, hidden).float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    hits = logits.argmax(dim=-1) == targets
    if torch.is_grad_enabled():
        return torch.logsumexp(logits, dim=-1) - picked, hits
    return _logsumexp_(logits) - picked, hits


def _logsumexp_(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, -1)`` computed in ``x``'s own storage (which it overwrites): the same
    ops in the same order as aten's (max, x - max, exp, sum, log, + max), so bit-identical, with
    no second chunk x vocab buffer (on the CPU that buffer's fresh pages cost ~5 % of an evaluation).

    >>> x = torch.randn(3, 7)
    >>> bool(torch.equal(_logsumexp_(x.clone()), torch.logsumexp(x, -1)))
    True
    """
    peak = x.amax(dim=-1, keepdim=True)
    peak.masked_fill_(peak.isinf(), 0)  # rows of ±inf: as aten, shift by 0
    return x.sub_(peak).exp_().sum(dim=-1).log_().add_(peak.squeeze(-1))


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
    """Mean next-token NLL of a batch (differentiable; used for gradients)."""
    nll, _ = token_nll(model, batch, checkpoint=checkpoint)
    return nll.mean()


# --- decoder layers: checkpointing and regional compilation ----------------------------------


@contextlib.contextmanager
def checkpointed(model: torch.nn.Module, enabled: bool = True):
    """Activation checkpointing of every decoder layer for the block (first-order gradients only):
    each layer keeps its input and recomputes its activations in the backward pass."""
    layers = decoder_layers(model) if enabled else []
    saved = []
    for layer in layers:
        inner = layer.forward
        had = "forward" in layer.__dict__

        def forward(*args, _inner=inner, **kwargs):
            if not torch.is_grad_enabled():
                return _inner(*args, **kwargs)
            from torch.utils.checkpoint import checkpoint as ckpt

            return ckpt(_inner, *args, use_reentrant=False, **kwargs)

        saved.append((layer, had, inner))
        layer.forward = forward
    try:
        yield
    finally:
        for layer, had, inner in reversed(saved):
            if had:
                layer.forward = inner
            else:
                del layer.forward


_COMPILED: dict = {}


@contextlib.contextmanager
def compiled(model: torch.nn.Module, enabled: bool = True):
    """Run the decoder layers (and the loss chunks) compiled for the block: each layer gets a
    ``torch.compile`` of its call once (kept on the layer, reused by all layers of one class)."""
    if not enabled:
        yield
        return
    layers = decoder_layers(model)
    previous = []
    for layer in layers:
        impl = layer.__dict__.get("_esa_compiled")
        if impl is None:
            impl = torch.compile(layer._call_impl, dynamic=False)
            layer._esa_compiled = impl
        previous.append((layer, getattr(layer, "_compiled_call_impl", None)))
        layer._compiled_call_impl = impl
    if "chunk" not in _COMPILED:
        _COMPILED["chunk"] = torch.compile(_chunk_nll, dynamic=False)
        config = torch._dynamo.config  # one entry per (model class, batch shape): allow many
        for name in ("recompile_limit", "cache_size_limit"):
            if isinstance(getattr(config, name, None), int) and getattr(config, name) < 64:
                setattr(config, name, 64)
    _COMPILED["active"] = True
    try:
        yield
    finally:
        _COMPILED["active"] = False
        for layer, impl in previous:
            layer._compiled_call_impl = impl


def _final_hidden(model: Any, batch: torch.Tensor) -> torch.Tensor:
    out = model.base_model(input_ids=batch, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _logits(model, head, hidden):
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device
