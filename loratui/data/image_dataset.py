"""Image dataset parsing: which images are trained, with which caption and how many repeats.

This is the single source of truth for image datasets: ``loratui check`` and the Stable Diffusion trainer
both read datasets through ``scan_image_dataset``, so what the check accepts is what training reads.
It only looks at file names and caption text; pixel checks live in ``loratui.data.image_checks``.

Layouts accepted (see docs/datasets.md):

- images directly in ``root`` and/or in subfolders (any depth; hidden folders and ``__MACOSX`` skipped);
- kohya-style top-level folders ``N_name`` (``10_mychar/``: N repeats per epoch, N >= 1). When any
  top-level image folder is kohya-style, the others are flagged ``malformed_kohya_folder``; names like
  ``10mychar``, ``0_x`` or ``10_`` are always flagged. Flagged folders use 1 repeat.

Caption precedence for an image ``sub/cat.png``:

1. its row in ``metadata.csv`` (``filename,prompt``; ``file_name,text`` accepted), file names relative to
   ``root``. When a sidecar file also exists with a different text, the metadata row wins and the conflict
   is reported (``caption_conflict``).
2. the sidecar ``sub/cat<ext>`` for the first ``ext`` in ``caption_extensions`` that exists
   (default ``(".txt", ".caption")``). Only the first non-empty line is used (as kohya does).
3. otherwise ``caption == ""`` and ``caption_source is None`` (``missing_caption``; when a caption exists
   under another extension or as ``cat.png.txt`` the finding is ``wrong_caption_extension`` instead).

Public API (stable):

- ``scan_image_dataset(root, *, metadata_path=None, caption_extensions=(".txt", ".caption"),
  trigger_word=None) -> ImageDatasetScan``
- ``ImageItem(path, rel, caption, caption_source, repeats, subset, caption_file, caption_line)``
- ``ImageDatasetScan``: ``items``, ``findings``, ``subsets``, ``n_images``, ``n_samples`` (images x repeats),
  ``steps_per_epoch(batch_size)``, ``tag_frequency()``, ``has_errors``.
- ``caption_label(item, root)``: where an item's caption lives (metadata.csv or the sidecar file).
- ``split_tags(caption)``, ``has_trigger(caption, trigger)``, ``ensure_trigger(caption, trigger)``.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from loratui.data.findings import Example, Finding, FindingBag
from loratui.data.image_io import IMAGE_EXTENSIONS, UNSUPPORTED_IMAGE_EXTENSIONS
from loratui.data.metadata_csv import MetadataTable, read_metadata_csv

DEFAULT_CAPTION_EXTENSIONS: tuple[str, ...] = (".txt", ".caption")
#: Extensions recognised as caption files even when not configured (for the wrong-extension hint).
KNOWN_CAPTION_EXTENSIONS: frozenset[str] = frozenset({".txt", ".caption", ".tags", ".cap"})
SKIPPED_DIRS = frozenset({"__MACOSX", "@eaDir", "__pycache__"})
METADATA_SOURCE = "metadata.csv"

_KOHYA_RE = re.compile(r"^(\d+)_(.+)$")
_DIGITS_THEN_NAME_RE = re.compile(r"^(\d+)([^\d_].*)$")


@dataclass
class ImageItem:
    """One training image and where its caption came from."""

    path: Path  # absolute path of the image
    rel: str  # POSIX path relative to the dataset root
    caption: str = ""
    caption_source: str | None = None  # "metadata.csv" | ".txt" | ".caption" | None
    repeats: int = 1
    subset: str = "."  # top-level folder name, "." for images directly in the root
    caption_file: Path | None = None  # metadata.csv or the sidecar file the caption came from
    caption_line: int | None = None  # line in metadata.csv


@dataclass
class SubsetInfo:
    """A top-level folder of images (kohya subset)."""

    name: str
    repeats: int
    n_images: int = 0
    kohya: bool = False


@dataclass
class ImageDatasetScan:
    """What ``scan_image_dataset`` found."""

    root: Path
    items: list[ImageItem]
    findings: list[Finding]
    subsets: dict[str, SubsetInfo]
    metadata_path: Path | None
    caption_extensions: tuple[str, ...]
    orphan_captions: list[Path] = field(default_factory=list)
    unsupported_files: list[Path] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        """Number of training images."""
        return len(self.items)

    @property
    def n_samples(self) -> int:
        """Images x repeats: samples seen per epoch."""
        return sum(item.repeats for item in self.items)

    def steps_per_epoch(self, batch_size: int = 1) -> int:
        """ceil(images x repeats / batch_size)."""
        return math.ceil(self.n_samples / max(1, batch_size))

    @property
    def has_errors(self) -> bool:
        """True when any finding is an error."""
        return any(f.severity == "error" for f in self.findings)

    def tag_frequency(self) -> Counter[str]:
        """Comma-separated caption tags counted over images (each image once, repeats ignored)."""
        counts: Counter[str] = Counter()
        for item in self.items:
            counts.update(set(split_tags(item.caption)))
        return counts


def split_tags(caption: str) -> list[str]:
    """``"a, b ,c"`` -> ``["a", "b", "c"]`` (lower-cased, empties dropped)."""
    return [t.strip().lower() for t in caption.split(",") if t.strip()]


def has_trigger(caption: str, trigger: str) -> bool:
    """Case-insensitive whole-word match of ``trigger`` in ``caption``."""
    pattern = r"(?<![\w])" + re.escape(trigger.strip()) + r"(?![\w])"
    return re.search(pattern, caption, flags=re.IGNORECASE) is not None


def ensure_trigger(caption: str, trigger: str | None) -> str:
    """Prefix ``trigger, `` when the caption lacks it (for trainers that enforce the trigger word)."""
    if not trigger or has_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _walk(root: Path) -> list[tuple[Path, str, list[str]]]:
    """(folder, folder relative to root as POSIX ("" for root), sorted visible file names)."""
    out: list[tuple[Path, str, list[str]]] = []
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIPPED_DIRS)
        rel_dir = os.path.relpath(dirpath, base).replace(os.sep, "/")
        out.append(
            (
                Path(dirpath),
                "" if rel_dir == "." else rel_dir,
                sorted(f for f in filenames if not f.startswith(".")),
            )
        )
    return out


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _read_caption_file(path: Path, label: str, bag: FindingBag) -> str:
    """First non-empty line of a caption file (UTF-8; bad bytes replaced and reported)."""
    try:
        data = path.read_bytes()
    except OSError as exc:  # permission, I/O error: reported, the image counts as uncaptioned
        bag.add("file_unreadable", Example(label, None, exc.strerror or str(exc)))
        return ""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bag.add(
            "caption_not_utf8", Example(label, line, f"byte 0x{data[exc.start]:02x} at offset {exc.start}")
        )
        text = data.decode("utf-8-sig", errors="replace")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if len(lines) > 1:
        bag.add("multiline_caption", Example(label, None, f"{len(lines)} non-empty lines"))
    return lines[0] if lines else ""


def _folder_repeats(name: str, kohya_style: bool) -> tuple[int, bool, str | None]:
    """(repeats, is_kohya, problem) for a top-level folder name."""
    m = _KOHYA_RE.match(name)
    if m:
        n = int(m.group(1))
        if n >= 1:
            return n, True, None
        return 1, False, "0 repeats: kohya would never use these images"
    if _DIGITS_THEN_NAME_RE.match(name):
        return 1, False, "missing '_' between the repeat count and the name"
    if re.fullmatch(r"\d+_?", name):
        return 1, False, "missing name after the repeat count"
    if kohya_style:
        return 1, False, "no repeat count, unlike the other N_name folders"
    return 1, False, None


def scan_image_dataset(
    root: Path,
    *,
    metadata_path: Path | None = None,
    caption_extensions: tuple[str, ...] | list[str] = DEFAULT_CAPTION_EXTENSIONS,
    trigger_word: str | None = None,
) -> ImageDatasetScan:
    """List the training images under ``root`` with captions and repeats, plus parsing findings.

    ``metadata_path`` defaults to ``root/metadata.csv`` when it exists. ``trigger_word`` only adds
    ``trigger_word_missing`` findings; captions are returned unchanged (see ``ensure_trigger``).
    Raises ``FileNotFoundError``/``NotADirectoryError`` when ``root`` is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    exts = tuple(e if e.startswith(".") else f".{e}" for e in caption_extensions)
    bag = FindingBag()
    tree = _walk(root)

    if metadata_path is None and (root / "metadata.csv").is_file():
        metadata_path = root / "metadata.csv"
    table: MetadataTable | None = None
    if metadata_path is not None:
        table = read_metadata_csv(metadata_path, root)
        bag.extend(table.findings)

    # images and caption candidates per folder
    images: list[tuple[Path, str, str, str]] = []  # (folder, rel_dir, name, stem)
    captions_by_dir: dict[str, dict[str, list[str]]] = {}  # rel_dir -> stem -> caption file names
    unsupported: list[Path] = []
    for folder, rel_dir, names in tree:
        stems: dict[str, list[str]] = {}
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            if not dot:
                continue
            ext = "." + suffix.lower()
            if ext in IMAGE_EXTENSIONS:
                images.append((folder, rel_dir, name, stem))
            elif "." + suffix in exts or ext in KNOWN_CAPTION_EXTENSIONS:
                stems.setdefault(stem, []).append(name)
            elif ext in UNSUPPORTED_IMAGE_EXTENSIONS:
                unsupported.append(folder / name)
        captions_by_dir[rel_dir] = stems
    for p in unsupported:
        bag.add("unsupported_image_format", Example(_rel(p, root), None, p.suffix.lower()))

    # top-level folders -> repeats
    top_dirs = sorted({rel_dir.split("/", 1)[0] for _, rel_dir, _, _ in images if rel_dir})
    kohya_style = any(_folder_repeats(d, False)[1] for d in top_dirs)
    subsets: dict[str, SubsetInfo] = {}
    for d in top_dirs:
        repeats, is_kohya, problem = _folder_repeats(d, kohya_style)
        subsets[d] = SubsetInfo(d, repeats, kohya=is_kohya)
        if problem:
            bag.add("malformed_kohya_folder", Example(d + "/", None, problem))
    if any(not rel_dir for _, rel_dir, _, _ in images):
        subsets["."] = SubsetInfo(".", 1)
        if _folder_repeats(root.name, False)[1]:
            bag.add(
                "root_is_kohya_folder", Example(root.name + "/", None, "images directly in it use 1 repeat")
            )

    used_caption_files: set[str] = set()  # rel paths
    items: list[ImageItem] = []
    rows = dict(table.rows) if table is not None else {}
    for folder, rel_dir, img_name, img_stem in images:
        img = folder / img_name
        rel = _join(rel_dir, img_name)
        subset = rel_dir.split("/", 1)[0] if rel_dir else "."
        info = subsets[subset]
        info.n_images += 1
        item = ImageItem(path=img, rel=rel, repeats=info.repeats, subset=subset)
        stems = captions_by_dir.get(rel_dir, {})
        candidates = stems.get(img_stem, [])
        sidecars = (
            [folder / (img_stem + e) for e in exts if (img_stem + e) in candidates] if candidates else []
        )
        # every caption-like file named after an image belongs to it (read or reported), never an orphan
        for name in (*candidates, *stems.get(img_name, [])):
            used_caption_files.add(_join(rel_dir, name))

        row = rows.pop(rel, None)
        if row is not None:
            item.caption = row.caption.strip()
            item.caption_source = METADATA_SOURCE
            item.caption_file = table.path if table is not None else None
            item.caption_line = row.line
            if sidecars:
                side_label = _join(rel_dir, sidecars[0].name)
                side_text = _read_caption_file(sidecars[0], side_label, bag)
                if side_text.strip() != item.caption:
                    bag.add(
                        "caption_conflict",
                        Example(rel, row.line, f"metadata.csv line {row.line} used; {side_label} ignored"),
                    )
        elif sidecars:
            if len(sidecars) > 1:
                names = ", ".join(s.name for s in sidecars)
                bag.add("duplicate_caption_files", Example(rel, None, f"{names}: {sidecars[0].name} used"))
            item.caption = _read_caption_file(sidecars[0], _join(rel_dir, sidecars[0].name), bag)
            item.caption_source = sidecars[0].name[len(img_stem) :]
            item.caption_file = sidecars[0]
        else:
            others = sorted(
                {n for n in candidates if (folder / n) not in sidecars} | set(stems.get(img_name, []))
            )
            if others:
                found = ", ".join(others)
                expected = " or ".join(img_stem + e for e in exts)
                bag.add(
                    "wrong_caption_extension",
                    Example(rel, None, f"found {found}; expected {expected}"),
                    fix=_wrong_ext_fix(others, exts),
                )
            else:
                where = "no metadata.csv row and no " if table is not None else "no "
                bag.add("missing_caption", Example(rel, None, where + " / ".join(img_stem + e for e in exts)))
        if item.caption_source is not None and not item.caption:
            bag.add("empty_caption", Example(caption_label(item, root), item.caption_line))
        if trigger_word and item.caption and not has_trigger(item.caption, trigger_word):
            bag.add(
                "trigger_word_missing",
                Example(caption_label(item, root), item.caption_line, item.caption[:80]),
            )
        items.append(item)

    if table is not None:
        image_lower = {item.rel.lower(): item.rel for item in items}
        for key, row in rows.items():
            target = root / key
            if target.exists():
                hint = "not a supported training image (or in a hidden folder)"
            elif key.lower() in image_lower:
                hint = f"file not found; did you mean {image_lower[key.lower()]}? (names are case-sensitive)"
            else:
                hint = "file not found"
            bag.add(
                "metadata_missing_image", Example(_rel(table.path, root), row.line, f"{row.filename}: {hint}")
            )

    orphans: list[Path] = []
    for rel_dir, stems in captions_by_dir.items():
        for names in stems.values():
            for n in names:
                rel_caption = _join(rel_dir, n)
                if rel_caption not in used_caption_files:
                    orphans.append(root / rel_caption)
                    bag.add("orphan_caption", Example(rel_caption))

    kohya = [s for s in subsets.values() if s.kohya]
    if kohya:
        bag.add(
            "kohya_folders",
            count=len(kohya),
            message=f"{len(kohya)} kohya-style folder(s): "
            + ", ".join(f"{s.name} ({s.repeats} repeats x {s.n_images} images)" for s in kohya),
            data={s.name: {"n_repeats": s.repeats, "img_count": s.n_images} for s in kohya},
        )
    if not images:
        bag.add("no_images", Example(str(root)))

    return ImageDatasetScan(
        root=root,
        items=items,
        findings=bag.to_list(),
        subsets=subsets,
        metadata_path=metadata_path,
        caption_extensions=exts,
        orphan_captions=orphans,
        unsupported_files=unsupported,
    )


def caption_label(item: ImageItem, root: Path) -> str:
    """The file holding the caption (metadata.csv or the sidecar), relative to root."""
    return _rel(item.caption_file, root) if item.caption_file else item.rel


def _wrong_ext_fix(found: list[str], exts: tuple[str, ...]) -> str:
    found_exts = sorted({("." + n.split(".")[-1]) for n in found})
    return (
        f"Captions are read from {' / '.join(exts)} files but these use {' / '.join(found_exts)}: rename "
        f'them (e.g. `for f in *{found_exts[0]}; do mv "$f" "${{f%{found_exts[0]}}}{exts[0]}"; done`) '
        f"or set `caption_extension: {found_exts[0]}` in the config (kohya's CLI default is .caption, "
        "GUIs write .txt)."
    )
