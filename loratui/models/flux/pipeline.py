"""Images from `FluxParts`: a diffusers FluxPipeline / ChromaPipeline over the live modules.

The pipeline holds the very modules it is given (with any LoRA layers injected into the transformer), so
samples during training show the LoRA as it is. Sampling uses the flow-match Euler scheduler with few steps
and a fixed seed: the same prompt, seed and weights give the same image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loratui.models.flux.parts import FluxParts

#: denoising steps of dev and Chroma samples (schnell: 4); few, for previews during training
SAMPLE_STEPS = 12


@dataclass(frozen=True)
class SampleSettings:
    """How `generate` draws: steps, guidance, size and seed."""

    steps: int
    guidance_scale: float
    height: int
    width: int
    seed: int = 0
    max_sequence_length: int = 512


def default_sample_settings(
    parts: FluxParts,
    *,
    height: int,
    width: int,
    seed: int = 0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
) -> SampleSettings:
    """Each variant's few-step preview settings: schnell 4 steps without guidance; dev 12 steps at the
    embedded guidance 3.5; Chroma 12 steps without classifier-free guidance (guidance 1, one pass a step)."""
    defaults = {"schnell": (4, 0.0), "dev": (SAMPLE_STEPS, 3.5), "chroma": (SAMPLE_STEPS, 1.0)}[parts.variant]
    return SampleSettings(
        steps=steps or defaults[0],
        guidance_scale=defaults[1] if guidance_scale is None else guidance_scale,
        height=height,
        width=width,
        seed=seed,
        max_sequence_length=max_sequence_length or parts.default_t5_max_length,
    )


def build_pipeline(parts: FluxParts) -> Any:
    """A diffusers pipeline over `parts` (no copies: the modules are shared)."""
    import diffusers

    if parts.is_chroma:
        pipe = diffusers.ChromaPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=parts.t5,
            tokenizer=parts.t5_tokenizer,
            transformer=parts.transformer,
        )
    else:
        pipe = diffusers.FluxPipeline(
            scheduler=parts.scheduler,
            vae=parts.vae,
            text_encoder=parts.clip,
            tokenizer=parts.clip_tokenizer,
            text_encoder_2=parts.t5,
            tokenizer_2=parts.t5_tokenizer,
            transformer=parts.transformer,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(
    parts: FluxParts, prompts: list[str], settings: SampleSettings, pipeline: Any = None
) -> list[Any]:
    """One PIL image per prompt, each drawn from the seed in `settings` (fixed noise per prompt)."""
    import torch

    pipe = pipeline or build_pipeline(parts)
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings.steps,
        "height": settings.height,
        "width": settings.width,
        "max_sequence_length": settings.max_sequence_length,
    }
    if parts.is_chroma or parts.has_guidance:
        kwargs["guidance_scale"] = settings.guidance_scale
    images = []
    with torch.no_grad():
        for prompt in prompts:
            generator = torch.Generator("cpu").manual_seed(settings.seed)
            images.append(pipe(prompt, generator=generator, **kwargs).images[0])
    return images
