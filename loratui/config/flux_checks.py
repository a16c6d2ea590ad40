"""Checks of the Flux keys that need the model family (and, for block counts, the model's files).

Run by `load_config` once the family is known (`model_family`, or detected from `base_model`): resolution a
multiple of 16 (8x autoencoder, 2x2 patches), `blocks_to_swap` below the transformer's block count.
"""

from __future__ import annotations

from collections.abc import Callable

from loratui.config.base_model import FLUX_FAMILIES, flux_block_count
from loratui.config.errors import ConfigProblem
from loratui.config.schema import TrainConfig

#: Flux latents are 1/8 of the image, packed into 2x2 patches: image sides are multiples of 16
FLUX_RESOLUTION_MULTIPLE = 16


def flux_config_problems(
    cfg: TrainConfig, family: str, where: Callable[[str], tuple[str, int | None]]
) -> list[ConfigProblem]:
    """Problems with a Flux/Chroma run's settings; [] for other families. `where(key)` -> (source, line)."""
    if family not in FLUX_FAMILIES:
        return []
    problems: list[ConfigProblem] = []
    if cfg.resolution % FLUX_RESOLUTION_MULTIPLE:
        low = cfg.resolution // FLUX_RESOLUTION_MULTIPLE * FLUX_RESOLUTION_MULTIPLE
        problems.append(
            ConfigProblem(
                "resolution",
                f"{cfg.resolution} is not a multiple of 16: Flux images are encoded at 1/8 size and cut into 2x2 "
                "patches",
                f"use {low} or {low + FLUX_RESOLUTION_MULTIPLE}",
                *where("resolution"),
            )
        )
    if cfg.blocks_to_swap and cfg.base_model:
        counts = flux_block_count(cfg.base_model)
        if counts is not None and cfg.blocks_to_swap >= sum(counts):
            total = sum(counts)
            problems.append(
                ConfigProblem(
                    "blocks_to_swap",
                    f"{cfg.blocks_to_swap} is not below the model's {total} transformer blocks ({counts[0]} double, "
                    f"{counts[1]} single); at least one block stays on the GPU",
                    f"use at most {total - 1}",
                    *where("blocks_to_swap"),
                )
            )
    return problems
