"""A small, deterministic byte-level BPE learner used to make the tiny models' tokenizers offline.

The learner runs on the bundled corpus (``corpus/*.txt``) in well under a second. It is written here
rather than taken from ``tokenizers.trainers`` so that the merges (and therefore the token ids) are
identical on every machine and every run: ties are broken by the pair's text, never by hash order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from itertools import pairwise

Pair = tuple[str, str]


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table (256 entries, in canonical order)."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, codes, strict=True)}


def byte_alphabet() -> list[str]:
    """The 256 byte-level symbols in the order CLIP's vocab.json lists them (ids 0-255)."""
    return list(bytes_to_unicode().values())


def read_corpus(*names: str) -> list[str]:
    """Non-empty lines of the bundled corpus files, e.g. ``read_corpus("en", "zh")``."""
    lines: list[str] = []
    for name in names:
        text = (
            resources.files("loratui.tiny_models")
            .joinpath("corpus")
            .joinpath(f"{name}.txt")
            .read_text("utf-8")
        )
        lines.extend(line.strip() for line in text.splitlines() if line.strip())
    return lines


def learn_bpe(words: Counter[tuple[str, ...]], max_merges: int, min_frequency: int = 2) -> list[Pair]:
    """Learn up to ``max_merges`` BPE merges from word counts (each word given as its initial symbols).

    Classic BPE: repeatedly merge the most frequent adjacent pair. Ties go to the pair that sorts
    first, so the result depends only on ``words``.
    """
    seqs: list[list[str]] = [list(w) for w in sorted(words)]
    freqs: list[int] = [words[w] for w in sorted(words)]
    counts: Counter[Pair] = Counter()
    where: dict[Pair, set[int]] = {}
    for idx, seq in enumerate(seqs):
        for pair in pairwise(seq):
            counts[pair] += freqs[idx]
            where.setdefault(pair, set()).add(idx)
    heap = [(-n, pair) for pair, n in counts.items()]
    heapq.heapify(heap)

    merges: list[Pair] = []
    while heap and len(merges) < max_merges:
        neg, pair = heapq.heappop(heap)
        if counts.get(pair, 0) != -neg:
            continue  # stale heap entry
        if -neg < min_frequency:
            break
        merges.append(pair)
        merged = pair[0] + pair[1]
        touched: set[Pair] = set()
        for idx in sorted(where.pop(pair, ())):
            old = seqs[idx]
            new = _merge_word(old, pair, merged)
            if new == old:
                continue
            f = freqs[idx]
            for p in pairwise(old):
                counts[p] -= f
                touched.add(p)
            for p in pairwise(new):
                counts[p] += f
                where.setdefault(p, set()).add(idx)
                touched.add(p)
            seqs[idx] = new
        counts.pop(pair, None)
        for p in touched:
            if counts.get(p, 0) > 0:
                heapq.heappush(heap, (-counts[p], p))
    return merges


def _merge_word(seq: list[str], pair: Pair, merged: str) -> list[str]:
    """Replace every non-overlapping occurrence of ``pair`` in ``seq`` (left to right)."""
    out: list[str] = []
    i = 0
    while i < len(seq):
        if i + 1 < len(seq) and seq[i] == pair[0] and seq[i + 1] == pair[1]:
            out.append(merged)
            i += 2
        else:
            out.append(seq[i])
            i += 1
    return out


def count_words(pieces: Iterable[str], end_of_word_suffix: str = "") -> Counter[tuple[str, ...]]:
    """Word counts keyed by initial symbols; a suffix (CLIP's ``</w>``) is glued to the last symbol."""
    words: Counter[tuple[str, ...]] = Counter()
    for piece in pieces:
        if not piece:
            continue
        symbols = list(piece)
        symbols[-1] += end_of_word_suffix
        words[tuple(symbols)] += 1
    return words
