"""Validation loss for image runs: a held-out split (`val_split`) or folder (`val_data_dir`).

The held-out images are chosen by the seed alone (the same images for the same seed and dataset) and are never
trained on. Each validation image is scored at `VAL_TIMESTEPS` timesteps spread evenly over the noise schedule,
with noise from a generator seeded per (image, timestep): the loss of the same weights is the same at every
evaluation, so the curve is comparable between steps and between runs. No augmentation, no caption dropout,
no gradient, the UNet in eval mode (adapter dropout off); the loss is the plain mean squared error against the
training target (no Min-SNR weighting), averaged over images and timesteps.

Latents and (with frozen text encoders) caption embeddings are encoded once, before training; an evaluation
then runs the UNet only.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from typing import Any

import torch

from loratui.models.sd.conditioning import TextConditioner, sdxl_added_conditions
from loratui.models.sd.loss import training_target
from loratui.train.loop.reporting import Reporter
from loratui.train.sd.dataset import DatasetError, DatasetOptions, SDDataset, load_dataset
from loratui.train.sd.latent_cache import LatentSource

#: timesteps per validation image, evenly spread over the schedule
VAL_TIMESTEPS = 4
VAL_HINT = "Validation runs the UNet at batch_size; lower batch_size or leave val_split/val_data_dir out."


def held_out_images(num_images: int, fraction: float, seed: int) -> list[int]:
    """Indices of the images held out for validation: `ceil(fraction * n)` of them (at least one, and at
    least one image left for training), chosen by `seed` alone."""
    if fraction <= 0:
        return []
    if num_images < 2:
        raise DatasetError(f"val_split={fraction} needs at least 2 images; the dataset has {num_images}")
    count = min(num_images - 1, max(1, math.ceil(fraction * num_images)))
    order = list(range(num_images))
    random.Random(f"val_split-{seed}").shuffle(order)
    return sorted(order[:count])


def fixed_timesteps(num_train_timesteps: int, count: int = VAL_TIMESTEPS) -> list[int]:
    """`count` timesteps at the centres of equal slices of the schedule (e.g. 125, 375, 625, 875)."""
    return [int((j + 0.5) * num_train_timesteps / count) for j in range(count)]


def _eval_options(options: DatasetOptions) -> DatasetOptions:
    """The same sizes and trigger word, without random augmentation or caption changes."""
    return replace(options, random_crop=False, flip_aug=False, caption_dropout=0.0, shuffle_tags=False)


def _once_each(dataset: SDDataset, options: DatasetOptions) -> SDDataset:
    records = [replace(record, repeats=1) for record in dataset.records]
    return SDDataset(records, dataset.scan, options)


def split_datasets(cfg: Any, dataset: SDDataset, reporter: Reporter) -> tuple[SDDataset, SDDataset | None]:
    """(the training dataset, the validation dataset or None) from `val_split` or `val_data_dir`."""
    val_dir, fraction = getattr(cfg, "val_data_dir", None), getattr(cfg, "val_split", 0.0)
    if not val_dir and not fraction:
        return dataset, None
    if val_dir:
        warn = lambda message: reporter.event("warning", message=f"val_data_dir: {message}")  # noqa: E731
        val_cfg = cfg.model_copy(update={"train_data_dir": val_dir, "metadata_path": None})
        val = load_dataset(val_cfg, warn=warn)
        return dataset, _once_each(val, _eval_options(dataset.options))
    held = held_out_images(dataset.num_images, fraction, cfg.seed)
    if not held:
        return dataset, None
    chosen = set(held)
    train_records = [r for i, r in enumerate(dataset.records) if i not in chosen]
    val_records = [r for i, r in enumerate(dataset.records) if i in chosen]
    train = SDDataset(train_records, dataset.scan, dataset.options)
    val = SDDataset(val_records, dataset.scan, _eval_options(dataset.options))
    return train, _once_each(val, val.options)


@dataclass
class ValidationItem:
    """One held-out image, ready for the UNet."""

    latents: torch.Tensor  # [C, h, w] fp32, CPU
    caption: str
    embeds: (
        torch.Tensor | None
    )  # [77, D] (None when the text encoders are trained: encoded at each evaluation)
    pooled: torch.Tensor | None
    time_ids: list[int]
    bucket: tuple[int, int]


class ValidationSet:
    """The validation images encoded once, scored with fixed timesteps and noise."""

    def __init__(self, items: list[ValidationItem], seed: int, num_train_timesteps: int, batch_size: int):
        self.items = items
        self.seed = seed
        self.timesteps = fixed_timesteps(num_train_timesteps)
        self.batch_size = max(1, batch_size)

    def __len__(self) -> int:
        return len(self.items)

    def noise(self, index: int, slot: int) -> torch.Tensor:
        """The fixed noise of image `index` at its `slot`-th timestep."""
        generator = torch.Generator("cpu").manual_seed(self.seed * 1_000_003 + index * VAL_TIMESTEPS + slot)
        shape = self.items[index].latents.shape
        return torch.randn(shape, generator=generator, dtype=torch.float32)

    @torch.no_grad()
    def loss(self, models: Any, text: TextConditioner, autocast: Any, batch_size: int | None = None) -> float:
        """Mean validation loss of the model as it is now (UNet in eval mode for the duration), `batch_size`
        images and timesteps per forward (default: the run's batch_size at the start; the OOM ladder may
        have lowered it since)."""
        batch = max(1, batch_size or self.batch_size)
        device = models.device
        jobs = [(i, slot) for i in range(len(self.items)) for slot in range(len(self.timesteps))]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for job in jobs:
            groups.setdefault(self.items[job[0]].bucket, []).append(job)
        modules = [models.unet, *models.text_encoders]
        modes = [module.training for module in modules]
        for module in modules:
            module.eval()
        total, count = 0.0, 0
        try:
            for group in groups.values():
                for start in range(0, len(group), batch):
                    chunk = group[start : start + batch]
                    with autocast():
                        losses = self._chunk_loss(models, text, chunk, device)
                    total += float(losses.sum())
                    count += len(chunk)
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)
        return total / max(1, count)

    def _chunk_loss(self, models: Any, text: TextConditioner, chunk, device) -> torch.Tensor:
        items = [self.items[i] for i, _ in chunk]
        latents = torch.stack([item.latents for item in items]).to(device)
        noise = torch.stack([self.noise(i, slot) for i, slot in chunk]).to(device)
        timesteps = torch.tensor([self.timesteps[slot] for _, slot in chunk], device=device, dtype=torch.long)
        if items[0].embeds is None:
            embeds, pooled = text.encode([item.caption for item in items])
        else:
            embeds = torch.stack([item.embeds for item in items]).to(device)
            pooled = torch.stack([item.pooled for item in items]).to(device) if models.sdxl else None
        kwargs = {}
        if models.sdxl:
            kwargs["added_cond_kwargs"] = sdxl_added_conditions(
                pooled, [item.time_ids for item in items], models.dtype
            )
        noisy = models.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = models.unet(noisy.to(models.dtype), timesteps, embeds.to(models.dtype), **kwargs).sample
        target = training_target(models.noise_scheduler, latents, noise, timesteps, models.prediction_type)
        return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2, 3))


def _move(modules: list, device: Any) -> list:
    before = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    return before


@torch.no_grad()
def build_validation_set(cfg: Any, models: Any, val: SDDataset) -> ValidationSet:
    """Encode every validation image (and, with frozen text encoders, caption) once; the VAE and text encoders
    go back where they were."""
    encode_text = not cfg.train_text_encoder
    modules = [models.vae, *(models.text_encoders if encode_text else [])]
    before = _move(modules, models.device)
    try:
        vae_dtype = next(models.vae.parameters()).dtype
        source = LatentSource(models.vae, val, device=models.device, dtype=vae_dtype)
        text = TextConditioner(
            models.tokenizers, models.text_encoders, sdxl=models.sdxl, device=models.device
        )
        items = []
        for index in range(len(val)):
            view = val.view(index, 0)
            latents = source.latents([view])[0].cpu()
            embeds = pooled = None
            if encode_text:
                embeds, pooled = text.encode([view.caption])
                embeds = embeds[0].float().cpu()
                pooled = pooled[0].float().cpu() if pooled is not None else None
            items.append(
                ValidationItem(latents, view.caption, embeds, pooled, view.sdxl_time_ids, view.bucket)
            )
    finally:
        for module, device in zip(modules, before, strict=True):
            module.to(device)
    return ValidationSet(
        items, cfg.seed, int(models.noise_scheduler.config.num_train_timesteps), cfg.batch_size
    )


def validation_due(step: int, every: int | None, steps_per_epoch: int, total_steps: int) -> bool:
    """Evaluate at every `every`-th step (default: at each epoch's end), and at the last step."""
    period = every or steps_per_epoch
    return step % max(1, period) == 0 or step == total_steps
