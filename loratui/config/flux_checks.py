"""Checks of the Flux keys that need the model family (and, for block counts, the model's files).

Run by `load_config` once the family is known (`model_family`, or detected from `base_model`): resolution a
multiple of 16 (8x autoencoder, 2x2 patches), `blocks_to_swap` at most `max_blocks_to_swap` of the model.

`blocks_to_swap: N` means what it means in kohya sd-scripts: N // 2 double-stream blocks and 2 x (N - N // 2)
single-stream blocks, the last ones of each kind, live in CPU memory (`swap_split`). loratui's swapper keeps
at least one block of each kind on the device (kohya's keeps two): every kohya value (at most 35 for FLUX.1
and Chroma) means the same blocks here, and loratui also takes 36.
"""

from __future__ import annotations

from collections.abc import Callable

from loratui.config.base_model import FLUX_FAMILIES, flux_block_count
from loratui.config.errors import ConfigProblem
from loratui.config.schema import TrainConfig

#: blocks of each kind that always stay on the device
RESIDENT_PER_KIND = 1


def swap_split(blocks: int, num_double: int, num_single: int) -> tuple[int, int]:
    """(double, single) blocks in CPU memory for `blocks_to_swap` (kohya's split), each kind capped so that
    `RESIDENT_PER_KIND` of its blocks stay on the device."""
    blocks = max(0, int(blocks))
    double, single = blocks // 2, (blocks - blocks // 2) * 2
    return (
        min(double, max(0, num_double - RESIDENT_PER_KIND)),
        min(single, max(0, num_single - RESIDENT_PER_KIND)),
    )


def max_blocks_to_swap(num_double: int, num_single: int) -> int:
    """The largest `blocks_to_swap` whose kohya split fits the model (36 for FLUX.1's 19 + 38 blocks)."""
    best = 0
    for blocks in range(2 * (num_double + num_single) + 1):
        double, single = blocks // 2, (blocks - blocks // 2) * 2
        if double <= num_double - RESIDENT_PER_KIND and single <= num_single - RESIDENT_PER_KIND:
            best = blocks
    return best


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
        limit = None if counts is None else max_blocks_to_swap(*counts)
        if counts is not None and limit is not None and cfg.blocks_to_swap > limit:
            double, single = cfg.blocks_to_swap // 2, (cfg.blocks_to_swap - cfg.blocks_to_swap // 2) * 2
            problems.append(
                ConfigProblem(
                    "blocks_to_swap",
                    f"{cfg.blocks_to_swap} asks for {double} double and {single} single blocks in CPU memory "
                    f"(N // 2 and 2 x (N - N // 2), as in kohya sd-scripts); the model has {counts[0]} double and "
                    f"{counts[1]} single blocks and one of each kind stays on the GPU",
                    f"use at most {limit}",
                    *where("blocks_to_swap"),
                )
            )
    return problems
