"""Offline CLIP tokenizer files (vocab.json, merges.txt, tokenizer configs) laid out like Stable Diffusion's.

The vocabulary follows CLIP's construction exactly: the 256 byte symbols, the same 256 with ``</w>``,
one token per merge (learned on the bundled English corpus), then ``<|startoftext|>`` and
``<|endoftext|>`` as the two last ids.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

from loratui.tiny_models.bpe import Pair, byte_alphabet, count_words, learn_bpe, read_corpus

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
MODEL_MAX_LENGTH = 77
#: Upper bound on learned merges; the bundled corpus yields fewer (see ``clip_vocab``).
MAX_MERGES = 1500
# CLIP's pre-tokenization pattern (words, single digits, punctuation runs, contractions).
_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _pretokenize(lines: list[str]) -> list[str]:
    """CLIP normalisation + split + byte-level mapping, via the ``tokenizers`` primitives."""
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    pieces: list[str] = []
    for line in lines:
        pieces.extend(piece for piece, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    return pieces


@lru_cache(maxsize=1)
def clip_vocab() -> tuple[dict[str, int], tuple[Pair, ...]]:
    """(vocab, merges) of the tiny CLIP tokenizer; deterministic, built from ``corpus/en.txt``."""
    words = count_words(_pretokenize(read_corpus("en")), end_of_word_suffix="</w>")
    merges = learn_bpe(words, MAX_MERGES, min_frequency=2)
    alphabet = byte_alphabet()
    tokens = alphabet + [s + "</w>" for s in alphabet] + [a + b for a, b in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):  # a merge can never recreate a base symbol, but check anyway
        raise RuntimeError("duplicate token in generated CLIP vocabulary")
    return vocab, tuple(merges)


def clip_vocab_size() -> int:
    """Number of ids in the tiny CLIP vocabulary (the text encoders' ``vocab_size``)."""
    return len(clip_vocab()[0])


def write_clip_tokenizer(dest: Path, pad_token: str = EOS) -> Path:
    """Write a CLIP tokenizer folder loadable by ``CLIPTokenizer.from_pretrained(dest)``.

    ``pad_token`` is ``<|endoftext|>`` for SD 1.x and ``!`` for SD 2.x and SDXL's ``tokenizer_2``.
    """
    vocab, merges = clip_vocab()
    if pad_token not in vocab:
        raise ValueError(f"pad token {pad_token!r} is not in the vocabulary")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges_text = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    (dest / "merges.txt").write_text(merges_text, encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": pad_token}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(dest / "special_tokens_map.json", special)
    return dest


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
