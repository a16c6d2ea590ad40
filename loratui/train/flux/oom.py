"""The Flux trainer's side of the OOM ladder: applying rungs to the live models, data and caches.

Beside the image rungs the SD trainer applies (`loratui.train.sd.oom`), a Flux run takes two of its own:

- `base_weights_dtype` (bf16 -> fp8 -> nf4): the frozen blocks' Linears are stored again in the new format
  in place (`apply_base_weights_dtype`); the LoRA layers, optimizer state and step are untouched;
- `blocks_to_swap` (more blocks in CPU memory): the swap hooks are set up again with the new count
  (`apply_blocks_to_swap`); the loss of a step does not depend on it.

The others: `gradient_checkpointing` on the transformer (and a trained CLIP-L); `cache_latents` /
`cache_text_encoder_outputs` (every latent / caption encoded once, then the AE / text encoders leave the
device); `ema_on_cpu`; `resolution` (the dataset and latent cache rebuilt at the new size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loratui.models.checkpointing import enable_activation_checkpointing

#: the order in which a frozen base gets smaller (each rung one step to the right)
BASE_DTYPE_ORDER = ("bf16", "fp8", "nf4")


def apply_base_weights_dtype(models: Any, mode: str) -> bool:
    """Store the frozen transformer blocks as `mode` mid-run; False when that is not a smaller format than
    the current one (a quantised base is never widened in place; fp8 -> nf4 quantises the fp8 weights)."""
    from loratui.train.flux.setup import place_transformer, setup_base_storage

    current = models.base_weights_dtype
    if mode not in BASE_DTYPE_ORDER or BASE_DTYPE_ORDER.index(mode) <= BASE_DTYPE_ORDER.index(current):
        return False
    if models.swapper is not None:  # the swapped blocks are converted where they are, in CPU memory
        models.swapper.detach(to_device=False)
        models.swapper = None
    setup_base_storage(models, mode)
    place_transformer(models)  # swapped again (from the converted weights), the rest on the device
    return True


def apply_blocks_to_swap(models: Any, count: int) -> bool:
    """Keep `count` transformer blocks in CPU memory from the next step on."""
    from loratui.train.flux.setup import place_transformer

    models.blocks_to_swap = int(count)
    place_transformer(models)
    return True


def resident_parts(models: Any) -> list[Any]:
    """The transformer's modules whose weights stay on the device: all of it, or with block swap everything
    but the swapped blocks (their LoRA layers, which stay, are a rounding error)."""
    from loratui.models.flux.block_swap import CONTAINERS

    swapper = models.swapper
    if swapper is None:
        return [models.transformer]
    swapped = {id(entry.block) for entry in swapper.swapped}
    out = [child for name, child in models.transformer.named_children() if name not in CONTAINERS]
    for name in CONTAINERS:
        out += [block for block in getattr(models.transformer, name, []) if id(block) not in swapped]
    return out


def flux_meter_modules(models: Any, context: Any) -> Callable[[], list[Any]]:
    """The modules whose weights sit on the (simulated) card: the transformer's resident part, the text
    encoders unless they left, the AE unless latents are cached."""

    def modules() -> list[Any]:
        out = resident_parts(models)
        if models.text_on_device:
            out += models.text_encoders
        if not context.latents.cache_enabled:
            out.append(models.vae)
        return out

    return modules


def flux_rung_applier(
    job: Any, models: Any, context: Any, reporter: Any, session: Any = None
) -> Callable[[dict[str, Any]], bool]:
    """The callback `RecoveringStep` calls with a rung's changes (the config already holds them)."""

    def apply(changes: dict[str, Any]) -> bool:
        from loratui.train.flux.setup import setup_latents, setup_text
        from loratui.train.sd.setup import setup_dataset

        cfg = job.resolved.config
        if "base_weights_dtype" in changes and not apply_base_weights_dtype(
            models, changes["base_weights_dtype"]
        ):
            return False
        if "blocks_to_swap" in changes:
            apply_blocks_to_swap(models, changes["blocks_to_swap"])
        if changes.get("gradient_checkpointing"):
            models.transformer.enable_gradient_checkpointing()
            if cfg.train_text_encoder and models.parts.clip is not None:
                enable_activation_checkpointing(models.parts.clip)
        old = context.dataset, context.latents, context.text
        try:
            if "resolution" in changes:
                dataset = setup_dataset(cfg, reporter)
                if len(dataset) != len(context.dataset):
                    return False  # a different number of samples would change the plan
                context.dataset = dataset
            if {"cache_latents", "resolution"} & set(changes):
                context.latents = setup_latents(cfg, models, context.dataset, reporter)
            if "cache_text_encoder_outputs" in changes:
                context.text = setup_text(cfg, models, context.dataset, reporter, cfg.sample_prompts)
        except BaseException:
            context.dataset, context.latents, context.text = old
            models.vae.to("cpu" if old[1].cache_enabled else models.device)
            raise
        if changes.get("ema_on_cpu") and getattr(session, "ema", None) is not None:
            session.ema.move_to("cpu")
        if session is not None:
            session.dataset = context.dataset
        return True

    return apply
