"""Validation loss for Flux runs: the image trainer's held-out split (`val_split`) or folder (`val_data_dir`).

Each held-out image is scored at `VAL_SIGMAS` fixed noise levels (the centres of four equal slices of (0, 1))
with noise from a generator seeded per (image, level), so the same weights always give the same loss: plain
mean squared error against the velocity target, averaged over images and levels, the transformer in eval mode,
no gradient. Latents and T5 embeddings (and CLIP-L's pooled output unless CLIP-L is trained) are encoded once,
before the caches are filled and T5 is released; an evaluation runs the transformer only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loratui.models.flux.conditioning import Conditioning, FluxTextConditioner
from loratui.models.flux.flow_match import noisy_latents, per_sample_mse, velocity_target
from loratui.train.sd.dataset import SDDataset
from loratui.train.sd.latent_cache import LatentSource

VAL_SIGMAS = (0.125, 0.375, 0.625, 0.875)


@dataclass
class FluxValidationItem:
    """One held-out image, ready for the transformer (tensors on the CPU)."""

    latents: torch.Tensor  # [C, h, w]
    caption: str
    t5: torch.Tensor  # [L, D]
    mask: torch.Tensor  # [L]
    pooled: torch.Tensor | None  # [P], None for Chroma or when CLIP-L is trained (encoded at each evaluation)


class FluxValidationSet:
    """The validation images encoded once, scored at fixed sigmas and noise."""

    def __init__(self, items: list[FluxValidationItem], seed: int, batch_size: int):
        self.items = items
        self.seed = seed
        self.batch_size = max(1, batch_size)

    def __len__(self) -> int:
        return len(self.items)

    def noise(self, index: int, slot: int) -> torch.Tensor:
        generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + index * len(VAL_SIGMAS) + slot)
        return torch.randn(self.items[index].latents.shape, generator=generator)

    @torch.no_grad()
    def loss(self, context: Any, batch_size: int | None = None) -> float:
        """Mean loss of the transformer as it is now (`context`: the trainer's `FluxLossContext`)."""
        models = context.models
        batch = max(1, batch_size or self.batch_size)
        jobs: dict[tuple, list[tuple[int, int]]] = {}
        for index, item in enumerate(self.items):
            for slot in range(len(VAL_SIGMAS)):
                jobs.setdefault(tuple(item.latents.shape), []).append((index, slot))
        modules = [models.transformer, *([models.parts.clip] if models.forward_clip is not None else [])]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        total, count = 0.0, 0
        try:
            for group in jobs.values():
                for start in range(0, len(group), batch):
                    chunk = group[start : start + batch]
                    total += float(self._chunk_loss(context, chunk).sum())
                    count += len(chunk)
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)
        return total / max(1, count)

    def _chunk_loss(self, context: Any, chunk: list[tuple[int, int]]) -> torch.Tensor:
        device = context.models.device
        items = [self.items[i] for i, _ in chunk]
        latents = torch.stack([item.latents for item in items]).to(device)
        noise = torch.stack([self.noise(i, slot) for i, slot in chunk]).to(device)
        sigmas = torch.tensor([VAL_SIGMAS[slot] for _, slot in chunk], device=device)
        pooled = None
        if not context.models.parts.is_chroma:
            if items[0].pooled is None:
                pooled = context.text.encode_clip([item.caption for item in items])
            else:
                pooled = torch.stack([item.pooled for item in items]).to(device)
        cond = Conditioning(
            torch.stack([item.t5 for item in items]).to(device),
            pooled,
            torch.stack([item.mask for item in items]).to(device),
        )
        prediction = context.predict(noisy_latents(latents, noise, sigmas), sigmas, cond)
        return per_sample_mse(prediction, velocity_target(latents, noise))


def _move(modules: list, device: Any) -> list:
    before = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    return before


@torch.no_grad()
def build_flux_validation_set(cfg: Any, models: Any, val: SDDataset) -> FluxValidationSet:
    """Encode every validation image and caption once; the AE and text encoders go back where they were."""
    parts = models.parts
    clip_trained = bool(cfg.train_text_encoder and parts.clip is not None)
    modules = [parts.vae, *models.text_encoders]
    before = _move(modules, models.device)
    try:
        vae_dtype = next(parts.vae.parameters()).dtype
        source = LatentSource(parts.vae, val, device=models.device, dtype=vae_dtype)
        text = FluxTextConditioner(
            parts.t5,
            parts.t5_tokenizer,
            parts.clip,
            parts.clip_tokenizer,
            max_length=models.t5_max_length,
            device=models.device,
            chroma=parts.is_chroma,
        )
        items = []
        for index in range(len(val)):
            view = val.view(index, 0)
            cond = text.encode([view.caption])
            mask = cond.mask[0]
            pooled = None if cond.pooled is None or clip_trained else cond.pooled[0].float().cpu()
            items.append(
                FluxValidationItem(
                    source.latents([view])[0].cpu(),
                    view.caption,
                    cond.t5[0].float().cpu(),
                    mask.cpu(),
                    pooled,
                )
            )
    finally:
        for module, device in zip(modules, before, strict=True):
            module.to(device)
    return FluxValidationSet(items, cfg.seed, cfg.batch_size)


def report_validation(reporter: Any, step: int, epoch: int, loss: float) -> None:
    """The validation loss as an `eval` event and a TensorBoard scalar (as the other trainers)."""
    reporter.event("eval", step, eval_loss=loss, epoch=epoch)
    if reporter.tensorboard is not None:
        reporter.tensorboard.add_scalar("eval_loss", loss, step)
