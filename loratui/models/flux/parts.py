"""The parts of a Flux-family base model, however it was stored (diffusers folder or single files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

VARIANTS = ("dev", "schnell", "chroma")


@dataclass
class FluxParts:
    """A loaded FLUX.1 dev / schnell or Chroma base model."""

    variant: str  # "dev" | "schnell" | "chroma"
    transformer: Any  # diffusers FluxTransformer2DModel | ChromaTransformer2DModel
    vae: Any  # diffusers AutoencoderKL, 16 latent channels
    t5: Any  # transformers T5EncoderModel
    t5_tokenizer: Any
    clip: Any | None  # transformers CLIPTextModel (None for Chroma)
    clip_tokenizer: Any | None
    scheduler: Any  # diffusers FlowMatchEulerDiscreteScheduler
    source: str  # human-readable origin, for messages

    @property
    def is_chroma(self) -> bool:
        return self.variant == "chroma"

    @property
    def has_guidance(self) -> bool:
        """True for guidance-distilled models (FLUX.1-dev): the transformer takes a guidance value."""
        return bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def default_t5_max_length(self) -> int:
        """T5 tokens per caption unless `t5_max_length` says otherwise: 256 for schnell, 512 otherwise
        (capped at the tokenizer's own limit, as the tiny test models have short ones)."""
        wanted = 256 if self.variant == "schnell" else 512
        limit = getattr(self.t5_tokenizer, "model_max_length", wanted) or wanted
        return min(wanted, int(limit))

    def modules(self) -> dict[str, Any]:
        """The torch modules by role (text encoders that are absent left out)."""
        out = {"transformer": self.transformer, "vae": self.vae, "t5": self.t5}
        if self.clip is not None:
            out["clip"] = self.clip
        return out
