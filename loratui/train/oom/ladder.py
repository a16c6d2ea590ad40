"""The out-of-memory ladder: which settings to lower next, quality-preserving first.

Pure settings logic (no torch): the worker uses it to recover inside a run, and the supervisor uses it to
lower settings before restarting a worker that died. Rungs, in order:

1. `micro_batch`: halve the micro-batch and multiply gradient accumulation (effective batch unchanged);
   repeated down to a micro-batch of 1;
2. `gradient_checkpointing`: recompute activations in backward;
3. `offload`: SD caches latents / text-encoder outputs (VAE and text encoders leave the GPU) and moves the
   EMA of the LoRA weights (`ema_decay`) to CPU memory (`ema_on_cpu`); LLMs compute the loss in chunks of
   tokens (`chunked_loss`, on by default, so this rung is only met when it was turned off);
4. `activation_offload`: LLMs keep saved activations in host memory until backward (CUDA only; slower, the same
   result);
5. `optimizer_8bit`: 8-bit AdamW (bitsandbytes on CUDA, or on the CPU from bitsandbytes 0.50), optimizer state
   carried over; only from AdamW (its two moments map onto 8-bit AdamW's): for Prodigy, Adafactor, schedule-free
   AdamW, CAME and Lion the rung is skipped with the reason (`skipped`);
6. Flux only (`flux_rung`), ordered by what they cost:
   `block_swap`: raise `blocks_to_swap` (kohya's meaning: N // 2 double and 2 x (N - N // 2) single blocks,
   the last of each kind, in CPU memory) by `SWAP_STEP`, up to `FAST_SWAP_LIMIT` (9 double + 18 single blocks
   of FLUX.1, 47 % of the blocks' weights): the weights stay exact and, with prefetch, moving the small single blocks hides behind the blocks' compute; then `quantise_base` to fp8 (e4m3 storage of the frozen block weights:
   halves them, a rounding of the frozen weights only, and faster than moving them over PCIe every step); then
   `block_swap` beyond the fast limit up to `max_blocks_to_swap` (transfer-bound: slower steps, still exact);
   then `quantise_base` to nf4 (4-bit: a coarser base than fp8, and dequantisation is slower), last before
   lowering quality;
7. `quality`: lower the resolution (SD, Flux: 64 px) or max_seq_len (LLM, a quarter) one step, never below half
   of the value the run started with; only with `oom_allow_quality_reduction`.

The LoRA rank is never changed mid-run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SD_KEYS = (
    "batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "cache_latents",
    "cache_text_encoder_outputs",
    "optimizer",
    "resolution",
    "ema_on_cpu",  # None when the run keeps no EMA (`ema_decay` unset)
)
LLM_KEYS = (
    "batch_size",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "chunked_loss",
    "activation_offload",
    "optimizer",
    "max_seq_len",
)
FLUX_KEYS = (*SD_KEYS, "base_weights_dtype", "blocks_to_swap")
RUNG_ORDER = (
    "micro_batch",
    "gradient_checkpointing",
    "offload",
    "activation_offload",
    "optimizer_8bit",
    "block_swap",
    "quantise_fp8",
    "block_swap_more",
    "quantise_nf4",
    "quality",
)
#: the rung name each step of `RUNG_ORDER` reports (and is marked unavailable under)
RUNG_NAMES = {
    "block_swap_more": "block_swap",
    "quantise_fp8": "quantise_base",
    "quantise_nf4": "quantise_base",
}
FLUX_FAMILIES = ("flux", "chroma")
SWAP_STEP = (
    6  # `blocks_to_swap` a block-swap rung adds: 3 double + 6 single FLUX.1 blocks (about 1.7 GiB in bf16)
)
FAST_SWAP_LIMIT = 18  # kohya's meaning: 9 double + 18 single FLUX.1 blocks, 47 % of the blocks' weights
MAX_BLOCKS_TO_SWAP = 36  # FLUX.1 and Chroma (19 double + 38 single): 18 + 36, one block of each kind stays
MIN_RESOLUTION = 64
MIN_SEQ_LEN = 32


#: optimizers whose state maps onto 8-bit AdamW's (the swap keeps the moments): AdamW only
EIGHT_BIT_FROM = ("adamw",)


def eight_bit_skip_reason(optimizer: str) -> str | None:
    """Why the 8-bit rung does not apply to `optimizer` (None when it applies, or 8-bit already runs)."""
    if optimizer in (*EIGHT_BIT_FROM, "adamw8bit"):
        return None
    return (
        f"the 8-bit AdamW rung is skipped: optimizer {optimizer} keeps state that does not map onto 8-bit "
        "AdamW's two moments (a swap would restart the optimizer with other update rules); to save optimizer "
        "memory set optimizer: adamw8bit (or adafactor, whose factored state is smallest) and restart"
    )


def kind_of(family: str) -> str:
    """'llm', 'flux' or 'sd' for a model family (sd15, sd2, sdxl, flux, chroma, llm)."""
    if family in FLUX_FAMILIES:
        return "flux"
    return "llm" if family == "llm" else "sd"


def settings_keys(kind: str) -> tuple[str, ...]:
    return {"llm": LLM_KEYS, "flux": FLUX_KEYS}.get(kind, SD_KEYS)


def settings_of(cfg: Any, kind: str) -> dict[str, Any]:
    """The ladder-controlled settings of a config (TrainConfig or mapping)."""
    get = cfg.get if isinstance(cfg, Mapping) else lambda key: getattr(cfg, key, None)
    settings = {key: get(key) for key in settings_keys(kind)}
    if kind != "llm" and not isinstance(cfg, Mapping) and cfg.ema_decay is None:
        settings["ema_on_cpu"] = None
    return settings


@dataclass(frozen=True)
class Rung:
    """One rung: its name, a human label, the settings it changes, and whether it lowers quality."""

    name: str
    label: str
    changes: dict[str, Any]
    quality: bool = False


def combine(rungs: list[Rung]) -> Rung:
    """Several consecutive rungs applied at once (later changes win)."""
    if len(rungs) == 1:
        return rungs[0]
    changes: dict[str, Any] = {}
    for rung in rungs:
        changes.update(rung.changes)
    names = list(dict.fromkeys(r.name for r in rungs))
    labels = list(dict.fromkeys(r.label for r in rungs))
    return Rung("+".join(names), " + ".join(labels), changes, any(r.quality for r in rungs))


def halve_micro_batch(batch_size: int, accumulation: int) -> tuple[int, int] | None:
    """The largest divisor of the effective batch at most half the micro-batch, and the new accumulation."""
    effective = batch_size * accumulation
    if batch_size <= 1:
        return None
    smaller = next(d for d in range(batch_size // 2, 0, -1) if effective % d == 0)
    return smaller, effective // smaller


def lower_resolution(resolution: int, floor: int) -> int | None:
    new = (resolution - 64) // 64 * 64 if resolution > 128 else (resolution - 16) // 8 * 8
    new = max(new, floor, MIN_RESOLUTION)
    return new if new < resolution else None


def lower_seq_len(seq_len: int, floor: int) -> int | None:
    new = max(seq_len * 3 // 4 // 8 * 8, floor, MIN_SEQ_LEN)
    return new if new < seq_len else None


@dataclass
class OomLadder:
    """The rungs still available from a set of settings.

    `original` holds the settings the run started with (quality floors are half of those); `unavailable`
    names rungs that cannot be applied here (e.g. `optimizer_8bit` without a bitsandbytes that runs on this
    device, `activation_offload` without CUDA, `offload` when captions change every epoch); `can_cache_text`
    says whether SD text-encoder outputs may be cached.
    """

    kind: str
    original: dict[str, Any]
    allow_quality: bool = True
    unavailable: set[str] = field(default_factory=set)
    can_cache_latents: bool = True
    can_cache_text: bool = True
    max_blocks_to_swap: int = MAX_BLOCKS_TO_SWAP

    def next_rung(self, settings: Mapping[str, Any]) -> Rung | None:
        """The first rung that changes something, or None when the ladder is exhausted."""
        for name in RUNG_ORDER:
            if name in self.unavailable or RUNG_NAMES.get(name) in self.unavailable:
                continue
            rung = self._rung(name, settings)
            if rung is not None:
                return rung
        return None

    def skipped(self, settings: Mapping[str, Any]) -> dict[str, str]:
        """Rungs left out for these settings, with the reason (e.g. the 8-bit rung for Prodigy)."""
        reason = eight_bit_skip_reason(str(settings["optimizer"]))
        return {"optimizer_8bit": reason} if reason and "optimizer_8bit" not in self.unavailable else {}

    def remaining(self, settings: Mapping[str, Any]) -> list[Rung]:
        """Every rung still to come from `settings`, each one on top of the previous ones."""
        current, out = dict(settings), []
        while (rung := self.next_rung(current)) is not None and len(out) < 64:
            out.append(rung)
            current.update(rung.changes)
        return out

    def choose(
        self, settings: Mapping[str, Any], fits: Callable[[dict[str, Any]], bool | None] | None = None
    ) -> list[Rung]:
        """The rungs to apply now: the first one, or, when `fits(settings)` (the memory planner) rules the
        earlier ones out, everything up to the first rung whose settings could fit. A quality-lowering rung is
        never jumped to (it comes only after the rungs before it really failed), and when the planner sees
        nothing fit it is not trusted either: one rung at a time. Empty when exhausted."""
        rungs = self.remaining(settings)
        if not rungs or fits is None:
            return rungs[:1]
        current = dict(settings)
        for count, rung in enumerate(rungs, start=1):
            if rung.quality and count > 1:
                return rungs[:1]
            current.update(rung.changes)
            verdict = fits(dict(current))
            if verdict is None:  # the planner cannot tell: take one rung at a time
                return rungs[:1]
            if verdict:
                return rungs[:count]
        return rungs[:1]

    def _rung(self, name: str, s: Mapping[str, Any]) -> Rung | None:
        if name == "micro_batch":
            halved = halve_micro_batch(int(s["batch_size"]), int(s["gradient_accumulation_steps"]))
            if halved is None:
                return None
            label = f"halve the micro-batch to {halved[0]}, accumulate {halved[1]} (same effective batch)"
            return Rung(name, label, {"batch_size": halved[0], "gradient_accumulation_steps": halved[1]})
        if name == "gradient_checkpointing":
            if s["gradient_checkpointing"]:
                return None
            return Rung(name, "gradient checkpointing", {"gradient_checkpointing": True})
        if name == "offload":
            return self._offload(s)
        if name == "activation_offload":
            if self.kind != "llm" or s.get("activation_offload", False):
                return None
            return Rung(
                name, "activation offload (saved activations in host memory)", {"activation_offload": True}
            )
        if name == "optimizer_8bit":
            if s["optimizer"] not in EIGHT_BIT_FROM:  # already 8-bit, or no state mapping (`skipped`)
                return None
            return Rung(name, "8-bit AdamW", {"optimizer": "adamw8bit"})
        if name in ("block_swap", "block_swap_more", "quantise_fp8", "quantise_nf4") and self.kind == "flux":
            return flux_rung(name, s, self.max_blocks_to_swap)
        if name == "quality" and self.allow_quality:
            return self._quality(s)
        return None

    def _offload(self, s: Mapping[str, Any]) -> Rung | None:
        if self.kind == "llm":
            return None if s["chunked_loss"] else Rung("offload", "chunked loss", {"chunked_loss": True})
        changes: dict[str, Any] = {}
        if self.can_cache_latents and not s["cache_latents"]:
            changes["cache_latents"] = True
        if self.can_cache_text and not s["cache_text_encoder_outputs"]:
            changes["cache_text_encoder_outputs"] = True
        if s.get("ema_on_cpu") is False:
            changes["ema_on_cpu"] = True
        if not changes:
            return None
        what = " and ".join(
            text
            for key, text in (
                ("cache_latents", "cache latents (VAE off the GPU)"),
                ("cache_text_encoder_outputs", "cache text-encoder outputs"),
                ("ema_on_cpu", "EMA weights to CPU memory"),
            )
            if key in changes
        )
        return Rung("offload", what, changes)

    def _quality(self, s: Mapping[str, Any]) -> Rung | None:
        if self.kind == "llm":
            start = int(self.original.get("max_seq_len") or s["max_seq_len"])
            new = lower_seq_len(int(s["max_seq_len"]), start // 2)
            if new is None:
                return None
            return Rung(
                "quality",
                f"max_seq_len {s['max_seq_len']} -> {new} (longer samples are cut)",
                {"max_seq_len": new},
                quality=True,
            )
        start = int(self.original.get("resolution") or s["resolution"])
        new = lower_resolution(int(s["resolution"]), start // 2)
        if new is None:
            return None
        return Rung(
            "quality",
            f"resolution {s['resolution']} -> {new} (less detail)",
            {"resolution": new},
            quality=True,
        )


def flux_rung(step: str, s: Mapping[str, Any], max_blocks: int = MAX_BLOCKS_TO_SWAP) -> Rung | None:
    """A Flux rung (see the module docstring): more blocks swapped, or the frozen base quantised."""
    if step in ("block_swap", "block_swap_more"):
        current = int(s.get("blocks_to_swap") or 0)
        limit = min(FAST_SWAP_LIMIT, max_blocks) if step == "block_swap" else max_blocks
        if current >= limit:
            return None
        new = min(current + SWAP_STEP, limit)
        label = (
            f"keep {new} transformer blocks in CPU memory (blocks_to_swap {current} -> {new}; slower steps)"
        )
        return Rung("block_swap", label, {"blocks_to_swap": new})
    dtype = str(s.get("base_weights_dtype") or "bf16")
    if step == "quantise_fp8" and dtype == "bf16":
        label = "store the frozen transformer in fp8 e4m3 (base_weights_dtype bf16 -> fp8)"
        return Rung("quantise_base", label, {"base_weights_dtype": "fp8"})
    if step == "quantise_nf4" and dtype in ("bf16", "fp8"):
        label = (
            f"store the frozen transformer in NF4 (base_weights_dtype {dtype} -> nf4; slower, coarser base)"
        )
        return Rung("quantise_base", label, {"base_weights_dtype": "nf4"})
    return None


def describe_change(old: Mapping[str, Any], new: Mapping[str, Any], keys: Iterable[str] | None = None) -> str:
    """'batch_size 4 -> 2, gradient_accumulation_steps 1 -> 2' for the keys that differ."""
    keys = list(keys) if keys is not None else list(dict.fromkeys([*old, *new]))
    parts = [f"{k} {old.get(k)} -> {new.get(k)}" for k in keys if old.get(k) != new.get(k)]
    return ", ".join(parts) or "no change"
