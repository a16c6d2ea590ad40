"""The Flux section of the GPU check (`python bench/gpu_check.py --only flux`).

A FLUX.1-dev-architecture transformer with random weights (`loratui/models/flux/configs/flux1-dev.json`, built
directly on the GPU in bf16; nothing is downloaded) trains LoRA rank 16 (the default Flux targets), batch 1,
gradient checkpointing on, at 1024² and 512², with a bf16 or fp8 base and with or without block swap.
T5/CLIP-L/AE are not needed: the step reads what the caches would hold (latents [1, 16, h, w], T5 states
[1, 512, 4096], CLIP-L pooled [1, 768], moved to the device each step as the caches do).

The step is loratui's own: the Flux trainer's setup functions (`setup_lora`, `setup_base_storage`,
`setup_optimizer`), its forward (`FluxLossContext.predict`: packing, position ids, guidance), the flow-match
pieces of `loratui.models.flux.flow_match` (per-sample sigma and noise, noisy latents, velocity target, loss),
fp8 storage (`loratui.models.flux.fp8`), block swap (`place_transformer`: `BlockSwapper` hooks, the last N
blocks in pinned CPU memory) and the shared `optimizer_step` (accelerate's bf16 autocast, clipping, AdamW).
One difference from a run: the fp8 base is converted on the device after the bf16 cases (a run converts in
CPU memory before placing the transformer).

Per case: the planner's prediction for the same config (`estimate_peak`; the training step, see
`predicted_step`) vs `torch.cuda.max_memory_allocated()` (allocated basis) and `max_memory_reserved()` +
CUDA context (total), samples/s, and the first step's loss. Every case starts from the same LoRA weights and
the same first sample, so the first-step losses of a swapped and an unswapped run must agree. Peaks are
reset per case after the optimizer is built; cases are skipped (with the reason) when the time budget or
the card's memory does not allow them.

`--smoke`: the same code on the CPU with the tiny FLUX.1-dev model (`loratui.tiny_models.flux`, 2 double + 2
single blocks) at 64 px in fp32 (one torch thread), memory from the memory meter (the transformer's resident
parts, the LoRA and the optimizer); on the CPU a swap moves no bytes, the hooks and their order still run.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass
from typing import Any

GIB = 2**30
LORA_RANK = 16
#: (resolution, base_weights_dtype, blocks_to_swap) on the GPU, in run order (the fp8 cases convert the base,
#: so every bf16 case comes first); the swap counts are the flux-dev presets' (24gb: bf16 + 22,
#: 16gb: fp8 + 14, 12gb: fp8 + 41)
GPU_CASES = [
    (1024, "bf16", 0),
    (1024, "bf16", 22),
    (512, "bf16", 0),
    (512, "bf16", 22),
    (1024, "fp8", 0),
    (1024, "fp8", 14),
    (1024, "fp8", 41),
    (512, "fp8", 0),
    (512, "fp8", 41),
]
#: the tiny model has 2 double + 2 single blocks; 64 px is the smallest resolution a config takes
SMOKE_CASES = [(64, "bf16", 0), (64, "bf16", 2), (64, "fp8", 0), (64, "fp8", 2)]
#: the flux-dev preset sections whose transformer settings a case has (they add gradient accumulation)
PRESETS = {
    (1024, "bf16", 0): "48gb, 80gb",
    (1024, "bf16", 22): "24gb",
    (1024, "fp8", 14): "16gb",
    (1024, "fp8", 41): "12gb",
}
#: seconds a case needs on an H100/H200 (build excluded), for the time-budget check
CASE_COST = {1024: 15.0, 512: 8.0}
SWAP_COST = 10.0
BUILD_COST = 30.0
#: parts of the planner's breakdown: weights held through the step, and CUDA's additions
STATIC_PARTS = ("transformer_weights", "lora_params", "optimizer_state", "block_swap_buffer", "ema_weights")
CUDA_PARTS = ("cuda_context", "workspace", "fragmentation")
NOT_IN_STEP = ("text_encoders", "vae")  # encoders: cached outputs, not on the device during the step

FLUX_COLUMNS = [
    ("resolution", "resolution", "int"),
    ("base", "base", "text"),
    ("blocks_to_swap", "blocks_to_swap", "int"),
    ("swapped", "swapped double+single: run / planner", "text"),
    ("preset", "preset", "text"),
    ("predicted", "predicted step (total)", "gib"),
    ("reserved_plus_context", "max reserved + context", "gib"),
    ("error_vs_reserved", "error", "pct"),
    ("predicted_allocated_basis", "predicted step (allocated basis)", "gib"),
    ("allocated", "max allocated", "gib"),
    ("error_vs_allocated", "error", "pct"),
    ("predicted_run", "predicted run peak", "gib"),
    ("rate", "samples/s", "rate2"),
    ("rate_vs_unswapped", "vs no swap", "ratio"),
    ("first_loss", "first loss", "f4"),
    ("status", "status", "text"),
]


@dataclass
class Architecture:
    """The transformer to build and the shapes of what the caches hold for it."""

    label: str
    base_model: str  # what the planner reads (a folder, or a name it takes as the bundled FLUX.1-dev)
    transformer: dict[str, Any]  # {"class": ..., "config": {...}}
    vae_factor: int
    t5_tokens: int

    @property
    def latent_channels(self) -> int:
        return int(self.transformer["config"].get("in_channels", 64)) // 4

    def cond_shapes(self) -> tuple[int, int]:
        config = self.transformer["config"]
        return int(config["joint_attention_dim"]), int(config["pooled_projection_dim"])


def _architecture(ctx: Any) -> Architecture:
    import json
    from importlib import resources

    if not ctx.smoke:
        shipped = resources.files("loratui.models.flux").joinpath("configs", "flux1-dev.json")
        configs = json.loads(shipped.read_text("utf-8"))
        factor = 2 ** (len(configs["vae"]["block_out_channels"]) - 1)
        return Architecture("FLUX.1-dev", "flux1-dev", configs["transformer"], factor, 512)
    from loratui.tiny_models import build_tiny_flux

    folder = build_tiny_flux(ctx.work / "tiny-flux-dev", "dev")
    own = json.loads((folder / "transformer" / "config.json").read_text("utf-8"))
    vae = json.loads((folder / "vae" / "config.json").read_text("utf-8"))
    transformer = {"class": own["_class_name"], "config": {k: v for k, v in own.items() if k[0] != "_"}}
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    return Architecture("tiny FLUX.1-dev layout", str(folder), transformer, factor, 32)


def _config(ctx: Any, arch: Architecture, resolution: int, base: str, swap: int) -> Any:
    from loratui.config import TrainConfig

    return TrainConfig(
        task_type="image-generation",
        model_family="flux",
        base_model=arch.base_model,
        train_data_dir=str(ctx.work),
        resolution=resolution,
        batch_size=1,
        lora_rank=LORA_RANK,
        lora_alpha=LORA_RANK,
        gradient_checkpointing=True,
        mixed_precision="no" if ctx.smoke else "bf16",  # the CPU computes bf16 slowly
        base_weights_dtype=base,
        blocks_to_swap=swap,
        cache_latents=True,
        cache_text_encoder_outputs=True,
        t5_max_length=arch.t5_tokens,
        seed=0,
    )


# --- prediction ------------------------------------------------------------------------------------------


def predicted_step(cfg: Any, device: str) -> dict[str, Any]:
    """The planner's figures for `cfg`: the run's peak (which may be a caching pass before training) and the
    training step's own peak, the one this section measures.

    With cached outputs on a GPU the planner's peak can be the T5 caching pass (T5-XXL is larger than an
    fp8 base with swapped blocks); the step's figure then comes from the same config planned with the text
    encoders on the device, less their weights (the rest of the step is the same). On the CPU the planner
    counts the encoders and the AE in memory; the section measures the transformer only, so they are left
    out too."""
    from loratui.memory.estimate import estimate_peak
    from loratui.memory.estimate_types import cuda_overheads

    run = estimate_peak(cfg, family="flux", device=device)
    step = estimate_peak(
        cfg.model_copy(update={"cache_text_encoder_outputs": False}), family="flux", device=device
    )
    out: dict[str, Any] = {
        "predicted_run": int(run.total_bytes),
        "run_phase": run.phase,
        "band": step.error_band,
        "phase": step.phase,
    }
    if "before training" in step.phase:  # a caching pass even without the text encoders: no step figure
        out.update(predicted=None, predicted_allocated_basis=None)
        return out
    parts = {k: int(v) for k, v in step.breakdown.items() if k not in NOT_IN_STEP and k not in CUDA_PARTS}
    static = sum(v for k, v in parts.items() if k in STATIC_PARTS)
    dynamic = sum(parts.values()) - static
    extra = sum(cuda_overheads("llm", dynamic, static).values()) if device == "cuda" else 0
    out.update(
        predicted=static + dynamic + extra,
        predicted_allocated_basis=static + dynamic,
        predicted_parts=parts,
    )
    return out


# --- the model and the step ------------------------------------------------------------------------------


def build_models(arch: Architecture, cfg: Any, device: str) -> tuple[Any, Any, list[Any]]:
    """(FluxModels, LoraPlan, trainable parameters): the transformer built from its config directly on the
    device (GPU: bf16 from the start), frozen, checkpointing on, LoRA injected by the Flux trainer's
    `setup_lora`."""
    import diffusers
    import torch
    from bench_memory_gpu import init_on

    from loratui.models.flux.parts import FluxParts
    from loratui.train.flux.setup import FluxModels, setup_lora
    from loratui.train.loop.precision import resolve_precision, weight_dtype

    dtype = weight_dtype(resolve_precision(cfg.mixed_precision, device))
    torch.manual_seed(0)
    cls = getattr(diffusers, arch.transformer["class"])
    with init_on(device, str(dtype).removeprefix("torch.")):
        transformer = cls(**arch.transformer["config"])
    transformer.to(device=device, dtype=dtype)
    transformer.requires_grad_(False)
    transformer.enable_gradient_checkpointing()
    parts = FluxParts("dev", transformer, None, None, None, None, None, None, f"random {arch.label}")
    models = FluxModels(
        parts,
        "flux",
        torch.device(device),
        dtype,
        guidance_scale=float(cfg.guidance_scale),
        t5_max_length=arch.t5_tokens,
    )
    plan, params = setup_lora(cfg, models)
    return models, plan, params


def cached_inputs(arch: Architecture, resolution: int, dtype: Any) -> dict[str, Any]:
    """What the latent and text caches hold for one sample: fp32 latents, text-encoder outputs in the
    encoders' compute dtype (CPU tensors; the step moves them)."""
    import torch

    generator = torch.Generator().manual_seed(resolution)
    side = resolution // arch.vae_factor
    joint, pooled = arch.cond_shapes()
    return {
        "latents": torch.randn(1, arch.latent_channels, side, side, generator=generator),
        "t5": torch.randn(1, arch.t5_tokens, joint, generator=generator).to(dtype),
        "pooled": torch.randn(1, pooled, generator=generator).to(dtype),
    }


def micro_loss_fn(cfg: Any, context: Any, inputs: dict[str, Any], device: Any):
    """The Flux trainer's micro-batch loss (`FluxLossContext.group_loss`) over cached inputs."""
    from loratui.models.flux.conditioning import Conditioning
    from loratui.models.flux.flow_match import (
        noisy_latents,
        per_sample_mse,
        sample_sigmas_and_noise,
        velocity_target,
    )

    def micro_loss(indices: list[int]) -> Any:
        latents = inputs["latents"].to(device)
        sigmas, noise = sample_sigmas_and_noise(
            latents,
            indices,
            seed=cfg.seed,
            epoch=0,
            method=cfg.timestep_sampling,
            sigmoid_scale=cfg.sigmoid_scale,
            discrete_flow_shift=cfg.discrete_flow_shift,
            noise_offset=cfg.noise_offset,
        )
        cond = Conditioning(inputs["t5"].to(device), inputs["pooled"].to(device), None)
        prediction = context.predict(noisy_latents(latents, noise, sigmas), sigmas, cond)
        return per_sample_mse(prediction, velocity_target(latents, noise)).sum() / len(indices)

    return micro_loss


def _planned_split(arch: Architecture, swap: int) -> str:
    """The (double, single) blocks the planner takes as swapped for `blocks_to_swap`."""
    from loratui.memory.flux import swap_split

    config = arch.transformer["config"]
    double, single = swap_split(swap, int(config["num_layers"]), int(config["num_single_layers"]))
    return f"{double}+{single}"


def _fmt_gib(value: float) -> str:
    return f"{value / GIB:.2f} GiB"


def _error(predicted: float | None, measured: float | None) -> float | None:
    if predicted is None or not measured:
        return None
    return round(predicted / measured - 1, 4)


def _finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


# --- the section -----------------------------------------------------------------------------------------


@dataclass
class _Run:
    """The state shared by the cases: models, LoRA plan and its starting weights, the accelerator."""

    cfg: Any
    models: Any
    plan: Any
    params: list[Any]
    start: dict[str, Any]
    accelerator: Any


def run_flux_section(ctx: Any, sec: Any) -> None:
    """Fill `sec` (a `gpu_check.Section`) with one row per case; see the module docstring."""
    import torch
    from _gpu_common import free_memory

    steps = 2 if ctx.smoke else 5
    warmup = min(2, steps - 1)
    cases = SMOKE_CASES if ctx.smoke else GPU_CASES
    if not ctx.enough(0 if ctx.smoke else BUILD_COST):
        for resolution, base, swap in cases:
            sec.rows.append(_base_row(resolution, base, swap) | {"status": "skipped: time budget"})
        return
    arch = _architecture(ctx)
    precision = "fp32" if ctx.smoke else "bf16 mixed precision"
    sec.notes.append(
        f"{arch.label} transformer, random weights; LoRA rank {LORA_RANK} on the default Flux targets, "
        f"batch 1, {precision}, gradient checkpointing on, latents and text-encoder outputs cached "
        f"({arch.t5_tokens} T5 tokens); {steps} steps per case, samples/s = median after the first {warmup}. "
        "'predicted step': the planner's training-step peak for the same config; 'predicted run peak': its "
        "figure for the whole run, which with a 16-bit T5 can be the caching pass before training. "
        "The trainer keeps the last N blocks (in execution order) in CPU memory; 'swapped' shows those "
        "and the blocks the planner takes as swapped. The fp8 base is converted in place on the device "
        "after the bf16 cases (a run converts in CPU memory), so its reserved figure may keep some of the "
        "bf16 weights' segments."
    )
    if ctx.smoke:
        sec.notes.append("--smoke: CPU, tiny model; memory is the memory meter's peak (no allocator).")
    run = None
    unswapped: dict[tuple[int, str], dict[str, Any]] = {}
    threads = torch.get_num_threads()
    if ctx.smoke:  # tiny tensors: one thread is faster, and steadier on a shared machine
        torch.set_num_threads(1)
    try:
        for resolution, base, swap in cases:
            row = _base_row(resolution, base, swap)
            cost = (0.0 if ctx.smoke else CASE_COST[resolution] + (SWAP_COST if swap else 0.0)) + (
                0.0 if run is not None or ctx.smoke else BUILD_COST
            )
            if not ctx.enough(cost):
                sec.rows.append(row | {"status": f"skipped: time budget ({ctx.left():.0f} s left)"})
                continue
            cfg = _config(ctx, arch, resolution, base, swap)
            row.update(predicted_step(cfg, ctx.device))
            card = torch.cuda.get_device_properties(0).total_memory if ctx.device == "cuda" else None
            if card is not None and (row["predicted"] or 0) > 0.95 * card:
                sec.rows.append(row | {"status": f"skipped: predicted over the card's {_fmt_gib(card)}"})
                continue
            if run is None:
                print(f"  flux: building the {arch.label} transformer", flush=True)
                started = time.perf_counter()
                run = _start(cfg, arch, ctx.device)
                sec.notes.append(
                    f"transformer built and LoRA injected in {time.perf_counter() - started:.1f} s."
                )
            if base != run.models.base_weights_dtype:
                from loratui.train.flux.setup import setup_base_storage

                converted = setup_base_storage(run.models, base)
                free_memory()
                sec.notes.append(f"{base} base: {converted} Linear layers of the blocks converted.")
            print(f"  flux: {resolution}² {base} blocks_to_swap {swap}", flush=True)
            try:
                row.update(_measure(ctx, run, cfg, arch, swap, steps, warmup))
                row["status"] = "ok"
            except torch.OutOfMemoryError as exc:
                row["status"] = "skipped: out of memory: " + str(exc).splitlines()[0][:120]
            finally:
                free_memory()
            if row["status"] == "ok":
                key = (resolution, base)
                if swap == 0:
                    unswapped[key] = row
                elif key in unswapped:
                    row["rate_vs_unswapped"] = round(row["rate"] / unswapped[key]["rate"], 4)
                    row["loss_vs_unswapped"] = row["first_loss"] - unswapped[key]["first_loss"]
            sec.rows.append(row)
            _checks(ctx, sec, row)
    finally:
        torch.set_num_threads(threads)
        if run is not None:
            run.accelerator.free_memory()
            del run
        free_memory()


def _base_row(resolution: int, base: str, swap: int) -> dict[str, Any]:
    return {
        "resolution": resolution,
        "base": base,
        "blocks_to_swap": swap,
        "preset": PRESETS.get((resolution, base, swap), "-"),
    }


def _start(cfg: Any, arch: Architecture, device: str) -> _Run:
    from loratui.models.sd.lora import lora_state
    from loratui.train.loop.precision import resolve_precision
    from loratui.train.process.distributed import make_accelerator

    models, plan, params = build_models(arch, cfg, device)
    accelerator = make_accelerator(resolve_precision(cfg.mixed_precision, device), cpu=device == "cpu")
    models.transformer.train()
    # as `setup_wrappers`: the forward under accelerate's autocast, no device placement (block swap)
    models.forward_transformer = accelerator.prepare_model(models.transformer, device_placement=False)
    start = lora_state(models.components(), plan)
    return _Run(cfg, models, plan, params, start, accelerator)


def _measure(
    ctx: Any, run: _Run, cfg: Any, arch: Architecture, swap: int, steps: int, warmup: int
) -> dict[str, Any]:
    """One case: the same starting LoRA, `steps` optimizer steps; peaks, samples/s and the first loss."""
    from _gpu_common import cuda_peaks, rate, reset_peaks, synchronize

    from loratui.memory.meter import MemoryMeter
    from loratui.models.sd.lora import load_lora_state
    from loratui.train.flux.oom import resident_parts
    from loratui.train.flux.setup import place_transformer, setup_optimizer
    from loratui.train.flux.trainer import FluxLossContext
    from loratui.train.loop.stepping import optimizer_step

    models = run.models
    device = models.device
    load_lora_state(models.components(), run.start)
    swapped = "-"
    if swap:
        models.blocks_to_swap = swap
        place_transformer(models)  # the swapped blocks' weights leave the device for pinned CPU memory
        double = {id(b) for b in models.transformer.transformer_blocks}
        on_cpu = [id(entry.block) in double for entry in models.swapper.swapped]
        swapped = f"{sum(on_cpu)}+{len(on_cpu) - sum(on_cpu)} / " + _planned_split(arch, swap)
    optimizer = scheduler = meter = None
    seconds: list[float] = []
    losses: list[float] = []
    try:
        optimizer, scheduler = setup_optimizer(cfg, models, run.plan, steps)
        context = FluxLossContext(cfg, models, None, None, None)
        micro_loss = micro_loss_fn(cfg, context, cached_inputs(arch, cfg.resolution, models.dtype), device)
        reset_peaks()
        if ctx.device == "cpu":
            meter = MemoryMeter()
            for module in resident_parts(models):
                meter.register_model(module)
            meter.register_optimizer(optimizer)
            meter.reset_peak()
        step = functools.partial(
            optimizer_step,
            micro_loss=micro_loss,
            accelerator=run.accelerator,
            optimizer=optimizer,
            scheduler=scheduler,
            params=run.params,
            max_grad_norm=cfg.max_grad_norm,
            model=models.forward_transformer,
        )
        for index in range(steps):
            # CPU: the first step under the meter (memory), the others timed without it
            metered = meter if meter is not None and index == 0 else contextlib.nullcontext()
            synchronize()
            started = time.perf_counter()
            with metered:
                result = step([[index]])
            synchronize()
            seconds.append(time.perf_counter() - started)
            losses.append(result.loss)
        allocated, reserved = cuda_peaks()
        if meter is not None:
            allocated = int(meter.peak_bytes)
    finally:
        if meter is not None:
            meter.close()
        for param in run.params:
            param.grad = None
        del optimizer, scheduler
        if models.swapper is not None:
            models.blocks_to_swap = 0
            place_transformer(models)  # every block back on the device for the next case
    out: dict[str, Any] = {
        "allocated": allocated,
        "reserved_plus_context": None if reserved is None else reserved + ctx.context_bytes,
        "rate": rate(cfg.batch_size, seconds, warmup=warmup),
        "swapped": swapped,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "step_seconds": [round(s, 4) for s in seconds],
    }
    return out


def _checks(ctx: Any, sec: Any, row: dict[str, Any]) -> None:
    """Plumbing (always judged) and the thresholds (judged on the GPU)."""
    label = f"{row['resolution']}² {row['base']} blocks_to_swap {row['blocks_to_swap']}"
    if row["status"] != "ok":
        return
    row["error_vs_allocated"] = _error(row.get("predicted_allocated_basis"), row.get("allocated"))
    row["error_vs_reserved"] = _error(row.get("predicted"), row.get("reserved_plus_context"))
    required = ["predicted", "allocated", "rate", "first_loss", "last_loss"]
    sec.check(
        f"{label}: finite numbers",
        _finite(*(row.get(k) for k in required)),
        ", ".join(f"{k}={row.get(k)}" for k in required),
    )
    err = row["error_vs_reserved"] if ctx.device == "cuda" else row["error_vs_allocated"]
    if err is not None and row.get("band") is not None:
        sec.check(
            f"{label}: prediction within its stated band",
            abs(err) <= row["band"],
            f"error {err:+.1%}, band ±{row['band']:.0%}",
            judged=ctx.judged,
        )
    if "loss_vs_unswapped" in row:
        diff, scale = abs(row["loss_vs_unswapped"]), max(abs(row["first_loss"]), 1e-6)
        sec.check(
            f"{label}: first-step loss equals the unswapped run's",
            diff <= 1e-3 * scale,
            f"|difference| {diff:.2e}",
        )
