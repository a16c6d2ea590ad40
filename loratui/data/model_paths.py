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


def shipped_code(folder: str | Path) -> str | None:
    """Where a local model folder declares its own Python code (``auto_map``), e.g. "auto_map in config.json".

    Loading such a folder with ``trust_remote_code=True`` runs that code; callers refuse it unless the user
    passed ``--trust-remote-code``. Unreadable or invalid JSON counts as no code (the load reports it).
    """
    import json

    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json"):
        try:
            data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            return f"auto_map in {name}"
    return None


REMOTE_CODE_HINT = "loratui does not run it unless you pass --trust-remote-code (read the code first)"
