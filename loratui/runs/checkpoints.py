"""Checkpoint folders of a run: `checkpoints/step-N/`, written atomically, read back for exact resume.

Layout of one checkpoint:
    lora.safetensors      trainable LoRA tensors (PEFT names)
    training_state.pt     optimizer, scheduler, grad-scaler and RNG states (tensors/primitives only,
                          read with torch.load(weights_only=True))
    meta.json             step, epoch, data position, family, settings really used
    config.yaml           the resolved config at that moment
    manifest.json         size and sha256 of each file above, written last

A checkpoint is checked before use (`checkpoint_problems`): against its manifest, or, for checkpoints written
before manifests existed, as far as the files allow (meta.json readable, the safetensors header consistent with
the file size, training_state.pt a complete zip archive). `--resume latest` or a run directory picks the newest
intact checkpoint; an export needs only intact weights. Temporary folders a crash left behind are removed
before the next checkpoint is written.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from loratui.config.base_model import read_safetensors_header
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
    clean_leftovers(run)
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
        write_manifest(tmp)
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


def load_checkpoint(
    path: Path, map_location: str | torch.device = "cpu", *, training_state: bool = True
) -> Checkpoint:
    """Read a checkpoint folder (safe loading: safetensors + weights_only) after checking it.

    `training_state=False` reads only the weights and meta (an export); the optimizer state may then be
    damaged. Raises `DamagedCheckpoint` (one line, naming the intact checkpoint of the run) when it is not
    usable."""
    path = Path(path)
    problems = checkpoint_problems(path, state=training_state)
    if problems:
        raise DamagedCheckpoint(damaged_message(path, problems, state=training_state))
    meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    lora = load_file(path / "lora.safetensors", device=str(map_location))
    state = (
        torch.load(path / "training_state.pt", map_location=map_location, weights_only=True)
        if training_state
        else {}
    )
    return Checkpoint(path, int(meta["step"]), meta, lora, state)


def is_checkpoint(path: Path) -> bool:
    """A folder with the files of a checkpoint."""
    return (Path(path) / "meta.json").is_file() and (Path(path) / "lora.safetensors").is_file()


def looks_like_checkpoint(path: Path) -> bool:
    """A folder meant as a checkpoint, complete or not (`step-N` in `checkpoints/`, or a checkpoint file)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if path.parent.name == "checkpoints" and re.fullmatch(r"step-\d+", path.name):
        return True
    return any((path / name).is_file() for name in (*WEIGHTS_FILES, "training_state.pt", MANIFEST))


# --- checking -------------------------------------------------------------------------------------------

MANIFEST = "manifest.json"
WEIGHTS_FILES = ("meta.json", "lora.safetensors")
CHECKPOINT_FILES = (*WEIGHTS_FILES, "training_state.pt", "config.yaml")
_CHUNK = 1 << 20


class DamagedCheckpoint(FileNotFoundError):
    """A checkpoint folder that cannot be used (a file missing, truncated or changed); the message is one line
    and names the intact checkpoint to use instead. A FileNotFoundError, so that callers handling "no
    checkpoint to use" handle this too."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record the size and sha256 of each checkpoint file in `manifest.json` (written after them)."""
    files = {}
    for name in CHECKPOINT_FILES:
        path = folder / name
        if path.is_file():
            files[name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    target = folder / MANIFEST
    target.write_text(json.dumps({"format": 1, "files": files}, indent=1), encoding="utf-8")
    return target


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file is unusable (header unreadable, data shorter than the header says), or None."""
    try:
        size = path.stat().st_size
        if size < 8:
            return f"{path.name} is truncated ({size} bytes)"
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
        if length > size - 8:
            return f"{path.name} is truncated ({size} bytes, its header alone needs {length + 8})"
        header = read_safetensors_header(path)
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} is unreadable ({type(exc).__name__})"
    if 8 + length + end != size:
        return f"{path.name} is {size} bytes, its header says {8 + length + end} (truncated?)"
    return None


def _zip_problem(path: Path) -> str | None:
    """Why a torch.save archive is unusable (its end is missing when truncated), or None."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        return f"{path.name} is not a complete archive ({exc}; truncated?)"
    return None


def checkpoint_problems(path: Path, *, state: bool = True) -> list[str]:
    """What is wrong with a checkpoint folder (empty when it is intact). `state=False`: only what an export
    needs (meta.json and the weights), so a damaged optimizer state does not count."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    needed = [*WEIGHTS_FILES, *(("training_state.pt",) if state else ())]
    problems = [f"{name} is missing" for name in needed if not (path / name).is_file()]
    if problems:
        return problems
    manifest = path / MANIFEST
    if manifest.is_file():
        try:
            recorded = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return [f"{MANIFEST} is unreadable"]
        for name in needed:
            entry = recorded.get(name) if isinstance(recorded, dict) else None
            if not isinstance(entry, dict):
                problems.append(f"{name} is not in {MANIFEST}")
                continue
            size = (path / name).stat().st_size
            if size != entry.get("size"):
                problems.append(f"{name} is {size} bytes, {entry.get('size')} were written (truncated?)")
            elif _sha256(path / name) != entry.get("sha256"):
                problems.append(f"{name} has changed since it was written (sha256 differs)")
        if problems:
            return problems
    else:  # written before manifests: check what the files themselves allow
        problem = _safetensors_problem(path / "lora.safetensors")
        if problem:
            problems.append(problem)
        if state:
            problem = _zip_problem(path / "training_state.pt")
            if problem:
                problems.append(problem)
    try:
        int(json.loads((path / "meta.json").read_text(encoding="utf-8"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        problems.append("meta.json is unreadable or has no step")
    return problems


def newest_intact(run: RunDir, *, state: bool = True, before_step: int | None = None) -> Path | None:
    """The newest checkpoint of `run` without problems (older than `before_step` when given)."""
    for path in reversed(run.checkpoints()):
        if before_step is not None and _step_of(path) >= before_step:
            continue
        if not checkpoint_problems(path, state=state):
            return path
    return None


def last_good_checkpoint(run: RunDir, *, before_step: int) -> Path | None:
    """The newest intact checkpoint saved before optimizer step `before_step` went wrong."""
    return newest_intact(run, before_step=before_step)


def damaged_newer(checkpoint: Path, *, state: bool = True) -> list[str]:
    """One line for each damaged checkpoint of the same run newer than `checkpoint` (skipped over)."""
    checkpoint = Path(checkpoint)
    run = _run_of(checkpoint)
    lines = []
    for path in run.checkpoints():
        if _step_of(path) > _step_of(checkpoint):
            problems = checkpoint_problems(path, state=state)
            if problems:
                lines.append(f"skipped damaged checkpoint {path}: {'; '.join(problems)}")
    return lines


def damaged_message(path: Path, problems: list[str], *, state: bool = True) -> str:
    """One line: what is wrong with `path` and which checkpoint of its run is intact."""
    run = _run_of(path)
    others = [p for p in run.checkpoints() if p != path and not checkpoint_problems(p, state=state)]
    if others:
        hint = f"the newest intact checkpoint of this run is {others[-1]}: use --resume {others[-1]}"
    else:
        hint = "no intact checkpoint is left in this run; start it again"
    return f"checkpoint {path} is damaged ({'; '.join(problems)}); {hint}"


def clean_leftovers(run: RunDir) -> list[Path]:
    """Remove the temporary folders an interrupted checkpoint write left (`.step-N.*.tmp`); a `.step-N.old`
    is removed when `step-N` exists and put back as `step-N` otherwise. Returns the folders removed."""
    removed: list[Path] = []
    folder = run.checkpoints_dir
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        if not path.is_dir():
            continue
        if re.fullmatch(r"\.step-\d+(\..+)?\.tmp", path.name):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        elif match := re.fullmatch(r"\.(step-\d+)\.old", path.name):
            target = folder / match.group(1)
            if target.exists():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
            else:
                path.rename(target)
    return removed


def nonfinite_tensors(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors that hold nan or inf."""
    return [
        name
        for name, tensor in tensors.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]


def _step_of(path: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", Path(path).name)
    return int(match.group(1)) if match else -1


def _run_of(checkpoint: Path) -> RunDir:
    checkpoint = Path(checkpoint)
    return RunDir(checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent)


# --- resuming -------------------------------------------------------------------------------------------


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
    name, changed since); any run when neither is given. In a run, the newest intact checkpoint is used
    (`damaged_newer` lists the ones skipped). A checkpoint folder given explicitly must be intact. Raises
    FileNotFoundError (or `DamagedCheckpoint`) with a clear message otherwise.
    """
    path = Path(spec)
    if looks_like_checkpoint(path):
        problems = checkpoint_problems(path)
        if problems:
            raise DamagedCheckpoint(damaged_message(path, problems))
        return _run_of(path), path
    if spec != "latest":
        run = RunDir(path) if (path / "checkpoints").is_dir() else find_run(runs_dir, spec)
        if run is None:
            raise FileNotFoundError(f"no run or checkpoint called {spec!r} (looked in {runs_dir})")
        return run, _intact_of(run)
    for summary in list_runs(runs_dir):
        name_ok = run_name_prefix is None or re.match(re.escape(run_name_prefix) + r"-\d", summary.run.name)
        if summary.run.latest_checkpoint() is not None and (
            name_ok or (like and _trains_the_same(summary.run, like))
        ):
            return summary.run, _intact_of(summary.run)
    raise FileNotFoundError(f"no run with a checkpoint in {runs_dir} to resume (`--resume latest`)")


def _intact_of(run: RunDir) -> Path:
    """The newest intact checkpoint of `run`; FileNotFoundError when it has none."""
    if run.latest_checkpoint() is None:
        raise FileNotFoundError(f"run {run.path} has no checkpoint to resume from")
    intact = newest_intact(run)
    if intact is None:
        damaged = "; ".join(f"{p.name}: {', '.join(checkpoint_problems(p))}" for p in run.checkpoints())
        raise DamagedCheckpoint(f"every checkpoint of run {run.path} is damaged ({damaged}); start it again")
    return intact
