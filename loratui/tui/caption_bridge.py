"""The captioning calls the wizard makes, mapped onto the core (`loratui.data`). No Textual import.

Reading current captions uses the same scan as training; generating captions is the core's
`caption_dataset` (which writes them, atomically, never losing existing rows); edits made in the review
table are merged into metadata.csv or written as sidecar files with the core's atomic writers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def available() -> bool:
    """True when the core captioning module is installed (checked without importing it)."""
    from importlib.util import find_spec

    try:
        return find_spec("loratui.data.captioning") is not None
    except (ImportError, ValueError):
        return False


def current_captions(
    root: Path, *, caption_extensions: tuple[str, ...], metadata_path: Path | None
) -> list[tuple[str, str]]:
    """(relative image path, caption or '') for every training image, as training reads them."""
    from loratui.data.image_dataset import scan_image_dataset

    if metadata_path is None and (root / "metadata.csv").is_file():
        metadata_path = root / "metadata.csv"
    scan = scan_image_dataset(root, caption_extensions=caption_extensions, metadata_path=metadata_path)
    return [(item.rel, item.caption or "") for item in scan.items]


def model_kind(folder: str) -> str:
    """One line saying what kind of captioning model ``folder`` holds (read from its files, nothing loaded)."""
    import json

    from loratui.data.wd_tagger import TAGS_FILE, TaggerFolderError, is_wd_tagger_folder, read_tag_list

    path = Path(folder).expanduser()
    if not folder.strip() or not path.is_dir():
        return f"{folder or 'the folder'} is not a folder yet."
    if is_wd_tagger_folder(path):
        try:
            tags = read_tag_list(path / TAGS_FILE)
        except TaggerFolderError as exc:
            return f"WD tagger folder with a problem: {exc}"
        if not (path / "model.onnx").is_file():
            return f"WD tagger folder with a problem: {path / 'model.onnx'} is missing."
        return (
            f"WD tagger (booru tags, {len(tags)} tags): general tags from 0.35, characters from 0.85, "
            "ratings left out."
        )
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "Neither a WD tagger (model.onnx + selected_tags.csv) nor a model with config.json."
    kind = str(config.get("model_type") or "unknown")
    names = {"blip": "BLIP captions", "florence2": "Florence-2 detailed captions"}
    return f"{names.get(kind, kind + ' model')} (config.json)."


def caption(
    root: Path,
    *,
    model: str,
    prefix: str,
    overwrite: bool,
    fmt: str,
    caption_extension: str,
    progress: Callable[[int, int], None],
    mode: str | None = None,
) -> Any:
    """Caption the images that need it with a local model and write them; returns the `CaptionResult`.

    ``mode`` (keep | append | overwrite) defaults to overwrite when ``overwrite`` else keep. Raises
    `CaptionError` / `ModelNotAvailable` with a message that says what to do.
    """
    from loratui.data.caption_models import load_captioner, resolve_caption_model
    from loratui.data.captioning import caption_dataset, plan_captions

    plan = plan_captions(root, fmt=fmt, overwrite=overwrite, caption_extension=caption_extension, mode=mode)
    progress(0, len(plan.todo))
    if not plan.todo:
        return caption_dataset(root, _NoCaptioner(), plan=plan, fmt=fmt, prefix=prefix)
    captioner = load_captioner(resolve_caption_model(model))
    return caption_dataset(
        root,
        captioner,
        fmt=fmt,
        prefix=prefix,
        overwrite=overwrite,
        caption_extension=caption_extension,
        on_progress=lambda done, total, _rel: progress(done, total),
        plan=plan,
    )


class _NoCaptioner:
    """Stands in when nothing needs captioning (no model is loaded)."""

    name = "none"
    produces_tags = False

    def caption(self, images: list) -> list[str]:
        return ["" for _ in images]


def write(
    root: Path, rows: list[tuple[str, str]], *, fmt: str, caption_extension: str = ".txt"
) -> tuple[int, Path | None]:
    """Write reviewed captions: merged into `root/metadata.csv` (fmt "csv"; other rows and the header
    names are kept) or as sidecar files. Returns (count, metadata.csv path or None)."""
    from loratui.data.metadata_csv import read_metadata_csv, write_metadata_csv
    from loratui.util.atomic import atomic_write_text

    if fmt == "csv":
        target = root / "metadata.csv"
        merged: dict[str, tuple[str, str]] = {}
        header = ("filename", "prompt")
        if target.exists():
            table = read_metadata_csv(target, root)
            if any(f.severity == "error" for f in table.findings) or table.extra_columns:
                raise ValueError(f"{target} has problems; fix it first (`loratui check` lists them)")
            header = table.header
            merged = {key: (row.filename, row.caption) for key, row in table.rows.items()}
        for rel, text in rows:
            merged[rel] = (merged[rel][0] if rel in merged else rel, text)
        write_metadata_csv(target, merged.values(), header)
        return len(rows), target
    ext = caption_extension if caption_extension.startswith(".") else "." + caption_extension
    for rel, text in rows:
        image = root / rel
        atomic_write_text(image.with_name(image.stem + ext), text + "\n")
    return len(rows), None
