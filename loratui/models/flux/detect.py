"""What a Flux-related file is, from its safetensors header alone: a transformer (dev, schnell, Chroma) in the
original or diffusers layout, an all-in-one checkpoint, an autoencoder, a CLIP-L or T5-XXL text encoder, or
something else (a Stable Diffusion checkpoint, a LoRA) that gets a message saying what to do instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.config.base_model import (
    classify_state_keys,
    flux_prefix,
    flux_variant,
    read_safetensors_header,
)
from loratui.models.flux.ae_layout import VAE_PREFIXES
from loratui.models.flux.layout import FluxDims, LayoutError, dims_from_diffusers_state, dims_from_original

#: where ComfyUI's all-in-one checkpoints keep the text encoders (`text_encoders.<name>.transformer.` + the
#: transformers key names)
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_l.")
T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "text_encoders.t5xxl.")
#: CLIP-L files carry `text_model.`; transformers 5 saves CLIPTextModel without it
CLIP_MARKERS = ("text_model.embeddings.token_embedding.weight", "embeddings.token_embedding.weight")
T5_MARKERS = ("encoder.block.0.layer.0.SelfAttention.q.weight",)
AE_MARKERS = ("encoder.conv_in.weight",)

#: where each file usually comes from, for messages about missing or wrong files
WHERE = {
    "vae": "`ae.safetensors` from the FLUX.1-dev or FLUX.1-schnell repository (black-forest-labs on Hugging Face), "
    "usually in ComfyUI/models/vae",
    "clip_l": "`clip_l.safetensors` from comfyanonymous/flux_text_encoders on Hugging Face, usually in "
    "ComfyUI/models/text_encoders (older setups: models/clip)",
    "t5xxl": "`t5xxl_fp16.safetensors` (or the smaller `t5xxl_fp8_e4m3fn.safetensors`) from "
    "comfyanonymous/flux_text_encoders on Hugging Face, usually in ComfyUI/models/text_encoders (older "
    "setups: models/clip)",
}
PART_NAMES = {
    "vae": "the autoencoder",
    "clip_l": "the CLIP-L text encoder",
    "t5xxl": "the T5-XXL text encoder",
}


class FluxFileError(ValueError):
    """A file that cannot serve as the Flux part it was given for; the message says what it is and what to do."""


@dataclass
class FluxFileInfo:
    """What one .safetensors file holds, for the Flux loader."""

    path: Path
    kind: str  # transformer | vae | clip_l | t5xxl | sd-checkpoint | lora | llm-weights | unknown
    header: dict[str, Any] = field(repr=False, default_factory=dict)
    layout: str | None = None  # transformer layout: original | diffusers
    prefix: str = ""  # the transformer's key prefix inside the file
    variant: str | None = None  # dev | schnell | chroma
    dims: FluxDims | None = None
    params: int = 0  # transformer parameters
    fp8: bool = False  # float8 weights in the transformer
    scaled_fp8: bool = False  # ComfyUI's scaled fp8 (a `.scale_weight` per weight)
    parts: dict[str, str] = field(default_factory=dict)  # vae / clip_l / t5xxl -> key prefix inside this file
    family: str | None = None  # for other checkpoints: sd15 / sd2 / sdxl / llm

    @property
    def metadata(self) -> dict[str, str]:
        return dict(self.header.get("__metadata__") or {})

    @property
    def keys(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    @property
    def all_in_one(self) -> bool:
        return self.kind == "transformer" and bool(self.parts)


def check_complete(path: Path) -> dict[str, Any]:
    """The header of a complete .safetensors file; `FluxFileError` when it is unreadable or cut short."""
    path = Path(path)
    if not path.is_file():
        raise FluxFileError(f"{path} does not exist")
    try:
        header = read_safetensors_header(path)
    except (ValueError, OSError) as exc:
        raise FluxFileError(
            f"{path} is not a readable .safetensors file ({exc}); it may be truncated or another format: "
            "download it again"
        ) from exc
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    needed = 8 + length + max(ends, default=0)
    size = path.stat().st_size
    if size < needed:
        raise FluxFileError(
            f"{path} is truncated: {size:,} bytes on disk, {needed:,} expected (an interrupted download or copy?); "
            "download it again"
        )
    return header


def _component_prefix(keys: set[str], markers: tuple[str, ...], prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if any(prefix + marker in keys for marker in markers):
            return prefix
    return None


def _numel(entry: dict[str, Any]) -> int:
    count = 1
    for dim in entry.get("shape", []):
        count *= int(dim)
    return count


def inspect_flux_file(path: Path | str) -> FluxFileInfo:
    """Read a .safetensors header and tell what it holds (raises `FluxFileError` for unreadable files)."""
    path = Path(path).expanduser()
    header = check_complete(path)
    keys = {k for k in header if k != "__metadata__"}
    found = flux_prefix(keys)
    if found is None:
        if _component_prefix(keys, CLIP_MARKERS, ("",)) is not None:
            return FluxFileInfo(path, "clip_l", header, parts={"clip_l": ""})
        if _component_prefix(keys, T5_MARKERS, ("",)) is not None:
            return FluxFileInfo(path, "t5xxl", header, parts={"t5xxl": ""})
        kind, family = classify_state_keys(sorted(keys))
        if kind == "vae":
            return FluxFileInfo(path, "vae", header, parts={"vae": ""})
        return FluxFileInfo(path, kind, header, family=family)
    prefix, layout = found
    inner = {k[len(prefix) :]: header[k] for k in keys if k.startswith(prefix)}
    shapes = {k: v["shape"] for k, v in inner.items()}
    try:
        dims = dims_from_original(shapes) if layout == "original" else dims_from_diffusers_state(shapes)
    except LayoutError as exc:
        raise FluxFileError(
            f"{path} looks like a Flux transformer but its tensors do not fit together: {exc}"
        ) from exc
    info = FluxFileInfo(path, "transformer", header, layout=layout, prefix=prefix, dims=dims)
    info.variant = flux_variant(keys, prefix)
    transformer_keys = [k for k in inner if not k.endswith((".scale_weight", ".scale_input"))]
    info.params = sum(_numel(inner[k]) for k in transformer_keys)
    info.fp8 = any(str(inner[k].get("dtype", "")).startswith("F8") for k in transformer_keys)
    info.scaled_fp8 = any(k.endswith(".scale_weight") for k in inner)
    for name, marker, prefixes in (
        ("vae", AE_MARKERS, VAE_PREFIXES),
        ("clip_l", CLIP_MARKERS, CLIP_PREFIXES),
        ("t5xxl", T5_MARKERS, T5_PREFIXES),
    ):
        part_prefix = _component_prefix(keys, marker, prefixes)
        if part_prefix is not None:
            info.parts[name] = part_prefix
    return info


def describe(info: FluxFileInfo) -> str:
    """What the file is, in a few words."""
    if info.kind == "transformer":
        what = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "chroma": "Chroma"}[info.variant or "dev"]
        extra = f" + {', '.join(info.parts)}" if info.parts else ""
        return (
            f"a {what} transformer ({info.params / 1e9:.2f}B parameters{', fp8' if info.fp8 else ''}{extra})"
        )
    return {
        "vae": "an autoencoder (like ae.safetensors)",
        "clip_l": "a CLIP-L text encoder (like clip_l.safetensors)",
        "t5xxl": "a T5-XXL text encoder (like t5xxl_fp16.safetensors)",
        "sd-checkpoint": f"a Stable Diffusion checkpoint ({info.family})",
        "lora": "a LoRA file",
        "llm-weights": "language-model weights",
    }.get(info.kind, "not a model file loratui recognises")


def require_transformer(path: Path | str) -> FluxFileInfo:
    """The file given as the Flux base model, checked: `FluxFileError` says what it is otherwise."""
    info = inspect_flux_file(path)
    if info.kind == "transformer":
        return info
    if info.kind == "sd-checkpoint":
        raise FluxFileError(
            f"{info.path} is {describe(info)}, not a Flux transformer: train it with model_family: "
            f"{info.family} (or auto), or give base_model the FLUX.1 transformer (flux1-dev.safetensors, "
            "flux1-schnell.safetensors) or a FLUX.1 diffusers folder"
        )
    if info.kind == "lora":
        raise FluxFileError(
            f"{info.path} is a LoRA file, not a base model: give it as `init_lora` (or to `loratui sample "
            "--lora`), and set base_model to the Flux transformer it was trained on (e.g. flux1-dev.safetensors)"
        )
    if info.kind in ("vae", "clip_l", "t5xxl"):
        raise FluxFileError(
            f"{info.path} is {describe(info)}, not the Flux transformer: give it as `{info.kind}: {info.path}` "
            "and set base_model to the transformer (flux1-dev.safetensors, flux1-schnell.safetensors)"
        )
    raise FluxFileError(
        f"{info.path} is {describe(info)}: a Flux transformer has double_blocks.N / single_blocks.N tensors "
        "(flux1-dev.safetensors, flux1-schnell.safetensors, a Chroma checkpoint)"
    )


def require_part(path: Path | str, part: str) -> FluxFileInfo:
    """A file given as `vae`, `clip_l` or `t5xxl`, checked to hold that part."""
    info = inspect_flux_file(path)
    if part in info.parts:
        return info
    hint = f" (use it as `{info.kind}`)" if info.kind in ("vae", "clip_l", "t5xxl") else ""
    raise FluxFileError(
        f"{part}: {info.path} is {describe(info)}{hint}, not {PART_NAMES[part]}; use {WHERE[part]}"
    )


def missing_part(part: str, transformer: Path, variant: str) -> FluxFileError:
    """The message for a part that is neither given nor inside the transformer file."""
    model = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "chroma": "Chroma"}.get(variant, "Flux")
    return FluxFileError(
        f"{model} needs {PART_NAMES[part]}, which {transformer.name} does not hold: set `{part}: PATH` to "
        f"{WHERE[part]}"
    )
