"""CLIP-L and T5-XXL text encoders from the separate files Flux users have, with their tokenizers, offline.

The weight files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`, ...) use transformers' key names and carry
no config or tokenizer. Sizes come from the tensors' shapes, the rest from the shipped FLUX.1 configs.

Tokenizers: CLIP-L's is built from the CLIP BPE merges bundled with loratui. T5's SentencePiece vocabulary is
not bundled; it is looked up, in this order, in a tokenizer folder next to the T5 file or the transformer
(`t5_tokenizer/`, `tokenizer_2/`, or a folder holding `spiece.model` / `tokenizer.json`), then in the local
Hugging Face cache (FLUX.1 or T5 v1.1 XXL repositories, offline). When none is found the message says which
files are needed and where they come from.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from loratui.models.flux.detect import FluxFileError

#: config keys stored by loratui's own writers in a file's safetensors metadata (sizes shapes cannot tell)
CONFIG_METADATA = "loratui.config"

CLIP_TOKENIZER_DIRS = ("clip_tokenizer", "tokenizer")
T5_TOKENIZER_DIRS = ("t5_tokenizer", "tokenizer_2", "tokenizer")
#: (repository, subfolder) in the local Hugging Face cache that hold the T5-XXL tokenizer
T5_CACHED_REPOS = (
    ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
    ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
    ("google/t5-v1_1-xxl", ""),
    ("lodestones/Chroma", "tokenizer"),
)
#: rows of the real encoders' embeddings: these get the real tokenizers
CLIP_L_VOCAB = 49408
T5_XXL_VOCAB = 32128
# Keys that transformers' CLIPTextModel does not have but clip_l files carry.
_CLIP_EXTRA = (
    "text_projection.weight",
    "logit_scale",
    "text_model.embeddings.position_ids",
    "embeddings.position_ids",
)


def _count(keys, prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in keys if k.startswith(prefix)}
    return max(found) + 1 if found else 0


def _shape(shapes: Mapping[str, Any], key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise FluxFileError(f"{what}: the key {key!r} is missing")
    value = shapes[key]
    return tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))


def clip_config_from_shapes(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """`CLIPTextConfig` kwargs: sizes from the weights, the rest from `base` (heads: 64-wide unless `base`
    already fits the width)."""
    vocab, hidden = _shape(shapes, "embeddings.token_embedding.weight", "clip_l")
    config = dict(base)
    heads = int(config.get("num_attention_heads", 0))
    if not heads or hidden % heads or int(config.get("hidden_size", hidden)) != hidden:
        heads = max(1, hidden // 64)
    config.update(
        vocab_size=vocab,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=_count(shapes, "encoder.layers."),
        intermediate_size=_shape(shapes, "encoder.layers.0.mlp.fc1.weight", "clip_l")[0],
        max_position_embeddings=_shape(shapes, "embeddings.position_embedding.weight", "clip_l")[0],
    )
    if "text_projection.weight" in shapes:
        config["projection_dim"] = _shape(shapes, "text_projection.weight", "clip_l")[0]
    return config


def t5_config_from_shapes(shapes: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, Any]:
    """`T5Config` kwargs: sizes from the weights (heads from the relative attention bias), the rest from `base`."""
    embed = "shared.weight" if "shared.weight" in shapes else "encoder.embed_tokens.weight"
    vocab, d_model = _shape(shapes, embed, "t5xxl")
    buckets, heads = _shape(
        shapes, "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", "t5xxl"
    )
    inner = _shape(shapes, "encoder.block.0.layer.0.SelfAttention.q.weight", "t5xxl")[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    ff_key = "wi_0" if gated else "wi"
    config = dict(base)
    config.update(
        vocab_size=vocab,
        d_model=d_model,
        num_heads=heads,
        d_kv=inner // heads,
        d_ff=_shape(shapes, f"encoder.block.0.layer.1.DenseReluDense.{ff_key}.weight", "t5xxl")[0],
        num_layers=_count(shapes, "encoder.block."),
        relative_attention_num_buckets=buckets,
        feed_forward_proj=str(config.get("feed_forward_proj", "gated-gelu")) if gated else "relu",
    )
    return config


def stored_config(metadata: Mapping[str, str] | None, part: str) -> dict[str, Any]:
    """The config loratui's writer stored for `part` in a file's metadata, or {}."""
    raw = (metadata or {}).get(f"{CONFIG_METADATA}.{part}")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def clip_state(state: dict[str, Any]) -> dict[str, Any]:
    """A clip_l state dict in the bare names (`embeddings.`, `encoder.`, `final_layer_norm.`), without the keys
    CLIPTextModel does not have (projection, logit scale, position ids)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if k not in _CLIP_EXTRA}


def clip_state_for(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A bare-named CLIP state dict in the names `model` uses (`text_model.` before transformers 5)."""
    if any(k.startswith("text_model.") for k in model.state_dict()):
        return {f"text_model.{k}": v for k, v in state.items()}
    return state


def t5_state(state: dict[str, Any]) -> dict[str, Any]:
    """A t5xxl state dict with both embedding names present (the encoder's embedding is the shared one)."""
    state = dict(state)
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
    return state


# --- tokenizers ------------------------------------------------------------------------------------------


def _tokenizer_folders(places: list[Path], names: tuple[str, ...]) -> list[Path]:
    seen: list[Path] = []
    for place in places:
        for name in names:
            folder = place / name
            if folder.is_dir() and folder not in seen:
                seen.append(folder)
        if place.is_dir() and place not in seen:
            seen.append(place)
    return seen


def _is_t5_folder(folder: Path) -> bool:
    if (folder / "spiece.model").is_file():
        return True
    config = folder / "tokenizer_config.json"
    if config.is_file() and (folder / "tokenizer.json").is_file():
        try:
            return "T5" in str(json.loads(config.read_text("utf-8")).get("tokenizer_class", ""))
        except ValueError:
            return False
    return False


def _is_clip_folder(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def load_t5_tokenizer(places: list[Path], vocab_rows: int, max_length: int = 512) -> Any:
    """The T5 tokenizer from a folder next to the files or the local Hugging Face cache; `FluxFileError`
    naming what is needed when neither has it."""
    import transformers

    for folder in _tokenizer_folders(places, T5_TOKENIZER_DIRS):
        if _is_t5_folder(folder):
            try:
                tokenizer = transformers.T5TokenizerFast.from_pretrained(str(folder), local_files_only=True)
            except (ImportError, OSError, ValueError) as exc:
                raise FluxFileError(
                    f"the T5 tokenizer in {folder} could not be read ({str(exc).splitlines()[0][:160]}); a folder "
                    "with tokenizer.json + tokenizer_config.json (as in FLUX.1's tokenizer_2) needs no extra "
                    "package, spiece.model alone needs `pip install sentencepiece`"
                ) from exc
            _check_vocab(tokenizer, vocab_rows, folder, "t5xxl")
            return tokenizer
    if vocab_rows == T5_XXL_VOCAB:
        for repo, subfolder in T5_CACHED_REPOS:
            try:
                tokenizer = transformers.T5TokenizerFast.from_pretrained(
                    repo, subfolder=subfolder or None, local_files_only=True
                )
            except (OSError, ValueError):
                continue
            tokenizer.model_max_length = max(int(tokenizer.model_max_length or 0), max_length)
            return tokenizer
    where = ", ".join(str(p) for p in places)
    raise FluxFileError(
        "the T5-XXL tokenizer was not found: the t5xxl weight file carries no vocabulary. Put the tokenizer "
        f"files (spiece.model, or tokenizer.json + tokenizer_config.json) in a `t5_tokenizer` folder next to it "
        f"(looked in: {where}); they are the `tokenizer_2` folder of a FLUX.1-dev/schnell download "
        "(black-forest-labs on Hugging Face) or the files of google/t5-v1_1-xxl. A FLUX.1 download in the local "
        "Hugging Face cache is found without copying"
    )


def load_clip_tokenizer(places: list[Path], vocab_rows: int) -> Any:
    """CLIP-L's tokenizer: the bundled BPE vocabulary for the real encoder, else a folder next to the files."""
    import transformers

    for folder in _tokenizer_folders(places, CLIP_TOKENIZER_DIRS):
        if _is_clip_folder(folder):
            tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            _check_vocab(tokenizer, vocab_rows, folder, "clip_l")
            return tokenizer
    if vocab_rows == CLIP_L_VOCAB:
        from loratui.models.sd.loading import bundled_config_folder

        return transformers.CLIPTokenizer.from_pretrained(str(bundled_config_folder("sd15") / "tokenizer"))
    raise FluxFileError(
        f"clip_l: the text encoder has {vocab_rows} vocabulary rows, not CLIP-L's {CLIP_L_VOCAB}, and no CLIP "
        "tokenizer folder (vocab.json + merges.txt, named `clip_tokenizer`) is next to it"
    )


def _check_vocab(tokenizer: Any, vocab_rows: int, folder: Path, part: str) -> None:
    if len(tokenizer) > vocab_rows:
        raise FluxFileError(
            f"{part}: the tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only "
            f"{vocab_rows} embedding rows: it belongs to another model"
        )
