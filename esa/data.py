"""Evaluation and calibration text, and the windows protocol.

Protocol: tokenize the whole text once with no special tokens, cut it into consecutive
non-overlapping windows of ``max_length`` tokens and drop the remainder.

BOS: a model whose tokenizer starts every sequence with a BOS token (``add_bos_token``, or
``tokenizer("a")`` beginning with ``bos_token_id``) is evaluated as it was trained. With
``bos="auto"`` (or "always") each window is ``[BOS, t_1 .. t_{L-1}]``, L = ``max_length``: BOS is
input only (position 0 is never a label) and the NLL is over t_1 .. t_{L-1}, every text token of
the window; "never" (and "auto" for tokenizers that add none, e.g. SmolLM2's) keeps
``[t_1 .. t_L]`` with the NLL over t_2 .. t_L. Either way L - 1 tokens are scored per window.

Evaluation takes the first ``max_samples`` windows; calibration samples windows with the seed
from text disjoint from the evaluation windows (a separate calibration text, or the windows after
the evaluation ones when none is given or it is the evaluation text itself).

Seeds must draw materially different calibration sets: two draws of n windows from a pool of N
share n/N of their windows on average, so ``calibration`` refuses n/N > 0.5 (``DataError``
naming the fix) and ``calibration_overlap`` reports the Jaccard overlaps the seeds actually get.
``default_data_file`` finds the offline WikiText-2 copies under ``<root>/../shared/data``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esa.errors import ConfigError, DataError
from esa.models.tokenizer import builtin_corpus
from esa.util.files import file_sha256, text_sha256

log = logging.getLogger("esa")

BUILTIN = "builtin"
SHARED_DATA = {  # split -> path under <root>/../shared/data (offline WikiText-2 copies)
    "test": ("wikitext-2-raw", "wiki.test.raw"),
    "validation": ("wikitext-2", "valid.txt"),
}
MAX_CALIB_OVERLAP = 0.5  # largest expected share of windows two seeds' calibration sets may have
HF_DATASETS = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-v1": ("wikitext", "wikitext-2-v1"),
    "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1"),
}
DATASET_FORMATS = {".parquet": "parquet", ".arrow": "arrow", ".jsonl": "json", ".json": "json", ".csv": "csv"}
BOS_MODES = ("auto", "always", "never")  # --bos / --esa-bos
NO_BOS = {"mode": "never", "prepended": False, "token_id": None, "token": None, "reason": "no BOS"}


@dataclass(frozen=True)
class TextSource:
    """A text and where it came from."""

    name: str
    text: str = field(repr=False)
    sha256: str
    path: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "chars": len(self.text)}


def default_data_file(split: str, root: str | Path | None = None) -> Path | None:
    """The offline WikiText-2 ``split`` ("test": wikitext-2-raw/wiki.test.raw, "validation":
    wikitext-2/valid.txt) under ``<root>/../shared/data`` (root: the current directory), resolved;
    None when the file is absent."""
    if split not in SHARED_DATA:
        raise DataError(f"no default data file for split {split!r}: use one of {', '.join(SHARED_DATA)}")
    path = Path.cwd() if root is None else Path(root)
    path = path / ".." / "shared" / "data" / Path(*SHARED_DATA[split])
    return path.resolve() if path.is_file() else None


def load_text(spec: str | Path | None, split: str = "test") -> TextSource:
    """Text from a file path (plain text, or a local copy in a datasets format: parquet, arrow,
    json/jsonl, csv with a ``text`` column, read by ``datasets``), a Hugging Face dataset id, or the
    built-in corpus (``None``)."""
    if spec is None or str(spec) == BUILTIN:
        text = builtin_corpus()
        return TextSource("builtin:pydoc_data.topics", text, text_sha256(text))
    spec = str(spec)
    if spec in HF_DATASETS:
        return _load_hf(spec, split)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(
            f"data file {spec!r} not found: pass an existing text file, "
            f"one of {', '.join(HF_DATASETS)}, or omit it for the built-in corpus"
        )
    if path.suffix.lower() in DATASET_FORMATS:
        return _load_local_dataset(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {spec!r} is not UTF-8 text: convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {spec!r} is empty: pass a file with natural-language text")
    return TextSource(path.name, text, file_sha256(path), str(path.resolve()))


def _load_local_dataset(path: Path) -> TextSource:
    """The ``text`` column of a local file in a datasets format, rows joined by blank lines (as
    the hub's WikiText rows are)."""
    datasets = _datasets(str(path))
    try:
        rows = datasets.load_dataset(
            DATASET_FORMATS[path.suffix.lower()], data_files=str(path), split="train"
        )
    except Exception as exc:  # malformed file: one line, what to do
        raise DataError(
            f"cannot read {str(path)!r} with datasets ({type(exc).__name__}: {exc})"[:300]
        ) from None
    if "text" not in rows.column_names:
        raise DataError(f"{str(path)!r} has no 'text' column (columns: {', '.join(rows.column_names)})")
    text = "\n\n".join(t for t in rows["text"] if t)
    if not text.strip():
        raise DataError(f"data file {str(path)!r} has no text: pass a file with natural-language text")
    return TextSource(path.name, text, file_sha256(path), str(path.resolve()))


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{what!r} needs the datasets package: pip install datasets, "
            "or pass --data-file with a plain-text copy"
        ) from None
    return datasets


def _load_hf(spec: str, split: str) -> TextSource:
    datasets = _datasets(spec)
    repo, config = HF_DATASETS[spec]
    try:
        rows = datasets.load_dataset(repo, config, split=split)["text"]
    except Exception as exc:  # network, hub or cache errors all end the same way
        raise DataError(
            f"cannot load {spec!r} split {split!r} from the hub ({type(exc).__name__}): "
            "without network access pass --data-file with a local copy"
        ) from None
    text = "\n\n".join(rows)
    return TextSource(f"{spec}:{split}", text, text_sha256(text))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of the whole text, no special tokens (1-D LongTensor)."""
    quiet = logging.getLogger("transformers.tokenization_utils_base")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # silence "sequence longer than model max length"
    try:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    finally:
        quiet.setLevel(level)
    return torch.tensor(ids, dtype=torch.long)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own convention starts a sequence with its BOS token:
    ``add_bos_token`` is True, or ``tokenizer("a")`` (special tokens on) begins with
    ``bos_token_id`` (a post-processor that adds it, e.g. a saved Llama 3 tokenizer.json)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", False) is True:
        return True
    ids = tokenizer("a")["input_ids"]
    return bool(ids) and int(ids[0]) == int(bos)


def bos_policy(tokenizer, mode: str = "auto") -> dict:
    """What the windows start with (plain types, for the manifest): ``mode``, ``prepended``,
    ``token_id``, ``token`` and ``reason``. "auto" follows :func:`adds_bos`, "always" prepends the
    tokenizer's BOS (DataError when it has none), "never" prepends nothing."""
    if mode not in BOS_MODES:
        raise ConfigError(f"unknown --bos {mode!r}: use one of {', '.join(BOS_MODES)}")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if mode == "never":
        return {**NO_BOS, "reason": "--bos never"}
    if mode == "always" and bos_id is None:
        raise DataError("--bos always: this tokenizer has no BOS token; use --bos auto or --bos never")
    add = mode == "always" or adds_bos(tokenizer)
    reason = "--bos always" if mode == "always" else f"tokenizer adds {'a' if add else 'no'} BOS"
    return {
        "mode": mode,
        "prepended": bool(add),
        "token_id": int(bos_id) if add and bos_id is not None else None,
        "token": str(getattr(tokenizer, "bos_token", None)) if add else None,
        "reason": reason,
    }


def make_windows(tokenizer, text: str, max_length: int, bos_id: int | None = None) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, max_length]``; the remainder is dropped. With
    ``bos_id`` each window is ``[bos_id]`` + the next ``max_length - 1`` text tokens."""
    ids = tokenize(tokenizer, text)
    return windows_of(ids, max_length, bos_id)


def windows_of(ids: torch.Tensor, max_length: int, bos_id: int | None = None) -> torch.Tensor:
    """``[n, max_length]`` windows of ``ids`` (``bos_id``: ``max_length - 1`` text tokens after it)."""
    if bos_id is None:
        n = ids.numel() // max_length
        return ids[: n * max_length].view(n, max_length)
    body = windows_of(ids, max_length - 1)
    return torch.cat((torch.full((body.shape[0], 1), int(bos_id), dtype=body.dtype), body), dim=1)


@dataclass
class DataBundle:
    """Evaluation windows plus a pool of disjoint calibration windows sampled per seed."""

    eval_ids: torch.Tensor
    calib_pool: torch.Tensor
    eval_source: TextSource
    calib_source: TextSource
    max_length: int
    eval_total_windows: int
    disjoint: bool = True  # no calibration text overlaps the evaluation text (see prepare_data)
    bos: dict = field(default_factory=lambda: dict(NO_BOS))  # bos_policy(): what each window starts with

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        """``n`` calibration windows drawn without replacement with ``seed`` (in pool order);
        DataError when n exceeds half the pool (seeds would share most of their windows)."""
        return self.calib_pool[self._draw(n, seed)]

    def calibration_overlap(self, n: int, seeds) -> dict:
        """Pairwise Jaccard overlap of the seeds' calibration window sets (plain numbers):
        ``mean_jaccard`` and ``max_jaccard`` (0.0 with fewer than two seeds), ``expected_overlap``
        = n / pool (the expected share of windows two draws have in common), ``n``, ``pool``."""
        self._check(n)
        sets = [set(self._draw(n, s).tolist()) for s in seeds]
        pairs = [len(a & b) / len(a | b) for i, a in enumerate(sets) for b in sets[i + 1 :]]
        return {
            "n": int(n),
            "pool": int(self.calib_pool.shape[0]),
            "seeds": [int(s) for s in seeds],
            "expected_overlap": n / max(int(self.calib_pool.shape[0]), 1),
            "mean_jaccard": sum(pairs) / len(pairs) if pairs else 0.0,
            "max_jaccard": max(pairs) if pairs else 0.0,
        }

    def _draw(self, n: int, seed: int) -> torch.Tensor:
        self._check(n)
        gen = torch.Generator().manual_seed(int(seed))
        return torch.randperm(int(self.calib_pool.shape[0]), generator=gen)[:n].sort().values

    def _check(self, n: int) -> None:
        pool = int(self.calib_pool.shape[0])
        if n > MAX_CALIB_OVERLAP * pool:
            name = self.calib_source.name if self.calib_source is not None else "the pool"
            raise DataError(
                f"{n} calibration windows from a pool of {pool} ({name}, {self.max_length} tokens each): "
                f"seeds would share about {n / max(pool, 1):.0%} of their windows; use at most "
                f"{pool // 2} (--calib-samples), shorter windows (--max-length) or a longer --calib-file"
            )

    def manifest(self) -> dict:
        after = self.calib_source.sha256 == self.eval_source.sha256
        bos = self.bos.get("token_id") if self.bos.get("prepended") else None
        return {
            "protocol": "tokenize once without special tokens; consecutive non-overlapping windows; "
            + ("" if bos is None else f"each window = BOS (id {bos}, input only, never scored) + text; ")
            + "remainder dropped; eval = first windows; calibration sampled per seed"
            + ("; calibration from the windows after the evaluation ones" if after else ""),
            "max_length": self.max_length,
            "bos": dict(self.bos),
            "eval": {
                **self.eval_source.describe(),
                "windows_total": self.eval_total_windows,
                "windows_used": int(self.eval_ids.shape[0]),
            },
            "calibration": {
                **self.calib_source.describe(),
                "windows_pool": int(self.calib_pool.shape[0]),
                "from": "windows after the evaluation ones" if after else "a separate text",
            },
            "calibration_disjoint": bool(self.disjoint),
        }


def prepare_data(
    tokenizer,
    data=None,
    calib_data=None,
    max_length: int = 512,
    max_samples: int | None = None,
    min_calib_windows: int = 1,
    calib_windows: int | None = None,
    bos: str = "auto",
) -> DataBundle:
    """Load and window the evaluation text (and calibration text, disjoint from it).

    Calibration comes from ``calib_data`` unless it is None or the evaluation text itself; then
    from the windows after the evaluation ones. With ``calib_windows`` it checks at once that the
    pool can give seeds materially different draws (as ``DataBundle.calibration`` does). ``bos``
    ("auto" | "always" | "never", see :func:`bos_policy`) decides whether every window (evaluation
    and calibration) starts with the tokenizer's BOS token; the choice is in the manifest."""
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too short: use at least 2 tokens")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples {max_samples}: evaluate at least 1 window")
    policy = bos_policy(tokenizer, bos)
    bos_id = policy["token_id"] if policy["prepended"] else None
    eval_src = load_text(data, split="test")
    all_windows = make_windows(tokenizer, eval_src.text, max_length, bos_id)
    if all_windows.shape[0] == 0:
        n_tok = tokenize(tokenizer, eval_src.text).numel()
        raise DataError(
            f"{eval_src.name} has {n_tok} tokens, fewer than one window of "
            f"--max-length {max_length}"
            + ("" if bos_id is None else " (BOS + text)")
            + ": use a longer text or a smaller --max-length"
        )
    n_eval = all_windows.shape[0] if max_samples is None else min(max_samples, all_windows.shape[0])
    if max_samples is not None and max_samples > all_windows.shape[0]:
        log.warning(
            "esa: only %d windows of %d tokens in %s (asked for %d)",
            all_windows.shape[0],
            max_length,
            eval_src.name,
            max_samples,
        )
    calib_src = eval_src if calib_data is None else load_text(calib_data, split="train")
    if calib_src.sha256 == eval_src.sha256:
        calib_src, pool = eval_src, all_windows[n_eval:]
    else:
        pool = make_windows(tokenizer, calib_src.text, max_length, bos_id)
    if pool.shape[0] < min_calib_windows:
        raise DataError(
            f"no calibration text left after {n_eval} evaluation windows of {eval_src.name}: "
            "lower --max-samples or --max-length, or pass --calib-file"
        )
    disjoint = _disjoint(eval_src, calib_src, all_windows[:n_eval], pool)
    bundle = DataBundle(
        all_windows[:n_eval],
        pool,
        eval_src,
        calib_src,
        max_length,
        int(all_windows.shape[0]),
        disjoint,
        policy,
    )
    if calib_windows is not None:
        bundle._check(calib_windows)
    return bundle


def _disjoint(
    eval_src: TextSource, calib_src: TextSource, eval_ids: torch.Tensor, pool: torch.Tensor
) -> bool:
    """True when calibration is the windows after the evaluation ones, or a text that neither
    contains nor is contained in the evaluation text and shares no window with it."""
    if calib_src.sha256 == eval_src.sha256:
        return True
    if calib_src.text in eval_src.text or eval_src.text in calib_src.text:
        return False
    rows = {r.numpy().tobytes() for r in eval_ids}
    return not any(r.numpy().tobytes() in rows for r in pool)


def random_windows(n: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """``[n, length]`` token ids uniform in ``[0, vocab_size)`` (CPU, seeded)."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, int(vocab_size), (int(n), int(length)), generator=gen, dtype=torch.long)


def random_data(vocab_size: int, n_eval: int, n_calib: int, length: int, seed: int = 0):
    """A DataBundle of random-id windows (eval + a disjoint calibration pool), for benchmarks."""
    ids = random_windows(n_eval + n_calib, length, vocab_size, seed)
    digest = text_sha256(f"random-ids:{vocab_size}:{n_eval}:{n_calib}:{length}:{seed}")
    src = TextSource(f"random-ids(vocab={vocab_size}, seed={seed})", "", digest)
    return DataBundle(ids[:n_eval], ids[n_eval:], src, src, int(length), int(n_eval))
