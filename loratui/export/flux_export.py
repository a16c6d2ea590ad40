"""Export Flux LoRAs: kohya/ComfyUI `.safetensors` (default) or diffusers/PEFT `pytorch_lora_weights`.

Sources: a Flux run directory (its newest checkpoint), a Flux checkpoint folder, or a Flux LoRA file (converted
between the kohya and diffusers layouts; a kohya file's fused modules are split at widths read from the file).
`loratui export` calls `export_flux_lora` when `is_flux_source` says so; the file writers are
`loratui.models.flux.lora_files` (the Flux trainer writes its result with them too).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratui.export.result import Exported, UnusableExportRequest
from loratui.models.flux.lora_files import (
    DIFFUSERS_FILE,
    FLUX_FAMILIES,
    export_flux_checkpoint,
    is_flux_lora_keys,
    read_flux_lora,
    write_flux_diffusers,
    write_flux_kohya,
)
from loratui.models.sd.kohya import KohyaInfo
from loratui.models.sd.lora_files import ExportError, check_output, parse_dtype, usage_string


def is_flux_source(source: Path) -> bool:
    """Whether an export source is a Flux run, checkpoint or LoRA file."""
    from loratui.config.base_model import read_safetensors_header

    source = Path(source)
    if source.is_file():
        try:
            keys = [k for k in read_safetensors_header(source) if k != "__metadata__"]
        except (OSError, ValueError):
            return False
        return is_flux_lora_keys(keys)
    if not source.is_dir():
        return False
    from loratui.export.sd_export import resolve_source

    try:
        _, checkpoint = resolve_source(source)
        meta = json.loads((checkpoint / "meta.json").read_text(encoding="utf-8"))
    except (ExportError, OSError, ValueError):
        return False
    return meta.get("family") in FLUX_FAMILIES


def diffusers_skipped_modules(path: Path) -> list[str]:
    """The kohya modules of a written file that diffusers' Flux loader skips (`kohya.diffusers_skipped`)."""
    from loratui.config.base_model import read_safetensors_header
    from loratui.models.flux.kohya import diffusers_skipped

    names = {k.split(".", 1)[0] for k in read_safetensors_header(path) if k != "__metadata__"}
    return diffusers_skipped(names)


def convert_flux_file(
    source: Path, *, fmt: str, out: Path | None, dtype: torch.dtype | None, overwrite: bool
) -> Path:
    """kohya -> diffusers or diffusers -> kohya for a Flux LoRA file."""
    lora = read_flux_lora(source)
    if lora.fmt == fmt:
        other = "diffusers" if fmt == "kohya" else "kohya"
        raise ExportError(f"{source} is already a {fmt} file; use --format {other} to convert it")
    if fmt == "diffusers":
        target = Path(out) if out else source.with_name(DIFFUSERS_FILE)
        if target.suffix != ".safetensors":
            target = target / DIFFUSERS_FILE
        check_output(target, None, overwrite=overwrite)
        return write_flux_diffusers(target, lora.modules, lora.variant, dtype=dtype)
    from loratui.models.flux.kohya import dims_from_lora
    from loratui.models.flux.lora_files import diffusers_state

    variant = lora.variant or "dev"
    dims = dims_from_lora(diffusers_state(lora.modules), variant)
    rank = lora.modules[0].rank if lora.modules else 0
    info = KohyaInfo(
        name=source.stem, family="flux", rank=rank, alpha=lora.modules[0].alpha if lora.modules else 0
    )
    target = Path(out) if out else source.with_name(f"{source.stem}_kohya.safetensors")
    if target.suffix != ".safetensors":
        target = target / f"{source.stem}_kohya.safetensors"
    check_output(target, None, overwrite=overwrite)
    return write_flux_kohya(target, lora.modules, dims, info, variant, dtype=dtype)


def export_flux_lora(
    source: Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Exported:
    """`loratui export` for Flux LoRAs: write a kohya (default) or diffusers file and say how to use it.

    Raises `UnusableExportRequest` for options that do not apply, `ExportError`/`FluxLoraError` when the
    export cannot be done."""
    from loratui.export.sd_export import refuse_nonfinite, resolve_source

    fmt = (fmt or "kohya").lower()
    if fmt not in ("kohya", "diffusers"):
        raise UnusableExportRequest(f"--format {fmt} is not available for Flux LoRAs; use kohya or diffusers")
    if merge:
        raise UnusableExportRequest(
            "--merge is only available for LLM adapters; Flux LoRAs are exported as LoRA files"
        )
    torch_dtype = parse_dtype(dtype)
    kind, path = resolve_source(Path(source))
    refuse_nonfinite(path / "lora.safetensors" if kind == "checkpoint" else path)
    if kind == "file":
        if ema:
            raise UnusableExportRequest(
                f"--ema reads a run or checkpoint (its EMA weights); {path} is a LoRA file"
            )
        written = convert_flux_file(path, fmt=fmt, out=out, dtype=torch_dtype, overwrite=overwrite)
    else:
        written = export_flux_checkpoint(
            path, fmt=fmt, out=out, dtype=torch_dtype, overwrite=overwrite, ema=ema
        )
    if fmt == "kohya":
        usage = (
            f"ComfyUI: copy it to models/loras and use a LoraLoaderModelOnly node; Forge: "
            f"{usage_string(written.stem, 1.0)}"
        )
        skipped = diffusers_skipped_modules(written)
        if skipped:
            usage += (
                f" (diffusers' FluxPipeline.load_lora_weights skips its {len(skipped)} module(s) outside the blocks, "
                f"e.g. {skipped[0]}: for diffusers export --format diffusers)"
            )
        return Exported(written, "kohya", usage)
    return Exported(written, "diffusers", f"FluxPipeline: pipe.load_lora_weights({str(written.parent)!r})")
