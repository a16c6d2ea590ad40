"""``metadata.csv`` captions: a tolerant reader that reports problems with line numbers, and a writer.

Format: UTF-8 CSV with a header line ``filename,prompt`` (``file_name``/``text`` as used by diffusers'
imagefolder are accepted too, in any combination), one row per image, file names relative to the dataset
root (subfolders allowed, ``/`` or ``\\`` separators). Fields containing commas, quotes or newlines are
quoted (``"a cat, sitting"``), inner quotes doubled.

Public API (stable):

- ``read_metadata_csv(path, root) -> MetadataTable`` with ``.rows: dict[str, MetadataRow]`` keyed by the
  normalised relative POSIX path, and ``.findings`` (codes ``metadata_*``, ``empty_caption`` is left to the
  dataset scan). Broken rows are skipped and reported; the first row for a file wins.
- ``write_metadata_csv(path, rows, header=("filename", "prompt"))``: atomic write of ``(filename, prompt)`` rows with a ``filename,prompt``
  header, quoted by the csv module.
- ``normalise_filename(name)``: the key normalisation used for matching rows to files.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from loratui.data.findings import Example, FindingBag
from loratui.util.atomic import atomic_write_text

FILENAME_COLUMNS = ("filename", "file_name")
CAPTION_COLUMNS = ("prompt", "text")
#: Lines an open quote may span before it is treated as an unclosed quote.
MAX_FIELD_LINES = 20

_LINE_SPLIT = re.compile(r"(?<=\n)|(?<=\r)(?!\n)")


@dataclass
class MetadataRow:
    """One data row: 1-based line where it starts, the file name as written and the caption."""

    line: int
    filename: str
    caption: str


@dataclass
class MetadataTable:
    """Parsed metadata.csv: rows by normalised relative path, plus findings."""

    path: Path
    rows: dict[str, MetadataRow] = field(default_factory=dict)
    bag: FindingBag = field(default_factory=FindingBag)
    header_ok: bool = False
    header: tuple[str, str] = ("filename", "prompt")  # the file-name and caption column names as written
    extra_columns: tuple[str, ...] = ()

    @property
    def findings(self):  # -> list[Finding]
        """Findings sorted by severity."""
        return self.bag.to_list()


def normalise_filename(name: str) -> str:
    """``./a\\b.png`` -> ``a/b.png`` (strip spaces, unify separators, drop leading ``./``)."""
    name = name.strip().replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return re.sub(r"/{2,}", "/", name)


def _decode(data: bytes, bag: FindingBag, label: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        bag.add(
            "metadata_not_utf8",
            Example(
                label, line, f"byte 0x{data[exc.start]:02x} at offset {exc.start}; bad bytes read as U+FFFD"
            ),
        )
        return data.decode("utf-8-sig", errors="replace")


def _records(text: str, bag: FindingBag, label: str) -> Iterator[tuple[int, list[str]]]:
    """Yield (start line, fields) for each CSV record; report and skip broken ones."""
    lines = [piece for piece in _LINE_SPLIT.split(text) if piece]
    i = 0
    while i < len(lines):
        start = i
        if not lines[i].strip():
            i += 1
            continue
        end = i + 1
        while True:
            chunk = "".join(lines[start:end])
            try:
                rows = list(csv.reader(io.StringIO(chunk, newline=""), strict=True))
            except csv.Error as exc:
                if (
                    "unexpected end of data" in str(exc)
                    and end < len(lines)
                    and end - start < MAX_FIELD_LINES
                ):
                    end += 1  # a quoted field spanning lines: read on
                    continue
                if "unexpected end of data" in str(exc):
                    detail = "a quote opened on this line is never closed"
                else:
                    detail = f"{exc}" if end - start == 1 else f"record starting on this line: {exc}"
                bag.add("metadata_bad_quoting", Example(label, start + 1, detail))
                end = start + 1  # resume on the next line
                rows = None
            break
        i = end
        if rows:
            yield start + 1, rows[0]


def read_metadata_csv(path: str | Path, root: str | Path) -> MetadataTable:
    """Parse ``path``; file names are relative to ``root``. Never raises for content problems."""
    path, root = Path(path), Path(root)
    table = MetadataTable(path=path)
    label = path.name if path.parent == root else str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:  # permission, I/O error: an error finding, so nothing rewrites the file
        table.bag.add("file_unreadable", Example(label, None, exc.strerror or str(exc)))
        return table
    text = _decode(data, table.bag, label)
    records = _records(text, table.bag, label)
    header = next(records, None)
    if header is None:
        table.bag.add("metadata_empty", Example(label, None, "the file is empty"))
        return table
    hline, hfields = header
    cols = [c.strip().lower() for c in hfields]
    fcol = next((cols.index(c) for c in FILENAME_COLUMNS if c in cols), None)
    ccol = next((cols.index(c) for c in CAPTION_COLUMNS if c in cols), None)
    if fcol is None or ccol is None:
        looks_like_data = bool(hfields) and Path(normalise_filename(hfields[0])).suffix != ""
        hint = " (it looks like a data row: add the header line first)" if looks_like_data else ""
        table.bag.add("metadata_bad_columns", Example(label, hline, f"header is {','.join(hfields)!r}{hint}"))
        return table
    table.header_ok = True
    table.header = (hfields[fcol].strip(), hfields[ccol].strip())
    extra = [c for i, c in enumerate(hfields) if i not in (fcol, ccol)]
    table.extra_columns = tuple(extra)
    if extra:
        table.bag.add("metadata_extra_columns", Example(label, hline, f"ignored: {', '.join(extra)}"))
    ncols = len(hfields)
    for line, fields in records:
        if len(fields) != ncols and not (len(fields) > ncols and not any(f.strip() for f in fields[ncols:])):
            table.bag.add(
                "metadata_wrong_column_count",
                Example(label, line, f"{len(fields)} columns, expected {ncols}"),
            )
            continue
        name = normalise_filename(fields[fcol])
        if not name:
            table.bag.add("metadata_wrong_column_count", Example(label, line, "empty file name"))
            continue
        caption = fields[ccol]
        key = _relative_key(name, root)
        first = table.rows.get(key)
        if first is not None:
            same = "same caption" if first.caption.strip() == caption.strip() else "different caption"
            table.bag.add(
                "metadata_duplicate_row",
                Example(label, line, f"{name} first listed at line {first.line} ({same})"),
            )
            continue
        table.rows[key] = MetadataRow(line=line, filename=name, caption=caption)
    if (
        not table.rows
        and "metadata_wrong_column_count" not in table.bag
        and "metadata_bad_quoting" not in table.bag
    ):
        table.bag.add("metadata_empty", Example(label, None, "header only"))
    return table


def _relative_key(name: str, root: Path) -> str:
    p = Path(name)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return name  # outside the root: will not match any image and gets reported
    return name


def format_metadata_csv(
    rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("filename", "prompt")
) -> str:
    """CSV text with a ``filename,prompt`` header (``\\n`` line endings, minimal quoting)."""
    buf = io.StringIO(newline="")
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(list(header))
    for name, prompt in rows:
        writer.writerow([name, prompt])
    return buf.getvalue()


def write_metadata_csv(
    path: str | Path, rows: Iterable[tuple[str, str]], header: tuple[str, str] = ("filename", "prompt")
) -> None:
    """Atomically write ``rows`` as metadata.csv (UTF-8, no BOM); ``header`` names the two columns."""
    atomic_write_text(path, format_metadata_csv(rows, header))
