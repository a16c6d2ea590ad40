"""The command-line paths for image LoRAs: `loratui train` (real worker subprocess), `export`, `sample`, `demo`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from sd_helpers import events_of, make_image_dataset, make_job, seed_like_config
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.runs.rundir import list_runs
from loratui.train.sd.trainer import train


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Derived config folders (real-architecture configs + CLIP vocab) go to a test folder."""
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loratui-cache"))


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_sd15, tmp_path_factory):
    """One small finished run (in-process) shared by the export and sample tests."""
    tmp = tmp_path_factory.mktemp("sd_cli")
    data = make_image_dataset(tmp / "data", 4)
    job = make_job(seed_like_config(tmp, tiny_sd15, data, epochs=2, learning_rate="1e-3", save_steps=None))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    assert train(job) == "finished"
    torch.set_num_threads(threads)
    kohya = Path(events_of(job.run, "export")[0]["path"])
    return tmp, job, kohya


def _cli(*args: str):
    return CliRunner().invoke(app, list(args), catch_exceptions=False)


def test_cli_train_runs_the_worker_end_to_end(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 4)
    config = seed_like_config(tmp_path, tiny_sd15, data, epochs=1, save_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exported = tmp_path / "output" / "my_style_lora" / "my_style_lora.safetensors"
    assert f"exported:{exported}" in "".join(proc.stdout.split())  # rich may wrap long paths
    assert "use it: <lora:my_style_lora:0.8>" in proc.stdout
    assert "step 1 epoch 1 loss" in proc.stdout
    assert exported.is_file()
    [run] = list_runs(tmp_path / "runs")
    assert run.state == "finished" and run.step == 1
    assert (run.run.path / "launch.json").is_file() and run.run.latest_checkpoint().name == "step-1"


def test_cli_resume_latest_continues_a_stopped_run_exactly(tiny_sd15, tmp_path):
    data = make_image_dataset(tmp_path / "data", 6)
    straight = make_job(seed_like_config(tmp_path / "a", tiny_sd15, data, epochs=2, save_steps=None))
    assert train(straight) == "finished"
    config = seed_like_config(tmp_path / "b", tiny_sd15, data, epochs=2, save_steps=None)
    first = make_job(config)
    assert train(first, stop_after_step=2) == "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "--config", str(config), "--resume", "latest", "--no-tui"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resuming from" in proc.stdout and "step-2" in proc.stdout
    assert [e["step"] for e in events_of(first.run, "step")] == [1, 2, 3, 4]
    ours = load_file(str(first.run.latest_checkpoint() / "lora.safetensors"))
    reference = load_file(str(straight.run.latest_checkpoint() / "lora.safetensors"))
    assert max((ours[k] - reference[k]).abs().max().item() for k in ours) <= 1e-6


def test_export_converts_both_ways_and_formats_agree(trained, tiny_sd15):
    tmp, job, kohya = trained
    out = tmp / "exports"
    result = _cli("export", str(job.run.path), "--format", "diffusers", "--out", str(out))
    assert result.exit_code == 0, result.output
    diffusers_file = out / "pytorch_lora_weights.safetensors"
    tensors = load_file(str(diffusers_file))
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in tensors

    again = _cli("export", str(job.run.path), "--format", "diffusers", "--out", str(out))
    assert again.exit_code == 0  # same run: re-export allowed

    half = _cli(
        "export", str(job.run.latest_checkpoint()), "--dtype", "fp16", "--out", str(out / "half.safetensors")
    )
    assert half.exit_code == 0, half.output
    assert "<lora:half:0.8>" in half.output
    assert all(v.dtype == torch.float16 for v in load_file(str(out / "half.safetensors")).values())

    back = _cli("export", str(diffusers_file), "--format", "kohya", "--out", str(out / "back.safetensors"))
    assert back.exit_code == 0, back.output
    original, roundtrip = load_file(str(kohya)), load_file(str(out / "back.safetensors"))
    assert set(original) == set(roundtrip)
    assert all(torch.equal(original[k], roundtrip[k]) for k in original)

    to_diffusers = _cli(
        "export", str(kohya), "--format", "diffusers", "--out", str(out / "from_kohya.safetensors")
    )
    assert to_diffusers.exit_code == 0, to_diffusers.output
    converted = load_file(str(out / "from_kohya.safetensors"))
    assert set(converted) == set(tensors) and all(torch.equal(converted[k], tensors[k]) for k in tensors)

    refused = _cli(
        "export", str(kohya), "--format", "diffusers", "--out", str(out / "from_kohya.safetensors")
    )
    assert refused.exit_code == 1 and "already exists" in refused.output

    # the diffusers file and the kohya file change the pipeline identically
    from loratui.sample.sd_sample import LoraRequest, apply_loras, generate, load_pipeline

    renders = []
    for path in (kohya, diffusers_file):
        pipe, loaded = load_pipeline(str(tiny_sd15))
        apply_loras(pipe, [LoraRequest(path, 1.0)], loaded.family)
        renders.append(np.asarray(generate(pipe, "a circle", steps=2, width=64, height=64), dtype=np.float32))
    assert np.abs(renders[0] - renders[1]).max() <= 1.0


def test_sample_cli_with_weights_and_prompt_tags(trained, tiny_sd15):
    tmp, job, kohya = trained
    common = [
        "sample",
        "--base",
        str(tiny_sd15),
        "--steps",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--seed",
        "3",
    ]
    base = _cli(*common, "--prompt", "a circle", "--out", str(tmp / "base.png"))
    assert base.exit_code == 0, base.output
    flag = _cli(*common, "--prompt", "a circle", "--lora", f"{kohya}:0.7", "--out", str(tmp / "flag.png"))
    assert flag.exit_code == 0, flag.output
    assert "my_style_lora.safetensors:0.7" in flag.output
    tag = _cli(
        *common,
        "--prompt",
        "a circle <lora:my_style_lora:0.7>",
        "--lora-dir",
        str(kohya.parent),
        "--out",
        str(tmp / "tag.png"),
    )
    assert tag.exit_code == 0, tag.output
    images = {
        name: np.asarray(Image.open(tmp / f"{name}.png"), dtype=np.float32)
        for name in ("base", "flag", "tag")
    }
    assert images["base"].shape == (64, 64, 3)
    assert np.abs(images["flag"] - images["tag"]).max() == 0  # the tag is the same LoRA at the same weight
    assert np.abs(images["flag"] - images["base"]).mean() > 0.05
    two = _cli(
        *common,
        "--prompt",
        "a circle",
        "--lora",
        f"{kohya}:0.5",
        "--lora",
        f"{kohya}:0.2",
        "--out",
        str(tmp / "two.png"),
    )
    assert two.exit_code == 0, two.output

    missing = _cli(*common, "--prompt", "x <lora:nothing:1>", "--lora-dir", str(tmp))
    assert missing.exit_code == 1 and "nothing.safetensors" in missing.output


#: The image demo's LoRA (weight 1.0) must show the star in at least this share more samples than the base
#: model (the shipped build: 12 of 24 vs 0 of 24).
STAR_MARGIN = 0.35


def test_image_demo_teaches_the_star(tmp_path):
    """The whole default image demo: the pixel detector finds the star in far more samples with the LoRA (weight
    1.0) than with the base model, and weight 0.0 renders exactly what the base model renders."""
    from rich.console import Console

    from loratui.demo.image_demo import run_demo
    from loratui.tiny_models.pretrain.scenes import read_scene

    console = Console(record=True, width=200, no_color=True)
    assert run_demo(tmp_path / "demo", console=console) == 0
    text = console.export_text()
    assert "tiny pretrained" in text and "use it as:     <lora:demo_stars:0.8>" in text
    lora = tmp_path / "demo" / "output" / "demo_stars" / "demo_stars.safetensors"
    assert lora.is_file() and (tmp_path / "demo" / "demo_grid.png").is_file()
    assert "LoRA layers in the UNet" in text and "samples show a star" in text
    renders = tmp_path / "demo" / "renders"
    assert sorted(p.name for p in renders.iterdir()) == ["base", "lora-0.0", "lora-0.5", "lora-1.0"]
    for base in sorted((renders / "base").glob("*.png")):  # same prompts, same seeds
        assert np.array_equal(
            np.asarray(Image.open(base)), np.asarray(Image.open(renders / "lora-0.0" / base.name))
        )

    def stars(row: str) -> float:
        files = sorted((renders / row).glob("*.png"))
        return sum(read_scene(Image.open(f)).shape == "star" for f in files) / len(files)

    assert stars("lora-1.0") >= stars("base") + STAR_MARGIN, (stars("base"), stars("lora-1.0"))


@pytest.mark.slow
def test_image_demo_default_finishes_within_two_minutes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "demo", "--task", "image", "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    elapsed = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed <= 120, f"demo took {elapsed:.0f} s"
