"""The SD trainer's side of the OOM ladder: applying rungs to the live models, data and caches.

- `gradient_checkpointing`: turned on in the running UNet (and trained text encoders);
- `cache_latents` / `cache_text_encoder_outputs` (rung 3): every latent and caption embedding is computed once
  (latents are the VAE posterior's mean, so cached training sees the same numbers), then the VAE and the frozen
  text encoders leave the GPU;
- `ema_on_cpu` (rung 3): the EMA copy of the LoRA weights moves to CPU memory;
- `resolution` (rung 6, quality): the dataset is rebuilt at the new resolution (same samples, same order, the
  same validation images held out) and the caches with it; the validation images keep the resolution they
  were encoded at, so the validation curve stays comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loratui.models.checkpointing import enable_activation_checkpointing


def sd_meter_modules(models: Any, context: Any) -> Callable[[], list[Any]]:
    """The modules whose weights sit on the (simulated) card: the UNet, the text encoders unless the ladder
    moved them off, the VAE unless latents are cached."""

    def modules() -> list[Any]:
        out = [models.unet]
        if getattr(models, "text_on_device", True):
            out += list(models.text_encoders)
        if not context.latents.cache_enabled:
            out.append(models.vae)
        return out

    return modules


def sd_rung_applier(
    job: Any, models: Any, context: Any, reporter: Any, session: Any = None
) -> Callable[[dict[str, Any]], bool]:
    """The callback `RecoveringStep` calls with a rung's changes (the config already holds them)."""

    def apply(changes: dict[str, Any]) -> bool:
        from loratui.train.sd.setup import setup_dataset, setup_latents, setup_text
        from loratui.train.sd.validation import split_datasets

        cfg = job.resolved.config
        if changes.get("gradient_checkpointing"):
            models.unet.enable_gradient_checkpointing()
            if cfg.train_text_encoder:
                for encoder in models.text_encoders:
                    enable_activation_checkpointing(encoder)
        old_dataset, old_latents, old_text = context.dataset, context.latents, context.text
        try:
            if "resolution" in changes:
                dataset = split_datasets(cfg, setup_dataset(cfg, reporter), reporter)[0]
                if len(dataset) != len(context.dataset):
                    return False  # a different number of samples would change the plan
                context.dataset = dataset
            # each pass encodes everything once (the encoder is on the device meanwhile) and leaves the device;
            # captions do not depend on the resolution, so their cache is kept unless its own setting changed
            if {"cache_latents", "resolution"} & set(changes):
                context.latents = setup_latents(cfg, models, context.dataset, reporter)
            if "cache_text_encoder_outputs" in changes:
                context.text = setup_text(cfg, models, context.dataset, reporter)
        except BaseException:  # the rung is undone: the old sources, and their encoders where they need them
            context.dataset, context.latents, context.text = old_dataset, old_latents, old_text
            models.vae.to("cpu" if old_latents.cache_enabled else models.device)
            on_device = not old_text.cache_enabled
            for encoder in models.text_encoders:
                encoder.to(models.device if on_device else "cpu")
            models.text_on_device = on_device
            raise
        if changes.get("ema_on_cpu") and getattr(session, "ema", None) is not None:
            session.ema.move_to("cpu")
        if session is not None:
            session.dataset = context.dataset
        return True

    return apply
