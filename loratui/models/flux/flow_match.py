"""The rectified-flow training objective of FLUX.1 and Chroma: timesteps, noisy inputs, the velocity target.

With sigma in (0, 1) the noisy latents are ``(1 - sigma) * latents + sigma * noise`` and the transformer
predicts the velocity ``noise - latents`` (kohya's ``model_prediction_type: raw``, the objective FLUX.1 was
trained with). The transformer reads sigma as its timestep (diffusers scales it by 1000 inside).

Timestep sampling (`timestep_sampling`), defined as in kohya sd-scripts' ``flux_train_utils.py``:

- ``uniform``: sigma ~ U(0, 1).
- ``sigma`` (kohya's default): one of the 1000 training sigmas k / 1000 (k = 1..1000) drawn uniformly, shifted
  by ``discrete_flow_shift`` (s) as kohya's training scheduler (FlowMatchEulerDiscreteScheduler with shift s)
  shifts them: sigma' = s * sigma / (1 + (s - 1) * sigma).
- ``sigmoid`` (the default): sigma = sigmoid(sigmoid_scale * n), n ~ N(0, 1): logit-normal, centred on 0.5.
- ``logit_normal``: sigma = sigmoid(n), n ~ N(0, 1): SD3's lognorm(0, 1), whatever sigmoid_scale says.
- ``shift``: the sigmoid draw, then shifted toward noise by ``discrete_flow_shift`` (s):
  sigma' = s * sigma / (1 + (s - 1) * sigma); kohya's recommended FLUX LoRA setting is s = 3.1582.
- ``flux_shift``: the sigmoid draw, shifted by the image size as the sampling scheduler's dynamic shifting
  does: mu grows linearly from 0.5 at 256 packed tokens to 1.15 at 4096, sigma' = e^mu / (e^mu + 1/sigma - 1).

Every draw (sigma and noise) comes from the sample's own generator keyed by (seed, epoch, index), so a
sample gets the same noise in any micro-batch, process or resumed session.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from loratui.util.seeding import sample_generator

SAMPLINGS = ("uniform", "sigma", "sigmoid", "logit_normal", "shift", "flux_shift")
TRAIN_TIMESTEPS = 1000  # the training scheduler's discrete timesteps (`sigma` sampling)
#: the linear map from packed image tokens to the shift exponent mu (FLUX.1's scheduler config)
BASE_SEQ_LEN, MAX_SEQ_LEN, BASE_SHIFT, MAX_SHIFT = 256, 4096, 0.5, 1.15


def resolution_mu(image_tokens: int) -> float:
    """The dynamic-shift exponent for `image_tokens` packed latent tokens ((h/2) * (w/2))."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_SEQ_LEN - BASE_SEQ_LEN)
    return BASE_SHIFT + slope * (image_tokens - BASE_SEQ_LEN)


def shift_sigma(sigma: float, shift: float) -> float:
    """The discrete flow shift: sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def time_shift(mu: float, sigma: float) -> float:
    """The resolution-dependent shift: e^mu / (e^mu + 1/sigma - 1)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def draw_sigma(
    generator: torch.Generator,
    method: str,
    *,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    image_tokens: int = BASE_SEQ_LEN,
) -> float:
    """One sigma in (0, 1) from `generator` by `method` (see the module docstring)."""
    if method not in SAMPLINGS:
        raise ValueError(f"timestep_sampling {method!r}: choose one of {', '.join(SAMPLINGS)}")
    if method == "sigma":
        index = min(int(float(torch.rand((1,), generator=generator)) * TRAIN_TIMESTEPS), TRAIN_TIMESTEPS - 1)
        return shift_sigma((TRAIN_TIMESTEPS - index) / TRAIN_TIMESTEPS, discrete_flow_shift)
    if method == "uniform":
        sigma = float(torch.rand((1,), generator=generator))
    else:
        scale = 1.0 if method == "logit_normal" else sigmoid_scale
        sigma = float(torch.sigmoid(scale * torch.randn((1,), generator=generator)))
    sigma = min(max(sigma, 1e-6), 1 - 1e-6)
    if method == "shift":
        sigma = shift_sigma(sigma, discrete_flow_shift)
    elif method == "flux_shift":
        sigma = time_shift(resolution_mu(image_tokens), sigma)
    return sigma


def sample_sigmas_and_noise(
    latents: torch.Tensor,
    indices: Sequence[int],
    *,
    seed: int,
    epoch: int,
    method: str,
    sigmoid_scale: float = 1.0,
    discrete_flow_shift: float = 3.0,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas [B], noise like `latents` [B, C, H, W]), each sample's from its own generator."""
    tokens = (latents.shape[-2] // 2) * (latents.shape[-1] // 2)
    sigmas, noises = [], []
    for index in indices:
        generator = sample_generator(seed, epoch, index, "flow_noise")
        sigmas.append(
            draw_sigma(
                generator,
                method,
                sigmoid_scale=sigmoid_scale,
                discrete_flow_shift=discrete_flow_shift,
                image_tokens=tokens,
            )
        )
        noise = torch.randn(tuple(latents.shape[1:]), generator=generator)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((latents.shape[1], 1, 1), generator=generator)
        noises.append(noise)
    noise = torch.stack(noises).to(latents.device, latents.dtype)
    return torch.tensor(sigmas, device=latents.device, dtype=torch.float32), noise


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """(1 - sigma) * latents + sigma * noise, per sample."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """What the transformer learns to predict: noise - latents."""
    return noise - latents


# --- packing: [B, C, H, W] latents <-> [B, H/2 * W/2, 4C] tokens ---------------------------------------------


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """2x2 patches of the latent image as a token sequence, row-major (the layout FluxPipeline uses)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latents of {h}x{w} cannot be packed in 2x2 patches (image sides: multiples of 16)")
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents` for latents of `height` x `width`."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(
    height: int, width: int, device: torch.device | str = "cpu", dtype=torch.float32
) -> torch.Tensor:
    """[h/2 * w/2, 3] position ids of the packed tokens: (0, row, column)."""
    rows, cols = height // 2, width // 2
    ids = torch.zeros(rows, cols, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(cols)[None, :]
    return ids.reshape(rows * cols, 3).to(device, dtype)


def text_ids(length: int, device: torch.device | str = "cpu", dtype=torch.float32) -> torch.Tensor:
    """[length, 3] zeros: text tokens carry no position in the rotary embedding."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None):
    """Mean squared error per sample (fp32); `weights` like the target weight each element (masks)."""
    error = (prediction.float() - target.float()) ** 2
    if weights is not None:
        error = error * weights
        return error.flatten(1).sum(1) / weights.flatten(1).sum(1).clamp_min(1e-8)
    return error.flatten(1).mean(1)
