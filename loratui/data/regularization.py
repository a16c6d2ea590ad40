"""Regularization (class) images for prior preservation, counted the way kohya sd-scripts counts them.

kohya's DreamBooth dataset puts the regularization images in the same epoch as the training images and
balances them: it walks the regularization images in order, first adding each one with its folder's repeats,
then one more repeat per image on later passes, and stops as soon as the regularization samples reach the
number of training samples (images x repeats). So an epoch holds every training sample once plus about as
many regularization samples, and the steps per epoch double; images past the point where the count is reached
are not used (kohya warns "some of reg images are not used"). ``reg_repeats`` reproduces that walk.

Public API: ``reg_repeats(num_train_samples, folder_repeats) -> list[int]``,
``SampleCounts`` and ``sample_counts(train_scan, reg_scan, batch_size)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from loratui.data.image_dataset import ImageDatasetScan


def reg_repeats(num_train_samples: int, folder_repeats: Sequence[int]) -> list[int]:
    """How many times each regularization image is used per epoch (0: not used), kohya's balancing walk."""
    counts = [0] * len(folder_repeats)
    if not folder_repeats or num_train_samples <= 0:
        return counts
    total, first = 0, True
    while total < num_train_samples:
        for i, repeats in enumerate(folder_repeats):
            step = repeats if first else 1
            counts[i] += step
            total += step
            if total >= num_train_samples:
                break
        first = False
    return counts


@dataclass(frozen=True)
class SampleCounts:
    """What one epoch holds: training samples, regularization samples, and the steps they make."""

    train_images: int
    train_samples: int
    reg_images: int  # regularization images found
    reg_images_used: int  # of them, the ones with at least one sample
    reg_samples: int
    batch_size: int

    @property
    def samples_per_epoch(self) -> int:
        return self.train_samples + self.reg_samples

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.samples_per_epoch / max(1, self.batch_size))


def sample_counts(
    train_scan: ImageDatasetScan, reg_scan: ImageDatasetScan | None, batch_size: int = 1
) -> SampleCounts:
    """The epoch's sample counts for a training folder and an optional regularization folder."""
    train_samples = train_scan.n_samples
    repeats = reg_repeats(train_samples, [item.repeats for item in reg_scan.items]) if reg_scan else []
    return SampleCounts(
        train_images=train_scan.n_images,
        train_samples=train_samples,
        reg_images=len(repeats),
        reg_images_used=sum(1 for r in repeats if r),
        reg_samples=sum(repeats),
        batch_size=batch_size,
    )


def epoch_plan(cfg) -> SampleCounts | None:
    """The sample counts of an image run's config (training and regularization folders scanned), per
    optimizer step of batch_size x gradient_accumulation_steps samples; None when a folder cannot be read
    (the dataset check reports it)."""
    from pathlib import Path

    from loratui.data.image_dataset import scan_image_dataset

    if cfg.task_type != "image-generation" or not cfg.train_data_dir:
        return None
    exts = (cfg.caption_extension,)
    try:
        metadata = Path(cfg.metadata_path).expanduser() if cfg.metadata_path else None
        train = scan_image_dataset(
            Path(cfg.train_data_dir).expanduser(), metadata_path=metadata, caption_extensions=exts
        )
        reg = (
            scan_image_dataset(Path(cfg.reg_data_dir).expanduser(), caption_extensions=exts)
            if cfg.reg_data_dir
            else None
        )
    except (OSError, ValueError):
        return None
    return sample_counts(train, reg, cfg.batch_size * cfg.gradient_accumulation_steps)


def epoch_line(counts: SampleCounts, epochs: int, max_steps: int | None) -> str:
    """One line for `--dry-run`: samples per epoch and optimizer steps."""
    reg = (
        f" + {counts.reg_samples} regularization samples ({counts.reg_images_used} of {counts.reg_images} images)"
        if counts.reg_images
        else ""
    )
    total = max_steps if max_steps is not None else counts.steps_per_epoch * epochs
    return (
        f"data: {counts.train_images} images, {counts.train_samples} samples with repeats{reg} per epoch; "
        f"{counts.steps_per_epoch} steps per epoch of {counts.batch_size} samples, {total} steps in all"
    )
