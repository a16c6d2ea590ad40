"""Tiny BLIP image captioner (``BlipForConditionalGeneration`` + ``BlipProcessor``) built offline."""

from __future__ import annotations

import json
import shutil
import string
from collections import Counter
from pathlib import Path

from loratui.tiny_models.bpe import read_corpus
from loratui.tiny_models.common import atomic_build, load_config, quiet_hf

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
#: BLIP's decoder start token and its encoder token; like the real checkpoint they are the last ids.
DEC, ENC = "[DEC]", "[ENC]"
_BUNDLED = [("configs", "blip.json"), ("corpus", "en.txt")]


def build_tiny_blip(dest: Path, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight BLIP captioner + processor folder; returns its absolute path.

    Loads offline with ``BlipProcessor.from_pretrained(dest)`` and
    ``BlipForConditionalGeneration.from_pretrained(dest)``; images are resized to 64x64.
    """
    return atomic_build(
        dest,
        builder="build_tiny_blip",
        settings={"seed": seed},
        bundled=_BUNDLED,
        build=lambda tmp: _build(tmp, seed),
        kind="BLIP image-captioning",
    )


def blip_vocab() -> list[str]:
    """WordPiece vocabulary: specials, ASCII characters, ``##`` continuations, corpus words, [DEC], [ENC].

    Any lowercase ASCII text tokenizes without ``[UNK]`` (unknown words fall back to characters).
    """
    from tokenizers import normalizers, pre_tokenizers

    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=None, handle_chinese_chars=True)
    pre = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in read_corpus("en"):
        counts.update(piece for piece, _ in pre.pre_tokenize_str(norm.normalize_str(line)))
    chars = list(string.punctuation + string.digits + string.ascii_lowercase)
    tokens = SPECIALS + chars + ["##" + c for c in string.digits + string.ascii_lowercase]
    seen = set(tokens)
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        if word not in seen:
            tokens.append(word)
            seen.add(word)
    return tokens + [DEC, ENC]


def write_bert_tokenizer(dest: Path, model_max_length: int) -> Path:
    """Write vocab.txt + tokenizer configs in the layout of BLIP's BERT tokenizer."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "vocab.txt").write_text("".join(t + "\n" for t in blip_vocab()), encoding="utf-8")
    special = {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "bos_token": DEC,
        "additional_special_tokens": [ENC],
    }
    config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": True,
        **special,
    }
    for name, data in (("tokenizer_config.json", config), ("special_tokens_map.json", special)):
        (dest / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return dest


def _build(tmp: Path, seed: int) -> None:
    with quiet_hf("transformers"):
        import torch
        import transformers

        config = load_config("blip")
        scratch = write_bert_tokenizer(tmp / ".tokenizer", config["tokenizer"]["model_max_length"])
        tokenizer = transformers.BertTokenizer.from_pretrained(scratch)
        image_processor_cls = (
            getattr(transformers, "BlipImageProcessorPil", None) or transformers.BlipImageProcessor
        )
        processor = transformers.BlipProcessor(
            image_processor=image_processor_cls(**config["image_processor"]), tokenizer=tokenizer
        )

        vocab = tokenizer.get_vocab()
        text_config = {
            **config["model"]["text_config"],
            "vocab_size": len(vocab),
            "bos_token_id": vocab[DEC],
            "pad_token_id": vocab["[PAD]"],
            "sep_token_id": vocab["[SEP]"],
            "eos_token_id": vocab["[SEP]"],
        }
        model_config = transformers.BlipConfig(
            **{k: v for k, v in config["model"].items() if k not in ("text_config", "vision_config")},
            text_config=text_config,
            vision_config=config["model"]["vision_config"],
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.BlipForConditionalGeneration(model_config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        # Keep the classic files next to what this transformers version wrote (older versions read them).
        if not (tmp / "preprocessor_config.json").exists():
            processor.image_processor.save_pretrained(tmp)
    for name in ("vocab.txt", "special_tokens_map.json"):
        if not (tmp / name).exists():
            shutil.copy2(scratch / name, tmp / name)
    shutil.rmtree(scratch)
    _drop_load_time_keys(tmp / "tokenizer_config.json")


def _drop_load_time_keys(path: Path) -> None:
    """Remove loader arguments that ``from_pretrained`` leaked into the saved tokenizer config."""
    data = json.loads(path.read_text("utf-8"))
    for key in ("is_local", "local_files_only", "name_or_path", "_commit_hash"):
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
