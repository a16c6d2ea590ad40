"""Generate images with Flux bases (FLUX.1 dev/schnell, Chroma) and Flux LoRAs (`loratui sample`).

LoRAs come from `--lora PATH[:WEIGHT]` and `<lora:NAME:WEIGHT>` prompt tags, as for SD. Each file (kohya or
diffusers format, from loratui or another trainer) is read with loratui's own converter, which splits fused
`qkv`/`linear1` modules at the widths of the loaded transformer (diffusers' converter assumes FLUX.1's), and
handed to the pipeline as diffusers/PEFT tensors, one adapter per file, combined with `set_adapters`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

from loratui.data.image_io import save_png
from loratui.sample.sd_sample import ImageSample, LoraRequest, SampleError, collect_loras

FLUX_PIPELINES = ("FluxPipeline", "ChromaPipeline")


def is_flux_base(base: str | Path) -> bool:
    """Whether `base` is a Flux-family model: a FluxPipeline/ChromaPipeline folder or a transformer file in the
    original layout (`double_blocks.N...`, possibly under a ComfyUI prefix)."""
    path = Path(base).expanduser()
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return str(index.get("_class_name", "")) in FLUX_PIPELINES
    if path.is_file() and path.suffix == ".safetensors":
        from loratui.config.base_model import read_safetensors_header

        try:
            keys = [k for k in read_safetensors_header(path) if k != "__metadata__"]
        except (OSError, ValueError):
            return False
        if any(".lora_" in k or k.startswith("lora_") for k in keys[:50]):
            return False
        return any(
            re.match(r"^(model\.diffusion_model\.|diffusion_model\.|model\.)?double_blocks\.\d+\.", k)
            for k in keys
        )
    return False


def _adapter_name(path: Path, position: int) -> str:
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}_{position}"


def refuse_other_families(request: LoraRequest) -> None:
    """A SampleError before any model loads when a LoRA file is not a Flux LoRA (SD, LLM, unreadable)."""
    from loratui.config.base_model import read_safetensors_header
    from loratui.models.flux.lora_files import is_flux_lora_keys

    try:
        keys = [k for k in read_safetensors_header(request.path) if k != "__metadata__"]
    except (OSError, ValueError) as exc:
        raise SampleError(f"{request.path.name} cannot be read as a safetensors file ({exc})") from exc
    if not is_flux_lora_keys(keys):
        first = keys[0] if keys else "no tensors"
        raise SampleError(
            f"{request.path.name} is not a Flux LoRA (first tensor: {first}); the base model is a Flux model: "
            "pass a Flux LoRA (lora_unet_double_blocks_N_... or transformer.transformer_blocks.N...)"
        )


def lora_tensors(request: LoraRequest, parts: Any) -> dict[str, Any]:
    """The diffusers/PEFT tensors (scale folded in) of one Flux LoRA file for the loaded model."""
    from loratui.models.flux.kohya import FluxLoraError, dims_of_transformer
    from loratui.models.flux.lora_files import diffusers_state, module_in_features, read_flux_lora
    from loratui.models.sd.kohya import LoraFileError

    try:
        lora = read_flux_lora(
            request.path,
            dims=dims_of_transformer(parts.transformer),
            in_features=module_in_features(parts.transformer),
        )
    except (FluxLoraError, LoraFileError) as exc:
        raise SampleError(f"{request.path.name}: {exc}") from exc
    if parts.clip is None and any(m.component == "text_encoder" for m in lora.modules):
        raise SampleError(
            f"{request.path.name} adapts CLIP-L, which {parts.variant} does not have; use a LoRA for this model"
        )
    return diffusers_state(lora.modules)


def apply_flux_loras(pipe: Any, parts: Any, requests: list[LoraRequest]) -> list[str]:
    """Load every LoRA as its own adapter and activate them with their weights."""
    from loratui.models.sd.loading import quiet_libraries
    from loratui.sample.sd_sample import _loaded

    names = []
    for position, request in enumerate(requests):
        name = _adapter_name(request.path, position)
        tensors = lora_tensors(request, parts)
        with quiet_libraries(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*peft_config.*multiple adapters.*")
            try:
                pipe.load_lora_weights(tensors, adapter_name=name)
            except (RuntimeError, ValueError, KeyError) as exc:
                raise SampleError(
                    f"{request.path.name} does not fit the base model ({str(exc)[:200]})"
                ) from exc
        if not _loaded(pipe, name):
            raise SampleError(
                f"{request.path.name} has no tensor that matches the base model ({parts.source})"
            )
        names.append(name)
    if names:
        pipe.set_adapters(names, adapter_weights=[r.weight for r in requests])
    return names


def sample_flux_image(
    *,
    base: str,
    lora: list[str] | None = None,
    lora_dir: Path | None = None,
    prompt: str,
    seed: int = 1,
    steps: int | None = None,
    width: int | None = None,
    height: int | None = None,
    guidance: float | None = None,
    out: Path | None = None,
    vae: str | None = None,
    clip_l: str | None = None,
    t5xxl: str | None = None,
) -> ImageSample:
    """`loratui sample` for Flux: render one image with the LoRAs and save it as PNG.

    Steps and guidance default to the variant's (schnell 4 steps, no guidance; dev 20 steps at 3.5; Chroma 20),
    the size to the pipeline's default. Raises `SampleError`, `FluxLoadError` or `FileNotFoundError`."""
    import torch

    from loratui.models.flux.loading import load_flux
    from loratui.models.flux.pipeline import build_pipeline, default_sample_settings, generate

    clean, requests = collect_loras(list(lora or []), prompt, lora_dir)
    for request in requests:
        refuse_other_families(request)
    cuda = torch.cuda.is_available()
    parts = load_flux(
        base,
        vae=vae,
        clip_l=clip_l,
        t5xxl=t5xxl,
        dtype=torch.bfloat16 if cuda else torch.float32,
        device="cuda" if cuda else "cpu",
    )
    pipe = build_pipeline(parts)
    apply_flux_loras(pipe, parts, requests)
    size = int(pipe.default_sample_size * pipe.vae_scale_factor)
    height, width = height or size, width or size
    multiple = 2 * int(pipe.vae_scale_factor)
    if height % multiple or width % multiple:
        raise SampleError(
            f"--width/--height must be multiples of {multiple} for this model (got {width}x{height})"
        )
    settings = default_sample_settings(
        parts, height=height, width=width, seed=seed, steps=steps, guidance_scale=guidance
    )
    image = generate(parts, [clean], settings, pipeline=pipe)[0]
    target = Path(out) if out else Path(f"sample-{seed}.png")
    save_png(image, target)
    return ImageSample(target, image.width, image.height, seed, requests)
