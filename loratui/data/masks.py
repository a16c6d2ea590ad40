"""Loss masks: where they come from and whether they fit their images.

A mask says how much each pixel of a training image counts in the loss (white 1, black 0, grey between).
It comes either from a ``mask_dir`` holding one grayscale file per image, at the same path relative to the
folder and with the same stem (``10_char/a.png`` -> ``mask_dir/10_char/a.png``, any image extension, as
kohya's ``conditioning_data_dir``), or from the image's own alpha channel (``alpha_mask``). A mask must have
the image's (upright) size; it is resized, cropped and flipped with its image by the trainer.

Public API: ``mask_path_for(mask_dir, rel)``, ``open_mask(path)``, ``open_alpha_mask(path)``,
``mask_findings(scan, mask_dir, alpha_mask) -> list[Finding]``.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from loratui.data.findings import Example, Finding, FindingBag
from loratui.data.image_dataset import ImageDatasetScan
from loratui.data.image_io import IMAGE_EXTENSIONS, ImageReadError, probe_image

if TYPE_CHECKING:
    from PIL.Image import Image

_ROTATED_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def mask_path_for(mask_dir: Path, rel: str) -> Path | None:
    """The mask file for the image at ``rel`` (POSIX, relative to the dataset root), or None."""
    rel_path = PurePosixPath(rel)
    folder = Path(mask_dir).joinpath(*rel_path.parent.parts)
    exact = folder / rel_path.name
    if exact.is_file():
        return exact
    for ext in sorted(IMAGE_EXTENSIONS):
        candidate = folder / (rel_path.stem + ext)
        if candidate.is_file():
            return candidate
    return None


def _upright_size(path: Path) -> tuple[int, int]:
    info = probe_image(path)
    if info.exif_orientation in _ROTATED_ORIENTATIONS:
        return info.height, info.width
    return info.width, info.height


def _open_upright(path: Path) -> Image:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            image.seek(0)
            image.load()
            return ImageOps.exif_transpose(image).copy()
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"{exc}; re-export or delete it") from exc


def open_mask(path: Path) -> Image:
    """A mask file as an upright 8-bit grayscale ("L") image."""
    return _open_upright(Path(path)).convert("L")


def open_alpha_mask(path: Path) -> Image:
    """The alpha channel of an image as an upright "L" image (all white when the image has none)."""
    from PIL import Image

    image = _open_upright(Path(path))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if "A" in image.getbands():
        return image.getchannel("A")
    return Image.new("L", image.size, 255)


def mask_findings(scan: ImageDatasetScan, mask_dir: Path | None, alpha_mask: bool) -> list[Finding]:
    """``missing_mask`` / ``mask_size_mismatch`` / ``mask_unreadable`` for ``mask_dir``, ``no_alpha_mask``
    for images without transparency when ``alpha_mask`` is on."""
    bag = FindingBag()
    for item in scan.items:
        if mask_dir is not None:
            path = mask_path_for(Path(mask_dir), item.rel)
            if path is None:
                stem = PurePosixPath(item.rel).with_suffix("")
                bag.add(
                    "missing_mask",
                    Example(item.rel, None, f"no {Path(mask_dir) / stem}.png (or other image)"),
                )
                continue
            try:
                mask_size, image_size = _upright_size(path), _upright_size(item.path)
            except ImageReadError as exc:
                bag.add("mask_unreadable", Example(str(path), None, exc.reason))
                continue
            if mask_size != image_size:
                detail = f"mask {mask_size[0]}x{mask_size[1]}, image {image_size[0]}x{image_size[1]}"
                bag.add("mask_size_mismatch", Example(item.rel, None, detail))
        elif alpha_mask:
            try:
                has_alpha = probe_image(item.path).has_alpha
            except ImageReadError:
                continue  # reported by the file checks
            if not has_alpha:
                bag.add("no_alpha_mask", Example(item.rel, None, "no alpha channel: the whole image counts"))
    return bag.to_list()
