"""What the wizard needs to know about a FLUX.1 / Chroma base model (no Textual): the variant, which separate
files (autoencoder, CLIP-L, T5-XXL) a single-file transformer still needs, whether a memory prediction is
really one of the Flux step, and a one-line summary of the Flux choices for the review step."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

FLUX_FAMILIES = ("flux", "chroma")
VARIANT_NAMES = {"dev": "FLUX.1-dev", "schnell": "FLUX.1-schnell", "chroma": "Chroma"}
#: the separate files a Flux transformer file may need, in the order the wizard asks for them
PART_KEYS = ("vae", "clip_l", "t5xxl")
PART_LABELS = {"vae": "autoencoder", "clip_l": "CLIP-L", "t5xxl": "T5-XXL"}
#: the config keys shown in the settings step's Flux section and the review summary
FLUX_KEYS = (
    "base_weights_dtype",
    "blocks_to_swap",
    "t5_max_length",
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "guidance_scale",
)


def is_flux_family(family: str | None) -> bool:
    return family in FLUX_FAMILIES


def parts_for(variant: str | None) -> tuple[str, ...]:
    """The parts a variant's pipeline has besides the transformer (Chroma has no CLIP-L)."""
    return ("vae", "t5xxl") if variant == "chroma" else PART_KEYS


@dataclass(frozen=True)
class FluxModel:
    """A Flux-class base model as the wizard sees it."""

    variant: str  # dev | schnell | chroma
    single_file: bool  # a transformer file (else a diffusers folder, which holds every part)
    held: tuple[str, ...] = ()  # parts inside the transformer file (all-in-one checkpoints)

    @property
    def name(self) -> str:
        return VARIANT_NAMES.get(self.variant, "FLUX.1")

    @property
    def needed(self) -> tuple[str, ...]:
        """Parts that must come from separate files (`vae`, `clip_l`, `t5xxl` keys)."""
        if not self.single_file:
            return ()
        return tuple(part for part in parts_for(self.variant) if part not in self.held)


def _file_key(path: str) -> tuple[str, float, int]:
    target = Path(path).expanduser()
    try:
        stat = target.stat()
    except OSError:
        return path, 0.0, -1
    return path, stat.st_mtime, stat.st_size


def flux_model(base_model: str | None) -> FluxModel | None:
    """The Flux model at `base_model` (headers only), or None when it is not a readable Flux model."""
    if not base_model:
        return None
    return _flux_model(*_file_key(str(base_model)))


@lru_cache(maxsize=16)
def _flux_model(path: str, _mtime: float, _size: int) -> FluxModel | None:
    from loratui.config.base_model import inspect_base_model

    info = inspect_base_model(path)
    if not is_flux_family(info.family):
        return None
    variant = info.variant or ("chroma" if info.family == "chroma" else "dev")
    if info.kind != "flux-checkpoint":
        return FluxModel(variant, single_file=False)
    from loratui.models.flux.detect import FluxFileError, inspect_flux_file

    try:
        held = tuple(part for part in PART_KEYS if part in inspect_flux_file(path).parts)
    except FluxFileError:
        held = ()
    return FluxModel(variant, single_file=True, held=held)


def part_status(part: str, path: str) -> tuple[bool, str]:
    """(usable, sentence) for a file given as `vae`, `clip_l` or `t5xxl`."""
    from loratui.models.flux.detect import FluxFileError, describe, inspect_flux_file, require_part

    try:
        require_part(path, part)
    except FluxFileError as exc:
        return False, str(exc)
    return True, f"{PART_LABELS[part]}: {describe(inspect_flux_file(path))}"


def missing_part_problems(base_model: str | None, values: dict[str, Any]) -> list[str]:
    """Messages for separate files a single-file transformer needs and the config does not name."""
    model = flux_model(base_model)
    if model is None:
        return []
    from loratui.models.flux.detect import missing_part

    return [
        str(missing_part(part, Path(str(base_model)), model.variant))
        for part in model.needed
        if not values.get(part)
    ]


def is_flux_estimate(estimate: Any) -> bool:
    """False when a prediction for a Flux config is really a UNet model's (a memory planner without the Flux
    step falls back to the Stable Diffusion step): such a number would be wrong, so the wizard says the
    prediction is unavailable instead."""
    return "unet_weights" not in (getattr(estimate, "breakdown", None) or {})


def flux_summary(config: Any, variant: str | None) -> str:
    """One line of the Flux choices: 'FLUX.1-dev: base weights fp8, 10 blocks swapped, T5 512 tokens, ...'."""
    t5 = config.t5_max_length or (256 if variant == "schnell" else 512)
    swapped = config.blocks_to_swap
    parts = [
        f"base weights {config.base_weights_dtype}",
        f"{swapped} block{'s' if swapped != 1 else ''} swapped" if swapped else "no block swap",
        f"T5 {t5} tokens{'' if config.t5_max_length else ' (default)'}",
        f"timesteps {config.timestep_sampling}",
    ]
    if config.timestep_sampling == "shift":
        parts.append(f"shift {config.discrete_flow_shift:g}")
    if variant == "dev":
        parts.append(f"guidance {config.guidance_scale:g}")
    files = [f"{key} {Path(getattr(config, key)).name}" for key in PART_KEYS if getattr(config, key)]
    if files:
        parts.append("files: " + ", ".join(files))
    return f"{VARIANT_NAMES.get(variant or '', 'FLUX.1')}: " + ", ".join(parts) + "."
