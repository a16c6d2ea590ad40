"""Noise schedules: the prediction type and zero terminal SNR, for training and for sampling.

Zero terminal SNR (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed") rescales
the betas so that alpha_bar at the last timestep is 0: the model then sees pure noise at the last step, as
it does when sampling starts. diffusers implements it (`rescale_betas_zero_snr=True`); the paper pairs it
with v-prediction, "trailing" timestep spacing (sampling starts at the last timestep) and guidance rescale
0.7 against over-exposed images. NoobAI-style v-pred SDXL checkpoints carry it as marker keys (`v_pred`,
`ztsnr`; see `loratui.config.base_model.schedule_markers`).
"""

from __future__ import annotations

import inspect
from typing import Any

#: classifier-free guidance rescale the paper recommends with zero terminal SNR (phi = 0.7)
ZTSNR_GUIDANCE_RESCALE = 0.7


def training_scheduler(config: Any, prediction_type: str, zero_terminal_snr: bool):
    """The DDPM scheduler the loop noises latents with (and reads alphas_cumprod from)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(
        config, prediction_type=prediction_type, rescale_betas_zero_snr=bool(zero_terminal_snr)
    )


def _supports_zero_snr(cls: type) -> bool:
    return "rescale_betas_zero_snr" in inspect.signature(cls.__init__).parameters


def sampling_settings(config: Any, prediction_type: str, zero_terminal_snr: bool) -> dict[str, Any]:
    """Scheduler config values that sampling needs for this prediction type and schedule."""
    wanted: dict[str, Any] = {"prediction_type": prediction_type}
    if zero_terminal_snr:
        wanted.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    elif config.get("rescale_betas_zero_snr"):
        wanted["rescale_betas_zero_snr"] = False
    return wanted


def configure_pipeline_scheduler(pipeline: Any, prediction_type: str, zero_terminal_snr: bool) -> None:
    """Set `pipeline.scheduler` to the prediction type and schedule the model was trained with.

    A scheduler without the zero-SNR option (PNDM, the SD 1.x default) is replaced by DDIM, the sampler of
    the paper; Euler (SDXL's default) and DDIM keep their class."""
    scheduler = pipeline.scheduler
    wanted = sampling_settings(scheduler.config, prediction_type, zero_terminal_snr)
    if all(scheduler.config.get(key) == value for key, value in wanted.items()):
        return
    cls = type(scheduler)
    if zero_terminal_snr and not _supports_zero_snr(cls):
        from diffusers import DDIMScheduler

        cls = DDIMScheduler
    pipeline.scheduler = cls.from_config(scheduler.config, **wanted)


def guidance_rescale(zero_terminal_snr: bool) -> float:
    """The pipelines' `guidance_rescale` for this schedule (0: off)."""
    return ZTSNR_GUIDANCE_RESCALE if zero_terminal_snr else 0.0
