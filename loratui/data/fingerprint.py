"""Cheap fingerprints of a run's inputs, recorded in every checkpoint and compared when a run is resumed.

- base model: its path, and the names, sizes and a hash of samples of its weight files (the first MiB with
  the header, the last MiB and 16 slices of 64 KiB in between: two fine-tunes of one architecture have the
  same header and size, not the same weights);
- dataset: the names and sizes of the dataset's files, the full content of caption and record files (text,
  small) and the first 64 KiB of each image.

Two fingerprints are the same inputs when their `sha256` match; `files` and `bytes` are there to say how they
differ. Moving a folder keeps its fingerprint (names are relative to it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from loratui.data.image_dataset import KNOWN_CAPTION_EXTENSIONS, SKIPPED_DIRS
from loratui.data.image_io import IMAGE_EXTENSIONS
from loratui.data.model_paths import resolve_local_model
from loratui.data.text_dataset import TEXT_EXTENSIONS

WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf")
RECORD_EXTENSIONS = (*TEXT_EXTENSIONS, ".csv", *sorted(KNOWN_CAPTION_EXTENSIONS))
HEADER_BYTES = 1 << 20
SLICE_BYTES = 64 << 10
SLICES = 16
IMAGE_HEAD_BYTES = 64 << 10


def _files(root: Path, suffixes: tuple[str, ...]) -> list[tuple[str, Path]]:
    """(name relative to root, path) of the visible files under root with these suffixes, sorted."""
    if root.is_file():
        return [(root.name, root)] if root.name.lower().endswith(suffixes) else []
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS)
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    return sorted(found)


def _samples(handle, size: int) -> list[bytes]:
    """The first and last MiB of a file and SLICES slices spread between them."""
    offsets = [0, max(0, size - HEADER_BYTES)]
    offsets[1:1] = [HEADER_BYTES + (size - 2 * HEADER_BYTES) * i // SLICES for i in range(SLICES)]
    out = []
    for number, offset in enumerate(offsets):
        if 0 < number < len(offsets) - 1 and size <= 2 * HEADER_BYTES:
            continue
        handle.seek(max(0, offset))
        out.append(handle.read(HEADER_BYTES if number in (0, len(offsets) - 1) else SLICE_BYTES))
    return out


def _digest(
    entries: list[tuple[str, Path]],
    head: int | None,
    full_suffixes: tuple[str, ...] = (),
    sampled: bool = False,
) -> dict:
    """sha256 over (name, size, content) of each file: samples of it (`sampled`), its first `head` bytes, or
    all of it for `full_suffixes` (or when `head` is None)."""
    digest = hashlib.sha256()
    total = 0
    for name, path in entries:
        size = path.stat().st_size
        total += size
        digest.update(f"{name}\0{size}\0".encode())
        limit = None if head is None or name.lower().endswith(full_suffixes) else head
        with open(path, "rb") as handle:
            if sampled:
                for chunk in _samples(handle, size):
                    digest.update(chunk)
            elif limit is not None:
                digest.update(handle.read(limit))
            else:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return {"files": len(entries), "bytes": total, "sha256": digest.hexdigest()}


def base_model_fingerprint(base_model: str) -> dict[str, Any]:
    """The weight files of the base model (a folder, a single file, or a repo id in the local cache)."""
    path = Path(base_model).expanduser()
    local = path if path.is_file() else resolve_local_model(base_model)
    if local is None:
        return {"path": str(base_model)}
    entries = _files(local, WEIGHT_EXTENSIONS)
    return {"path": str(base_model), **_digest(entries, HEADER_BYTES, sampled=True)}


def dataset_fingerprint(train_data_dir: str, metadata_path: str | None = None) -> dict[str, Any]:
    """The images, captions and records under `train_data_dir` (and `metadata_path` when it is elsewhere)."""
    root = Path(train_data_dir).expanduser()
    if not root.exists():
        return {"path": str(train_data_dir)}
    entries = _files(root, (*sorted(IMAGE_EXTENSIONS), *RECORD_EXTENSIONS))
    if metadata_path:
        extra = Path(metadata_path).expanduser()
        if extra.is_file() and extra.resolve() not in {p.resolve() for _, p in entries}:
            entries.append((f"metadata:{extra.name}", extra))
    return {"path": str(train_data_dir), **_digest(entries, IMAGE_HEAD_BYTES, RECORD_EXTENSIONS)}


def input_fingerprints(cfg: Any) -> dict[str, Any]:
    """`{"base_model": ..., "dataset": ...}` for a TrainConfig, plus `reg_dataset` (reg_data_dir) and `masks`
    (mask_dir) when they are set."""
    out = {
        "base_model": base_model_fingerprint(str(cfg.base_model)),
        "dataset": dataset_fingerprint(str(cfg.train_data_dir), getattr(cfg, "metadata_path", None)),
    }
    for key, option in (("reg_dataset", "reg_data_dir"), ("masks", "mask_dir")):
        folder = getattr(cfg, option, None)
        if folder:
            out[key] = dataset_fingerprint(str(folder))
    return out
