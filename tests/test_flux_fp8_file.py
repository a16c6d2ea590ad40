"""An fp8 single-file FLUX base trained with `base_weights_dtype: fp8` keeps its float8 weights from load to step."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from loratui.models.flux import fp8 as fp8_module
from loratui.models.flux.single_file import write_single_files_from_folder
from loratui.train.flux.trainer import train
from tests.sd_helpers import events_of, make_image_dataset, make_job, seed_like_config


def test_fp8_file_is_not_widened_and_rounded_again(tiny_flux_dev: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    paths = write_single_files_from_folder(tiny_flux_dev, tmp_path / "files", fp8=True)
    data = make_image_dataset(tmp_path / "data", 2, sizes=[(64, 64)])
    seen: list[torch.dtype] = []
    original = fp8_module.Fp8Linear.from_linear.__func__

    def spy(cls, linear):
        seen.append(linear.weight.dtype)
        return original(cls, linear)

    monkeypatch.setattr(fp8_module.Fp8Linear, "from_linear", classmethod(spy))
    config = seed_like_config(
        tmp_path / "run",
        paths["transformer"],
        data,
        model_family="flux",
        vae=str(paths["vae"]),
        clip_l=str(paths["clip_l"]),
        t5xxl=str(paths["t5xxl"]),
        base_weights_dtype="fp8",
        batch_size=1,
        max_steps=1,
        lora_rank=4,
        save_steps=None,
    )
    job = make_job(config)
    assert train(job) == "finished"
    assert len(seen) == 40 and set(seen) == {torch.float8_e4m3fn}  # every block Linear arrived as float8
    steps = events_of(job.run, "step")
    assert len(steps) == 1 and math.isfinite(steps[0]["loss"])
