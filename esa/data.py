"""Evaluation and calibration text, and the windows protocol.

Protocol: tokenize the whole text once with no special tokens, cut it into consecutive
non-overlapping windows of ``max_length`` tokens and drop the remainder. Evaluation takes the
first ``max_samples`` windows; calibration samples windows with the seed from text disjoint from
the evaluation windows (a separate calibration text, or the windows after the evaluation ones).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from esa.errors import DataError
from esa.models.tokenizer import builtin_corpus
from esa.util.files import file_sha256, text_sha256

log = logging.getLogger("esa")

BUILTIN = "builtin"
HF_DATASETS = {
    "wikitext-2-raw-v1": ("wikitext", "wikitext-2-raw-v1"),
    "wikitext-2-v1": ("wikitext", "wikitext-2-v1"),
    "wikitext-103-raw-v1": ("wikitext", "wikitext-103-raw-v1"),
}


@dataclass(frozen=True)
class TextSource:
    """A text and where it came from."""

    name: str
    text: str = field(repr=False)
    sha256: str
    path: str | None = None

    def describe(self) -> dict:
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "chars": len(self.text)}


def load_text(spec: str | Path | None, split: str = "test") -> TextSource:
    """Text from a file path, a Hugging Face dataset id, or the built-in corpus (``None``)."""
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
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"data file {spec!r} is not UTF-8 text: convert it to UTF-8") from None
    if not text.strip():
        raise DataError(f"data file {spec!r} is empty: pass a file with natural-language text")
    return TextSource(path.name, text, file_sha256(path), str(path.resolve()))


def _load_hf(spec: str, split: str) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec!r} needs the datasets package: pip install datasets, "
            "or pass --data-file with a local copy"
        ) from None
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


def make_windows(tokenizer, text: str, max_length: int) -> torch.Tensor:
    """Consecutive non-overlapping windows ``[n, max_length]``; the remainder is dropped."""
    ids = tokenize(tokenizer, text)
    return windows_of(ids, max_length)


def windows_of(ids: torch.Tensor, max_length: int) -> torch.Tensor:
    n = ids.numel() // max_length
    return ids[: n * max_length].view(n, max_length)


@dataclass
class DataBundle:
    """Evaluation windows plus a pool of disjoint calibration windows sampled per seed."""

    eval_ids: torch.Tensor
    calib_pool: torch.Tensor
    eval_source: TextSource
    calib_source: TextSource
    max_length: int
    eval_total_windows: int

    def calibration(self, n: int, seed: int) -> torch.Tensor:
        """``n`` calibration windows drawn without replacement with ``seed``."""
        n = min(n, self.calib_pool.shape[0])
        gen = torch.Generator().manual_seed(int(seed))
        order = torch.randperm(self.calib_pool.shape[0], generator=gen)[:n]
        return self.calib_pool[order.sort().values]

    def manifest(self) -> dict:
        same = self.calib_source.sha256 == self.eval_source.sha256
        return {
            "protocol": "tokenize once without special tokens; consecutive non-overlapping windows; "
            "remainder dropped; eval = first windows; calibration sampled per seed"
            + ("; calibration from the windows after the evaluation ones" if same else ""),
            "max_length": self.max_length,
            "eval": {
                **self.eval_source.describe(),
                "windows_total": self.eval_total_windows,
                "windows_used": int(self.eval_ids.shape[0]),
            },
            "calibration": {**self.calib_source.describe(), "windows_pool": int(self.calib_pool.shape[0])},
        }


def prepare_data(
    tokenizer,
    data=None,
    calib_data=None,
    max_length: int = 512,
    max_samples: int | None = None,
    min_calib_windows: int = 1,
) -> DataBundle:
    """Load and window the evaluation text (and calibration text, disjoint from it)."""
    if max_length < 2:
        raise DataError(f"--max-length {max_length} is too short: use at least 2 tokens")
    if max_samples is not None and max_samples < 1:
        raise DataError(f"--max-samples {max_samples}: evaluate at least 1 window")
    eval_src = load_text(data, split="test")
    all_windows = make_windows(tokenizer, eval_src.text, max_length)
    if all_windows.shape[0] == 0:
        n_tok = tokenize(tokenizer, eval_src.text).numel()
        raise DataError(
            f"{eval_src.name} has {n_tok} tokens, fewer than one window of "
            f"--max-length {max_length}: use a longer text or a smaller --max-length"
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
    if calib_data is not None:
        calib_src = load_text(calib_data, split="train")
        pool = make_windows(tokenizer, calib_src.text, max_length)
    else:
        calib_src, pool = eval_src, all_windows[n_eval:]
    if pool.shape[0] < min_calib_windows:
        raise DataError(
            f"no calibration text left after {n_eval} evaluation windows of {eval_src.name}: "
            "lower --max-samples or --max-length, or pass --calib-file"
        )
    return DataBundle(all_windows[:n_eval], pool, eval_src, calib_src, max_length, int(all_windows.shape[0]))


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
