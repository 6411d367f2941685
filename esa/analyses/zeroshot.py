"""Zero-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness style).

Example schema (one JSON object per line of a ``.jsonl`` file; see fixtures/zeroshot/README.md)::

    {"id": "piqa-1", "context": "Question: ...\\nAnswer:", "choices": ["...", "..."], "label": 0}

- ``id``: string or integer, unique within the file;
- ``context``: string (may be empty);
- ``choices``: list of at least 2 non-empty strings;
- ``label``: integer index of the correct choice (0-based).

Scoring: for each choice the continuation ``delimiter + choice`` (delimiter " " by default) is
appended to the context and scored as the sum of the log-probabilities of its tokens given
everything before them. Tokenisation follows lm-evaluation-harness: trailing whitespace of the
context moves to the continuation, the pair is tokenised as one string, and the continuation
tokens are those after the context's own tokens (no special tokens are added; an empty context
gets the BOS, else EOS, token as its only token). ``acc`` = fraction of examples whose highest
log-likelihood choice is the label; ``acc_norm`` = the same with each log-likelihood divided by
the character length of the choice string (the harness's ``acc_norm``). Ties go to the first
choice. Over-long inputs keep their last ``max_length`` tokens.

Tasks ``hellaswag``, ``piqa``, ``boolq``, ``arc_easy`` load from the Hugging Face hub via
``datasets`` when reachable and are mapped to the schema (prompts as in lm-evaluation-harness):

- hellaswag (``Rowan/hellaswag``, validation): context = preprocess(activity_label + ": " +
  ctx_a + " " + ctx_b.capitalize()), choices = preprocess(endings), label = int(label);
  preprocess strips, turns " [title]" into ". ", drops other [bracketed] tags and double spaces.
- piqa (``baber/piqa`` / ``ybisk/piqa``, validation): context = "Question: {goal}\\nAnswer:",
  choices = [sol1, sol2], label = label.
- boolq (``super_glue``/boolq or ``google/boolq``, validation): context =
  "{passage}\\nQuestion: {question}?\\nAnswer:", choices = ["no", "yes"], label = label (or
  int(answer)).
- arc_easy (``allenai/ai2_arc`` ARC-Easy, test): context = "Question: {question}\\nAnswer:",
  choices = choices["text"], label = choices["label"].index(answerKey).

Without network, pass a local JSONL path to ``load_task`` instead.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from esa.errors import ConfigError, DataError

log = logging.getLogger("esa")

SCHEMA_KEYS = ("id", "context", "choices", "label")
_TOKEN_BUDGET = 8192  # padded tokens per forward pass


# --- task loading ------------------------------------------------------------------------------


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(doc, i) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {
        "id": doc.get("ind", i),
        "context": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
        "choices": [_hellaswag_clean(e) for e in doc["endings"]],
        "label": int(doc["label"]),
    }


def _piqa(doc, i) -> dict:
    return {
        "id": doc.get("id", i),
        "context": f"Question: {doc['goal']}\nAnswer:",
        "choices": [doc["sol1"], doc["sol2"]],
        "label": int(doc["label"]),
    }


def _boolq(doc, i) -> dict:
    label = doc["label"] if "label" in doc else int(bool(doc["answer"]))
    return {
        "id": doc.get("idx", i),
        "context": f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:",
        "choices": ["no", "yes"],
        "label": int(label),
    }


def _arc(doc, i) -> dict:
    labels = list(doc["choices"]["label"])
    return {
        "id": doc.get("id", i),
        "context": f"Question: {doc['question']}\nAnswer:",
        "choices": list(doc["choices"]["text"]),
        "label": labels.index(doc["answerKey"]),
    }


@dataclass(frozen=True)
class TaskSpec:
    """A hub task: candidate (dataset path, config) pairs tried in order, split, field mapping."""

    name: str
    sources: tuple[tuple[str, str | None], ...]
    split: str
    convert: Callable[[Mapping, int], dict]


TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag", (("Rowan/hellaswag", None),), "validation", _hellaswag),
    "piqa": TaskSpec("piqa", (("baber/piqa", None), ("ybisk/piqa", None)), "validation", _piqa),
    "boolq": TaskSpec("boolq", (("super_glue", "boolq"), ("google/boolq", None)), "validation", _boolq),
    "arc_easy": TaskSpec("arc_easy", (("allenai/ai2_arc", "ARC-Easy"),), "test", _arc),
}


def load_task(name_or_path: str | Path, limit: int | None = None, split: str | None = None) -> list[dict]:
    """Examples (schema in the module doc) from a local JSONL file or a hub task name.

    ``limit`` keeps the first ``limit`` examples. A hub task that cannot be loaded raises
    ``DataError`` asking for a local JSONL file.
    """
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(str(name_or_path)).expanduser()
    if path.is_file():
        examples = read_jsonl(path, limit=limit)
    elif str(name_or_path) in TASKS:
        examples = _load_hub(TASKS[str(name_or_path)], limit, split)
    else:
        raise DataError(
            f"{str(name_or_path)!r} is neither a JSONL file nor a task "
            f"({', '.join(TASKS)}): pass a local JSONL file (schema: id, context, choices, label)"
        )
    if not examples:
        raise DataError(f"no examples in {str(name_or_path)!r}: the task needs at least one")
    return examples


def _load_hub(spec: TaskSpec, limit: int | None, split: str | None) -> list[dict]:
    hint = (
        'pass a local JSONL file with one {"id", "context", "choices", "label"} object per '
        "line instead (see fixtures/zeroshot/README.md)"
    )
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"task {spec.name!r} needs the datasets package (pip install datasets); or {hint}"
        ) from None
    split = split or spec.split
    errors = []
    for path, config in spec.sources:
        try:
            rows = datasets.load_dataset(path, config, split=split)
        except Exception as exc:
            errors.append(f"{path}: {type(exc).__name__}")
            continue
        out: list[dict] = []
        for i, doc in enumerate(rows):
            if limit is not None and len(out) >= limit:
                break
            out.append(validate_example(spec.convert(doc, i), where=f"{path}[{i}]"))
        return out
    raise DataError(
        f"cannot load task {spec.name!r} split {split!r} from the hub ({'; '.join(errors)}): {hint}"
    )


def read_jsonl(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read and validate a JSONL task file; errors name the file and the 1-based line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(
            f"cannot read task file {str(path)!r} ({exc.strerror}): pass an existing JSONL file"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"task file {str(path)!r} is not UTF-8: convert it to UTF-8 JSONL") from None
    examples: list[dict] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: invalid JSON ({exc.msg}); each line must be one JSON object") from None
        example = validate_example(obj, where=where)
        key = str(example["id"])
        if key in seen:
            raise DataError(
                f"{where}: duplicate id {example['id']!r} (first on line {seen[key]}); ids must be unique"
            )
        seen[key] = lineno
        examples.append(example)
        if limit is not None and len(examples) >= limit:
            break
    return examples


def validate_example(obj, where: str = "example") -> dict:
    """Check one example against the schema; return it with exactly the schema keys."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with keys {', '.join(SCHEMA_KEYS)}")
    missing = [k for k in SCHEMA_KEYS if k not in obj]
    if missing:
        raise DataError(f"{where}: missing key(s) {', '.join(missing)}; schema: {', '.join(SCHEMA_KEYS)}")
    ident, context, choices, label = (obj[k] for k in SCHEMA_KEYS)
    if isinstance(ident, bool) or not isinstance(ident, (str, int)):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {type(ident).__name__}")
    if not isinstance(context, str):
        raise DataError(f"{where}: 'context' must be a string, got {type(context).__name__}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise DataError(f"{where}: 'choices' must be a list of at least 2 strings")
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c:
            raise DataError(f"{where}: choice {j} must be a non-empty string, got {c!r}")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: 'label' must be an integer in 0..{len(choices) - 1}, got {label!r}")
    return {"id": ident, "context": context, "choices": list(choices), "label": label}


# --- scoring -----------------------------------------------------------------------------------


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
