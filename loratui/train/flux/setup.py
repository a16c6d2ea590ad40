"""The Flux trainer's setup: base model, LoRA, base storage and block swap, optimizer, caches, placement.

Each `setup_*` function builds one thing the loop in `loratui.train.flux.trainer` needs. The order matters for
memory: the base loads into CPU memory; the VAE and text encoders visit the device to fill the caches; the
LoRA layers are injected, the frozen blocks stored as `base_weights_dtype` says; then the transformer takes
the device, except the `blocks_to_swap` blocks, which stay in CPU memory.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratui.models.checkpointing import enable_activation_checkpointing
from loratui.models.flux.block_swap import BlockSwapper
from loratui.models.flux.conditioning import FluxTextConditioner
from loratui.models.flux.fp8 import quantise_base
from loratui.models.flux.lora import CLIP, TRANSFORMER, plan_flux_targets, target_names
from loratui.models.flux.parts import FluxParts
from loratui.models.sd.adapters import spec_from_config
from loratui.models.sd.lora import (
    LoraPlan,
    LoraSetupError,
    adapter_parameters,
    inject_lora,
    named_adapter_parameters,
)
from loratui.train.job import WorkerJob
from loratui.train.loop.ema import LoraEMA
from loratui.train.loop.optim import optimizer_from_config
from loratui.train.loop.precision import weight_dtype
from loratui.train.loop.reporting import Reporter
from loratui.train.sd.dataset import SDDataset
from loratui.util.seeding import set_global_seed


@dataclass
class FluxModels:
    """The loaded parts and how they are placed and stored."""

    parts: FluxParts
    family: str  # "flux" | "chroma"
    device: torch.device
    dtype: torch.dtype  # compute dtype of the frozen base (and of the activations)
    guidance_scale: float  # the guidance embedding's value during training (dev)
    t5_max_length: int
    base_weights_dtype: str = "bf16"
    blocks_to_swap: int = 0
    swapper: BlockSwapper | None = None
    forward_transformer: Any = None  # what the loop calls (prepared by accelerate)
    forward_clip: Any = None
    notes: list[str] = field(default_factory=list)
    text_on_device: bool = True  # False once the text encoders' outputs are cached and they left the device

    @property
    def transformer(self) -> Any:
        return self.parts.transformer

    @property
    def vae(self) -> Any:
        return self.parts.vae

    @property
    def variant(self) -> str:
        return self.parts.variant

    @property
    def text_encoders(self) -> list[Any]:
        """The text encoders still loaded (T5 is released once its outputs are cached)."""
        return [m for m in (self.parts.t5, self.parts.clip) if m is not None]

    def components(self) -> dict[str, torch.nn.Module]:
        """Modules that can carry LoRA layers, by the names of the LoRA file (`transformer`, `text_encoder`)."""
        out = {TRANSFORMER: self.parts.transformer}
        if self.parts.clip is not None:
            out[CLIP] = self.parts.clip
        return out


def setup_models(job: WorkerJob, precision: str, device: torch.device) -> FluxModels:
    """Load the base in the compute dtype, frozen, in CPU memory (see the module docstring for the order)."""
    from loratui.models.flux.loading import load_flux_for_config

    cfg = job.resolved.config
    dtype = weight_dtype(precision)
    parts = load_flux_for_config(cfg, dtype=dtype)
    family = "chroma" if parts.is_chroma else "flux"
    notes = []
    if job.resolved.family in ("flux", "chroma") and job.resolved.family != family:
        notes.append(
            f"model_family is {job.resolved.family}, the base model is {parts.variant}: trained as {family}"
        )
    if cfg.train_text_encoder and parts.clip is None:
        notes.append(
            "train_text_encoder: Chroma has no CLIP-L and T5 is never trained; only the transformer is"
        )
    if not parts.has_guidance and cfg.guidance_scale != 1.0:
        notes.append(
            f"guidance_scale {cfg.guidance_scale} is ignored: {parts.variant} has no guidance embedding"
        )
    if parts.vae.dtype != torch.float32 and dtype != torch.float32:
        parts.vae.to(dtype=torch.float32)  # the AE encodes once per image: full precision costs little
    if cfg.gradient_checkpointing:
        parts.transformer.enable_gradient_checkpointing()
        if cfg.train_text_encoder and parts.clip is not None:
            enable_activation_checkpointing(parts.clip)
    return FluxModels(
        parts,
        family,
        device,
        dtype,
        guidance_scale=float(cfg.guidance_scale),
        t5_max_length=int(cfg.t5_max_length or parts.default_t5_max_length),
        base_weights_dtype=cfg.base_weights_dtype,
        blocks_to_swap=int(cfg.blocks_to_swap),
        notes=notes,
    )


def setup_lora(
    cfg, models: FluxModels, reporter: Reporter | None = None
) -> tuple[LoraPlan, list[torch.nn.Parameter]]:
    """Inject the LoRA layers (fp32, seeded) into the transformer (and CLIP-L with `train_text_encoder`),
    optionally starting from `init_lora` (a kohya or diffusers Flux LoRA from loratui or another trainer)."""
    network = spec_from_config(cfg)
    if network.kind != "lora":
        raise LoraSetupError(f"Flux runs train network_type lora, not {network.kind}; set network_type: lora")
    te = bool(cfg.train_text_encoder and models.parts.clip is not None)
    plan = LoraPlan(
        targets=plan_flux_targets(cfg.target_modules, models.components(), train_text_encoder=te),
        rank=cfg.lora_rank,
        alpha=cfg.effective_alpha,
        dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        network=network,
        target_names=target_names(cfg.target_modules, train_text_encoder=te),
    )
    set_global_seed(cfg.seed)
    params = inject_lora({name: models.components()[name] for name in plan.targets}, plan)
    if cfg.init_lora:
        start_from_init_lora(Path(cfg.init_lora).expanduser(), models, plan, reporter)
    return plan, params


def start_from_init_lora(path: Path, models: FluxModels, plan: LoraPlan, reporter: Reporter | None) -> None:
    """Load `init_lora` into the fresh LoRA layers exactly, or raise LoraSetupError saying what differs."""
    from loratui.models.flux.kohya import FluxLoraError
    from loratui.models.flux.lora_files import apply_flux_init_lora, read_flux_init_lora
    from loratui.models.sd.kohya import LoraFileError

    components = {name: models.components()[name] for name in plan.targets}
    try:
        lora = read_flux_init_lora(path, models.transformer)
        loaded, skipped = apply_flux_init_lora(lora.modules, components)
    except (FluxLoraError, LoraFileError) as exc:
        raise LoraSetupError(str(exc) if str(exc).startswith("init_lora") else f"init_lora: {exc}") from exc
    if reporter is None:
        return
    reporter.event(
        "warning" if skipped else "info",
        message=f"init_lora: started from {loaded} module(s) of {path} ({lora.fmt} format)",
    )
    if skipped:
        reporter.event(
            "warning",
            message=f"init_lora: {len(skipped)} module(s) are not trained in this run and are dropped "
            f"(e.g. {skipped[0]}); set target_modules/train_text_encoder to keep them",
        )


def setup_base_storage(models: FluxModels, mode: str | None = None) -> int:
    """Store the transformer blocks' frozen Linears as `mode` (default: the config's base_weights_dtype);
    returns how many were converted. Call after `setup_lora` (the LoRA layers wrap the original Linears)."""
    mode = mode or models.base_weights_dtype
    if mode == "nf4":
        from loratui.models.quant import bitsandbytes_problem

        problem = bitsandbytes_problem(models.device.type, "base_weights_dtype: nf4")
        if problem:
            raise LoraSetupError(problem)
    converted = quantise_base(models.transformer, mode, models.dtype)
    models.base_weights_dtype = mode
    return converted


def place_transformer(models: FluxModels) -> None:
    """Move the transformer to the device; with `blocks_to_swap` (kohya's meaning), its swapped blocks stay in CPU
    memory."""
    if models.swapper is not None:  # another count: nothing comes to the device on the way
        models.swapper.detach(to_device=False)
        models.swapper = None
    if models.blocks_to_swap <= 0:
        models.transformer.to(models.device)
        return
    swapper = BlockSwapper(models.transformer, models.blocks_to_swap, models.device)
    swapper.attach()  # copies the newly swapped blocks to CPU memory and frees their device copies
    _move_except(models.transformer, swapper, models.device)
    models.swapper = swapper
    models.blocks_to_swap = swapper.count


def _move_except(model: torch.nn.Module, swapper: BlockSwapper, device: torch.device) -> None:
    """Every tensor of `model` to `device` except the swapped blocks' frozen ones (bitsandbytes layers whole)."""
    kept = {id(tensor) for entry in swapper.swapped for tensor, _ in entry.tensors}
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.to(device)
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if id(tensor) not in kept:
                tensor.data = tensor.data.to(device)


def setup_optimizer(cfg, models: FluxModels, plan: LoraPlan, total_steps: int):
    groups = []
    for name, model in models.components().items():
        if name not in plan.targets:
            continue
        lr = cfg.learning_rate if name == TRANSFORMER else (cfg.text_encoder_lr or cfg.learning_rate)
        groups.append({"params": adapter_parameters(model), "lr": lr})
    return optimizer_from_config(cfg, groups, total_steps)


def setup_latents(cfg, models: FluxModels, dataset: SDDataset, reporter: Reporter):
    """The image trainer's latent source over the Flux AE (16 channels, shift and scale applied)."""
    from loratui.train.sd.setup import setup_latents as image_latents

    return image_latents(cfg, models, dataset, reporter, split_across_processes=True)


def setup_text(
    cfg, models: FluxModels, dataset: SDDataset, reporter: Reporter, prompts: list[str] | None = None
) -> FluxTextConditioner:
    """The text conditioner. With `cache_text_encoder_outputs` and fixed captions, every caption and sample
    prompt is encoded once; then T5 leaves the device and is released from memory (nothing needs it again),
    and CLIP-L leaves the device unless it is trained."""
    parts = models.parts
    cache = bool(cfg.cache_text_encoder_outputs)
    if cache and not dataset.options.captions_fixed:
        reporter.event(
            "warning", message="cache_text_encoder_outputs is off: captions change (dropout/shuffle)"
        )
        cache = False
    clip_trained = bool(cfg.train_text_encoder and parts.clip is not None)
    text = FluxTextConditioner(
        parts.t5,
        parts.t5_tokenizer,
        models.forward_clip or parts.clip,
        parts.clip_tokenizer,
        max_length=models.t5_max_length,
        device=models.device,
        chroma=parts.is_chroma,
        cache_t5=cache,
        cache_clip=cache and not clip_trained,
    )
    for encoder in models.text_encoders:
        encoder.to(models.device)
    models.text_on_device = True
    if cache:
        captions = {dataset.view(i, 0).caption for i in range(len(dataset))}
        text.precompute(sorted(captions | set(prompts or [])))
        release_t5(models, text)
        if parts.clip is not None and not clip_trained:
            parts.clip.to("cpu")
        models.text_on_device = clip_trained
    return text


def release_t5(models: FluxModels, text: FluxTextConditioner) -> None:
    """Drop T5 (the largest text encoder) from the device and from memory once its outputs are cached."""
    models.parts.t5 = None
    text.t5 = None
    gc.collect()
    if models.device.type == "cuda":
        torch.cuda.empty_cache()


def setup_ema(cfg, models: FluxModels, plan: LoraPlan) -> LoraEMA | None:
    if cfg.ema_decay is None:
        return None
    params = named_adapter_parameters(models.components(), plan)
    return LoraEMA(params, cfg.ema_decay, update_every=cfg.ema_update_every, on_cpu=cfg.ema_on_cpu)


def setup_wrappers(
    cfg, accelerator: Any, models: FluxModels, text: FluxTextConditioner, optimizer: Any
) -> Any:
    """accelerate's wrappers; the loop calls `models.forward_transformer` (and the trained CLIP-L's wrapper)."""
    models.transformer.train()
    # placed by `place_transformer` (block swap keeps some weights in CPU memory): no device placement here
    models.forward_transformer = accelerator.prepare_model(models.transformer, device_placement=False)
    if cfg.train_text_encoder and models.parts.clip is not None:
        models.parts.clip.train()
        models.forward_clip = accelerator.prepare(models.parts.clip)
        text.clip = models.forward_clip
    return accelerator.prepare(optimizer)


def output_path(job: WorkerJob) -> Path:
    """The LoRA file's path; refuses early when it belongs to a different run."""
    from loratui.train.sd.setup import setup_output

    return setup_output(job)
