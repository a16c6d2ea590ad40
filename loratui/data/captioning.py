"""Automatic captioning of an image dataset into metadata.csv or sidecar caption files.

Rules (user data is never lost):

- ``mode`` says what happens to images that already have a caption (a metadata.csv row or a sidecar
  ``.txt``/``.caption`` file, as ``scan_image_dataset`` reads them): ``keep`` (default) skips them,
  ``append`` adds the new tags after the existing ones (``merge_tags``: comma-separated parts, duplicates
  dropped, the existing text first and unchanged), ``overwrite`` replaces them (``overwrite=True`` is the
  same). A ``--prefix`` stays first.
- ``fmt="csv"``: rows are merged into the metadata file (default ``ROOT/metadata.csv``): existing rows are
  kept (in order, with their header names), new rows appended; file names are relative to ``ROOT`` so
  ``scan_image_dataset`` loads the result as is. An existing file with errors (broken quoting, wrong
  column count, extra columns, not UTF-8) is refused rather than rewritten.
- ``fmt="txt"``: one sidecar file per image (``caption_extension``, default ``.txt``).
- Every write is atomic (temporary file + ``os.replace``); metadata.csv is also flushed every
  ``flush_every`` captions so an interrupted run keeps its work.

Public API: ``caption_dataset(root, captioner, ...) -> CaptionResult``, ``plan_captions(...)``,
``CaptionError``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from loratui.data.caption_models import Captioner
from loratui.data.caption_text import apply_edits, caption_to_tags
from loratui.data.image_dataset import ImageItem, scan_image_dataset
from loratui.data.image_io import ImageReadError, open_image_rgb
from loratui.data.metadata_csv import MetadataTable, read_metadata_csv, write_metadata_csv
from loratui.util.atomic import atomic_write_text

ProgressFn = Callable[[int, int, str], None]  # (done, total, last file)
FORMATS = ("csv", "txt")
STYLES = ("caption", "tags")
MODES = ("keep", "append", "overwrite")


class CaptionError(Exception):
    """Captioning cannot start; the message says why and what to do."""


@dataclass
class CaptionPlan:
    """Which images get captions and where they go."""

    root: Path
    fmt: str
    target: Path | None  # metadata.csv for fmt="csv"
    todo: list[ImageItem]
    skipped_existing: list[ImageItem]
    table: MetadataTable | None = None  # the existing target metadata.csv, if any
    caption_extension: str = ".txt"
    mode: str = "keep"


@dataclass
class CaptionResult:
    """What a captioning run did."""

    written: list[tuple[str, str]] = field(default_factory=list)  # (relative image path, caption)
    skipped_existing: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (relative image path, reason)
    output: Path | None = None
    fmt: str = "csv"
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _refuse_broken_table(table: MetadataTable) -> None:
    errors = [f for f in table.findings if f.severity == "error"]
    if errors or table.extra_columns:
        first = errors[0].examples[0] if errors and errors[0].examples else None
        where = f" ({first.location()}: {errors[0].message})" if first else ""
        if not errors:
            where = f" (extra columns: {', '.join(table.extra_columns)})"
        raise CaptionError(
            f"{table.path} has problems{where}; it is not rewritten so no rows are lost. Fix it first "
            "(`loratui check` lists every problem) or write to another file with --output."
        )


def plan_captions(
    root: Path,
    *,
    fmt: str = "csv",
    output: Path | None = None,
    overwrite: bool = False,
    caption_extension: str = ".txt",
    mode: str | None = None,
) -> CaptionPlan:
    """Decide what to caption. Raises ``CaptionError`` for unusable input."""
    root = Path(root)
    mode = resolve_mode(mode, overwrite)
    overwrite = mode != "keep"
    if fmt not in FORMATS:
        raise CaptionError(f"--format must be csv or txt, not {fmt!r}")
    if not root.is_dir():
        raise CaptionError(f"{root} is not a folder of images")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    target: Path | None = None
    table: MetadataTable | None = None
    metadata = None
    if fmt == "csv":
        target = Path(output) if output is not None else root / "metadata.csv"
        if target.exists():
            table = read_metadata_csv(target, root)
            _refuse_broken_table(table)
            metadata = target
    elif output is not None:
        raise CaptionError(
            "--output is for --format csv; --format txt writes a caption file next to each image"
        )
    exts = tuple(dict.fromkeys((caption_extension, ".txt", ".caption")))
    scan = scan_image_dataset(root, metadata_path=metadata, caption_extensions=exts)
    if not scan.items:
        raise CaptionError(f"no images (png, jpg, jpeg, webp, bmp, gif) found under {root}")
    todo, skipped = [], []
    for item in scan.items:
        (todo if overwrite or item.caption_source is None else skipped).append(item)
    return CaptionPlan(root, fmt, target, todo, skipped, table, caption_extension, mode)


def resolve_mode(mode: str | None, overwrite: bool = False) -> str:
    """``mode`` checked against ``MODES``; ``None`` means overwrite when ``overwrite`` else keep."""
    if mode is None:
        return "overwrite" if overwrite else "keep"
    if mode not in MODES:
        raise CaptionError(f"--mode must be keep, append or overwrite, not {mode!r}")
    if overwrite and mode != "overwrite":
        raise CaptionError(f"--overwrite contradicts --mode {mode}; use one of them")
    return mode


def _split_tags(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _tag_key(tag: str) -> str:
    return " ".join(tag.lower().replace("_", " ").split())


def merge_tags(existing: str, new: str, prefix: str = "") -> str:
    """``existing`` followed by the parts of ``new`` it lacks (comparing lower-case, ``_`` as space);
    ``prefix`` (a trigger word) first when the result does not already start with it."""
    parts = _split_tags(existing)
    seen = {_tag_key(p) for p in parts}
    for tag in _split_tags(new):
        if _tag_key(tag) not in seen:
            parts.append(tag)
            seen.add(_tag_key(tag))
    head = _split_tags(prefix)
    if head and [_tag_key(p) for p in parts[: len(head)]] != [_tag_key(p) for p in head]:
        keys = {_tag_key(p) for p in head}
        parts = head + [p for p in parts if _tag_key(p) not in keys]
    return ", ".join(parts)


def _postprocess(
    raw: str, captioner: Captioner, style: str, prefix: str, replacements: list[tuple[str, str]], append: str
) -> str:
    text = raw
    if style == "tags" and not captioner.produces_tags:
        text = caption_to_tags(text)
    return apply_edits(text, prefix=prefix, replacements=replacements, append=append)


class _CsvWriter:
    """Keeps existing rows, replaces/adds captioned ones and writes the whole file atomically."""

    def __init__(self, plan: CaptionPlan) -> None:
        assert plan.target is not None
        self.path = plan.target
        self.header = plan.table.header if plan.table is not None else ("filename", "prompt")
        self.rows: dict[str, tuple[str, str]] = {}
        if plan.table is not None:
            for key, row in plan.table.rows.items():
                self.rows[key] = (row.filename, row.caption)
        self.dirty = False

    def add(self, rel: str, caption: str) -> None:
        existing = self.rows.get(rel)
        self.rows[rel] = (existing[0] if existing else rel, caption)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_metadata_csv(self.path, self.rows.values(), self.header)
            self.dirty = False


def caption_dataset(
    root: Path,
    captioner: Captioner,
    *,
    fmt: str = "csv",
    output: Path | None = None,
    prefix: str = "",
    overwrite: bool = False,
    batch_size: int = 8,
    style: str = "caption",
    replacements: list[tuple[str, str]] | None = None,
    append: str = "",
    caption_extension: str = ".txt",
    on_progress: ProgressFn | None = None,
    flush_every: int = 256,
    plan: CaptionPlan | None = None,
    mode: str | None = None,
) -> CaptionResult:
    """Caption the images of ``root`` that need it and write the captions (see module docstring)."""
    if style not in STYLES:
        raise CaptionError(f"--style must be caption or tags, not {style!r}")
    plan = plan or plan_captions(
        root, fmt=fmt, output=output, overwrite=overwrite, caption_extension=caption_extension, mode=mode
    )
    result = CaptionResult(skipped_existing=len(plan.skipped_existing), fmt=plan.fmt, output=plan.target)
    writer = _CsvWriter(plan) if plan.fmt == "csv" else None
    start = time.perf_counter()
    total = len(plan.todo)
    done = 0
    since_flush = 0
    for first in range(0, total, max(1, batch_size)):
        batch = plan.todo[first : first + max(1, batch_size)]
        images, ready = [], []
        for item in batch:
            try:
                images.append(open_image_rgb(item.path))
                ready.append(item)
            except ImageReadError as err:
                result.failed.append((item.rel, err.reason))
        captions = captioner.caption(images) if images else []
        for item, raw in zip(ready, captions, strict=True):
            if plan.mode == "append" and item.caption:
                text = _postprocess(raw, captioner, style, "", replacements or [], append)
                text = merge_tags(item.caption, text, prefix)
            else:
                text = _postprocess(raw, captioner, style, prefix, replacements or [], append)
            if writer is not None:
                writer.add(item.rel, text)
            else:
                sidecar = item.path.with_name(item.path.stem + plan.caption_extension)
                atomic_write_text(sidecar, text + "\n")
            result.written.append((item.rel, text))
        done += len(batch)
        since_flush += len(ready)
        if writer is not None and since_flush >= flush_every:
            writer.flush()
            since_flush = 0
        if on_progress is not None:
            on_progress(done, total, batch[-1].rel)
    if writer is not None:
        writer.flush()
    if plan.fmt == "txt" and plan.mode != "keep":
        shadowed = [i.rel for i in plan.todo if i.caption_source == "metadata.csv"]
        if shadowed:
            result.notes.append(
                f"{len(shadowed)} image(s) also have a metadata.csv row, which takes precedence over the new "
                f"{plan.caption_extension} files (e.g. {shadowed[0]})."
            )
    result.seconds = time.perf_counter() - start
    return result
