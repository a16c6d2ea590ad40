"""`loratui demo --task image`: the Stable Diffusion LoRA path end to end, offline, on a CPU.

Builds a tiny SD 1.5-layout model with random weights from bundled configs (`loratui.tiny_models`), draws a
small captioned dataset of shapes, checks it, trains a LoRA through the real trainer (run directory, events,
checkpoints, kohya export), then reloads the kohya file with diffusers and renders the same seed before and
after. The model is random: its pictures are noise; the point is that every step works and the LoRA file
loads and changes the output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from loratui.demo.image_assets import TRIGGER, write_dataset
from loratui.demo.session import demo_session
from loratui.demo.session import say as _say

DEFAULT_STEPS = 40
RESOLUTION = 64
PROMPT = f"{TRIGGER}, a red circle, flat colours, plain background"


def _check(console: Any, data: Path) -> bool:
    from loratui.data.check import run_checks

    report = run_checks(data, task="image", resolution=RESOLUTION, batch_size=4, caption_extensions=(".txt",))
    counts = report.counts()
    summary = report.summary
    _say(
        console,
        f"dataset check: {counts['error']} error(s), {counts['warning']} warning(s); "
        f"{summary.get('images', '?')} images x 5 repeats (kohya folder 5_shapes) = "
        f"{summary.get('images_x_repeats', '?')} samples per epoch",
    )
    for finding in report.findings:
        if finding.severity == "error":
            _say(console, f"  error: {finding.message}")
    return not report.has_errors


def _write_config(out: Path, model: Path, data: Path, steps: int) -> Path:
    config = {
        "task_type": "image-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(out / "output" / "demo_shapes"),
        "runs_dir": str(out / "runs"),
        "run_name": "image-demo",
        "resolution": RESOLUTION,
        "lora_rank": 8,
        "lora_alpha": 8,
        "learning_rate": 5e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 2,
        "batch_size": 4,
        "max_steps": steps,
        "mixed_precision": "no",
        "flip_aug": True,
        "trigger_word": TRIGGER,
        "cache_latents": True,
        "cache_text_encoder_outputs": True,
        "save_steps": max(1, steps // 2),
        "log_every_steps": max(1, steps // 8),
        "sample_prompts": [PROMPT],
        "sample_every_steps": steps,
        "seed": 0,
    }
    path = out / "image_demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def _before_after(out: Path, model: Path, lora: Path) -> tuple[Path, int, float]:
    """Render the prompt without and with the LoRA (same seed) and save them side by side."""
    from PIL import Image

    from loratui.data.image_io import save_png
    from loratui.sample.sd_sample import LoraRequest, apply_loras, generate, load_pipeline

    pipe, loaded = load_pipeline(str(model))
    options = {"seed": 1, "steps": 20, "width": RESOLUTION * 2, "height": RESOLUTION * 2, "guidance": 5.0}
    before = generate(pipe, PROMPT, **options)
    apply_loras(pipe, [LoraRequest(lora, 1.0)], loaded.family)
    after = generate(pipe, PROMPT, **options)
    import numpy as np
    from peft.tuners.lora import LoraLayer

    layers = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    change = float(np.abs(np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)).mean())
    pair = Image.new("RGB", (before.width * 2 + 8, before.height), (255, 255, 255))
    pair.paste(before, (0, 0))
    pair.paste(after, (before.width + 8, 0))
    return save_png(pair, out / "before_after.png"), layers, change


def run_demo(out: Path, steps: int | None = None, console: Any = None) -> int:
    """Run the image demo in `out`; returns the exit code."""
    from loratui.runs.events import read_events
    from loratui.tiny_models.sd import build_tiny_sd
    from loratui.train.job import WorkerJob
    from loratui.train.sd.trainer import train

    with demo_session(out, steps, DEFAULT_STEPS, console) as demo:
        out, steps, console = demo.out, demo.steps, demo.console
        demo.say("loratui demo (image): a tiny Stable Diffusion 1.5-layout model with RANDOM weights,")
        demo.say("built from bundled configs; its pictures are noise. Nothing is downloaded.")
        model = build_tiny_sd(out / "models" / "tiny-sd15", "sd15")
        demo.say(f"tiny model (random weights, for the demo only): {model}")
        data = write_dataset(out / "data")
        demo.say(f"dataset: 8 drawn shapes with captions in {data}")
        if not _check(console, data):
            demo.say(f"the demo dataset failed its check; run `loratui check {data}`")
            return 1
        config_path = _write_config(out, model, data, steps)
        resolved, run = demo.start_run(config_path)
        demo.say(f"training {steps} steps on the CPU; run directory {run.path}")
        state = train(WorkerJob(run, resolved, None, True))
        if state != "finished":
            demo.say(f"training {state}")
            return 1
        events = read_events(run.events_path)
        losses = [e["loss"] for e in events if e["type"] == "step"]
        exported = next(Path(e["path"]) for e in events if e["type"] == "export")
        usage = next(e["usage"] for e in events if e["type"] == "export")
        samples = [e["path"] for e in events if e["type"] == "sample"]
        demo.say(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} (random model: the loss is noisy)")
        image, layers, change = _before_after(out, model, exported)
        demo.say(
            f"reloaded {exported.name} with diffusers: {layers} LoRA layers in the UNet; the same seed renders "
            f"differently (mean pixel change {change:.1f}/255)",
        )
    _summary(console, config_path, run.path, exported, usage, image, samples, demo.seconds())
    return 0


def _summary(
    console: Any,
    config: Path,
    run: Path,
    lora: Path,
    usage: str,
    image: Path,
    samples: list[str],
    seconds: float,
) -> None:
    _say(console)
    _say(console, f"done in {seconds:.0f} s")
    _say(console, f"  config:        {config}")
    _say(console, f"  run:           {run} (events.jsonl, checkpoints/, logs/ for TensorBoard, samples/)")
    _say(console, f"  LoRA (kohya):  {lora}")
    _say(console, f"  use it as:     {usage}")
    _say(console, f"  before/after:  {image} (left: base model, right: with the LoRA; same seed)")
    if samples:
        _say(console, f"  sample:        {samples[-1]}")
    _say(console)
    _say(console, "The same with a real checkpoint (e.g. v1-5-pruned.safetensors in the original layout):")
    _say(console, "  loratui check ./data/style_train")
    _say(console, "  loratui train --config examples/sd15_style.yaml \\")
    _say(console, "      --base-model ./models/Stable-diffusion/v1-5-pruned.safetensors")
    _say(console, "  loratui sample --base ./models/Stable-diffusion/v1-5-pruned.safetensors \\")
    _say(
        console,
        '      --lora ./output/my_style_lora/my_style_lora.safetensors:0.8 --prompt "..." --out test.png',
    )
    _say(console, "Copy the .safetensors file to AUTOMATIC1111/Forge models/Lora or ComfyUI models/loras.")
