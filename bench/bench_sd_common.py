"""Shared pieces of the Stable Diffusion benchmarks: models, a drawn dataset, configs, step rates.

Nothing is downloaded: the CPU benchmarks use the tiny SD 1.5-layout model (`loratui.tiny_models`), the GPU
benchmark a random-weight model built from the real SD 1.5 architecture configs bundled with loratui.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_dataset(root: Path, n: int, size: int) -> Path:
    """`n` drawn images of `size` px with sidecar captions (reused when present)."""
    from loratui.tiny_models.pretrain.scenes import (
        BACKGROUNDS,
        COLOURS,
        EXTRA_SHAPES,
        SHAPES,
        Scene,
        draw_scene,
    )

    root.mkdir(parents=True, exist_ok=True)
    shapes, colours, backgrounds = SHAPES + EXTRA_SHAPES, list(COLOURS), list(BACKGROUNDS)
    for i in range(n):
        image = root / f"img{i:04d}.png"
        if image.exists():
            continue
        scene = Scene(shapes[i % len(shapes)], colours[(i // len(shapes)) % len(colours)], backgrounds[i % 3])
        draw_scene(scene, size=size).save(image)
        (root / f"img{i:04d}.txt").write_text(
            f"{scene.caption}, flat colours, sample {i}\n", encoding="utf-8"
        )
    return root


def tiny_model(work: Path) -> Path:
    from loratui.tiny_models.sd import build_tiny_sd

    return build_tiny_sd(work / "tiny-sd15", "sd15")


def sd15_random_model(dest: Path, dtype: str = "float16") -> Path:
    """A diffusers SD 1.5 folder with random weights from the bundled real-size configs (reused if present)."""
    import diffusers
    import torch
    import transformers

    from loratui.models.sd.loading import bundled_config_folder

    if (dest / "model_index.json").is_file():
        return dest
    folder = bundled_config_folder("sd15")
    torch.manual_seed(0)
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae")),
        text_encoder=transformers.CLIPTextModel(
            transformers.CLIPTextConfig.from_pretrained(folder / "text_encoder")
        ),
        tokenizer=transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(folder / "unet")
        ),
        scheduler=diffusers.PNDMScheduler.from_pretrained(folder, subfolder="scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(getattr(torch, dtype)).save_pretrained(dest, safe_serialization=True)
    return dest


def job_for(values: dict[str, Any]):
    """A WorkerJob with a fresh run directory for a config dict."""
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.config.base_model import inspect_base_model
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    cfg = TrainConfig(**values)
    run = create_run_dir(Path(cfg.runs_dir), cfg.name)
    family = inspect_base_model(cfg.base_model).family or "sd15"
    return WorkerJob(run, ResolvedConfig(cfg, {}, family), None, True)


def step_rates(
    events: list[dict[str, Any]], skip: int = 1, clock: str = "time", epoch: int | None = None
) -> list[float]:
    """samples/s of each step after the first `skip` (warm-up), from consecutive step events' wall-clock
    times (`clock="time"`) or process CPU time (`clock="process_cpu_s"`); optionally only one epoch."""
    steps = [e for e in events if e["type"] == "step"]
    pairs = zip(steps[skip - 1 :], steps[skip:], strict=False)
    return [
        b["step_samples"] / (b[clock] - a[clock])
        for a, b in pairs
        if (epoch is None or (a["epoch"] == epoch and b["epoch"] == epoch)) and b[clock] > a[clock]
    ]


def machine() -> str:
    import torch

    return f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads"
