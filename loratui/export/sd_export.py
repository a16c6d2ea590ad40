"""Export Stable Diffusion LoRAs: kohya/A1111 `.safetensors` (default) or diffusers `pytorch_lora_weights`.

Sources: a run directory (its newest checkpoint), a checkpoint folder, or a LoRA file (converted between
kohya and diffusers layouts). `loratui export` calls `export_image_lora`; the file writers themselves are
`loratui.models.sd.lora_files` (the trainer writes its result with them too).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loratui.export.result import Exported, UnusableExportRequest
from loratui.models.sd.kohya import (
    KohyaInfo,
    family_from_lora_keys,
    from_kohya_state,
    is_kohya_state,
    name_map,
    read_lora_file,
)
from loratui.models.sd.lora_files import (
    DIFFUSERS_FILE,
    ExportError,
    check_output,
    export_checkpoint,
    parse_dtype,
    usage_string,
    write_diffusers,
    write_kohya,
)


def family_module_paths(family: str) -> tuple[dict[str, list[str]], int]:
    """Adaptable module paths per component of a real SD 1.x / 2.x / SDXL model (built on the meta device)."""
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    from loratui.models.sd.loading import bundled_config_folder
    from loratui.models.sd.lora import adaptable_modules

    folder = bundled_config_folder({"sd15": "sd15", "sd2": "sd2", "sdxl": "sdxl"}[family])
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    paths: dict[str, list[str]] = {}
    with init_empty_weights():
        unet = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(folder / "unet")
        )
        paths["unet"] = adaptable_modules(unet)
        for name in ("text_encoder", "text_encoder_2"):
            if name in index:
                cls = getattr(transformers, index[name][1])
                config = transformers.CLIPTextConfig.from_pretrained(folder / name)
                paths[name] = adaptable_modules(cls(config))
    return paths, int(unet.config.layers_per_block)


def convert_lora_file(
    source: Path, *, fmt: str, out: Path | None, dtype: torch.dtype | None, overwrite: bool
) -> Path:
    """kohya -> diffusers or diffusers -> kohya for a LoRA file (family detected from its tensors)."""
    tensors, metadata = read_lora_file(source)
    family = {"sd_v1": "sd15", "sd_v2": "sd2", "sdxl_base_v1-0": "sdxl"}.get(
        metadata.get("ss_base_model_version", "")
    ) or family_from_lora_keys(tensors)
    lycoris = sorted(
        {k.rsplit(".", 1)[-1] for k in tensors if any(m in k for m in ("hada_", "lokr_", "dora_scale"))}
    )
    if lycoris and fmt == "diffusers":
        raise ExportError(
            f"{source} is a LyCORIS file ({', '.join(lycoris[:3])} tensors): the diffusers format holds plain LoRA "
            "only; load the file in ComfyUI or A1111/Forge as it is"
        )
    if is_kohya_state(tensors):
        if fmt == "kohya":
            raise ExportError(f"{source} is already a kohya file; use --format diffusers to convert it")
        paths, layers = family_module_paths(family)
        modules, unknown = from_kohya_state(tensors, name_map(paths, family, layers))
        if unknown:
            raise ExportError(
                f"{len(unknown)} module(s) in {source} are not in a {family} model, e.g. {unknown[0]}"
            )
        target = Path(out) if out else source.with_name(DIFFUSERS_FILE)
        if target.suffix != ".safetensors":
            target = target / DIFFUSERS_FILE
        check_output(target, None, overwrite=overwrite)
        return write_diffusers(target, modules, dtype=dtype)
    if fmt == "diffusers":
        raise ExportError(f"{source} is already a diffusers LoRA file; use --format kohya to convert it")
    from loratui.models.sd.lora import diffusers_modules

    modules = diffusers_modules(tensors, metadata, {})
    rank = modules[0].rank if modules else 0
    info = KohyaInfo(name=source.stem, family=family, rank=rank, alpha=modules[0].alpha if modules else rank)
    target = Path(out) if out else source.with_name(f"{source.stem}_kohya.safetensors")
    check_output(target, None, overwrite=overwrite)
    return write_kohya(target, modules, info, dtype=dtype)


# --- sources --------------------------------------------------------------------------------------------------------


def resolve_source(source: Path) -> tuple[str, Path]:
    """('checkpoint', folder) or ('file', path) for a run directory, checkpoint folder or LoRA file."""
    from loratui.runs.checkpoints import looks_like_checkpoint, newest_intact
    from loratui.runs.rundir import RunDir

    source = Path(source)
    if source.is_file():
        return "file", source
    if looks_like_checkpoint(source):
        return "checkpoint", source
    run = RunDir(source)
    if run.latest_checkpoint() is None:
        raise ExportError(f"{source} has no checkpoint to export (training has not saved one yet)")
    intact = newest_intact(run, state=False)  # the optimizer state is not needed for an export
    if intact is None:
        raise ExportError(f"every checkpoint of {source} has damaged weights; nothing intact to export")
    return "checkpoint", intact


def refuse_nonfinite(path: Path) -> None:
    """ExportError when a LoRA file holds nan/inf values (a diverged run): they would break every image."""
    from safetensors.torch import load_file

    from loratui.runs.checkpoints import nonfinite_tensors

    try:
        tensors = load_file(str(path))
    except Exception:  # unreadable or missing: the export itself reports it
        return
    bad = nonfinite_tensors(tensors)
    if bad:
        raise ExportError(
            f"{path} holds nan/inf values in {len(bad)} of {len(tensors)} tensors (e.g. {bad[0]}): training "
            "diverged; export an earlier checkpoint (runs/<run>/checkpoints/step-N) instead"
        )


def export_image_lora(
    source: Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    ema: bool = False,
) -> Exported:
    """`loratui export` for image LoRAs: write a kohya (default) or diffusers file and say how to use it.

    Raises `UnusableExportRequest` for options that do not apply to image LoRAs, `ExportError` (and
    `FileNotFoundError`, `KeyError`, `ValueError` from unreadable files) when the export cannot be done.
    """
    fmt = (fmt or "kohya").lower()
    if fmt not in ("kohya", "diffusers"):
        raise UnusableExportRequest(
            f"--format {fmt} is not available for image LoRAs; use kohya or diffusers"
        )
    if merge:
        raise UnusableExportRequest(
            "--merge is only available for LLM adapters; image LoRAs are exported as LoRA files"
        )
    torch_dtype = parse_dtype(dtype)
    kind, path = resolve_source(Path(source))
    refuse_nonfinite(path / "lora.safetensors" if kind == "checkpoint" else path)
    if kind == "file" and ema:
        raise UnusableExportRequest(
            f"--ema reads a run or checkpoint (its EMA weights); {path} is a LoRA file"
        )
    if kind == "file":
        written = convert_lora_file(path, fmt=fmt, out=out, dtype=torch_dtype, overwrite=overwrite)
    else:
        written = export_checkpoint(path, fmt=fmt, out=out, dtype=torch_dtype, overwrite=overwrite, ema=ema)
    if fmt == "kohya":
        usage = f"{usage_string(written.stem)} (copy the file to your UI's models/Lora folder)"
        return Exported(written, "kohya", usage)
    return Exported(written, "diffusers", f"pipe.load_lora_weights({str(written.parent)!r})")
