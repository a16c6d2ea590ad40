"""The diffusion training objective: per-sample noise and timesteps, targets, Min-SNR weighting.

Noise and timesteps come from a generator keyed by (seed, epoch, sample index), so a sample is noised the
same way whatever micro-batch it is in. Losses are returned per sample; the trainer sums them and divides by
the number of samples in the whole optimizer step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loratui.util.seeding import sample_generator


def sample_noise(
    shape: Sequence[int], *, seed: int, epoch: int, index: int, num_timesteps: int, noise_offset: float = 0.0
) -> tuple[torch.Tensor, int]:
    """(noise [C, H, W], timestep) for one sample, drawn on the CPU from its own generator."""
    generator = sample_generator(seed, epoch, index, "noise")
    timestep = int(torch.randint(0, num_timesteps, (1,), generator=generator).item())
    noise = torch.randn(tuple(shape), generator=generator)
    if noise_offset:
        channels = shape[0]
        noise = noise + noise_offset * torch.randn((channels, 1, 1), generator=generator)
    return noise, timestep


def batch_noise(
    latents: torch.Tensor,
    indices: Sequence[int],
    *,
    seed: int,
    epoch: int,
    num_timesteps: int,
    noise_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise like `latents` and one timestep per sample, on the latents' device."""
    noises, steps = [], []
    for index in indices:
        noise, timestep = sample_noise(
            latents.shape[1:],
            seed=seed,
            epoch=epoch,
            index=index,
            num_timesteps=num_timesteps,
            noise_offset=noise_offset,
        )
        noises.append(noise)
        steps.append(timestep)
    noise = torch.stack(noises).to(latents.device, latents.dtype)
    return noise, torch.tensor(steps, device=latents.device, dtype=torch.long)


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(
    alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float, prediction_type: str
) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction.

    Finite at SNR 0 (the last timestep of a zero-terminal-SNR schedule): epsilon's weight is written
    gamma / max(SNR, gamma), which is the same number without dividing by SNR."""
    ratio = snr(alphas_cumprod, timesteps)
    if prediction_type == "v_prediction":
        return torch.clamp(ratio, max=gamma) / (ratio + 1.0)
    return gamma / torch.clamp(ratio, min=gamma)


def training_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "epsilon":
        return noise
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def per_sample_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    min_snr_gamma: float | None = None,
    pixel_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error per sample [B] (fp32), Min-SNR weighted when `min_snr_gamma` is set.

    `pixel_weights` ([B, 1, h, w], `loratui.models.sd.masks.latent_masks`) weigh each latent pixel's error
    before the mean (masked loss)."""
    error = (prediction.float() - target.float()).pow(2)
    if pixel_weights is not None:
        error = error * pixel_weights.to(error.device, error.dtype)
    loss = error.flatten(1).mean(dim=1)
    if min_snr_gamma:
        loss = loss * min_snr_weights(alphas_cumprod, timesteps, min_snr_gamma, prediction_type)
    return loss
