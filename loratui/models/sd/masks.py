"""Loss masks at latent size, and what they cost in memory.

The trainer's pixel masks ([1, H, W] in [0, 1], transformed with their images by the dataset) are reduced to
the latent grid by area averaging (kohya's `apply_masked_loss` does the same with `F.interpolate(mode="area")`):
each latent pixel's weight is the mean of the image pixels it covers. The squared error is multiplied by that
weight before it is averaged, so a latent pixel with weight 0 adds nothing to the loss and gets no gradient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: bytes per mask element (fp32) at pixel and latent size
MASK_ELEMENT_BYTES = 4


def latent_masks(
    masks: Sequence[torch.Tensor | None], latent_size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor | None:
    """[B, 1, h, w] latent weights from per-sample pixel masks (None: all ones); None when no sample has one."""
    if all(mask is None for mask in masks):
        return None
    out = []
    for mask in masks:
        if mask is None:
            out.append(torch.ones((1, 1, *latent_size)))
        else:
            out.append(torch.nn.functional.interpolate(mask[None].float(), size=latent_size, mode="area"))
    return torch.cat(out).to(device)


def mask_bytes(batch_size: int, resolution: int, vae_factor: int = 8) -> int:
    """Memory of one micro-batch's masks: the pixel masks plus their latent-size copies (fp32)."""
    latent = (resolution // vae_factor) ** 2
    return batch_size * (resolution * resolution + latent) * MASK_ELEMENT_BYTES
