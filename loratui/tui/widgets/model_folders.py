"""The base-model file browser: a directory tree without hidden files."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.widgets import DirectoryTree


class ModelFolders(DirectoryTree):
    """DirectoryTree that hides dot-files and dot-folders."""

    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".")]
