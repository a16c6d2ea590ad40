"""`loratui sample`: generate with one or more LoRAs."""

from __future__ import annotations

from pathlib import Path

import typer


def sample(
    base: str = typer.Option(
        ..., "--base", help="Base model: diffusers folder, .safetensors checkpoint or HF LLM."
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
    steps: int = typer.Option(25, "--steps", help="Image models: denoising steps."),
    width: int | None = typer.Option(None, "--width", help="Image models: width (default: model's)."),
    height: int | None = typer.Option(None, "--height", help="Image models: height (default: model's)."),
    guidance: float = typer.Option(7.0, "--guidance", help="Image models: classifier-free guidance scale."),
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
    """Generate an image (SD) or an answer (LLM) with the given LoRAs at the given weights."""
    options = dict(locals())  # the command's parameters only (taken before the imports below)
    from loratui.cli.common import console, not_implemented
    from loratui.config.base_model import guess_task_type

    task = guess_task_type(base, "") or "image-generation"
    try:
        if task == "image-generation":
            from loratui.sample.sd_sample import sample_cli
        else:
            from loratui.sample.llm_sample import sample_cli
    except ModuleNotFoundError:
        not_implemented(f"sample ({task})")
    raise typer.Exit(sample_cli(console=console(), **options))
