"""`loratui sample`: generate with one or more LoRAs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def sample(
    base: str = typer.Option(
        ..., "--base", help="Base model: diffusers folder, .safetensors checkpoint (SD or Flux) or HF LLM."
    ),
    lora: list[str] = typer.Option(
        [], "--lora", help="LoRA file or adapter, optionally PATH:WEIGHT. Repeatable."
    ),
    lora_dir: Path | None = typer.Option(
        None, "--lora-dir", help="Folder to resolve <lora:NAME:W> prompt tags."
    ),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text (may contain <lora:NAME:W>)."),
    negative_prompt: str = typer.Option("", "--negative-prompt", help="Image models: negative prompt."),
    seed: int = typer.Option(1, "--seed", help="Random seed."),
    steps: int | None = typer.Option(
        None, "--steps", help="Image models: denoising steps (SD 25; Flux dev/Chroma 20, schnell 4)."
    ),
    width: int | None = typer.Option(None, "--width", help="Image models: width (default: model's)."),
    height: int | None = typer.Option(None, "--height", help="Image models: height (default: model's)."),
    guidance: float | None = typer.Option(
        None, "--guidance", help="Image models: guidance scale (SD CFG 7; Flux dev 3.5, schnell none)."
    ),
    vae: str | None = typer.Option(None, "--vae", help="Flux single-file base: the ae.safetensors file."),
    clip_l: str | None = typer.Option(None, "--clip-l", help="Flux single-file base: clip_l.safetensors."),
    t5xxl: str | None = typer.Option(None, "--t5xxl", help="Flux single-file base: the T5-XXL file."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Image models: output PNG path."),
    compare: bool = typer.Option(
        False, "--compare", help="LLMs: print base vs adapter answers side by side."
    ),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", help="LLMs: tokens to generate."),
    temperature: float = typer.Option(0.0, "--temperature", help="LLMs: 0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="LLMs: nucleus sampling."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickle (.ckpt/.bin) weights."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Allow model folder code."),
) -> None:
    """Generate an image (SD, Flux) or an answer (LLM) with the given LoRAs at the given weights."""
    from loratui.cli.common import console, optional_dependencies
    from loratui.config.base_model import guess_task_type
    from loratui.sample.flux_sample import is_flux_base

    flux = is_flux_base(base)
    task = "image-generation" if flux else guess_task_type(base, "") or "image-generation"
    with optional_dependencies("sample"):
        if flux:
            if negative_prompt:
                console().print("warning: Flux models take no negative prompt; --negative-prompt is ignored")
            code = run_flux_sample(
                console=console(),
                base=base,
                lora=lora,
                lora_dir=lora_dir,
                prompt=prompt,
                seed=seed,
                steps=steps,
                width=width,
                height=height,
                guidance=guidance,
                out=out,
                vae=vae,
                clip_l=clip_l,
                t5xxl=t5xxl,
            )
        elif task == "image-generation":
            code = run_image_sample(
                console=console(),
                base=base,
                lora=lora,
                lora_dir=lora_dir,
                prompt=prompt,
                negative_prompt=negative_prompt,
                seed=seed,
                steps=25 if steps is None else steps,
                width=width,
                height=height,
                guidance=7.0 if guidance is None else guidance,
                out=out,
                allow_pickle=allow_pickle,
            )
        else:
            code = run_text_sample(
                console=console(),
                base=base,
                lora=lora,
                lora_dir=lora_dir,
                prompt=prompt,
                compare=compare,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                allow_pickle=allow_pickle,
                trust_remote_code=trust_remote_code,
            )
    raise typer.Exit(code)


def _say(console: Any, text: str) -> None:
    console.print(text, markup=False, highlight=False)


def run_image_sample(*, console: Any, **options: Any) -> int:
    """Render and save an image (options as `loratui.sample.sd_sample.sample_image`) and say where it went.
    Exit code 0 saved, 1 a LoRA or the base model could not be used."""
    from loratui.models.sd.loading import BaseModelError
    from loratui.sample.sd_sample import SampleError
    from loratui.sample.sd_sample import sample_image as render

    try:
        sample = render(**options)
    except (SampleError, BaseModelError, FileNotFoundError) as exc:
        _say(console, f"error: {exc}")
        return 1
    used = ", ".join(f"{r.path.name}:{r.weight:g}" for r in sample.loras) or "no LoRA"
    _say(console, f"saved {sample.path} ({sample.width}x{sample.height}, seed {sample.seed}, {used})")
    return 0


def run_flux_sample(*, console: Any, **options: Any) -> int:
    """Render and save a Flux image (options as `loratui.sample.flux_sample.sample_flux_image`) and say where
    it went. Exit code 0 saved, 1 a LoRA or the base model could not be used."""
    from loratui.models.flux.loading import FluxLoadError
    from loratui.sample.flux_sample import sample_flux_image
    from loratui.sample.sd_sample import SampleError

    try:
        sample = sample_flux_image(**options)
    except (SampleError, FluxLoadError, FileNotFoundError) as exc:
        _say(console, f"error: {exc}")
        return 1
    used = ", ".join(f"{r.path.name}:{r.weight:g}" for r in sample.loras) or "no LoRA"
    _say(console, f"saved {sample.path} ({sample.width}x{sample.height}, seed {sample.seed}, {used})")
    return 0


def run_text_sample(*, console: Any, **options: Any) -> int:
    """Generate an answer (options as `loratui.sample.llm_sample.sample_text`) and print it, or with
    `compare` the base and adapter answers side by side. Exit code 0 done, 1 failed to load."""
    from loratui.models.llm.loading import ModelLoadError
    from loratui.sample.llm_sample import sample_text as generate

    try:
        sample = generate(**options)
    except (ModelLoadError, FileNotFoundError, ValueError) as exc:
        _say(console, f"error: {exc}")
        return 1
    for note in sample.notes:
        _say(console, f"warning: {note}")
    if sample.base_answer is None:
        _say(console, sample.answer)
    else:
        print_compare(console, sample.prompt, sample.base_answer, sample.answer)
    return 0


def print_compare(console: Any, prompt: str, base_answer: str, lora_answer: str) -> None:
    """Base vs adapter answers: a two-column table on a terminal, titled plain blocks otherwise."""
    if getattr(console, "is_terminal", False):
        from rich.table import Table

        table = Table(title=prompt, show_lines=True, expand=True)
        table.add_column("base")
        table.add_column("base + LoRA")
        table.add_row(base_answer, lora_answer)
        console.print(table)
        return
    for title, text in (("base", base_answer), ("base + LoRA", lora_answer)):
        _say(console, f"--- {title} ---")
        _say(console, text)
