"""Evaluation: token perplexity, next-token accuracy, tokens/s and peak memory.

Perplexity is exp(mean NLL over every predicted token): for a window of L tokens the L-1 tokens
after the first are predicted (labels are the inputs shifted by one). Windows are full length, so
no padding exists to be scored. The loss is computed from the final hidden states in chunks of
positions, so the full-vocabulary logits of a batch never exist at once in fp32.
"""

from __future__ import annotations

import math
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

LEAK_PPL = 1.5
_CHUNK_TOKENS = 4096


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


def evaluate(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8,
             progress: bool = True, check_leak: bool = False, desc: str = "eval") -> EvalResult:
    """Evaluate a causal LM on ``windows`` ``[n, L]`` of token ids."""
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError("windows must be [n, L] with L >= 2")
    device = _input_device(model)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    nll_sum, correct, nonfinite = 0.0, 0, 0
    window_nll: list[float] = []
    start = time.perf_counter()
    batches = range(0, windows.shape[0], batch_size)
    with torch.inference_mode():
        for i in tqdm(batches, desc=desc, disable=not progress, leave=False, unit="batch"):
            batch = windows[i : i + batch_size].to(device)
            nll, hits = token_nll(model, batch)
            nll64 = nll.double()
            nonfinite += int((~torch.isfinite(nll64)).sum())
            nll_sum += float(nll64.sum())
            correct += int(hits.sum())
            window_nll += [float(v) for v in nll64.mean(dim=1).cpu()]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    n_tokens = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = nll_sum / n_tokens
    ppl = math.exp(mean_nll) if math.isfinite(mean_nll) and mean_nll < 700 else (
        math.inf if mean_nll == math.inf or (math.isfinite(mean_nll) and mean_nll >= 700) else math.nan)
    result = EvalResult(
        ppl=ppl, nll=mean_nll, accuracy=correct / n_tokens, n_tokens=n_tokens,
        n_windows=int(windows.shape[0]), tokens_per_s=windows.numel() / max(seconds, 1e-9),
        seconds=seconds, peak_memory_bytes=_peak_memory(device), finite=math.isfinite(ppl),
        nonfinite_tokens=nonfinite, window_nll=window_nll,
    )
    if check_leak and result.finite and result.ppl < LEAK_PPL:
        warnings.warn(
            f"baseline perplexity {result.ppl:.3f} < {LEAK_PPL} on natural text: likely a bug "
            "(repeated text in the windows, or labels leaking into the inputs)",
            SuspiciousPerplexityWarning, stacklevel=2,
        )
    return result


def token_nll(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token NLL ``[B, L-1]`` (fp32) and next-token hits, computed in position chunks."""
    hidden = _final_hidden(model, batch)
    head = model.get_output_embeddings()
    hidden = hidden[:, :-1].to(head.weight.device)
    targets = batch[:, 1:].to(head.weight.device)
    B, T, _ = hidden.shape
    step = max(1, _CHUNK_TOKENS // max(B, 1))
    nll_parts, hit_parts = [], []
    for s in range(0, T, step):
        logits = _logits(model, head, hidden[:, s : s + step]).float()
        tgt = targets[:, s : s + step]
        logz = torch.logsumexp(logits, dim=-1)
        picked = logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        nll_parts.append(logz - picked)
        hit_parts.append(logits.argmax(dim=-1) == tgt)
    return torch.cat(nll_parts, dim=1), torch.cat(hit_parts, dim=1)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of a batch (differentiable; used for gradients)."""
    nll, _ = token_nll(model, batch)
    return nll.mean()


def _final_hidden(model, batch):
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


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
