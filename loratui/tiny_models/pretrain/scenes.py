"""Procedurally drawn 64x64 scenes (one flat-coloured shape on a plain background) and a pixel check.

The shipped image model was pretrained on these scenes with template captions
("a red circle on a white background"); `read_scene` recovers the background, the shape's colour and the
shape from a picture by counting pixels, so samples can be checked against their caption.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

SIZE = 64
#: Shape colours and backgrounds (RGB). No colour is close to another one.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
#: The shapes the base model is pretrained on.
SHAPES = ("circle", "square", "triangle")
#: Shapes `draw_scene` can also draw (the VAE sees them; the diffusion model does not).
EXTRA_SHAPES = ("star", "diamond", "ring")


@dataclass(frozen=True)
class Scene:
    """What one picture shows; `caption` is the pretraining template."""

    shape: str
    colour: str
    background: str

    @property
    def caption(self) -> str:
        return caption(self.colour, self.shape, self.background)


def caption(colour: str, shape: str, background: str) -> str:
    """The caption template: ``a red circle on a white background``."""
    return f"a {colour} {shape} on a {background} background"


def all_scenes(shapes: tuple[str, ...] = SHAPES) -> list[Scene]:
    """Every shape x colour x background combination."""
    return [Scene(s, c, b) for s in shapes for c in COLOURS for b in BACKGROUNDS]


def star_points(cx: float, cy: float, radius: float, inner: float = 0.45) -> list[tuple[float, float]]:
    """The 10 corners of a five-pointed star pointing up."""
    points = []
    for k in range(10):
        r = radius if k % 2 == 0 else radius * inner
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_scene(scene: Scene, rng: random.Random | None = None, size: int = SIZE) -> Any:
    """A PIL image of `scene`: the shape at a random size and place (`rng`), else centred at 5/8 of the side."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), BACKGROUNDS[scene.background])
    pen = ImageDraw.Draw(image)
    colour = COLOURS[scene.colour]
    if rng is None:
        side, cx, cy = size * 5 / 8, size / 2, size / 2
    else:
        side = size * rng.uniform(0.45, 0.7)
        slack = (size - side) / 2 - size / 16
        cx = size / 2 + rng.uniform(-slack, slack)
        cy = size / 2 + rng.uniform(-slack, slack)
    half = side / 2
    box = (cx - half, cy - half, cx + half, cy + half)
    if scene.shape == "circle":
        pen.ellipse(box, fill=colour)
    elif scene.shape == "square":
        pen.rectangle(box, fill=colour)
    elif scene.shape == "triangle":
        pen.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    elif scene.shape == "star":
        pen.polygon(star_points(cx, cy + half * 0.1, half * 1.05), fill=colour)
    elif scene.shape == "diamond":
        pen.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], fill=colour)
    elif scene.shape == "ring":
        pen.ellipse(box, outline=colour, width=max(3, round(side / 6)))
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image


def random_scene(rng: random.Random, shapes: tuple[str, ...] = SHAPES) -> Scene:
    """A random scene (uniform over shapes, colours and backgrounds)."""
    return Scene(rng.choice(shapes), rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS)))


# --- the pixel check --------------------------------------------------------------------------------------

#: A shape whose pixels cover less than this share of their convex hull may be a star (convex shapes ~1)...
STAR_SOLIDITY = 0.75
#: ... if its outline's radius (seen from its centroid) swings five times around the shape: the 5th harmonic of
#: the radius over the angle is the strongest of the 2nd-8th and at least this share of the mean radius (a
#: drawn star: about 0.3; a circle, square or triangle: under 0.05; a ragged blob: no clear 5-fold swing).
STAR_HARMONIC = 0.15
#: Fewer shape pixels than this (of 64x64) and there is no shape.
MIN_PIXELS = 40


@dataclass(frozen=True)
class Reading:
    """What `read_scene` found: names (or "none"), plus the measures the shape was told by."""

    background: str
    colour: str
    shape: str
    fill: float = 0.0
    solidity: float = 0.0
    points: float = 0.0

    def matches(self, scene: Scene) -> bool:
        return (self.background, self.colour, self.shape) == (scene.background, scene.colour, scene.shape)


def _nearest(pixels: Any, palette: dict[str, tuple[int, int, int]]) -> tuple[Any, Any]:
    """(index of the nearest palette colour, its distance) per pixel."""
    import numpy as np

    colours = np.asarray(list(palette.values()), dtype=np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - colours, axis=-1)
    return distance.argmin(-1), distance.min(-1)


def read_scene(image: Any) -> Reading:
    """Background (the border's colour), shape colour (the most common shape colour among the pixels that
    differ from the background) and shape (fill of the bounding box; solidity for a star) of a picture."""
    import numpy as np

    pixels = np.asarray(image.convert("RGB").resize((SIZE, SIZE)), dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3)])
    border = np.concatenate([border, pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    bg_index, _ = _nearest(np.median(border, axis=0), BACKGROUNDS)
    background = list(BACKGROUNDS)[int(bg_index)]
    bg_colour = np.asarray(BACKGROUNDS[background], dtype=np.float32)
    colour_index, colour_distance = _nearest(pixels, COLOURS)
    foreground = colour_distance < np.linalg.norm(pixels - bg_colour, axis=-1)
    if foreground.sum() < MIN_PIXELS:
        return Reading(background, "none", "none")
    counts = np.bincount(colour_index[foreground], minlength=len(COLOURS))
    colour = list(COLOURS)[int(counts.argmax())]
    mask = foreground & (colour_index == counts.argmax())
    if mask.sum() < MIN_PIXELS:
        return Reading(background, colour, "none")
    fill, solidity = _fill_and_solidity(mask)
    points = five_point_swing(mask)
    return Reading(background, colour, shape_of(fill, solidity, points), fill, solidity, points)


def shape_of(fill: float, solidity: float, points: float) -> str:
    """The shape told by its bounding-box fill, its solidity (area / convex-hull area) and its five-point
    swing (`five_point_swing`; 0 when another harmonic is stronger)."""
    if solidity < STAR_SOLIDITY:
        return "star" if points >= STAR_HARMONIC else "none"
    if fill > 0.88:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def five_point_swing(mask: Any, bins: int = 40) -> float:
    """The 5th harmonic of the outline's radius over the angle around the centroid, relative to the mean
    radius; 0 if a harmonic from the 2nd to the 8th is stronger (a star's points make the 5th stand out)."""
    import numpy as np

    rows, cols = np.nonzero(mask)
    cy, cx = rows.mean(), cols.mean()
    angle = np.arctan2(rows - cy, cols - cx)
    radius = np.hypot(rows - cy, cols - cx)
    index = ((angle + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    outline = np.zeros(bins)
    np.maximum.at(outline, index, radius)
    empty = outline == 0
    if empty.mean() > 0.25:  # many angles without a pixel: not one solid shape around its centroid
        return 0.0
    if empty.any():  # a thin angle between pixels (a small shape's inner corners): the neighbours' mean
        outline[empty] = ((np.roll(outline, 1) + np.roll(outline, -1)) / 2)[empty]
    spectrum = np.abs(np.fft.rfft(outline)) / bins
    mean = spectrum[0]
    harmonics = spectrum[2:9]
    if mean <= 0 or harmonics.argmax() != 5 - 2:
        return 0.0
    return float(2 * spectrum[5] / mean)


def _fill_and_solidity(mask: Any) -> tuple[float, float]:
    import numpy as np

    rows, cols = np.nonzero(mask)
    area = float(mask.sum())
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    corners = []
    for row in np.unique(rows):
        in_row = cols[rows == row]
        for col in (in_row.min(), in_row.max() + 1):
            corners += [(float(col), float(row)), (float(col), float(row) + 1)]
    return area / box, area / max(_hull_area(corners), 1.0)


def _hull_area(points: list[tuple[float, float]]) -> float:
    """Area of the convex hull of `points` (monotone chain, then the shoelace formula)."""
    points = sorted(set(points))
    if len(points) < 3:
        return 0.0

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    upper: list[tuple[float, float]] = []
    for p in points:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(points):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    hull = lower[:-1] + upper[:-1]
    return 0.5 * abs(sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(hull, hull[1:] + hull[:1], strict=True)))
