"""Offline T5 tokenizer (SentencePiece-style Unigram over ``▁``-prefixed words) for the tiny Flux models.

T5's real vocabulary is a Unigram model: ids 0-2 are ``<pad>``, ``</s>``, ``<unk>``, then pieces with log
probabilities. The tiny one has the same structure, built deterministically from the bundled English corpus:
every character (alone and after ``▁``), then the words that occur at least twice, scored by frequency.
"""

from __future__ import annotations

import math
from collections import Counter
from functools import lru_cache
from pathlib import Path

from loratui.tiny_models.bpe import read_corpus

PAD, EOS, UNK, SPACE = "<pad>", "</s>", "<unk>", "▁"
#: score of a single character: low, so that whole words win whenever they are in the vocabulary
CHAR_SCORE = -20.0


@lru_cache(maxsize=1)
def t5_vocab() -> tuple[tuple[str, float], ...]:
    """(piece, log-probability) pairs in id order; deterministic."""
    words: Counter[str] = Counter()
    for line in read_corpus("en"):
        words.update(line.split())
    chars = sorted({ch for word in words for ch in word})
    frequent = sorted((w for w, n in words.items() if n >= 2), key=lambda w: (-words[w], w))
    total = sum(words[w] for w in frequent) or 1
    pieces: list[tuple[str, float]] = [(PAD, 0.0), (EOS, 0.0), (UNK, 0.0), (SPACE, -2.0)]
    pieces += [(ch, CHAR_SCORE) for ch in chars]
    pieces += [(SPACE + ch, CHAR_SCORE) for ch in chars]
    seen = {piece for piece, _ in pieces}
    for word in frequent:
        piece = SPACE + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, math.log(words[word] / total)))
    return tuple(pieces)


def t5_vocab_size() -> int:
    """Number of ids in the tiny T5 vocabulary (the encoder's ``vocab_size``)."""
    return len(t5_vocab())


def make_t5_tokenizer(model_max_length: int):
    """A ``T5TokenizerFast`` over the tiny vocabulary (no ``<extra_id_N>`` sentinels: only encoding is used)."""
    from transformers import T5TokenizerFast

    return T5TokenizerFast(
        vocab=list(t5_vocab()), extra_ids=0, model_max_length=model_max_length, legacy=False
    )


def write_t5_tokenizer(dest: Path, model_max_length: int) -> Path:
    """Write a folder loadable with ``T5TokenizerFast.from_pretrained(dest)``."""
    make_t5_tokenizer(model_max_length).save_pretrained(str(dest))
    return dest
