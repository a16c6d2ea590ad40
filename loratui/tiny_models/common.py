"""Shared plumbing for the tiny-model builders: bundled configs, labels, idempotent atomic builds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

#: Bump when a builder's output changes in a way the settings hash cannot see.
BUILD_FORMAT = 1
LABEL_FILE = "LORATUI_TINY_MODEL.txt"
MARKER_FILE = "loratui_tiny_model.json"

_LABEL = """\
TINY RANDOM-WEIGHT MODEL - NOT A REAL MODEL

Layout:   {kind} (same blocks and module names, tiny widths)
Builder:  loratui.tiny_models.{builder}, settings {settings}

The weights are random and the tokenizer was generated from a small text corpus bundled with
loratui. The model only produces noise. It exists for `loratui demo` and for tests:
do not publish it or use it as a model.
"""


def bundled_text(*parts: str) -> str:
    """Text of a file bundled in ``loratui/tiny_models`` (e.g. ``bundled_text("configs", "sd15.json")``)."""
    node = resources.files("loratui.tiny_models")
    for part in parts:
        node = node.joinpath(part)
    return node.read_text("utf-8")


def load_config(name: str) -> dict[str, Any]:
    """A bundled JSON config from ``loratui/tiny_models/configs/<name>.json``."""
    return json.loads(bundled_text("configs", f"{name}.json"))


def settings_digest(builder: str, settings: dict[str, Any], bundled: list[tuple[str, ...]]) -> str:
    """Hash of everything that determines a build: builder, settings and the bundled files it reads."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            {"builder": builder, "format": BUILD_FORMAT, "settings": settings}, sort_keys=True
        ).encode()
    )
    for parts in bundled:
        h.update("/".join(parts).encode())
        h.update(bundled_text(*parts).encode("utf-8"))
    return h.hexdigest()[:16]


def read_marker(path: Path) -> dict[str, Any] | None:
    """The build marker of a tiny-model folder, or None when ``path`` is not a (complete) tiny build."""
    try:
        data = json.loads((Path(path) / MARKER_FILE).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_tiny_model(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (or a parent up to 2 levels, for pipeline subfolders) is a loratui tiny build."""
    p = Path(path)
    return any(read_marker(q) is not None for q in [p, *list(p.parents)[:2]])


@contextmanager
def quiet_hf(*libraries: str) -> Iterator[None]:
    """Silence info/warning logs and progress bars of ``transformers`` / ``diffusers`` while building."""
    import importlib

    saved = []
    for name in libraries:
        hf_logging = importlib.import_module(f"{name}.utils.logging")
        saved.append((hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()))
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        for hf_logging, verbosity, bars in saved:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()


def atomic_build(
    dest: Path,
    builder: str,
    settings: dict[str, Any],
    bundled: list[tuple[str, ...]],
    build: Callable[[Path], None],
    kind: str,
) -> Path:
    """Run ``build(tmp)`` in a temporary sibling folder, label it, then move it to ``dest``.

    Returns ``dest`` as an absolute path; at once when it already holds a complete build with the same
    settings. A stale tiny build (other settings) is replaced; any other non-empty folder is left
    alone (FileExistsError).
    """
    dest = Path(dest).expanduser().absolute()
    digest = settings_digest(builder, settings, bundled)
    if _matches(dest, digest):
        return dest
    if dest.exists() and not _replaceable(dest):
        raise FileExistsError(
            f"{dest} exists and is not a loratui tiny-model build; refusing to overwrite it"
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        tmp.chmod(0o755)
        build(tmp)
        (tmp / LABEL_FILE).write_text(
            _LABEL.format(builder=builder, settings=json.dumps(settings, sort_keys=True), kind=kind),
            encoding="utf-8",
        )
        marker = {"builder": builder, "kind": kind, "digest": digest, "settings": settings}
        (tmp / MARKER_FILE).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _install(tmp, dest, digest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _matches(dest: Path, digest: str) -> bool:
    marker = read_marker(dest)
    return marker is not None and marker.get("digest") == digest


def _replaceable(dest: Path) -> bool:
    if not dest.is_dir():
        return False
    return read_marker(dest) is not None or not any(dest.iterdir())


def _install(tmp: Path, dest: Path, digest: str) -> None:
    """Move ``tmp`` to ``dest``; an existing stale build is swapped out first, then deleted."""
    old: Path | None = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, old)
    try:
        os.replace(tmp, dest)
    except OSError:
        # Another process installed the same build meanwhile: theirs is as good as ours.
        if not _matches(dest, digest):
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
