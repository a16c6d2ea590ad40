"""`loratui export`: convert a run or checkpoint to kohya/diffusers/PEFT files."""

from __future__ import annotations

from pathlib import Path

import typer


def export(
    source: Path = typer.Argument(..., help="A run directory, a checkpoint folder, or a LoRA file."),
    fmt: str | None = typer.Option(
        None, "--format", help="kohya | diffusers (image LoRAs) or peft (LLM adapters); default by task."
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 for the written tensors."),
    merge: bool = typer.Option(
        False, "--merge", help="LLM: write a merged full model instead of an adapter."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file or folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Export a run or checkpoint: kohya/A1111 .safetensors, diffusers, PEFT adapter or merged model.

    kohya files load in AUTOMATIC1111, ComfyUI and diffusers; PEFT adapter folders in transformers, vLLM
    and llama.cpp (convert_lora_to_gguf.py).
    """
    from loratui.cli.common import EXIT_UNUSABLE, console, not_implemented
    from loratui.export.detect import source_task

    task = source_task(source)
    if task is None:
        typer.echo(f"error: {source} is not a run directory, checkpoint or LoRA file", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    try:
        if task == "image-generation":
            from loratui.export.sd_export import export_cli
        else:
            from loratui.export.llm_export import export_cli
    except ModuleNotFoundError:
        not_implemented(f"export ({task})")
    raise typer.Exit(
        export_cli(source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite, console=console())
    )
