"""Load a Flux-family base model offline into `FluxParts`.

A diffusers pipeline folder (``FluxPipeline`` or ``ChromaPipeline`` layout, safetensors weights) is read
here; a single-file transformer (original BFL layout, with `vae`/`clip_l`/`t5xxl` files beside it) goes to
`loratui.models.flux.single_file.load_flux_single_file`. Nothing touches the network.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.models.flux.parts import FluxParts


class FluxLoadError(ValueError):
    """A Flux base model that cannot be loaded; the message says what is missing and what to do."""


def folder_variant(folder: Path) -> str:
    """dev, schnell or chroma from a diffusers folder's model_index.json and transformer config."""
    index = _read_json(folder / "model_index.json")
    transformer = _read_json(folder / "transformer" / "config.json")
    name = str(index.get("_class_name", "")) + str(transformer.get("_class_name", ""))
    if "Chroma" in name:
        return "chroma"
    if "Flux" not in name:
        raise FluxLoadError(
            f"{folder} is not a Flux pipeline folder (model_index.json names {index.get('_class_name')!r}); "
            "give a FluxPipeline/ChromaPipeline folder or the transformer's .safetensors file"
        )
    return "dev" if transformer.get("guidance_embeds") else "schnell"


def load_flux(
    base_model: str | Path,
    *,
    vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    t5xxl: str | Path | None = None,
    dtype: Any = None,
    device: Any = "cpu",
    fp8_weights: bool = False,
) -> FluxParts:
    """Load a diffusers folder or a single-file transformer (with its separate files) as `FluxParts`.

    Weights load in `dtype` (default float32), frozen (`requires_grad` off) and in eval mode. `fp8_weights`:
    an fp8 single file's float8 matrices stay float8 (for `base_weights_dtype: fp8`, which stores them so)
    instead of being widened to `dtype` and rounded back."""
    import torch

    dtype = dtype or torch.float32
    path = Path(base_model).expanduser()
    if path.is_file():
        parts = _load_single_file(
            path, vae=vae, clip_l=clip_l, t5xxl=t5xxl, dtype=dtype, device=device, fp8_weights=fp8_weights
        )
    elif path.is_dir():
        given = [k for k, v in (("vae", vae), ("clip_l", clip_l), ("t5xxl", t5xxl)) if v]
        if given:
            raise FluxLoadError(
                f"{', '.join(given)} name separate files, which go with a single-file transformer; "
                f"{path} is a diffusers folder that has its own (leave {', '.join(given)} out)"
            )
        parts = load_flux_folder(path, dtype=dtype, device=device)
    else:
        raise FluxLoadError(f"base_model not found: {path}")
    for module in parts.modules().values():
        module.requires_grad_(False)
        module.eval()
    return parts


def load_flux_for_config(cfg: Any, *, dtype: Any = None, device: Any = "cpu") -> FluxParts:
    """`load_flux` with the config's `base_model`, `vae`, `clip_l` and `t5xxl`."""
    return load_flux(
        cfg.base_model,
        vae=getattr(cfg, "vae", None),
        clip_l=getattr(cfg, "clip_l", None),
        t5xxl=getattr(cfg, "t5xxl", None),
        dtype=dtype,
        device=device,
        fp8_weights=getattr(cfg, "base_weights_dtype", "bf16") == "fp8",
    )


def load_flux_folder(folder: Path, *, dtype: Any, device: Any = "cpu") -> FluxParts:
    """A diffusers FluxPipeline / ChromaPipeline folder (safetensors only)."""
    import diffusers
    import transformers

    from loratui.tiny_models.common import quiet_hf

    variant = folder_variant(folder)
    chroma = variant == "chroma"
    t5_name, t5_tok_name = ("text_encoder", "tokenizer") if chroma else ("text_encoder_2", "tokenizer_2")
    needed = ["transformer", "vae", t5_name, t5_tok_name, "scheduler"]
    needed += [] if chroma else ["text_encoder", "tokenizer"]
    missing = [name for name in needed if not (folder / name).is_dir()]
    if missing:
        what = "the T5-XXL text encoder" if t5_name in missing else ", ".join(missing)
        raise FluxLoadError(
            f"{folder} lacks {what} (missing subfolders: {', '.join(missing)}); a complete {variant} "
            "pipeline folder has transformer, vae, text encoder(s), tokenizer(s) and scheduler"
        )
    common = {"torch_dtype": dtype, "use_safetensors": True}
    with quiet_hf("transformers", "diffusers"):
        transformer_cls = diffusers.ChromaTransformer2DModel if chroma else diffusers.FluxTransformer2DModel
        transformer = transformer_cls.from_pretrained(folder / "transformer", **common)
        vae = diffusers.AutoencoderKL.from_pretrained(folder / "vae", **common)
        t5 = transformers.T5EncoderModel.from_pretrained(folder / t5_name, dtype=dtype, use_safetensors=True)
        t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(str(folder / t5_tok_name))
        clip = clip_tokenizer = None
        if not chroma:
            clip = transformers.CLIPTextModel.from_pretrained(
                folder / "text_encoder", dtype=dtype, use_safetensors=True
            )
            clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")
    parts = FluxParts(
        variant, transformer, vae, t5, t5_tokenizer, clip, clip_tokenizer, scheduler, f"{folder} (diffusers)"
    )
    for module in parts.modules().values():
        module.to(device)
    return parts


def _load_single_file(path: Path, *, vae, clip_l, t5xxl, dtype, device, fp8_weights=False) -> FluxParts:
    try:
        from loratui.models.flux.single_file import load_flux_single_file
    except ImportError:
        raise FluxLoadError(
            f"{path} is a single file; this build reads Flux base models from diffusers folders only "
            "(a FluxPipeline folder with transformer/, vae/, text_encoder/, text_encoder_2/, ...)"
        ) from None
    return load_flux_single_file(
        path, vae=vae, clip_l=clip_l, t5xxl=t5xxl, dtype=dtype, device=device, fp8_weights=fp8_weights
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise FluxLoadError(f"{path.parent} is not a diffusers Flux folder: {path.name} is missing") from None
    except ValueError as exc:
        raise FluxLoadError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}
