"""The SD trainer's setup: base model, LoRA, optimizer, dataset, latent and text caches, device placement.

Each `setup_*` function builds one thing the loop in `loratui.train.sd.trainer` needs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loratui.models.checkpointing import enable_activation_checkpointing
from loratui.models.sd.adapters import spec_from_config
from loratui.models.sd.conditioning import TEXT_BATCH, TextConditioner
from loratui.models.sd.lora import (
    LoraPlan,
    LoraSetupError,
    adapter_parameters,
    apply_init_lora,
    inject_lora,
    named_adapter_parameters,
    plan_targets,
    read_init_lora,
    target_names,
)
from loratui.models.sd.lora_files import ExportError, check_output
from loratui.train.job import WorkerJob
from loratui.train.loop.ema import LoraEMA
from loratui.train.loop.optim import optimizer_from_config
from loratui.train.loop.precision import pick_device, resolve_precision, weight_dtype
from loratui.train.loop.reporting import Reporter
from loratui.train.sd.dataset import SDDataset, load_dataset
from loratui.train.sd.latent_cache import LatentSource
from loratui.util.seeding import set_global_seed


@dataclass
class Models:
    """The pipeline parts the loop uses."""

    pipeline: Any
    family: str
    prediction_type: str
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    noise_scheduler: Any
    device: torch.device
    dtype: torch.dtype
    notes: list[str] = field(default_factory=list)
    zero_terminal_snr: bool = False  # the rescaled noise schedule (training and samples)
    forward_unet: Any = None  # what the loop calls (prepared by accelerate)
    forward_text_encoders: list | None = None
    text_on_device: bool = (
        True  # False once frozen text encoders' outputs are cached and they left the device
    )

    @property
    def sdxl(self) -> bool:
        return self.family == "sdxl"

    def components(self) -> dict[str, torch.nn.Module]:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        return {"unet": self.unet, **dict(zip(names, self.text_encoders, strict=True))}


def setup_output(job: WorkerJob) -> Path:
    """The exported file's path; refuses early when it belongs to a different run."""
    cfg = job.resolved.config
    target = Path(cfg.output_dir).expanduser() / f"{cfg.name}.safetensors"
    try:
        check_output(target, job.run.name, overwrite=job.overwrite, resuming=job.resume_from is not None)
    except ExportError as exc:
        raise ExportError(f"output_dir check: {exc}") from None
    return target


def setup_accelerator(cfg):
    """A fresh `Accelerator` (one per process when several train; see loratui.train.process.distributed)."""
    from loratui.train.process.distributed import make_accelerator

    device = pick_device()
    precision = resolve_precision(cfg.mixed_precision, device.type)
    return make_accelerator(precision, cpu=device.type == "cpu"), precision


def setup_dataset(cfg, reporter: Reporter, allow_errors: bool = False) -> SDDataset:
    warn = lambda message: reporter.event("warning", message=message)  # noqa: E731
    dataset = load_dataset(cfg, warn=warn, allow_errors=allow_errors)
    return dataset


def setup_models(job: WorkerJob, precision: str, device: torch.device) -> Models:
    """Load the base model in the training dtype and freeze it; everything stays on the CPU for now.

    `setup_caches` brings the VAE and text encoders to `device` (only while encoding, when their outputs are
    cached) and `place_unet` the UNet after that, so the caching passes never share the card with the UNet.
    """
    from loratui.models.sd.loading import load_sd_pipeline
    from loratui.models.sd.schedule import training_scheduler

    cfg = job.resolved.config
    dtype = weight_dtype(precision)
    loaded = load_sd_pipeline(
        cfg.base_model,
        allow_pickle=cfg.allow_pickle,
        prediction_type=cfg.prediction_type,
        zero_terminal_snr=cfg.zero_terminal_snr,
        torch_dtype=dtype,
    )
    pipe = loaded.pipeline
    text_encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if loaded.is_sdxl else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if loaded.is_sdxl else [])
    if loaded.is_sdxl and dtype != torch.float32:
        pipe.vae.to(dtype=torch.float32)  # the SDXL VAE overflows in fp16
    for module in [pipe.unet, pipe.vae, *text_encoders]:
        module.requires_grad_(False)
    noise_scheduler = training_scheduler(
        pipe.scheduler.config, loaded.prediction_type, loaded.zero_terminal_snr
    )
    if loaded.zero_terminal_snr and loaded.prediction_type != "v_prediction":
        loaded.notes.append(
            "zero_terminal_snr with an epsilon model: the last timestep teaches nothing and samples cannot "
            "start from pure noise; use a v-prediction model (prediction_type: v_prediction)"
        )
    if cfg.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
        if cfg.train_text_encoder:
            for encoder in text_encoders:
                enable_activation_checkpointing(encoder)
    return Models(
        pipe,
        loaded.family,
        loaded.prediction_type,
        pipe.unet,
        pipe.vae,
        text_encoders,
        tokenizers,
        noise_scheduler,
        device,
        dtype,
        loaded.notes,
        loaded.zero_terminal_snr,
    )


def setup_lora(cfg, models: Models, reporter: Reporter) -> tuple[LoraPlan, list[torch.nn.Parameter]]:
    """Inject the adapter layers of `network_type` (seeded), optionally starting from `init_lora`."""
    components = models.components()
    network = spec_from_config(cfg)
    te = cfg.train_text_encoder
    plan = LoraPlan(
        targets=plan_targets(
            cfg.target_modules, components, train_text_encoder=te, convs=network.adapts_convs
        ),
        rank=cfg.lora_rank,
        alpha=cfg.effective_alpha,
        dropout=cfg.lora_dropout,
        use_rslora=cfg.use_rslora,
        network=network,
        target_names=target_names(cfg.target_modules, train_text_encoder=te),
    )
    if cfg.init_lora and network.kind not in ("lora", "locon"):
        raise LoraSetupError(
            f"init_lora starts lora or locon runs only, not network_type {network.kind}; leave init_lora out"
        )
    set_global_seed(cfg.seed)
    params = inject_lora(components, plan)
    if cfg.init_lora:
        layers = int(models.unet.config.layers_per_block)
        modules = read_init_lora(Path(cfg.init_lora).expanduser(), components, models.family, layers)
        loaded, skipped = apply_init_lora(modules, components, plan)
        reporter.event(
            "warning" if skipped else "info",
            message=f"init_lora: started from {loaded} module(s) of {cfg.init_lora}",
        )
        if skipped:
            reporter.event(
                "warning",
                message=f"init_lora: {len(skipped)} module(s) are not trained in this run and are dropped "
                f"(e.g. {skipped[0]}); set target_modules/train_text_encoder to keep them",
            )
    return plan, params


def setup_optimizer(cfg, models: Models, plan: LoraPlan, total_steps: int):
    groups = []
    for name, model in models.components().items():
        if name not in plan.targets:
            continue
        params = adapter_parameters(model)
        lr = cfg.learning_rate if name == "unet" else (cfg.text_encoder_lr or cfg.learning_rate)
        groups.append({"params": params, "lr": lr})
    optimizer, scheduler = optimizer_from_config(cfg, groups, total_steps)
    return optimizer, scheduler


def setup_caches(cfg, job: WorkerJob, models: Models, dataset: SDDataset, reporter: Reporter):
    """Latent source (cached when asked) and text conditioner (cached when frozen and captions are fixed).

    Device placement follows what is cached: the VAE is on the device while it encodes and leaves it once
    every latent is cached; frozen text encoders with cached outputs encode every caption once, then leave
    the device too (sampling brings both back for the duration). The OOM ladder re-runs one pass or the
    other mid-run (`setup_latents`, `setup_text`)."""
    latents = setup_latents(cfg, models, dataset, reporter, split_across_processes=True)
    return latents, setup_text(cfg, models, dataset, reporter)


def setup_latents(
    cfg, models: Models, dataset: SDDataset, reporter: Reporter, *, split_across_processes: bool = False
) -> LatentSource:
    """The latent source; with caching, every latent is encoded now and the VAE leaves the device.

    `split_across_processes` (the start of a run, which every process reaches together): with several
    processes and the disk cache, each process encodes its share, then reads the others' shares from disk."""
    cache_latents = cfg.cache_latents or cfg.cache_latents_to_disk
    if cache_latents and cfg.random_crop:
        reporter.event("warning", message="random_crop changes every epoch: latent caching is turned off")
        cache_latents = False
    disk = (
        Path(cfg.runs_dir).expanduser() / ".cache" / "latents"
        if cache_latents and cfg.cache_latents_to_disk
        else None
    )
    models.vae.to(models.device)
    vae_dtype = next(models.vae.parameters()).dtype
    latents = LatentSource(
        models.vae, dataset, device=models.device, dtype=vae_dtype, cache=cache_latents, disk_dir=disk
    )
    if cache_latents:
        started = time.time()
        split = split_across_processes and disk is not None
        encoded, how = precompute_latents(latents, max(1, cfg.batch_size), split=split)
        reporter.event(
            "info", message=f"cached latents: {encoded} encoded{how} in {time.time() - started:.1f}s"
        )
        models.vae.to("cpu")  # not needed on the accelerator any more
    return latents


def precompute_latents(latents: LatentSource, batch_size: int, *, split: bool) -> tuple[int, str]:
    """(latents this process encoded, how the work was split): with `split` and several processes, each
    encodes every n-th latent to the disk cache, all wait for each other, then each loads the rest; a latent
    another process wrote where this one cannot see it (another machine's disk) is encoded here."""
    from loratui.train.process.distributed import barrier, rank, world_size

    processes = world_size()
    if not split or processes == 1:
        return latents.precompute(batch_size=batch_size), ""
    mine = latents.precompute(batch_size=batch_size, share=(rank(), processes))
    barrier("latent caching")
    rest = latents.precompute(batch_size=batch_size)
    return mine + rest, f" by this process (its share of {processes} processes, and {rest} not found on disk)"


def setup_text(cfg, models: Models, dataset: SDDataset, reporter: Reporter) -> TextConditioner:
    """The text conditioner; with cached outputs, every caption is encoded now and the encoders leave."""
    cache_text = cfg.cache_text_encoder_outputs
    if cache_text and (cfg.train_text_encoder or not dataset.options.captions_fixed):
        why = "the text encoder is trained" if cfg.train_text_encoder else "captions change (dropout/shuffle)"
        reporter.event("warning", message=f"cache_text_encoder_outputs is off: {why}")
        cache_text = False
    for encoder in models.text_encoders:
        encoder.to(models.device)
    models.text_on_device = True
    text = TextConditioner(
        models.tokenizers,
        models.forward_text_encoders or models.text_encoders,
        sdxl=models.sdxl,
        device=models.device,
        cache=cache_text,
    )
    if cache_text:
        cache_all_captions(text, dataset)
        for encoder in models.text_encoders:
            encoder.to("cpu")
        models.text_on_device = False
    return text


def place_unet(models: Models) -> None:
    """Move the UNet (with its LoRA layers) to the device: after the caching passes, before training."""
    models.unet.to(models.device)


def setup_ema(cfg, models: Models, plan: LoraPlan) -> LoraEMA | None:
    """The EMA of the adapter weights (`ema_decay`), from their values now (after `init_lora`, on the device)."""
    if cfg.ema_decay is None:
        return None
    params = named_adapter_parameters(models.components(), plan)
    return LoraEMA(params, cfg.ema_decay, update_every=cfg.ema_update_every, on_cpu=cfg.ema_on_cpu)


def setup_wrappers(cfg, accelerator: Any, models: Models, text: TextConditioner, optimizer: Any) -> Any:
    """accelerate's autocast (and DDP) wrappers: the loop calls `models.forward_unet` (and the trained text
    encoders' wrappers); the weights stay on `models.unet`/`models.text_encoders`. Returns the optimizer."""
    models.unet.train()
    models.forward_unet = accelerator.prepare(models.unet)
    if cfg.train_text_encoder:
        models.forward_text_encoders = [accelerator.prepare(encoder) for encoder in models.text_encoders]
        text.text_encoders = models.forward_text_encoders
    return accelerator.prepare(optimizer)


def cache_all_captions(text: Any, dataset: Any) -> None:
    """Encode every caption of the dataset once (frozen text encoders with cached outputs)."""
    captions = sorted({dataset.view(i, 0).caption for i in range(len(dataset))})
    for start in range(0, len(captions), TEXT_BATCH):
        text.encode(captions[start : start + TEXT_BATCH])
