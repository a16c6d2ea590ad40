"""Tiny Stable Diffusion pipelines (SD 1.x, SD 2.x v-prediction, SDXL) with the real block layouts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from loratui.tiny_models.clip_tokenizer import BOS, EOS, clip_vocab, write_clip_tokenizer
from loratui.tiny_models.common import atomic_build, load_config, quiet_hf

#: family -> bundled config name and human-readable kind (for the label file).
SD_FAMILIES: dict[str, str] = {
    "sd15": "Stable Diffusion 1.5",
    "sd2-v": "Stable Diffusion 2.x (768-v, v-prediction)",
    "sdxl": "Stable Diffusion XL base",
}


def build_tiny_sd(dest: Path, family: str = "sd15", seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight diffusers pipeline folder; returns its absolute path.

    ``family`` is one of ``sd15``, ``sd2-v``, ``sdxl``. The folder loads offline with
    ``StableDiffusionPipeline.from_pretrained`` (``StableDiffusionXLPipeline`` for ``sdxl``).
    """
    if family not in SD_FAMILIES:
        raise ValueError(f"unknown SD family {family!r}; expected one of {sorted(SD_FAMILIES)}")
    config = load_config(family)
    check_sd_config(config)
    return atomic_build(
        dest,
        builder="build_tiny_sd",
        settings={"family": family, "seed": seed},
        bundled=[("configs", f"{family}.json"), ("corpus", "en.txt")],
        build=lambda tmp: _build_quietly(tmp, config, seed),
        kind=SD_FAMILIES[family],
    )


def check_sd_config(config: dict[str, Any]) -> None:
    """Raise ValueError when the bundled UNet and text-encoder widths do not fit together."""
    unet = config["unet"]
    hidden = config["text_encoder"]["config"]["hidden_size"]
    if "text_encoder_2" in config:
        te2 = config["text_encoder_2"]["config"]
        hidden += te2["hidden_size"]
        expected = 6 * unet["addition_time_embed_dim"] + te2["projection_dim"]
        if unet["projection_class_embeddings_input_dim"] != expected:
            raise ValueError(f"projection_class_embeddings_input_dim should be {expected}")
    if unet["cross_attention_dim"] != hidden:
        raise ValueError(f"cross_attention_dim should be {hidden} (sum of the text encoders' hidden sizes)")


def _build_quietly(tmp: Path, config: dict[str, Any], seed: int) -> None:
    with quiet_hf("transformers", "diffusers"):
        _build(tmp, config, seed)


def _build(tmp: Path, config: dict[str, Any], seed: int) -> None:
    import diffusers
    import torch
    import transformers

    vocab, _ = clip_vocab()
    components: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        components["unet"] = diffusers.UNet2DConditionModel(**config["unet"])
        torch.manual_seed(seed + 1)
        components["vae"] = diffusers.AutoencoderKL(**config["vae"])
        for offset, name in enumerate(("text_encoder", "text_encoder_2"), start=2):
            if name not in config:
                continue
            spec = config[name]
            pad = config["tokenizer" + name.removeprefix("text_encoder")]["pad_token"]
            te_config = transformers.CLIPTextConfig(
                **spec["config"],
                vocab_size=len(vocab),
                bos_token_id=vocab[BOS],
                eos_token_id=vocab[EOS],
                pad_token_id=vocab[pad],
            )
            torch.manual_seed(seed + offset)
            components[name] = getattr(transformers, spec["class"])(te_config).eval()
    scheduler_spec = config["scheduler"]
    components["scheduler"] = getattr(diffusers, scheduler_spec["class"]).from_config(
        scheduler_spec["config"]
    )

    scratch = tmp / ".tokenizers"
    for name in ("tokenizer", "tokenizer_2"):
        if name in config:
            folder = write_clip_tokenizer(scratch / name, pad_token=config[name]["pad_token"])
            components[name] = transformers.CLIPTokenizer.from_pretrained(folder)

    if config["pipeline"] == "StableDiffusionXLPipeline":
        pipe = diffusers.StableDiffusionXLPipeline(**components, add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(tmp, safe_serialization=True)
    # Replace the library-version-specific tokenizer files with the classic SD layout
    # (vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json).
    for name in ("tokenizer", "tokenizer_2"):
        if name in config:
            shutil.rmtree(tmp / name)
            shutil.move(str(scratch / name), tmp / name)
    shutil.rmtree(scratch)
