"""Reading images the way training does, and probing headers without decoding pixels.

Public API (stable):

- ``open_image_rgb(path) -> PIL.Image.Image``: first frame, EXIF orientation applied, converted to 8-bit
  RGB. RGBA/LA/PA and palette images with transparency are composited on white; CMYK, YCbCr, L, 1 are
  converted; 16-bit (``I;16*``) and 32-bit (``I``, ``F``) images are scaled down to 8 bits (not clipped).
  Raises ``ImageReadError`` (file and reason in the message) for unreadable, truncated or oversized files.
- ``probe_image(path_or_bytes, name=None) -> ImageInfo`` (``probe_stream(fp, name)`` for open files): format, size, mode, frame count, EXIF orientation
  and bit depth from the file header only. It never decodes pixel data and never triggers Pillow's
  decompression-bomb warning or error: compare ``info.pixels`` with ``PIL.Image.MAX_IMAGE_PIXELS``
  yourself (``info.is_bomb()``).
- ``IMAGE_EXTENSIONS``: the extensions training reads (png jpg jpeg webp bmp gif).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

#: Extensions (lower case) that are read as training images. Animated GIFs use their first frame.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"})
#: Image-like extensions that are recognised but not trained on.
UNSUPPORTED_IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {
        ".tif",
        ".tiff",
        ".heic",
        ".heif",
        ".avif",
        ".jxl",
        ".svg",
        ".psd",
        ".raw",
        ".cr2",
        ".nef",
        ".dng",
        ".ico",
    }
)

_ORIENTATION_TAG = 0x0112


class ImageReadError(Exception):
    """An image that cannot be used; the message names the file and what to do."""

    def __init__(self, path: str | Path, reason: str, kind: str = "corrupt") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind  # corrupt | truncated | bomb | missing
        super().__init__(f"cannot read image {self.path}: {reason}")


@dataclass(frozen=True)
class ImageInfo:
    """Header facts about an image file."""

    width: int
    height: int
    mode: str
    format: str
    n_frames: int = 1
    exif_orientation: int | None = None
    bits: int = 8
    has_alpha: bool = False  # an alpha channel or a transparency key (palette/tRNS)

    @property
    def pixels(self) -> int:
        """width * height."""
        return self.width * self.height

    def is_bomb(self, limit: int | None = None) -> bool:
        """True when the pixel count exceeds ``limit`` (default ``PIL.Image.MAX_IMAGE_PIXELS``)."""
        if limit is None:
            from PIL import Image

            limit = Image.MAX_IMAGE_PIXELS
        return limit is not None and self.pixels > limit

    @property
    def rotated(self) -> bool:
        """True when EXIF orientation requires a transpose (orientation 2..8)."""
        return self.exif_orientation not in (None, 0, 1)


def _open_header(fp: io.BufferedIOBase | io.BytesIO, name: str) -> PILImage.Image:
    """Identify the image like ``Image.open`` but without the decompression-bomb check.

    The check is what raises/warns for huge headers; we compare sizes ourselves instead.
    """
    from PIL import Image, UnidentifiedImageError

    fp.seek(0)
    prefix = fp.read(16)
    first_error = ""
    for loader in (Image.preinit, Image.init):
        loader()
        for fmt in list(Image.ID):
            factory, accept = Image.OPEN[fmt]
            result = not accept or accept(prefix)
            if not result or isinstance(result, str):
                continue
            fp.seek(0)
            try:
                return factory(fp, name)
            except (SyntaxError, IndexError, TypeError, ValueError, EOFError, OSError, struct.error) as exc:
                if accept is not None and not first_error:  # the signature matched: keep its reason
                    first_error = f"invalid {fmt} header: {exc}"
    if first_error:
        raise UnidentifiedImageError(first_error)
    raise UnidentifiedImageError("not a recognised image format")


def _png_bit_depth(head: bytes) -> int | None:
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 25 and head[12:16] == b"IHDR":
        return head[24]
    return None


def _exif_orientation(im: PILImage.Image) -> int | None:
    """EXIF orientation from header metadata only (never loads pixel data)."""
    from PIL import Image

    raw = im.info.get("exif")
    if not raw:
        return None
    try:
        exif = Image.Exif()
        exif.load(raw)
        value = exif.get(_ORIENTATION_TAG)
    except Exception:
        return None
    return int(value) if isinstance(value, int) else None


def _mode_bits(mode: str) -> int:
    if mode == "1":
        return 1
    if mode.startswith("I;16"):
        return 16
    if mode in ("I", "F"):
        return 32
    return 8


def _info_from_open(im: PILImage.Image, head: bytes) -> ImageInfo:
    n_frames = 1
    if getattr(im, "is_animated", False):
        try:
            n_frames = int(getattr(im, "n_frames", 2))
        except Exception:
            n_frames = 2
    bits = _png_bit_depth(head) or int(getattr(im, "bits", 0) or 0) or _mode_bits(im.mode)
    return ImageInfo(
        width=im.size[0],
        height=im.size[1],
        mode=im.mode,
        format=im.format or "",
        n_frames=n_frames,
        exif_orientation=_exif_orientation(im),
        bits=bits,
        has_alpha=im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info,
    )


def probe_stream(fp: io.BufferedIOBase | io.BytesIO, name: str) -> ImageInfo:
    """Like ``probe_image`` for an open binary file; reads only the header and leaves ``fp`` open."""
    from PIL import UnidentifiedImageError

    fp.seek(0)
    head = fp.read(32)
    if not head:
        raise ImageReadError(name, "empty file (0 bytes); re-export or delete it")
    try:
        im = _open_header(fp, name)
    except UnidentifiedImageError as exc:
        raise ImageReadError(name, f"{exc}; re-export or delete the file") from exc
    try:
        return _info_from_open(im, head)
    except (OSError, EOFError, SyntaxError, ValueError) as exc:  # e.g. frames of a broken GIF
        raise ImageReadError(name, f"invalid header ({exc}); re-export or delete the file") from exc


def probe_image(source: str | Path | bytes, name: str | None = None) -> ImageInfo:
    """Read the header of an image file (path) or of in-memory file bytes. Raises ``ImageReadError``."""
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    if isinstance(source, bytes):
        return probe_stream(io.BytesIO(source), label)
    try:
        with open(source, "rb") as fp:
            return probe_stream(fp, label)
    except FileNotFoundError as exc:
        raise ImageReadError(label, "file not found", kind="missing") from exc
    except IsADirectoryError as exc:
        raise ImageReadError(label, "is a folder, not an image") from exc
    except PermissionError as exc:
        raise ImageReadError(label, f"cannot open file ({exc.strerror or exc})") from exc


# --- decoding ---------------------------------------------------------------------------------


def _scale_to_uint8(im: PILImage.Image) -> PILImage.Image:
    """Scale a 16/32-bit integer or float single-channel image to 8-bit L (no clipping of 16-bit data)."""
    import numpy as np
    from PIL import Image

    if im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.float64) / 257.0
    elif im.mode == "I":
        arr = np.asarray(im, dtype=np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        # 32-bit containers almost always hold 16-bit data (PNG/TIFF); larger values use the full range.
        if peak > 65535:
            arr = arr / (2**32 - 1) * 255.0
        elif peak > 255:
            arr = arr / 257.0
    else:  # "F"
        arr = np.asarray(im, dtype=np.float64)
        peak = float(np.nanmax(arr)) if arr.size else 0.0
        if peak <= 1.0:
            arr = arr * 255.0
        elif peak > 255:
            arr = arr / 257.0
        arr = np.nan_to_num(arr)
    out = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(out)


def _composite_on_white(im: PILImage.Image) -> PILImage.Image:
    from PIL import Image

    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def to_rgb(im: PILImage.Image) -> PILImage.Image:
    """Convert an already-loaded image of any mode to 8-bit RGB (see module docstring for the rules)."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(im)
    if mode == "P":
        if "transparency" in im.info:
            return _composite_on_white(im)
        return im.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _scale_to_uint8(im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, RGBX


def open_image_rgb(path: str | Path) -> PILImage.Image:
    """Open an image for training: first frame, upright (EXIF), 8-bit RGB. Raises ``ImageReadError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    info = probe_image(path)
    if info.is_bomb():
        raise ImageReadError(
            path,
            f"{info.width}x{info.height} exceeds the {Image.MAX_IMAGE_PIXELS}-pixel safety limit; "
            "downscale it with a trusted tool or delete it",
            kind="bomb",
        )
    try:
        with Image.open(path) as im:
            im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im).copy()
    except UnidentifiedImageError as exc:
        raise ImageReadError(path, f"not a recognised image ({exc}); re-export or delete it") from exc
    except OSError as exc:
        text = str(exc)
        kind = "truncated" if "truncated" in text.lower() or "premature" in text.lower() else "corrupt"
        raise ImageReadError(path, f"{text}; re-export or re-download it", kind=kind) from exc
    except (SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageReadError(path, f"{exc}; re-export or delete it") from exc


def save_png(image, path: Path) -> Path:
    """Write a PNG atomically."""
    from loratui.util.atomic import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)
