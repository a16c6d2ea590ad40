"""Tiny Llama causal LM with an offline byte-level BPE tokenizer (English + Chinese corpus)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.tiny_models.bpe import byte_alphabet, count_words, learn_bpe, read_corpus
from loratui.tiny_models.common import atomic_build, bundled_text, load_config, quiet_hf

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
MIN_VOCAB = 300
_BUNDLED = [
    ("configs", "llama.json"),
    ("configs", "llama_chat_template.jinja"),
    ("corpus", "en.txt"),
    ("corpus", "zh.txt"),
]


def build_tiny_llama(
    dest: Path,
    seed: int = 0,
    *,
    pad_token: bool = True,
    chat_template: bool = True,
    vocab_size: int = 1000,
) -> Path:
    """Build (or reuse) a tiny random-weight ``LlamaForCausalLM`` + tokenizer; returns its absolute path.

    Ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2, then ``<pad>`` 3 when ``pad_token`` (otherwise the
    tokenizer has no pad token, like the original Llama releases). ``chat_template`` adds a Llama-2
    style ``[INST]`` template. ``vocab_size`` is exact: the tokenizer and the embeddings have that many ids.
    """
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {MIN_VOCAB} (256 byte symbols + specials + merges)")
    settings = {
        "seed": seed,
        "pad_token": pad_token,
        "chat_template": chat_template,
        "vocab_size": vocab_size,
    }
    return atomic_build(
        dest,
        builder="build_tiny_llama",
        settings=settings,
        bundled=_BUNDLED,
        build=lambda tmp: _build(tmp, seed, pad_token, chat_template, vocab_size),
        kind="Llama causal language model",
    )


def chat_template_text() -> str:
    """The bundled Llama-2 style chat template (Jinja)."""
    return bundled_text("configs", "llama_chat_template.jinja").strip()


def make_llama_tokenizer(
    vocab_size: int, pad_token: bool, min_frequency: int = 2, corpus: list[str] | None = None
) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE learned on ``corpus`` (default: the bundled English + Chinese
    corpus).

    Never produces unknown tokens (every byte has an id). When the corpus yields fewer merges than
    ``vocab_size`` needs, the remaining ids are reserved special tokens ``<|reserved_N|>``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = [UNK, BOS, EOS] + ([PAD] if pad_token else [])
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = [
        piece for line in (corpus or read_corpus("en", "zh")) for piece, _ in pre.pre_tokenize_str(line)
    ]
    budget = vocab_size - len(specials) - 256
    merges = learn_bpe(count_words(pieces), budget, min_frequency=min_frequency)
    reserved = [f"<|reserved_{i}|>" for i in range(budget - len(merges))]
    tokens = specials + byte_alphabet() + [a + b for a, b in merges] + reserved
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise RuntimeError("generated Llama vocabulary has duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, vocab[BOS])]
            ),
        ]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + reserved])
    return tok


def _build(tmp: Path, seed: int, pad_token: bool, chat_template: bool, vocab_size: int) -> None:
    with quiet_hf("transformers"):
        import torch
        import transformers

        config = load_config("llama")
        backend = make_llama_tokenizer(vocab_size, pad_token, config["tokenizer"]["min_frequency"])
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=BOS,
            eos_token=EOS,
            unk_token=UNK,
            pad_token=PAD if pad_token else None,
            model_max_length=config["tokenizer"]["model_max_length"],
            padding_side="right",
            clean_up_tokenization_spaces=False,
        )
        if chat_template:
            tokenizer.chat_template = chat_template_text()

        model_config = transformers.LlamaConfig(
            **config["model"],
            vocab_size=vocab_size,
            bos_token_id=backend.token_to_id(BOS),
            eos_token_id=backend.token_to_id(EOS),
            pad_token_id=backend.token_to_id(PAD) if pad_token else None,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.LlamaForCausalLM(model_config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    _portable_tokenizer_config(tmp, tokenizer.chat_template if chat_template else None)


def _portable_tokenizer_config(folder: Path, chat_template: str | None) -> None:
    """Make ``tokenizer_config.json`` readable by older ``transformers`` too.

    Newer releases write the chat template to ``chat_template.jinja``; older ones only read it from
    ``tokenizer_config.json``, so it goes in both. The generic fast-tokenizer class name is used.
    """
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text("utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        data["chat_template"] = chat_template
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
