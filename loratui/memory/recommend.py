"""Search settings that fit a memory budget, keeping the effective batch, preferring quality-neutral changes.

Searched: micro-batch × accumulation (same effective batch), gradient checkpointing, mixed precision, 8-bit
AdamW, latent / text-encoder caching (SD), LoRA rank, resolution (SD) or max_seq_len (LLM), and 4-bit loading
(LLM). Every candidate is estimated with `estimate_peak`'s planner (arithmetic on fitted models, no tracing for
known architectures); the ones that fit are ranked by quality cost, then speed, then how few settings change.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from loratui.memory.estimate import Estimate, Planner, per_process, planner_for, unpack_config
from loratui.util.sizes import format_bytes

CHECKPOINT_SLOWDOWN = 1.3  # recomputation costs about a third more compute
QLORA_SLOWDOWN = 1.33
MIN_RANK = 4
MIN_SEQ = 256


@dataclass
class Option:
    """One configuration that fits, with what changed from the user's config."""

    changes: dict[str, object]
    config: Any  # TrainConfig
    estimate: Estimate
    headroom_bytes: int
    relative_speed: float
    quality_note: str
    quality_cost: float = 0.0
    fits: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "changes": dict(self.changes),
            "predicted_peak_bytes": self.estimate.total_bytes,
            "predicted_peak": format_bytes(self.estimate.total_bytes),
            "headroom_bytes": self.headroom_bytes,
            "headroom": format_bytes(self.headroom_bytes, signed=True),
            "relative_speed": round(self.relative_speed, 2),
            "quality_note": self.quality_note,
            "quality_cost": round(self.quality_cost, 2),
            "breakdown": dict(self.estimate.breakdown),
            "error_band": self.estimate.error_band,
            "phase": self.estimate.phase,
        }


@dataclass
class Search:
    """What may change, derived from the user's config."""

    base: Any
    kind: str
    axes: dict[str, list] = field(default_factory=dict)


def _divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def _ranks(rank: int) -> list[int]:
    out = [rank]
    while out[-1] // 2 >= MIN_RANK:
        out.append(out[-1] // 2)
    return out


def _resolutions(family: str, resolution: int) -> list[int]:
    floor = 768 if family == "sdxl" else 384
    out = [resolution]
    for step in (128, 256):
        lower = (resolution - step) // 64 * 64
        if lower >= floor and lower not in out:
            out.append(lower)
    return out


def _seq_lens(seq: int) -> list[int]:
    out = [seq]
    while out[-1] // 2 >= MIN_SEQ:
        out.append(out[-1] // 2)
    return out


def search_space(
    cfg: Any, kind: str, family: str, device: str, fixed: frozenset[str] = frozenset()
) -> Search:
    """The values each setting may take (keys in `fixed` keep the user's value)."""
    effective = cfg.effective_batch
    axes: dict[str, list] = {
        "batch_size": _divisors(effective),
        "gradient_checkpointing": [cfg.gradient_checkpointing, not cfg.gradient_checkpointing],
        # only from AdamW: the other optimizers do other updates (and FSDP does not shard 8-bit state)
        "optimizer": [cfg.optimizer]
        + (["adamw8bit"] if device == "cuda" and cfg.optimizer == "adamw" and not cfg.fsdp else []),
        "lora_rank": _ranks(cfg.lora_rank),
        "mixed_precision": [cfg.mixed_precision]
        + (["auto"] if cfg.mixed_precision == "no" and device == "cuda" else []),
    }
    if kind == "sd":
        axes["resolution"] = _resolutions(family, cfg.resolution)
        axes["cache_latents"] = [cfg.cache_latents] + (
            [True] if not cfg.cache_latents and not cfg.random_crop else []
        )
        te_ok = not cfg.train_text_encoder and cfg.caption_dropout == 0 and not cfg.shuffle_tags
        axes["cache_text_encoder_outputs"] = [cfg.cache_text_encoder_outputs] + (
            [True] if te_ok and not cfg.cache_text_encoder_outputs else []
        )
    else:
        axes["max_seq_len"] = _seq_lens(cfg.max_seq_len)
        axes["load_in_4bit"] = [cfg.load_in_4bit] + (
            [True] if device == "cuda" and not cfg.load_in_4bit else []
        )
    if getattr(cfg, "init_lora", None):  # training continues a LoRA of that rank
        fixed = fixed | {"lora_rank"}
    for key in fixed:
        if key in axes:
            axes[key] = [getattr(cfg, key)]
    if "gradient_accumulation_steps" in fixed:
        axes["batch_size"] = [cfg.batch_size]
    return Search(cfg, kind, axes)


def _utilisation(batch: int) -> float:
    """Share of peak throughput a micro-batch reaches (small batches leave the GPU idle)."""
    return batch / (batch + 0.7)


def relative_speed(base: Any, cfg: Any) -> float:
    """Samples per second relative to the user's config (1.0), from simple cost rules."""
    speed = _utilisation(cfg.batch_size) / _utilisation(base.batch_size)
    if cfg.gradient_checkpointing != base.gradient_checkpointing:
        speed *= 1 / CHECKPOINT_SLOWDOWN if cfg.gradient_checkpointing else CHECKPOINT_SLOWDOWN
    if cfg.mixed_precision != base.mixed_precision and base.mixed_precision == "no":
        speed *= 2.0
    if cfg.load_in_4bit and not base.load_in_4bit:
        speed /= QLORA_SLOWDOWN
    if cfg.cache_latents and not base.cache_latents:
        speed *= 1.15
    if cfg.cache_text_encoder_outputs and not base.cache_text_encoder_outputs:
        speed *= 1.05
    if cfg.optimizer == "adamw8bit" and base.optimizer != "adamw8bit":
        speed *= 0.98
    speed *= (base.resolution / cfg.resolution) ** 2 if cfg.resolution != base.resolution else 1.0
    speed *= base.max_seq_len / cfg.max_seq_len if cfg.max_seq_len != base.max_seq_len else 1.0
    return speed


def quality(base: Any, changes: dict[str, object]) -> tuple[float, str]:
    """(cost, note): 0 for changes that train the same LoRA, more for those that change what is learned."""
    cost, notes = 0.0, []
    if "batch_size" in changes:
        notes.append(
            f"micro-batch {changes['batch_size']} x accumulation {changes['gradient_accumulation_steps']} "
            f"(same effective batch {base.effective_batch})"
        )
    if changes.get("gradient_checkpointing") is True:
        notes.append("gradient checkpointing (same result, ~30% slower)")
    if changes.get("gradient_checkpointing") is False:
        notes.append("no gradient checkpointing (faster)")
    if "mixed_precision" in changes:
        cost += 0.1
        notes.append("16-bit mixed precision (LoRA weights stay fp32)")
    if changes.get("cache_latents"):
        notes.append("latents cached (VAE off the GPU)")
    if changes.get("cache_text_encoder_outputs"):
        notes.append("text-encoder outputs cached")
    if changes.get("optimizer") == "adamw8bit":
        cost += 0.2
        notes.append("8-bit AdamW (near-identical training)")
    if changes.get("load_in_4bit"):
        cost += 1.0
        notes.append("QLoRA 4-bit base weights (small quality loss, slower)")
    if "lora_rank" in changes:
        halvings = (base.lora_rank // int(changes["lora_rank"])).bit_length() - 1
        cost += 0.6 * halvings
        notes.append(f"rank {base.lora_rank} -> {changes['lora_rank']} (less capacity)")
    if "resolution" in changes:
        steps = (base.resolution - int(changes["resolution"])) / 128
        cost += 2.0 * steps
        notes.append(f"resolution {base.resolution} -> {changes['resolution']} (less detail)")
    if "max_seq_len" in changes:
        halvings = (base.max_seq_len // int(changes["max_seq_len"])).bit_length() - 1
        cost += 2.0 * halvings
        notes.append(f"max_seq_len {base.max_seq_len} -> {changes['max_seq_len']} (longer samples are cut)")
    return cost, "; ".join(notes) if notes else "your settings as they are"


def candidates(search: Search) -> list[dict[str, object]]:
    """Every combination of axis values, as changes from the base config."""
    base = search.base
    names = list(search.axes)
    out = []
    for values in itertools.product(*(search.axes[n] for n in names)):
        changes: dict[str, object] = {}
        for name, value in zip(names, values, strict=True):
            if value != getattr(base, name):
                changes[name] = value
        if "batch_size" in changes:
            changes["gradient_accumulation_steps"] = base.effective_batch // int(changes["batch_size"])
        out.append(changes)
    return out


def _is_superset(changes: dict[str, object], chosen: list[dict[str, object]]) -> bool:
    items = set(map(repr, changes.items()))
    return any(set(map(repr, c.items())) < items for c in chosen)


def evaluate(
    planner: Planner, base: Any, changes: dict[str, object], usable: int, device: str, processes: int = 1
) -> Option:
    cfg = base.model_copy(update=changes)
    estimate = per_process(planner, cfg, planner.estimate(cfg, device), processes, device)
    cost, note = quality(base, changes)
    headroom = usable - estimate.total_bytes
    return Option(changes, cfg, estimate, headroom, relative_speed(base, cfg), note, cost, headroom >= 0)


def explore(
    resolved: Any,
    usable_bytes: int,
    *,
    device: str = "cuda",
    fixed: frozenset[str] = frozenset(),
    processes: int = 1,
) -> tuple[list[Option], Planner]:
    """Every candidate, estimated (fitting or not); with `processes` > 1 per GPU of a data-parallel run."""
    cfg, family = unpack_config(resolved)
    planner = planner_for(cfg if isinstance(resolved, dict) else resolved, family)
    if planner.spec.kind == "flux":  # + base_weights_dtype and blocks_to_swap (`loratui.memory.flux_search`)
        import sys

        from loratui.memory.flux_search import explore_flux

        this = sys.modules[__name__]
        return explore_flux(this, planner, cfg, usable_bytes, device, frozenset(fixed), processes), planner
    search = search_space(cfg, planner.spec.kind, planner.spec.family, device, frozenset(fixed))
    return [
        evaluate(planner, cfg, changes, usable_bytes, device, processes) for changes in candidates(search)
    ], planner


def rank_options(options: list[Option], top: int) -> list[Option]:
    """Fitting options, quality-preserving first, then faster, then fewer changes; no redundant supersets."""
    fitting = [o for o in options if o.fits]
    fitting.sort(
        key=lambda o: (
            round(o.quality_cost, 2),
            -round(o.relative_speed, 2),
            len(o.changes),
            o.estimate.total_bytes,
        )
    )
    chosen: list[Option] = []
    for option in fitting:
        if _is_superset(option.changes, [c.changes for c in chosen]):
            continue
        chosen.append(option)
        if len(chosen) >= top:
            break
    return chosen


def recommend(
    resolved: Any,
    usable_bytes: int,
    *,
    top: int = 5,
    device: str = "cuda",
    fixed: frozenset[str] = frozenset(),
    processes: int = 1,
) -> list[Option]:
    """Ranked options that fit `usable_bytes` (empty when nothing does; see `no_fit_message`).

    The effective batch is always kept; keys in `fixed` keep the user's value."""
    options, _ = explore(resolved, usable_bytes, device=device, fixed=fixed, processes=processes)
    return rank_options(options, top)


def smallest_option(options: list[Option]) -> Option:
    return min(options, key=lambda o: o.estimate.total_bytes)


def no_fit_message(
    resolved: Any,
    usable_bytes: int,
    *,
    device: str = "cuda",
    fixed: frozenset[str] = frozenset(),
    processes: int = 1,
) -> str:
    """Why nothing fits: the frozen weights alone, or the smallest option and what it needs (keys in `fixed`
    are not changed; when releasing them would give a fit, the message says so)."""
    options, planner = explore(resolved, usable_bytes, device=device, fixed=fixed, processes=processes)
    smallest = smallest_option(options)
    parts = smallest.estimate.breakdown
    frozen = sum(
        v
        for k, v in parts.items()
        if k in ("weights", "unet_weights", "transformer_weights", "text_encoders", "vae")
    )
    frozen += parts.get("cuda_context", 0)
    lines = [f"nothing fits in {format_bytes(usable_bytes)} of usable memory."]
    current = next((o for o in options if not o.changes), None)
    if current is not None:
        lines.append(f"your config needs about {format_bytes(current.estimate.total_bytes)}.")
    if frozen > usable_bytes:
        lines.append(
            f"the frozen weights alone (with the CUDA context) take {format_bytes(frozen)} even in the smallest "
            "setting, more than the budget."
        )
    change_text = ", ".join(f"{k}={v}" for k, v in smallest.changes.items()) or "your settings"
    lines.append(f"the smallest option ({change_text}) needs {format_bytes(smallest.estimate.total_bytes)}.")
    if planner.spec.kind == "llm" and not smallest.config.load_in_4bit and device == "cuda":
        lines.append("4-bit loading (load_in_4bit: true) is the largest saving for language models.")
    if fixed:
        free, _ = explore(resolved, usable_bytes, device=device, processes=processes)
        released = rank_options(free, 1)
        if released:
            kept = sorted(k for k in fixed if k in released[0].changes)
            changes = ", ".join(f"{k}={v}" for k, v in released[0].changes.items())
            lines.append(
                f"it would fit if you let the planner change {', '.join(kept) or 'the keys you fixed'} "
                f"({changes}: {format_bytes(released[0].estimate.total_bytes)})."
            )
            return " ".join(lines)
    lines.append("use a card with more memory, or a smaller base model.")
    return " ".join(lines)
