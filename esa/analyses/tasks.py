"""Zero-shot multiple-choice tasks: the example schema, JSONL files and hub tasks mapped to it.

Example schema (one JSON object per line of a ``.jsonl`` file; see fixtures/zeroshot/README.md)::

    {"id": "piqa-1", "context": "Question: ...\\nAnswer:", "choices": ["...", "..."], "label": 0}

- ``id``: string or integer, unique within the file;
- ``context``: string (may be empty);
- ``choices``: list of at least 2 non-empty strings;
- ``label``: integer index of the correct choice (0-based).

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

Without network, pass a local JSONL path to ``load_task`` instead, or the task's own data file
as lm-evaluation-harness reads it offline (a task yaml with ``dataset_path: json`` or ``parquet``
and ``data_files``): ``load_task(path, task="arc_easy")`` reads ``.jsonl`` / ``.json`` /
``.parquet`` rows with the dataset's fields and maps them as above (``read_raw``);
``find_local(folder, task)`` finds ``{task}.jsonl|json|parquet`` in a folder.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from esa.errors import ConfigError, DataError

SCHEMA_KEYS = ("id", "context", "choices", "label")


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


RAW_SUFFIXES = (".jsonl", ".json", ".parquet")


def load_task(
    name_or_path: str | Path, limit: int | None = None, split: str | None = None, *, task: str | None = None
) -> list[dict]:
    """Examples (schema in the module doc) from a local JSONL file or a hub task name.

    ``limit`` keeps the first ``limit`` examples. With ``task`` (a ``TASKS`` name) the file holds
    that task's raw dataset rows (``read_raw``). A hub task that cannot be loaded raises
    ``DataError`` asking for a local JSONL file.
    """
    if limit is not None and (isinstance(limit, bool) or int(limit) < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    path = Path(str(name_or_path)).expanduser()
    if task is not None:
        examples = read_raw(task, path, limit=limit)
    elif path.is_file():
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


def _spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return TASKS[task]


def _raw_rows(path: Path) -> list:
    """Rows of a ``.parquet`` (pyarrow), ``.jsonl`` or ``.json`` (a list, or one object a line)."""
    if path.suffix not in RAW_SUFFIXES or not path.is_file():
        raise DataError(f"{str(path)!r} is not a {'/'.join(RAW_SUFFIXES)} file: pass the task's data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise DataError(f"{str(path)!r}: invalid JSON ({exc.msg}); use one JSON object a line") from None


def read_raw(task: str, path: str | Path, limit: int | None = None) -> list[dict]:
    """Rows of ``task``'s own data file (the dataset's fields, as lm-evaluation-harness reads a
    local ``data_files`` entry) mapped to the schema by ``TASKS[task].convert``."""
    spec, path = _spec(task), Path(path)
    out: list[dict] = []
    for i, doc in enumerate(_raw_rows(path)):
        if limit is not None and len(out) >= limit:
            break
        try:
            example = spec.convert(doc, i)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise DataError(
                f"{path}[{i}]: not a {task} row ({type(exc).__name__}: {exc}); pass a file with the "
                f"fields of {spec.sources[0][0]}"
            ) from None
        out.append(validate_example(example, where=f"{path}[{i}]"))
    return out


def find_local(folder: str | Path, task: str) -> Path | None:
    """``folder/{task}{suffix}`` for the first of ``RAW_SUFFIXES`` that exists, else None."""
    _spec(task)
    for suffix in RAW_SUFFIXES:
        path = Path(folder) / f"{task}{suffix}"
        if path.is_file():
            return path
    return None


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
