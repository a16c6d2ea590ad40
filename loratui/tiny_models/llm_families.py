"""Tiny causal LMs of current model families (Llama 3.x, Qwen2.5, Qwen3, Qwen3-MoE, Gemma 2/3, Mistral, Phi-3).

Each is built from the family's real transformers config class (tiny widths, same module names), with a
byte-level BPE tokenizer learned offline on the bundled corpus plus the family's special tokens, and the
family's chat template (``configs/chat_templates/``), so ``apply_chat_template`` renders the family's format.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from loratui.tiny_models.bpe import byte_alphabet, count_words, learn_bpe, read_corpus
from loratui.tiny_models.common import atomic_build, bundled_text, load_config, quiet_hf

CONFIG_NAME = "llm_families"
VOCAB_SIZE = 1000


def llm_families() -> dict[str, dict[str, Any]]:
    """family -> its bundled settings (config class, tokenizer, template, model widths)."""
    return {k: v for k, v in load_config(CONFIG_NAME).items() if not k.startswith("_")}


LLM_FAMILIES: tuple[str, ...] = tuple(llm_families())


def family_template(family: str) -> str:
    """The family's chat template (Jinja) as bundled."""
    return bundled_text("configs", "chat_templates", llm_families()[_known(family)]["template"])


def build_tiny_llm(dest: Path, family: str, seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight causal LM of ``family`` (see ``LLM_FAMILIES``); returns its path."""
    spec = llm_families()[_known(family)]
    bundled = [("configs", f"{CONFIG_NAME}.json"), ("configs", "chat_templates", spec["template"])]
    bundled += [("corpus", "en.txt"), ("corpus", "zh.txt")]
    return atomic_build(
        dest,
        builder="build_tiny_llm",
        settings={"family": family, "seed": seed, "vocab_size": VOCAB_SIZE},
        bundled=bundled,
        build=lambda tmp: _build(tmp, family, spec, seed),
        kind=spec["kind"],
    )


def _known(family: str) -> str:
    if family not in LLM_FAMILIES:
        raise ValueError(f"unknown LLM family {family!r}; expected one of {', '.join(LLM_FAMILIES)}")
    return family


@lru_cache(maxsize=4)
def _merges(budget: int, min_frequency: int = 2) -> tuple[tuple[str, str], ...]:
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = [piece for line in read_corpus("en", "zh") for piece, _ in pre.pre_tokenize_str(line)]
    return tuple(learn_bpe(count_words(pieces), budget, min_frequency=min_frequency))


def make_family_tokenizer(settings: dict[str, Any], vocab_size: int = VOCAB_SIZE) -> Any:
    """A ``tokenizers.Tokenizer``: byte-level BPE on the bundled corpus with the family's special tokens first
    (ids 0..), then the 256 byte symbols, the merges and reserved tokens up to ``vocab_size``. A BOS token is
    prepended on encoding when ``add_bos``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    specials = list(settings["specials"])
    added = list(settings.get("added", []))
    budget = vocab_size - len(specials) - len(added) - 256
    merges = list(_merges(budget))
    reserved = [f"<|reserved_{i}|>" for i in range(budget - len(merges))]
    tokens = specials + added + byte_alphabet() + [a + b for a, b in merges] + reserved
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise RuntimeError("generated vocabulary has duplicate tokens")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    steps: list[Any] = [processors.ByteLevel(trim_offsets=False)]
    bos = settings.get("bos")
    if settings.get("add_bos") and bos:
        steps.append(
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, vocab[bos])]
            )
        )
    tok.post_processor = processors.Sequence(steps)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials + reserved])
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return tok


def _build(tmp: Path, family: str, spec: dict[str, Any], seed: int) -> None:
    with quiet_hf("transformers"):
        import torch
        import transformers

        settings = spec["tokenizer"]
        backend = make_family_tokenizer(settings)
        tokenizer = transformers.PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token=settings.get("bos"),
            eos_token=settings["eos"],
            unk_token=settings.get("unk"),
            pad_token=settings.get("pad"),
            model_max_length=2048,
            padding_side="right",
            clean_up_tokenization_spaces=False,
        )
        tokenizer.chat_template = family_template(family)

        def token_id(key: str) -> int | None:
            name = settings.get(key)
            return backend.token_to_id(name) if name else None

        config_class = getattr(transformers, spec["config_class"])
        model_config = config_class(
            **spec["model"],
            vocab_size=VOCAB_SIZE,
            bos_token_id=token_id("bos"),
            eos_token_id=token_id("eos"),
            pad_token_id=token_id("pad"),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = getattr(transformers, spec["model_class"])(model_config).eval()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    path = tmp / "tokenizer_config.json"
    data = json.loads(path.read_text("utf-8"))
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    data["chat_template"] = tokenizer.chat_template
    data["add_bos_token"] = bool(settings.get("add_bos"))
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
