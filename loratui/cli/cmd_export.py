"""`loratui export`: convert a run or checkpoint to kohya/diffusers/PEFT files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
    from loratui.cli.common import EXIT_UNUSABLE, console, optional_dependencies
    from loratui.export.detect import source_task

    task = source_task(source)
    if task is None:
        typer.echo(f"error: {source} is not a run directory, checkpoint or LoRA file", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    run = run_image_export if task == "image-generation" else run_text_export
    with optional_dependencies("export"):
        code = run(source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite, console=console())
    raise typer.Exit(code)


def _say(console: Any, text: str) -> None:
    console.print(text, markup=False, highlight=False)


def run_image_export(
    source: Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    console: Any,
) -> int:
    """Export an image LoRA and print where it went and how to use it. Exit code 0 written, 1 refused or
    failed, 2 an option that does not apply to image LoRAs."""
    from loratui.export.result import UnusableExportRequest
    from loratui.export.sd_export import ExportError, export_image_lora

    try:
        exported = export_image_lora(source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite)
    except UnusableExportRequest as exc:
        _say(console, f"error: {exc}")
        return 2
    except (ExportError, FileNotFoundError, KeyError, ValueError) as exc:
        _say(console, f"error: {exc}")
        return 1
    _say(console, f"exported: {exported.path}")
    _say(console, f"  use it: {exported.usage}")
    return 0


def run_text_export(
    source: Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    console: Any,
) -> int:
    """Export an LLM adapter (or a merged model) and print where it went and how to use it. Exit code 0
    written, 1 refused or failed, 2 an option that does not apply to LLM adapters."""
    from loratui.export.llm_export import ExportError, export_adapter
    from loratui.export.result import UnusableExportRequest
    from loratui.models.llm.loading import ModelLoadError

    try:
        exported = export_adapter(source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite)
    except UnusableExportRequest as exc:
        _say(console, f"error: {exc}")
        return 2
    except (ExportError, ModelLoadError, OSError) as exc:
        _say(console, f"error: {exc}")
        return 1
    _say(console, f"{'merged model' if exported.kind == 'merged' else 'adapter'}: {exported.path}")
    _say(console, f"use it: {exported.usage}")
    return 0
