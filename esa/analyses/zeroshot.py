"""Zero-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness style).

Examples follow the schema of ``esa.analyses.tasks`` (``id``, ``context``, ``choices``, ``label``);
``load_task``, ``read_jsonl``, ``read_raw`` (lm-evaluation-harness data files), ``find_local``,
``validate_example`` and ``TASKS`` live there and are re-exported here.

Scoring: for each choice the continuation ``delimiter + choice`` (delimiter " " by default) is
appended to the context and scored as the sum of the log-probabilities of its tokens given
everything before them. Tokenisation follows lm-evaluation-harness: trailing whitespace of the
context moves to the continuation, the pair is tokenised as one string, and the continuation
tokens are those after the context's own tokens (no special tokens are added; an empty context
gets the BOS, else EOS, token as its only token). ``acc`` = fraction of examples whose highest
log-likelihood choice is the label; ``acc_norm`` = the same with each log-likelihood divided by
the character length of the choice string (the harness's ``acc_norm``). Ties go to the first
choice. Over-long inputs keep their last ``max_length`` tokens.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from tqdm.auto import tqdm

from esa.analyses.tasks import (
    SCHEMA_KEYS,
    TASKS,
    TaskSpec,
    find_local,
    load_task,
    read_jsonl,
    read_raw,
    validate_example,
)
from esa.errors import ConfigError, DataError

__all__ = [
    "SCHEMA_KEYS",
    "TASKS",
    "TaskSpec",
    "encode_pair",
    "evaluate_task",
    "find_local",
    "load_task",
    "read_jsonl",
    "read_raw",
    "score_choices",
    "score_requests",
    "validate_example",
]

_TOKEN_BUDGET = 8192  # padded tokens per forward pass


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prefix_token(tokenizer, model) -> int:
    for tid in (
        getattr(tokenizer, "bos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(model.config, "bos_token_id", None),
        getattr(model.config, "eos_token_id", None),
    ):
        if isinstance(tid, int):
            return tid
    return 0


def encode_pair(
    tokenizer, context: str, continuation: str, prefix_token: int = 0
) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them (module doc)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context) if context else []
    cont = whole[len(ctx) :]
    if not cont:
        raise DataError(f"continuation {continuation!r} has no tokens after context; use a non-empty choice")
    return (ctx or [prefix_token]), cont


def _max_length(model, max_length: int | None) -> int:
    if max_length is not None:
        return int(max_length)
    return int(min(getattr(model.config, "max_position_embeddings", 2048) or 2048, 2048))


def _requests(lm, examples, delimiter: str, max_length: int):
    prefix = _prefix_token(lm.tokenizer, lm.model)
    reqs = []
    for e, ex in enumerate(examples):
        for c, choice in enumerate(ex["choices"]):
            ctx, cont = encode_pair(lm.tokenizer, ex["context"], delimiter + choice, prefix)
            if len(cont) > max_length:
                raise DataError(
                    f"example {ex['id']!r} choice {c} has {len(cont)} tokens, more than "
                    f"max_length={max_length}; shorten it or raise max_length"
                )
            seq = (ctx + cont)[-(max_length + 1) :]
            reqs.append((e, c, seq, len(cont)))
    return reqs


def _batches(reqs, batch_size: int):
    order = sorted(range(len(reqs)), key=lambda i: -len(reqs[i][2]))
    batch: list[int] = []
    for i in order:
        width = len(reqs[batch[0]][2]) - 1 if batch else len(reqs[i][2]) - 1
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * width > _TOKEN_BUDGET):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _score_batch(model, seqs: list[list[int]], n_conts: list[int], pad: int) -> list[tuple[float, bool]]:
    device = model.get_input_embeddings().weight.device
    width = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s) - 1] = torch.tensor(s[:-1])
        mask[r, : len(s) - 1] = 1
    out = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    head = model.get_output_embeddings()
    # Only the positions that predict continuation tokens go through the LM head.
    picks = [
        (r, pos) for r, (s, n) in enumerate(zip(seqs, n_conts)) for pos in range(len(s) - 1 - n, len(s) - 1)
    ]
    rows_idx = torch.tensor([r for r, _ in picks], device=hidden.device)
    pos_idx = torch.tensor([p for _, p in picks], device=hidden.device)
    logits = head(hidden[rows_idx, pos_idx].to(head.weight.device)).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    logp_all = torch.log_softmax(logits, dim=-1)
    out = []
    start = 0
    for s, n in zip(seqs, n_conts):
        rows, logp = logits[start : start + n], logp_all[start : start + n]
        start += n
        target = torch.tensor(s[-n:], device=rows.device)
        ll = float(logp.gather(-1, target[:, None]).sum())
        greedy = bool((rows.argmax(-1) == target).all())
        out.append((ll, greedy))
    return out


def score_requests(
    lm,
    examples: Sequence[Mapping],
    *,
    delimiter: str = " ",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
) -> list[list[float]]:
    """Log-likelihood of every choice of every example: ``[[ll(choice) for choice] per example]``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    max_length = _max_length(lm.model, max_length)
    reqs = _requests(lm, examples, delimiter, max_length)
    pad = getattr(lm.tokenizer, "pad_token_id", None)
    pad = pad if isinstance(pad, int) else 0
    result = [[0.0] * len(ex["choices"]) for ex in examples]
    batches = list(_batches(reqs, batch_size))
    with torch.inference_mode():
        for batch in tqdm(batches, desc="zeroshot", disable=not progress, leave=False, unit="batch"):
            scored = _score_batch(lm.model, [reqs[i][2] for i in batch], [reqs[i][3] for i in batch], pad)
            for i, (ll, _) in zip(batch, scored):
                e, c = reqs[i][0], reqs[i][1]
                result[e][c] = ll
    return result


def score_choices(
    lm, context: str, choices: Sequence[str], *, delimiter: str = " ", max_length: int | None = None
) -> list[float]:
    """Log-likelihood of each ``delimiter + choice`` given ``context`` (sum over its tokens)."""
    example = {"id": 0, "context": context, "choices": list(choices), "label": 0}
    return score_requests(lm, [example], delimiter=delimiter, max_length=max_length, progress=False)[0]


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def evaluate_task(
    lm,
    examples: Sequence[Mapping],
    *,
    delimiter: str = " ",
    batch_size: int = 16,
    max_length: int | None = None,
    progress: bool = True,
    details: bool = False,
) -> dict:
    """Accuracy of ``lm`` on ``examples``: ``{"acc", "acc_norm", "n"}`` (plain floats / int).

    With ``details=True`` also ``"details"``: per example id, label, loglikelihoods, pred,
    pred_norm.
    """
    if not examples:
        raise DataError("no examples to evaluate: load_task returned none")
    examples = [validate_example(dict(ex), where=f"example {i}") for i, ex in enumerate(examples)]
    lls = score_requests(
        lm, examples, delimiter=delimiter, batch_size=batch_size, max_length=max_length, progress=progress
    )
    hits = hits_norm = 0
    rows = []
    for ex, ll in zip(examples, lls):
        pred = _argmax(ll)
        pred_norm = _argmax([v / len(c) for v, c in zip(ll, ex["choices"])])
        hits += pred == ex["label"]
        hits_norm += pred_norm == ex["label"]
        rows.append(
            {"id": ex["id"], "label": ex["label"], "loglikelihoods": ll, "pred": pred, "pred_norm": pred_norm}
        )
    n = len(examples)
    out: dict[str, object] = {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}
    if details:
        out["details"] = rows
    return out
