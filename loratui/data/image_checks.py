"""Per-file image inspection for ``loratui check`` (header-level by default, full decode with ``deep``).

Default mode probes the header without decoding and checks the end-of-file marker from the last 4 KiB
(PNG ``IEND``, JPEG ``EOI``, GIF trailer, RIFF/BMP sizes); only suspicious files are decoded to confirm
truncation. Exact duplicates: files are grouped by size and a hash of their first and last 4 KiB; only
files sharing both are hashed in full (blake2b of all bytes), since identical files agree on both. JPEGs additionally get a
reduced 1/8-scale decode (``Image.draft``), which is cheap, validates the entropy data and gives the
perceptual hash for near-duplicate detection. Other formats get a perceptual hash only with ``deep``,
where every image is decoded and converted exactly as training does.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

from loratui.data.image_io import ImageInfo, ImageReadError, probe_stream, to_rgb
from loratui.data.perceptual_hash import dhash

EXTENSION_FORMATS = {
    ".png": {"PNG"},
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP", "DIB"},
    ".gif": {"GIF"},
}
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
HEAD_BYTES = 4096
TAIL_BYTES = 4096


@dataclass
class FileInspection:
    """What one image file looks like."""

    index: int
    size_bytes: int = 0
    quick_key: bytes | None = None  # blake2b of the first and last 4 KiB: equal files have equal keys
    digest: bytes | None = None  # blake2b of all bytes, computed only when size and quick_key collide
    info: ImageInfo | None = None
    problem: str | None = None  # corrupt_image | truncated_image | decompression_bomb
    detail: str = ""
    dhash: int | None = None
    trailing_data: bool = False


def _end_marker_state(head: bytes, tail: bytes, size: int, fmt: str) -> str:
    """ "ok", "truncated" (certain), "suspect" (decode to confirm) or "trailing" (data after the end).

    ``head``/``tail`` are the first and last bytes of the file (``TAIL_BYTES`` at most), ``size`` its length.
    """
    if fmt == "PNG":
        if tail.endswith(_PNG_IEND):
            return "ok"
        return "trailing" if _PNG_IEND in tail else "suspect"
    if fmt in ("JPEG", "MPO"):
        return "ok" if tail.rstrip(b"\x00\r\n \t").endswith(b"\xff\xd9") else "suspect"
    if fmt == "GIF":
        return "ok" if tail.rstrip(b"\x00").endswith(b";") else "suspect"
    if fmt == "WEBP" and head[:4] == b"RIFF":
        declared = int.from_bytes(head[4:8], "little") + 8
        return "truncated" if size < declared else "ok"
    if fmt in ("BMP", "DIB") and head[:2] == b"BM":
        declared = int.from_bytes(head[2:6], "little")
        return "truncated" if 0 < size < declared else "ok"
    return "ok"


def _decode_full(data: bytes, want_hash: bool) -> tuple[int | None, str | None, str]:
    """Decode like training does. Returns (dhash, problem code, detail)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = to_rgb(ImageOps.exif_transpose(im))
            return (dhash(rgb) if want_hash else None), None, ""
    except Exception as exc:  # Pillow raises many types for broken data
        text = str(exc) or type(exc).__name__
        low = text.lower()
        code = (
            "truncated_image"
            if ("truncated" in low or "premature" in low or "ended" in low)
            else "corrupt_image"
        )
        return None, code, text


def _jpeg_reduced_hash(data: bytes) -> tuple[int | None, str | None, str]:
    """1/8-scale JPEG decode: validates the scan data and returns the dHash."""
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("L", (max(9, im.size[0] // 8), max(8, im.size[1] // 8)))
            im.load()
            return dhash(ImageOps.exif_transpose(im)), None, ""
    except Exception as exc:
        text = str(exc) or type(exc).__name__
        code = "truncated_image" if "truncated" in text.lower() else "corrupt_image"
        return None, code, text


def inspect_image_file(
    index: int, path: Path, *, deep: bool = False, jpeg_hash: bool = True
) -> FileInspection:
    """Inspect one file; never raises for bad content (problems go into the result).

    Reads the whole file only for JPEG (reduced decode), ``deep`` mode or suspicious endings; other files
    cost a header parse and two 4 KiB reads. ``digest`` is left for ``content_digests``.
    """
    out = FileInspection(index=index)
    data: bytes | None = None
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            out.size_bytes = size
            try:
                info = probe_stream(fh, path.name)
            except ImageReadError as err:
                out.problem, out.detail = "corrupt_image", err.reason
                return out
            out.info = info
            if info.is_bomb():
                from PIL import Image

                out.problem = "decompression_bomb"
                out.detail = (
                    f"{info.width}x{info.height} = {info.pixels:,} pixels > {Image.MAX_IMAGE_PIXELS:,}"
                )
                return out
            is_jpeg = info.format in ("JPEG", "MPO")
            fh.seek(0)
            if deep or (is_jpeg and jpeg_hash):
                data = fh.read()
                head, tail = data[:HEAD_BYTES], data[-TAIL_BYTES:]
            else:
                head = fh.read(HEAD_BYTES)
                fh.seek(max(0, size - TAIL_BYTES))
                tail = fh.read()
    except OSError as exc:
        out.problem, out.detail = "corrupt_image", f"cannot read the file: {exc.strerror or exc}"
        return out
    out.quick_key = hashlib.blake2b(head + tail, digest_size=16).digest()
    state = _end_marker_state(head, tail, size, info.format)
    if state == "truncated":
        out.problem, out.detail = "truncated_image", f"{size} bytes, the header declares more"
        return out
    if deep and data is not None:
        out.dhash, out.problem, out.detail = _decode_full(data, want_hash=True)
    elif state == "suspect":
        _, out.problem, out.detail = _decode_full(
            data if data is not None else path.read_bytes(), want_hash=False
        )
        if out.problem is None:
            out.trailing_data = True
    elif is_jpeg and jpeg_hash and data is not None:
        out.dhash, out.problem, out.detail = _jpeg_reduced_hash(data)
    if state == "trailing" and out.problem is None:
        out.trailing_data = True
    if out.problem == "corrupt_image" and state == "suspect":
        out.problem = "truncated_image"
    return out


def content_digests(paths: list[Path]) -> list[bytes | None]:
    """blake2b-128 of each file's bytes (None when unreadable)."""
    out: list[bytes | None] = []
    for p in paths:
        try:
            out.append(hashlib.blake2b(p.read_bytes(), digest_size=16).digest())
        except OSError:
            out.append(None)
    return out
