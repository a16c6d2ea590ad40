"""Checkpoint folders of a run: `checkpoints/step-N/`, written atomically, read back for exact resume.

Layout of one checkpoint:
    lora.safetensors      trainable LoRA tensors (PEFT names)
    training_state.pt     optimizer, scheduler, grad-scaler and RNG states (tensors/primitives only,
                          read with torch.load(weights_only=True))
    meta.json             step, epoch, data position, family, settings really used
    config.yaml           the resolved config at that moment
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loratui.runs.rundir import RunDir, find_run, list_runs
from loratui.util.atomic import atomic_directory
from loratui.util.disk import no_space_guard, tensor_bytes
from loratui.util.sizes import format_bytes


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    path: Path
    step: int
    meta: dict[str, Any]
    lora_state: dict[str, torch.Tensor]
    training_state: dict[str, Any]


def write_checkpoint(
    run: RunDir,
    step: int,
    *,
    lora_state: dict[str, torch.Tensor],
    training_state: dict[str, Any],
    meta: dict[str, Any],
    config_yaml: str,
    keep_last_n: int | None = None,
) -> Path:
    """Write `checkpoints/step-<step>/` atomically and rotate old ones. Returns the folder."""
    target = run.checkpoints_dir / f"step-{step}"
    lora_bytes, state_bytes = tensor_bytes(lora_state), tensor_bytes(training_state)
    parts = f"LoRA tensors {format_bytes(lora_bytes)} + optimizer state {format_bytes(state_bytes)}"
    with (
        no_space_guard(target, what="a checkpoint", needed=lora_bytes + state_bytes, parts=parts),
        atomic_directory(target, replace=True) as tmp,
    ):
        save_file({k: v.detach().contiguous().cpu() for k, v in lora_state.items()}, tmp / "lora.safetensors")
        torch.save(training_state, tmp / "training_state.pt")
        (tmp / "meta.json").write_text(json.dumps({"step": step, **meta}, indent=1), encoding="utf-8")
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
    if keep_last_n:
        rotate_checkpoints(run, keep_last_n)
    return target


def rotate_checkpoints(run: RunDir, keep_last_n: int) -> list[Path]:
    """Delete all but the newest `keep_last_n` checkpoints; returns the removed folders."""
    items = run.checkpoints()
    removed = items[: max(0, len(items) - keep_last_n)]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder (safe loading: safetensors + weights_only)."""
    path = Path(path)
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    lora = load_file(path / "lora.safetensors", device=str(map_location))
    state = torch.load(path / "training_state.pt", map_location=map_location, weights_only=True)
    return Checkpoint(path, int(meta["step"]), meta, lora, state)


def is_checkpoint(path: Path) -> bool:
    """A folder with the files of a checkpoint."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "lora.safetensors").is_file()


def _trains_the_same(run: RunDir, like: dict[str, Any]) -> bool:
    """Whether the run's config.yaml names the same values for every key of `like` (base model, data)."""
    import yaml

    try:
        data = yaml.safe_load(run.config_path.read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and all(data.get(key) == value for key, value in like.items())


def resolve_resume(
    spec: str, runs_dir: Path, run_name_prefix: str | None = None, like: dict[str, Any] | None = None
) -> tuple[RunDir, Path]:
    """Turn `--resume latest|RUN|CHECKPOINT` into (run directory, checkpoint folder).

    `latest` picks the newest run that has a checkpoint and whose name starts with `run_name_prefix` or whose
    config.yaml has the values of `like` (the same base model and data: a run whose output_dir, and so its
    name, changed since); any run when neither is given.
    Raises FileNotFoundError with a clear message otherwise.
    """
    path = Path(spec)
    if is_checkpoint(path):
        run_path = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return RunDir(run_path), path
    if spec != "latest":
        run = RunDir(path) if (path / "checkpoints").is_dir() else find_run(runs_dir, spec)
        if run is None:
            raise FileNotFoundError(f"no run or checkpoint called {spec!r} (looked in {runs_dir})")
        latest = run.latest_checkpoint()
        if latest is None:
            raise FileNotFoundError(f"run {run.path} has no checkpoint to resume from")
        return run, latest
    for summary in list_runs(runs_dir):
        name_ok = run_name_prefix is None or re.match(re.escape(run_name_prefix) + r"-\d", summary.run.name)
        latest = summary.run.latest_checkpoint()
        if latest is not None and (name_ok or (like and _trains_the_same(summary.run, like))):
            return summary.run, latest
    raise FileNotFoundError(f"no run with a checkpoint in {runs_dir} to resume (`--resume latest`)")
