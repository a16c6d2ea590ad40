"""Resolve model names to local folders only: a path on disk, or a repo id already in the local HF cache.

Nothing here downloads; a missing model yields ``None`` and the caller prints the command to fetch it.
"""

from __future__ import annotations

from pathlib import Path


def resolve_local_model(name_or_path: str | Path) -> Path | None:
    """A local folder for ``name_or_path`` (existing folder, or ``org/name`` found in the HF cache)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not cached (or an invalid id): callers explain how to fetch it
        return None
