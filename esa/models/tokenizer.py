"""An offline tokenizer for the random-init tiny-* models.

A byte-level BPE trained (deterministically, in about a second) on Python's own documentation
prose (``pydoc_data.topics``), so tiny models need no download. Any text can be encoded.
``builtin_tokenizer(add_bos=True)`` is the same vocabulary with the convention of tokenizers that
start every sequence with BOS (``add_bos_token=True``, like Llama's): ``tok("a")`` is
``[bos_token_id, ...]``; with ``add_special_tokens=False`` the ids are the plain ones.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerFast

BUILTIN_VOCAB_SIZE = 1024
_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def builtin_corpus() -> str:
    """English prose that ships with Python itself (the pydoc topic texts, in sorted order)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@functools.lru_cache(maxsize=4)
def builtin_tokenizer(vocab_size: int = BUILTIN_VOCAB_SIZE, add_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :func:`builtin_corpus` (cached per process); with
    ``add_bos`` it prepends its BOS token (id 0) when called with special tokens on."""
    return PreTrainedTokenizerFast(
        tokenizer_object=_trained(vocab_size),
        eos_token=_SPECIALS[0],
        bos_token=_SPECIALS[0],
        pad_token=_SPECIALS[1],
        add_bos_token=add_bos,
    )


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int):
    """The trained ``tokenizers.Tokenizer`` (deterministic, ~1 s; cached per process)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = builtin_corpus()
    chunk = 20_000
    tok.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer)
    return tok
