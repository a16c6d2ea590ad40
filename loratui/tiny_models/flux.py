"""Tiny FLUX.1 dev / schnell and Chroma pipelines: the real architecture configs at tiny widths.

The shipped architecture configs (``loratui/models/flux/configs``) give the classes and every setting; the
bundled ``configs/flux.json`` overrides only the widths and depths. The folders are diffusers pipeline folders
(``FluxPipeline`` / ``ChromaPipeline``, saved with ``save_pretrained``) with offline tokenizers: the tiny CLIP
BPE tokenizer and a tiny T5 Unigram tokenizer.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

from loratui.tiny_models.clip_tokenizer import BOS, EOS, clip_vocab, write_clip_tokenizer
from loratui.tiny_models.common import atomic_build, load_config, quiet_hf
from loratui.tiny_models.t5_tokenizer import t5_vocab_size, write_t5_tokenizer

#: variant -> (architecture config name, human-readable kind for the label file)
FLUX_VARIANTS: dict[str, tuple[str, str]] = {
    "dev": ("flux1-dev", "FLUX.1-dev (guidance-distilled, guidance embedding)"),
    "schnell": ("flux1-schnell", "FLUX.1-schnell (timestep-distilled)"),
    "chroma": ("chroma", "Chroma (Flux-schnell-derived, T5 only)"),
}


def architecture_config(name: str) -> dict[str, Any]:
    """A shipped FLUX architecture config (``loratui/models/flux/configs/<name>.json``)."""
    text = resources.files("loratui.models.flux").joinpath("configs", f"{name}.json").read_text("utf-8")
    return json.loads(text)


def tiny_flux_config(variant: str) -> dict[str, Any]:
    """The architecture config of `variant` with the tiny widths applied (classes and kwargs)."""
    if variant not in FLUX_VARIANTS:
        raise ValueError(f"unknown Flux variant {variant!r}; expected one of {sorted(FLUX_VARIANTS)}")
    config = architecture_config(FLUX_VARIANTS[variant][0])
    tiny = load_config("flux")
    transformer = config["transformer"]["config"]
    transformer.update({k: v for k, v in tiny["transformer"].items() if k in transformer})
    config["vae"] = {**config["vae"], **tiny["vae"]}
    clip_key = "text_encoder" if variant != "chroma" else None
    t5_key = "text_encoder_2" if variant != "chroma" else "text_encoder"
    if clip_key:
        config[clip_key]["config"].update(tiny["clip"])
    config[t5_key]["config"].update(tiny["t5"])
    config["t5_max_length"] = tiny["t5_max_length"][variant]
    return config


def build_tiny_flux(dest: Path, variant: str = "dev", seed: int = 0) -> Path:
    """Build (or reuse) a tiny random-weight Flux pipeline folder; returns its absolute path.

    ``variant`` is ``dev`` (guidance embedding), ``schnell`` or ``chroma``. The folder loads offline with
    ``FluxPipeline.from_pretrained`` (``ChromaPipeline`` for ``chroma``)."""
    config = tiny_flux_config(variant)
    name = FLUX_VARIANTS[variant][0]
    return atomic_build(
        dest,
        builder="build_tiny_flux",
        settings={"variant": variant, "seed": seed},
        bundled=[("configs", "flux.json"), ("corpus", "en.txt")],
        build=lambda tmp: _build_quietly(tmp, config, variant, seed),
        kind=f"{FLUX_VARIANTS[variant][1]}, from {name}.json",
    )


def _build_quietly(tmp: Path, config: dict[str, Any], variant: str, seed: int) -> None:
    with quiet_hf("transformers", "diffusers"):
        _build(tmp, config, variant, seed)


def _build(tmp: Path, config: dict[str, Any], variant: str, seed: int) -> None:
    import diffusers
    import torch
    import transformers

    chroma = variant == "chroma"
    t5_key = "text_encoder" if chroma else "text_encoder_2"
    components: dict[str, Any] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        spec = config["transformer"]
        components["transformer"] = getattr(diffusers, spec["class"])(**spec["config"])
        torch.manual_seed(seed + 1)
        components["vae"] = diffusers.AutoencoderKL(**config["vae"])
        if not chroma:
            vocab, _ = clip_vocab()
            clip_config = transformers.CLIPTextConfig(
                **{
                    **config["text_encoder"]["config"],
                    "vocab_size": len(vocab),
                    "bos_token_id": vocab[BOS],
                    "eos_token_id": vocab[EOS],
                    "pad_token_id": vocab[EOS],
                }
            )
            torch.manual_seed(seed + 2)
            components["text_encoder"] = transformers.CLIPTextModel(clip_config).eval()
        t5_config = transformers.T5Config(**{**config[t5_key]["config"], "vocab_size": t5_vocab_size()})
        torch.manual_seed(seed + 3)
        components[t5_key] = transformers.T5EncoderModel(t5_config).eval()
    scheduler_spec = config["scheduler"]
    components["scheduler"] = getattr(diffusers, scheduler_spec["class"]).from_config(
        scheduler_spec["config"]
    )
    scratch = tmp / ".tokenizers"
    t5_tokenizer_key = "tokenizer" if chroma else "tokenizer_2"
    t5_folder = write_t5_tokenizer(scratch / t5_tokenizer_key, config["t5_max_length"])
    components[t5_tokenizer_key] = transformers.T5TokenizerFast.from_pretrained(str(t5_folder))
    if not chroma:
        clip_folder = write_clip_tokenizer(scratch / "tokenizer")
        components["tokenizer"] = transformers.CLIPTokenizer.from_pretrained(str(clip_folder))
        pipe = diffusers.FluxPipeline(**components)
    else:
        pipe = diffusers.ChromaPipeline(**components)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # the plain tokenizer files, not this library version's output
        if (scratch / name).is_dir():
            shutil.rmtree(tmp / name, ignore_errors=True)
            shutil.move(str(scratch / name), tmp / name)
    shutil.rmtree(scratch)
    (tmp / "loratui_flux.json").write_text(
        json.dumps({"variant": variant, "t5_max_length": config["t5_max_length"]}, indent=2) + "\n",
        encoding="utf-8",
    )
