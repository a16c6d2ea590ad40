"""Per-sample and per-pixel loss weights of an SD micro-batch: prior preservation and loss masks.

Regularization samples weigh `prior_loss_weight`, training samples 1 (kohya's `loss_weights`); with masks,
each latent pixel weighs the area-averaged mask over the image pixels it covers (`models/sd/masks.py`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratui.models.sd.masks import latent_masks
from loratui.train.sd.dataset import SampleView, SDDataset


def sample_weights(dataset: SDDataset, views: Sequence[SampleView], device) -> torch.Tensor | None:
    """[B] loss weights, or None when every sample weighs 1."""
    weights = [dataset.loss_weight(view) for view in views]
    if all(w == 1.0 for w in weights):
        return None
    return torch.tensor(weights, dtype=torch.float32, device=device)


def pixel_weights(
    dataset: SDDataset, views: Sequence[SampleView], latents: torch.Tensor
) -> torch.Tensor | None:
    """[B, 1, h, w] latent-pixel weights from the samples' masks, or None when masks are off."""
    if not dataset.options.uses_masks:
        return None
    masks = [dataset.mask(view) for view in views]
    return latent_masks(masks, tuple(latents.shape[-2:]), latents.device)
