"""Tokenizer metadata for a merged GGUF model (`tokenizer.ggml.*` and `tokenizer.chat_template`).

From a Hugging Face folder: byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) as `gpt2` with merges;
SentencePiece-style tokenizers (Llama 2, Mistral, Gemma, Phi-3: `tokenizer.json` with byte fallback, or
`tokenizer.model`) as `llama` with scores. Token types: added special tokens are control tokens, other added
tokens user-defined, ids the model has but the tokenizer lacks are unused `[PAD{id}]` tokens. Special token ids,
add-bos/eos flags and merges come from the `gguf` package's `SpecialVocab`. From a GGUF base the `tokenizer.*`
keys are copied.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.models.llm.adapter_files import ExportError

# llama.cpp's pre-tokenizer names for byte-level BPE tokenizers, by GGUF architecture.
PRE_TOKENIZERS = {"qwen2": "qwen2", "qwen3": "qwen2", "qwen2moe": "qwen2", "qwen3moe": "qwen2"}


def _gpt2_tokens(tokenizer_json: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    import gguf

    by_id: dict[int, tuple[str, int]] = {
        i: (t, gguf.TokenType.NORMAL) for t, i in tokenizer_json["model"]["vocab"].items()
    }
    for added in tokenizer_json.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    size = max(n_vocab, max(by_id) + 1)
    tokens, types = [], []
    for i in range(size):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return tokens, types


def _pad_scored(vocab: Any, n_vocab: int) -> tuple[list[bytes], list[float], list[int]]:
    import gguf

    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(float(score))
        types.append(int(kind))
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return tokens, scores, types


def _sentencepiece_vocab(folder: Path, data: dict[str, Any] | None) -> Any:
    """SentencePiece-style vocabulary with scores: `tokenizer.model` when sentencepiece can read it (the model's own
    scores), else `tokenizer.json` (BPE with byte fallback) with scores by merge order (-id, as SentencePiece BPE
    numbers its pieces in merge order; llama.cpp only compares them)."""
    import gguf

    model = (data or {}).get("model") or {}
    if (folder / "tokenizer.model").is_file():
        try:
            return gguf.SentencePieceVocab(folder)
        except (RuntimeError, ImportError) as exc:  # sentencepiece missing
            if model.get("type") != "BPE":
                raise ExportError(
                    f"{folder / 'tokenizer.model'} needs the sentencepiece package: pip install sentencepiece"
                ) from exc
    if model.get("type") != "BPE":
        found = model.get("type") or "no tokenizer.json or tokenizer.model"
        raise ExportError(
            f"cannot write the tokenizer of {folder} to GGUF ({found}); supported: byte-level BPE and "
            "SentencePiece-style tokenizers"
        )
    try:
        vocab = gguf.LlamaHfVocab(folder)
    except (FileNotFoundError, TypeError) as exc:
        raise ExportError(f"cannot write the tokenizer of {folder} to GGUF: {exc}") from exc
    return _RankScored(vocab)


class _RankScored:
    """`LlamaHfVocab` tokens with scores by merge order (its own scores are a constant placeholder)."""

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab

    def all_tokens(self) -> Any:
        import gguf

        for i, (text, _, kind) in enumerate(self.vocab.all_tokens()):
            yield text, (-float(i) if kind == gguf.TokenType.NORMAL else 0.0), kind


def add_vocab_from_folder(
    writer: Any, folder: Path, *, arch: str, n_vocab: int, chat_template: str | None
) -> str:
    """Write the tokenizer of an HF model folder; returns the GGUF tokenizer model name (gpt2 | llama)."""
    import gguf

    folder = Path(folder)
    tok_file = folder / "tokenizer.json"
    data = json.loads(tok_file.read_text(encoding="utf-8")) if tok_file.is_file() else None
    model = (data or {}).get("model") or {}
    if data is not None and model.get("type") == "BPE" and not model.get("byte_fallback"):
        tokens, types = _gpt2_tokens(data, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(
            "llama-bpe"
            if arch == "llama" and model.get("ignore_merges")
            else PRE_TOKENIZERS.get(arch, "default")
        )
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        kind = "gpt2"
    else:
        tokens_b, scores, types = _pad_scored(_sentencepiece_vocab(folder, data), n_vocab)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens_b)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        kind = "llama"
    special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=len(types))
    if chat_template:
        special.chat_template = chat_template
    special.add_to_gguf(writer, quiet=True)
    return kind


def add_vocab_from_gguf(writer: Any, gguf_path: Path, *, chat_template: str | None) -> str:
    """Copy the `tokenizer.*` keys of a GGUF base (the chat template replaced when given)."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    kind = "llama"
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.") or (chat_template and name == gguf.Keys.Tokenizer.CHAT_TEMPLATE):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(name, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(name, value, vtype)
        if name == gguf.Keys.Tokenizer.MODEL:
            kind = str(value)
    if chat_template:
        writer.add_chat_template(chat_template)
    return kind
