"""`loratui export`: convert a run or checkpoint to kohya/diffusers/PEFT files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer


def export(
    source: Path = typer.Argument(..., help="A run directory, a checkpoint folder, or a LoRA file."),
    fmt: str | None = typer.Option(
        None,
        "--format",
        help="kohya | diffusers (image LoRAs, SD and Flux), peft or gguf (LLM adapters); default by task.",
    ),
    dtype: str | None = typer.Option(None, "--dtype", help="fp16, bf16 or fp32 for the written tensors."),
    merge: bool = typer.Option(
        False, "--merge", help="LLM: write a merged full model instead of an adapter."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output file or folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
    quant: str | None = typer.Option(
        None, "--quant", help="GGUF: f32, f16, bf16 or q8_0 (default f32 adapter, f16 merged model)."
    ),
    ema: bool = typer.Option(
        False, "--ema", help="Image LoRAs: export the EMA weights (runs trained with ema_decay)."
    ),
) -> None:
    """Export a run or checkpoint: kohya/A1111 .safetensors, diffusers, PEFT adapter, merged model or GGUF.

    kohya files load in AUTOMATIC1111, ComfyUI and diffusers; PEFT adapter folders in transformers and vLLM;
    --format gguf writes a llama.cpp LoRA adapter (llama-cli --lora), with --merge a merged GGUF model and
    an Ollama Modelfile.
    """
    from loratui.cli.common import EXIT_UNUSABLE, console, optional_dependencies
    from loratui.export.detect import source_task

    task = source_task(source)
    if task is None:
        typer.echo(f"error: {source} is not a run directory, checkpoint or LoRA file", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    run = run_image_export if task == "image-generation" else run_text_export
    if ema and task != "image-generation":
        typer.echo("error: --ema applies to image LoRAs trained with ema_decay", err=True)
        raise typer.Exit(2)
    extra = {"ema": True} if ema else {}
    with optional_dependencies("export"):
        code = run(
            source,
            fmt=fmt,
            dtype=dtype,
            merge=merge,
            out=out,
            overwrite=overwrite,
            quant=quant,
            console=console(),
            **extra,
        )
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
    quant: str | None = None,
    console: Any,
    ema: bool = False,
) -> int:
    """Export an image LoRA and print where it went and how to use it. Exit code 0 written, 1 refused or
    failed, 2 an option that does not apply to image LoRAs."""
    from loratui.export.flux_export import export_flux_lora, is_flux_source
    from loratui.export.result import UnusableExportRequest
    from loratui.export.sd_export import ExportError, export_image_lora

    if quant is not None:
        _say(console, "error: --quant applies to GGUF exports of LLM adapters, not image LoRAs")
        return 2
    export_lora = export_flux_lora if is_flux_source(source) else export_image_lora
    try:
        exported = export_lora(
            source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite, ema=ema
        )
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
    quant: str | None = None,
    console: Any,
) -> int:
    """Export an LLM adapter (or a merged model, or GGUF) and print where it went and how to use it. Exit
    code 0 written, 1 refused or failed, 2 an option that does not apply to LLM adapters."""
    from loratui.export.llm_export import ExportError, export_adapter
    from loratui.export.result import UnusableExportRequest
    from loratui.models.llm.loading import ModelLoadError

    try:
        exported = export_adapter(
            source, fmt=fmt, dtype=dtype, merge=merge, out=out, overwrite=overwrite, quant=quant
        )
    except UnusableExportRequest as exc:
        _say(console, f"error: {exc}")
        return 2
    except (ExportError, ModelLoadError, OSError) as exc:
        _say(console, f"error: {exc}")
        return 1
    what = "merged model" if exported.kind in ("merged", "gguf-merged") else "adapter"
    _say(console, f"{what}: {exported.path}")
    if exported.kind == "gguf-merged":
        _say(console, f"Modelfile: {exported.path.with_name('Modelfile')}")
    _say(console, f"use it: {exported.usage}")
    return 0
