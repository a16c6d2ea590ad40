"""What an export returns: the file or folder written and how to load it; the error for an unusable request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ExportKind = Literal["kohya", "diffusers", "adapter", "merged", "gguf-adapter", "gguf-merged"]


class UnusableExportRequest(ValueError):
    """An option that does not apply to this kind of source (e.g. `--merge` for an image LoRA)."""


@dataclass(frozen=True)
class Exported:
    """A written export: `path` (file or folder), its kind and a one-line way to use it."""

    path: Path
    kind: ExportKind
    usage: str
