"""Perceptual difference hash (dHash) and near-duplicate search, with Pillow only.

dHash: the image is reduced to 9x8 grayscale pixels; each of the 64 bits says whether a pixel is brighter
than its right neighbour. Re-encoded, resized or slightly edited copies differ in a few bits.

``near_duplicate_pairs`` finds all pairs within ``max_distance`` bits exactly: by the pigeonhole principle,
two 64-bit hashes within distance d agree on at least one of d+1 bands, so only hashes sharing a band
value are compared (fast for tens of thousands of images).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image as PILImage

HASH_BITS = 64
DEFAULT_MAX_DISTANCE = 4


#: Reduced images with less contrast than this (max - min gray level) get no hash: flat images all look alike.
MIN_CONTRAST = 12


def dhash(im: PILImage.Image) -> int | None:
    """64-bit difference hash of an image (any mode); None for (nearly) flat images."""
    from PIL import Image

    small = im.convert("L").resize((9, 8), Image.Resampling.BOX)
    px = small.tobytes()
    if max(px) - min(px) < MIN_CONTRAST:
        return None
    value = 0
    for row in range(8):
        base = row * 9
        for col in range(8):
            value = (value << 1) | (px[base + col] > px[base + col + 1])
    return value


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


def _bands(max_distance: int) -> list[tuple[int, int]]:
    n = max_distance + 1
    edges = [round(i * HASH_BITS / n) for i in range(n + 1)]
    return [(edges[i], edges[i + 1] - edges[i]) for i in range(n)]


def near_duplicate_pairs(
    hashes: Sequence[int | None], max_distance: int = DEFAULT_MAX_DISTANCE
) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, distance)`` with i < j and hamming distance <= max_distance."""
    bands = _bands(max_distance)
    found: dict[tuple[int, int], int] = {}
    for shift, width in bands:
        mask = (1 << width) - 1
        buckets: dict[int, list[int]] = defaultdict(list)
        for idx, h in enumerate(hashes):
            if h is not None:
                buckets[(h >> shift) & mask].append(idx)
        for members in buckets.values():
            if len(members) < 2:
                continue
            for a_pos, i in enumerate(members):
                hi = hashes[i]
                for j in members[a_pos + 1 :]:
                    if (i, j) in found:
                        continue
                    d = hamming(hi, hashes[j])  # type: ignore[arg-type]
                    if d <= max_distance:
                        found[(i, j)] = d
    return sorted((i, j, d) for (i, j), d in found.items())
