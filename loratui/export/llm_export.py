"""`loratui export` for LLM LoRAs: adapter folders from runs and checkpoints, and merged models.

The adapter folder format itself (and the trainer's writer) is `loratui.models.llm.adapter_files`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loratui.export.llm_source import ExportSource, merged_model
from loratui.export.result import Exported, UnusableExportRequest
from loratui.models.llm.adapter_files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    DTYPES,
    TEMPLATE_FILE,
    ExportError,
    OutputConflict,
    read_marker,
    usage_snippet,
    write_adapter,
)
from loratui.util import jsonsafe
from loratui.util.atomic import atomic_directory

# --- sources: run directories, checkpoints, adapter folders --------------------------------------------


def _config_flags(config_yaml: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(config_yaml.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _from_checkpoint(path: Path, kind: str) -> ExportSource:
    from loratui.runs.checkpoints import load_checkpoint

    ckpt = load_checkpoint(path, training_state=False)
    meta = ckpt.meta
    if "adapter_config" not in meta:
        raise ExportError(f"{path} is not an LLM checkpoint (no adapter settings in meta.json)")
    flags = _config_flags(path / "config.yaml")
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return ExportSource(
        path=run if kind == "run" else path,
        kind=kind,
        tensors=ckpt.lora_state,
        adapter_config=meta["adapter_config"],
        chat_template=meta.get("chat_template"),
        run_name=run.name,
        step=ckpt.step,
        allow_pickle=bool(flags.get("allow_pickle")),
        trust_remote_code=bool(flags.get("trust_remote_code")),
    )


def _load_weights(weights: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from loratui.config.base_model import unreadable_safetensors

    try:
        return load_file(weights)
    except (SafetensorError, OSError, RecursionError) as exc:
        raise ExportError(unreadable_safetensors(weights, exc)) from exc


def _from_adapter(path: Path) -> ExportSource:
    weights = path / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise ExportError(f"{path} has no {ADAPTER_WEIGHTS} (pickle adapter_model.bin files are not read)")
    try:
        config = jsonsafe.loads(
            (path / ADAPTER_CONFIG).read_text(encoding="utf-8"), str(path / ADAPTER_CONFIG)
        )
    except ValueError as exc:
        raise ExportError(f"{path / ADAPTER_CONFIG} is not valid JSON: {str(exc)[:200]}") from exc
    template = (
        (path / TEMPLATE_FILE).read_text(encoding="utf-8") if (path / TEMPLATE_FILE).is_file() else None
    )
    marker = read_marker(path) or {}
    return ExportSource(
        path, "adapter", _load_weights(weights), config, template, marker.get("run"), marker.get("step")
    )


def resolve_source(source: Path) -> ExportSource:
    """A run directory (its newest checkpoint), a checkpoint folder, or an adapter folder."""
    from loratui.runs.checkpoints import looks_like_checkpoint, newest_intact
    from loratui.runs.rundir import RunDir

    source = Path(source)
    if (source / ADAPTER_CONFIG).is_file():
        return _from_adapter(source)
    if looks_like_checkpoint(source):
        return _from_checkpoint(source, "checkpoint")
    if (source / "checkpoints").is_dir():
        run = RunDir(source)
        if run.latest_checkpoint() is None:
            raise ExportError(f"run {source} has no checkpoint to export yet")
        intact = newest_intact(run, state=False)  # the optimizer state is not needed for an export
        if intact is None:
            raise ExportError(
                f"every checkpoint of run {source} has damaged weights; nothing intact to export"
            )
        return _from_checkpoint(intact, "run")
    raise ExportError(f"{source} is not a run directory, checkpoint folder or PEFT adapter folder")


# --- merged models ---------------------------------------------------------------------------------------


def merge_to_folder(src: ExportSource, out: Path, *, dtype: str, overwrite: bool) -> Path:
    """Base + adapter merged into a full model folder (safetensors shards + tokenizer + chat template)."""
    import torch

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputConflict(f"{out} exists; pass --overwrite to replace it or choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise OutputConflict(f"{out} is not a model folder; refusing to replace it")
    merged, tokenizer, _ = merged_model(src)
    merged = merged.to(getattr(torch, DTYPES[dtype]))
    if src.chat_template:
        tokenizer.chat_template = src.chat_template
    with atomic_directory(out, replace=True) as tmp:
        merged.save_pretrained(tmp, max_shard_size="5GB")
        tokenizer.save_pretrained(tmp)
    return out


# --- the export ------------------------------------------------------------------------------------------


def _checked_source(source: Path) -> ExportSource:
    """The export source, refused when its tensors hold nan/inf."""
    from loratui.runs.checkpoints import nonfinite_tensors

    src = resolve_source(source)
    bad = nonfinite_tensors(src.tensors)
    if bad:
        raise ExportError(
            f"{src.path} holds nan/inf values in {len(bad)} of {len(src.tensors)} tensors (e.g. {bad[0]}): "
            "training diverged; export an earlier checkpoint (runs/<run>/checkpoints/step-N) instead"
        )
    return src


def export_adapter(
    source: Path,
    *,
    fmt: str | None = None,
    dtype: str | None = None,
    merge: bool = False,
    out: Path | None = None,
    overwrite: bool = False,
    quant: str | None = None,
) -> Exported:
    """`loratui export` for text runs/adapters: a PEFT adapter folder, or with `merge` a merged model; with
    `fmt="gguf"` a llama.cpp GGUF adapter, or with `merge` a merged GGUF model + Ollama Modelfile.

    Raises `UnusableExportRequest` for options that do not apply to LLM adapters; `ExportError`,
    `ModelLoadError` or `OSError` when the export cannot be done.
    """
    if fmt not in (None, "peft", "gguf"):
        raise UnusableExportRequest(
            f"LLM adapters export as a PEFT folder (--format peft), a merged model (--merge) or GGUF "
            f"(--format gguf), not {fmt!r}"
        )
    if fmt == "gguf":
        from loratui.export.gguf_export import export_gguf, parse_quant

        if quant is not None and dtype is not None:
            raise UnusableExportRequest("give --quant or --dtype for a GGUF export, not both")
        chosen = parse_quant(quant or dtype, "")
        return export_gguf(
            _checked_source(Path(source)), merge=merge, quant=chosen or None, out=out, overwrite=overwrite
        )
    if quant is not None:
        raise UnusableExportRequest("--quant applies to GGUF exports (--format gguf)")
    if dtype is not None and dtype not in DTYPES:
        raise UnusableExportRequest(f"--dtype must be fp16, bf16 or fp32, not {dtype!r}")
    src = _checked_source(Path(source))
    target = Path(out) if out else src.default_out(merge, dtype)
    if merge:
        path = merge_to_folder(src, target, dtype=dtype or "bf16", overwrite=overwrite)
        return Exported(path, "merged", f"AutoModelForCausalLM.from_pretrained({str(path)!r})")
    if target.resolve() == Path(source).resolve():
        raise OutputConflict("the output would replace the source adapter; give --out")
    path = write_adapter(
        target,
        tensors=src.tensors,
        adapter_config=src.adapter_config,
        chat_template=src.chat_template,
        run_name=src.run_name,
        step=src.step,
        overwrite=overwrite,
        dtype=dtype,
        same_run_ok=False,
    )
    return Exported(path, "adapter", usage_snippet(path, src.base_model))
