"""`loratui demo --task image`: teach a tiny pretrained Stable Diffusion model a new shape, offline, on a CPU.

The base is `shapes-sd`, shipped with loratui (SD 1.5 layout, 64x64 px, pretrained on drawn circles,
squares and triangles; see its LORATUI_TINY_MODEL.txt). The demo draws 20 stars captioned with a trigger
word, checks the dataset, trains a LoRA through the real trainer (run directory, events, checkpoints,
kohya export), reloads the kohya file with diffusers and renders the same prompts and seeds with the base
model and with the LoRA at weights 0.0 / 0.5 / 1.0 into one labelled grid. A pixel-level detector counts the
stars in each row: the measured effect of the LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loratui.demo.image_assets import IMAGES, PROMPT_SCENES, TRIGGER, prompts, write_dataset
from loratui.demo.session import demo_session
from loratui.demo.session import say as _say
from loratui.tiny_models.pretrain.image import NOISE_OFFSET

DEFAULT_STEPS = 400
RESOLUTION = 64
#: Seeds every prompt is rendered with (the grid shows the first).
SEEDS = (1, 2, 3, 4)
SAMPLE_STEPS = 20
GUIDANCE = 4.0
#: The rows of the grid: the base model, then the LoRA at these weights.
LORA_WEIGHTS = (0.0, 0.5, 1.0)


@dataclass
class Renders:
    """The rendered rows (label -> images, prompt-major then seed) and their star counts."""

    rows: dict[str, list[Any]] = field(default_factory=dict)

    def stars(self, label: str) -> int:
        from loratui.tiny_models.pretrain.scenes import read_scene

        return sum(read_scene(image).shape == "star" for image in self.rows[label])

    def share(self, label: str) -> float:
        return self.stars(label) / len(self.rows[label])


def _check(console: Any, data: Path) -> bool:
    from loratui.data.check import run_checks

    report = run_checks(data, task="image", resolution=RESOLUTION, batch_size=4, caption_extensions=(".txt",))
    counts = report.counts()
    summary = report.summary
    _say(
        console,
        f"dataset check: {counts['error']} error(s), {counts['warning']} warning(s); "
        f"{summary.get('images', '?')} images x 5 repeats (kohya folder 5_stars) = "
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
        "output_dir": str(out / "output" / "demo_stars"),
        "runs_dir": str(out / "runs"),
        "run_name": "image-demo",
        "resolution": RESOLUTION,
        # LoCon: LoRA on the attention layers and on the 3x3 convolutions, where this small UNet draws the
        # outlines (it has attention only at 8x8 and 4x4): the star is a new shape, not a new word for a known one.
        "network_type": "locon",
        "lora_rank": 16,
        "lora_alpha": 16,
        "conv_rank": 16,
        "conv_alpha": 16,
        # The trigger word is new to the text encoder too: its LoRA gives the word a meaning.
        "train_text_encoder": True,
        "min_snr_gamma": 5,
        "learning_rate": 3e-3,
        "lr_scheduler": "cosine",
        "lr_warmup_steps": 5,
        "batch_size": 4,
        "max_steps": steps,
        "mixed_precision": "no",
        "flip_aug": True,
        "trigger_word": TRIGGER,
        "noise_offset": NOISE_OFFSET,  # as the base model was pretrained
        "cache_latents": True,
        "cache_text_encoder_outputs": True,
        "save_steps": max(1, steps // 2),
        "log_every_steps": max(1, steps // 8),
        "sample_prompts": [prompts()[0]],
        "sample_every_steps": steps,
        "seed": 0,
    }
    path = out / "image_demo.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def prepare_demo(out: Path, steps: int | None = None) -> Path:
    """The drawn stars and the config in ``out`` (the shipped base model); returns the config's path."""
    from loratui.tiny_models.pretrain.image import shipped_model_path

    out = Path(out).absolute()
    data = write_dataset(out / "data")
    return _write_config(out, shipped_model_path(), data, steps or DEFAULT_STEPS)


def _render(pipe: Any) -> list[Any]:
    """Every prompt with every seed (prompt-major), one batch."""
    import torch

    texts = [text for text in prompts() for _ in SEEDS]
    generators = [torch.Generator("cpu").manual_seed(seed) for _ in prompts() for seed in SEEDS]
    return pipe(
        texts,
        num_inference_steps=SAMPLE_STEPS,
        guidance_scale=GUIDANCE,
        width=RESOLUTION,
        height=RESOLUTION,
        generator=generators,
    ).images


def render_rows(model: Path, lora: Path | None) -> tuple[Renders, int]:
    """The base model's renders, then (with `lora` reloaded through diffusers) the LoRA at each weight."""
    from peft.tuners.lora import LoraLayer

    from loratui.sample.sd_sample import LoraRequest, apply_loras, load_pipeline

    pipe, loaded = load_pipeline(str(model))
    renders = Renders()
    renders.rows["base model"] = _render(pipe)
    if lora is None:
        return renders, 0
    names = apply_loras(pipe, [LoraRequest(lora, 1.0)], loaded.family)
    layers = sum(isinstance(m, LoraLayer) for m in pipe.unet.modules())
    for weight in LORA_WEIGHTS:
        pipe.set_adapters(names, adapter_weights=[weight])
        renders.rows[f"LoRA {weight:.1f}"] = _render(pipe)
    return renders, layers


def save_renders(renders: Renders, folder: Path) -> Path:
    """Every render as `folder/<row>/<prompt number>-seed<seed>.png` (row: `base`, `lora-0.5`, ...)."""
    from loratui.data.image_io import save_png

    for label, images in renders.rows.items():
        row = folder / label.lower().replace(" model", "").replace(" ", "-")
        row.mkdir(parents=True, exist_ok=True)
        for index, image in enumerate(images):
            prompt, seed = divmod(index, len(SEEDS))
            save_png(image, row / f"{prompt}-seed{SEEDS[seed]}.png")
    return folder


def save_grid(renders: Renders, path: Path, scale: int = 2) -> Path:
    """One labelled PNG: a row per model/weight, a column per prompt (first seed), star counts on the left."""
    from PIL import Image, ImageDraw

    from loratui.data.image_io import save_png

    cell, label_width, header = RESOLUTION * scale, 150, 34
    columns = len(PROMPT_SCENES)
    grid = Image.new(
        "RGB", (label_width + columns * (cell + 4), header + len(renders.rows) * (cell + 4)), (255, 255, 255)
    )
    pen = ImageDraw.Draw(grid)
    for column, (colour, background) in enumerate(PROMPT_SCENES):
        x = label_width + column * (cell + 4)
        pen.text((x + 4, 4), f"{colour} {TRIGGER}", fill=(0, 0, 0))
        pen.text((x + 4, 18), f"on {background}", fill=(0, 0, 0))
    for row, (label, images) in enumerate(renders.rows.items()):
        y = header + row * (cell + 4)
        pen.text((6, y + cell // 2 - 14), label, fill=(0, 0, 0))
        pen.text((6, y + cell // 2 + 2), f"stars: {renders.stars(label)}/{len(images)}", fill=(90, 90, 90))
        for column in range(columns):
            image = images[column * len(SEEDS)].resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(image, (label_width + column * (cell + 4), y))
    return save_png(grid, path)


def run_demo(out: Path, steps: int | None = None, console: Any = None) -> int:
    """Run the image demo in `out`; returns the exit code."""
    from loratui.runs.events import read_events
    from loratui.tiny_models.pretrain.image import shipped_model_path
    from loratui.train.job import WorkerJob
    from loratui.train.sd.trainer import train

    with demo_session(out, steps, DEFAULT_STEPS, console) as demo:
        out, steps, console = demo.out, demo.steps, demo.console
        model = shipped_model_path()
        demo.say("loratui demo (image): teach a tiny pretrained Stable Diffusion model a shape it never saw.")
        demo.say(
            f"base model: shapes-sd (SD 1.5 layout, 64 px; circles, squares, triangles), shipped in {model}"
        )
        demo.say("Nothing is downloaded.")
        data = write_dataset(out / "data")
        demo.say(
            f"dataset: {IMAGES} drawn stars captioned 'a red {TRIGGER} on a white background', ... in {data}"
        )
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
        demo.say(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        demo.say(
            f"rendering {len(prompts())} prompts x {len(SEEDS)} seeds: base model, then LoRA 0.0 / 0.5 / 1.0"
        )
        renders, layers = render_rows(model, exported)
        grid = save_grid(renders, out / "demo_grid.png")
        save_renders(renders, out / "renders")
        demo.say(f"reloaded {exported.name} with diffusers: {layers} LoRA layers in the UNet")
        _effect(console, renders)
    _summary(console, config_path, run.path, exported, usage, grid, demo.seconds())
    return 0


def _effect(console: Any, renders: Renders) -> None:
    _say(console, "measured effect (a pixel-level detector looks for a star in each sample):")
    for label, images in renders.rows.items():
        _say(console, f"  {label:<11} {renders.stars(label):>2}/{len(images)} samples show a star")


def _summary(
    console: Any, config: Path, run: Path, lora: Path, usage: str, grid: Path, seconds: float
) -> None:
    _say(console)
    _say(console, f"done in {seconds:.0f} s")
    _say(console, f"  config:        {config}")
    _say(console, f"  run:           {run} (events.jsonl, checkpoints/, logs/ for TensorBoard, samples/)")
    _say(console, f"  LoRA (kohya):  {lora}")
    _say(console, f"  use it as:     {usage}")
    _say(console, f"  grid:          {grid} (rows: base model, LoRA 0.0 / 0.5 / 1.0; same prompts and seeds)")
    _say(console, f"  every sample:  {grid.parent / 'renders'}")
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
