"""`launch.json`: how a run was asked to start, written once by `loratui train` / the TUI before the worker
starts, and read by the supervisor and the worker.

    {"resume_from": "runs/x/checkpoints/step-40" | null, "overwrite": false, "skip_checks": false,
     "processes": {...} | null, "gpu": "1" | null, "allow_changed_data": false}

`processes` is `loratui.train.process.launcher.Processes` as JSON (several training processes); `gpu` is the
CUDA_VISIBLE_DEVICES value the worker gets (the GPU picked in the TUI), None to inherit the caller's.
A restart after an out-of-memory error does not rewrite this file: the supervisor hands the worker the
checkpoint to continue from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loratui.util.atomic import atomic_write_text

LAUNCH_FILE = "launch.json"


class LaunchFileError(ValueError):
    """launch.json is missing or unreadable (the message names the file and what to do)."""


@dataclass
class LaunchSpec:
    """What `launch.json` holds."""

    resume_from: Path | None = None
    overwrite: bool = False
    skip_checks: bool = False
    processes: dict[str, Any] | None = None
    gpu: str | None = None
    allow_changed_data: bool = False  # resume despite a changed base model or dataset

    def to_json(self) -> dict[str, Any]:
        return {
            "resume_from": str(self.resume_from) if self.resume_from else None,
            "overwrite": self.overwrite,
            "skip_checks": self.skip_checks,
            "processes": self.processes,
            "gpu": self.gpu,
            "allow_changed_data": self.allow_changed_data,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LaunchSpec:
        processes = data.get("processes")
        gpu = data.get("gpu")
        return cls(
            resume_from=Path(data["resume_from"]) if data.get("resume_from") else None,
            overwrite=bool(data.get("overwrite")),
            skip_checks=bool(data.get("skip_checks")),
            processes=processes if isinstance(processes, dict) else None,
            gpu=str(gpu) if gpu is not None else None,
            allow_changed_data=bool(data.get("allow_changed_data")),
        )


def launch_path(run_path: Path) -> Path:
    return Path(run_path) / LAUNCH_FILE


def write_launch(run_path: Path, spec: LaunchSpec) -> None:
    """Write `launch.json` atomically."""
    atomic_write_text(launch_path(run_path), json.dumps(spec.to_json(), indent=1))


def read_launch(run_path: Path) -> LaunchSpec:
    """The run's launch spec; LaunchFileError when the file is missing or not a JSON object."""
    path = launch_path(run_path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LaunchFileError(f"{path}: missing; start the run with `loratui train`") from None
    except (OSError, ValueError) as exc:
        raise LaunchFileError(
            f"{path}: unreadable ({exc}); start the run again with `loratui train`"
        ) from None
    if not isinstance(data, dict):
        raise LaunchFileError(f"{path}: expected a JSON object; start the run again with `loratui train`")
    return LaunchSpec.from_json(data)


def read_launch_or_default(run_path: Path) -> LaunchSpec:
    """The launch spec, or the defaults (one process, fresh start) when the file cannot be read."""
    try:
        return read_launch(run_path)
    except LaunchFileError:
        return LaunchSpec()
