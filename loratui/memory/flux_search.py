"""`loratui recommend` for Flux: the SD search space plus how the frozen transformer is stored and swapped.

Searched on top of `recommend.search_space` (micro-batch x accumulation, checkpointing, 8-bit AdamW, rank,
resolution, latent / text-encoder caching): `base_weights_dtype` (bf16 -> fp8 -> nf4, never back) and
`blocks_to_swap`. Memory falls as more blocks are swapped, so for every other combination only the smallest
`blocks_to_swap` that fits is kept (a bisection), not every value.

Costs, so that the ranking (quality cost, then speed) prefers what the peers recommend for small cards:

- fp8 base: 0.3 (the frozen weights rounded to e4m3; the LoRA is trained against that base) — more than 8-bit
  AdamW (0.2), less than halving the rank (0.6);
- NF4 base: 1.0 (as QLoRA for LLMs) and 1.33x slower steps (dequantisation);
- block swap: exact, but every swapped byte crosses PCIe in the forward and again in the backward pass each
  step; priced at `SWAP_COST_PER_GIB` quality units and `SWAP_SLOWDOWN_PER_GIB` of speed per swapped GiB, so
  that swapping a few GiB beats quantising, and swapping most of a bf16 transformer (15+ GiB) does not beat fp8
  with a few blocks swapped.
"""

from __future__ import annotations

import itertools
from typing import Any

from loratui.memory.flux import max_blocks_to_swap, transformer_bytes

DTYPE_ORDER = ("bf16", "fp8", "nf4")
DTYPE_COST = {"bf16": 0.0, "fp8": 0.3, "nf4": 1.0}
DTYPE_SPEED = {"bf16": 1.0, "fp8": 0.95, "nf4": 1 / 1.33}  # NF4: recommend.QLORA_SLOWDOWN
SWAP_COST_PER_GIB = 0.04
SWAP_SLOWDOWN_PER_GIB = 0.04
GIB = 2**30


def swapped_gib(planner: Any, cfg: Any) -> float:
    return transformer_bytes(planner.summary, cfg, 2)[2]["swapped_bytes"] / GIB


def flux_quality(
    rec: Any, planner: Any, base: Any, cfg: Any, changes: dict[str, object]
) -> tuple[float, str]:
    """`recommend.quality` plus the costs of quantising and swapping (module docstring)."""
    cost, note = rec.quality(
        base, {k: v for k, v in changes.items() if k not in ("base_weights_dtype", "blocks_to_swap")}
    )
    notes = [] if note == "your settings as they are" else [note]
    dtype = str(cfg.base_weights_dtype)
    if "base_weights_dtype" in changes:
        cost += DTYPE_COST[dtype] - DTYPE_COST[str(base.base_weights_dtype)]
        notes.append(
            "fp8 e4m3 base weights (the frozen weights rounded; as kohya's fp8_base)"
            if dtype == "fp8"
            else "NF4 base weights (4-bit frozen weights: small quality loss, slower)"
        )
    if "blocks_to_swap" in changes:
        extra = swapped_gib(planner, cfg) - swapped_gib(planner, base)
        cost += SWAP_COST_PER_GIB * max(extra, 0.0)
        notes.append(
            f"{cfg.blocks_to_swap} transformer blocks in CPU memory ({swapped_gib(planner, cfg):.1f} GiB over PCIe "
            "each step: same result, slower)"
        )
    return cost, "; ".join(notes) if notes else "your settings as they are"


def flux_speed(rec: Any, planner: Any, base: Any, cfg: Any) -> float:
    speed = rec.relative_speed(base, cfg)
    speed *= DTYPE_SPEED[str(cfg.base_weights_dtype)] / DTYPE_SPEED[str(base.base_weights_dtype)]
    extra = swapped_gib(planner, cfg) - swapped_gib(planner, base)
    return speed / (1 + SWAP_SLOWDOWN_PER_GIB * extra)


def _option(
    rec: Any, planner: Any, base: Any, changes: dict[str, object], usable: int, device: str, processes: int
):
    from loratui.memory.estimate import per_process

    cfg = base.model_copy(update=changes)
    estimate = per_process(planner, cfg, planner.estimate(cfg, device), processes, device)
    cost, note = flux_quality(rec, planner, base, cfg, changes)
    headroom = usable - estimate.total_bytes
    speed = flux_speed(rec, planner, base, cfg)
    return rec.Option(changes, cfg, estimate, headroom, speed, note, cost, headroom >= 0)


def explore_flux(
    rec: Any, planner: Any, cfg: Any, usable: int, device: str, fixed: frozenset[str], processes: int
) -> list[Any]:
    """Every candidate of the Flux search (`recommend.Option`s), each with the smallest `blocks_to_swap` that
    fits (or the most blocks when nothing does). `rec` is `loratui.memory.recommend`, handed in by its
    `explore` (which dispatches here) for the shared search space, costs and `Option`."""
    axes = dict(rec.search_space(cfg, "sd", planner.spec.family, device, fixed).axes)
    start = DTYPE_ORDER.index(str(cfg.base_weights_dtype))
    axes["base_weights_dtype"] = (
        [cfg.base_weights_dtype] if "base_weights_dtype" in fixed else list(DTYPE_ORDER[start:])
    )
    limit = max_blocks_to_swap(planner.summary["num_double"], planner.summary["num_single"])
    current = int(cfg.blocks_to_swap)
    swaps = [current] if "blocks_to_swap" in fixed or current >= limit else list(range(current, limit + 1))
    names = list(axes)
    options = []
    for values in itertools.product(*(axes[n] for n in names)):
        changes: dict[str, object] = {
            n: v for n, v in zip(names, values, strict=True) if v != getattr(cfg, n)
        }
        if "batch_size" in changes:
            changes["gradient_accumulation_steps"] = cfg.effective_batch // int(changes["batch_size"])
        options.append(_smallest_swap(rec, planner, cfg, changes, swaps, usable, device, processes))
    if not any(not option.changes for option in options):  # the config as it is, fitting or not
        options.append(_option(rec, planner, cfg, {}, usable, device, processes))
    return options


def _smallest_swap(
    rec: Any,
    planner: Any,
    cfg: Any,
    changes: dict[str, object],
    swaps: list[int],
    usable: int,
    device: str,
    processes: int,
) -> Any:
    """The option with the fewest swapped blocks that fits (memory falls as blocks are swapped)."""

    def at(index: int) -> Any:
        swap = dict(changes)
        if swaps[index] != cfg.blocks_to_swap:
            swap["blocks_to_swap"] = swaps[index]
        return _option(rec, planner, cfg, swap, usable, device, processes)

    first = at(0)
    if first.fits or len(swaps) == 1:
        return first
    last = at(len(swaps) - 1)
    if not last.fits:
        return last
    low, high, best = 0, len(swaps) - 1, last
    while high - low > 1:
        middle = (low + high) // 2
        option = at(middle)
        if option.fits:
            high, best = middle, option
        else:
            low = middle
    return best
