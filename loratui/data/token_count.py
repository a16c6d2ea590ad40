"""Token counts for captions (CLIP) and text records, with a local tokenizer or a stated approximation.

Tokenizers are only ever loaded from local folders (``local_files_only=True``); nothing is downloaded.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loratui.data.text_dataset import TextRecord

#: CLIP's context: 75 text tokens + begin/end tokens.
CLIP_MAX_TOKENS = 77
CLIP_APPROXIMATION = (
    "approximate count (no tokenizer): one token per word of up to 7 letters, more for longer words, one per "
    "digit and punctuation mark, plus 2 for the begin/end tokens"
)
TEXT_APPROXIMATION = "approximate count (no tokenizer): characters / 4 plus 4 per chat message"

_CLIP_PIECES = re.compile(r"[^\W\d_]+|\d|[^\w\s]", re.UNICODE)


def approx_clip_tokens(text: str) -> int:
    """Rough CLIP BPE token count including begin/end tokens."""
    n = 0
    for piece in _CLIP_PIECES.findall(text.lower()):
        n += 1 if len(piece) <= 7 else math.ceil(len(piece) / 5)
    return n + 2


def approx_text_tokens(record: TextRecord) -> int:
    """Rough LLM token count of a record."""
    if record.messages is None:
        return math.ceil(len(record.text or "") / 4)
    return sum(math.ceil(len(m.content) / 4) + 4 for m in record.messages)


def load_local_tokenizer(path: str | Path, *, trust_remote_code: bool = False) -> tuple[Any | None, str]:
    """(tokenizer, "") or (None, reason). Only local files are read; code shipped with the folder
    (``auto_map``) runs only with ``trust_remote_code``, and nothing ever asks on stdin."""
    from loratui.data.model_paths import REMOTE_CODE_HINT, shipped_code

    path = Path(path)
    if not path.is_dir():
        return None, f"{path} is not a local folder"
    code = None if trust_remote_code else shipped_code(path)
    if code:
        return None, f"{path} ships its own code ({code}); {REMOTE_CODE_HINT}"
    try:
        import transformers
        from transformers import AutoTokenizer

        transformers.logging.set_verbosity_error()
        tokenizer = AutoTokenizer.from_pretrained(
            str(path), local_files_only=True, trust_remote_code=trust_remote_code
        )
        return tokenizer, ""
    except Exception as exc:  # any loading problem: fall back to the approximation
        return None, f"cannot load a tokenizer from {path}: {type(exc).__name__}: {str(exc)[:200]}"


def clip_token_counts(captions: Sequence[str], tokenizer: Any | None) -> list[int]:
    """Token counts (with begin/end tokens) for each caption."""
    if tokenizer is None:
        return [approx_clip_tokens(c) for c in captions]
    counts: list[int] = []
    for start in range(0, len(captions), 1024):
        batch = list(captions[start : start + 1024])
        enc = tokenizer(batch, add_special_tokens=True, truncation=False)
        counts += [len(ids) for ids in enc["input_ids"]]
    return counts


def text_token_counts(records: Sequence[TextRecord], tokenizer: Any | None) -> list[int]:
    """Token counts per record: the chat template when the tokenizer has one, else the joined contents."""
    if tokenizer is None:
        return [approx_text_tokens(r) for r in records]
    has_template = bool(getattr(tokenizer, "chat_template", None))
    texts: list[tuple[str, bool]] = []  # (text, add special tokens)
    for r in records:
        if r.messages is not None and has_template:
            msgs = [{"role": m.role, "content": m.content} for m in r.messages]
            try:
                texts.append((tokenizer.apply_chat_template(msgs, tokenize=False), False))
                continue
            except Exception:
                pass  # templates that reject e.g. system messages: fall back to plain text
        texts.append((r.plain_text(), True))
    counts = [0] * len(texts)
    for special in (True, False):
        idx = [i for i, (_, s) in enumerate(texts) if s is special]
        for start in range(0, len(idx), 512):
            chunk = idx[start : start + 512]
            enc = tokenizer([texts[i][0] for i in chunk], add_special_tokens=special, truncation=False)
            for i, ids in zip(chunk, enc["input_ids"], strict=True):
                counts[i] = len(ids)
    return counts
