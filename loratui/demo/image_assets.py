"""The demo's image dataset: simple coloured shapes drawn with Pillow at run time (deterministic).

Written as a kohya-style folder (`5_shapes/`: 5 repeats per epoch) with one `.txt` caption per image,
each caption starting with the trigger word.
"""

from __future__ import annotations

from pathlib import Path

TRIGGER = "lrtshape"
COLOURS = {
    "red": (214, 48, 49),
    "orange": (230, 126, 34),
    "yellow": (241, 196, 15),
    "green": (39, 174, 96),
    "teal": (22, 160, 133),
    "blue": (41, 128, 185),
    "purple": (142, 68, 173),
    "black": (44, 62, 80),
}
SHAPES = ("circle", "square", "triangle", "diamond", "ring", "stripes", "checkerboard", "cross")


def draw(shape: str, colour: tuple[int, int, int], size: tuple[int, int] = (128, 128)):
    """One picture: a shape in `colour` on an off-white background."""
    from PIL import Image, ImageDraw

    width, height = size
    image = Image.new("RGB", size, (246, 241, 232))
    pen = ImageDraw.Draw(image)
    box = (width // 5, height // 5, width - width // 5, height - height // 5)
    cx, cy = width // 2, height // 2
    if shape == "circle":
        pen.ellipse(box, fill=colour)
    elif shape == "square":
        pen.rectangle(box, fill=colour)
    elif shape == "triangle":
        pen.polygon([(cx, box[1]), (box[0], box[3]), (box[2], box[3])], fill=colour)
    elif shape == "diamond":
        pen.polygon([(cx, box[1]), (box[2], cy), (cx, box[3]), (box[0], cy)], fill=colour)
    elif shape == "ring":
        pen.ellipse(box, outline=colour, width=max(4, width // 12))
    elif shape == "stripes":
        step = max(8, width // 8)
        for x in range(0, width, step):
            pen.rectangle((x, 0, x + step // 2 - 1, height), fill=colour)
    elif shape == "checkerboard":
        step = max(8, width // 8)
        for y in range(0, height, step):
            for x in range(0, width, step):
                if (x // step + y // step) % 2 == 0:
                    pen.rectangle((x, y, x + step - 1, y + step - 1), fill=colour)
    else:  # cross
        bar = max(6, width // 8)
        pen.rectangle((cx - bar, box[1], cx + bar, box[3]), fill=colour)
        pen.rectangle((box[0], cy - bar, box[2], cy + bar), fill=colour)
    return image


def write_dataset(root: Path, *, repeats: int = 5, size: tuple[int, int] = (128, 128)) -> Path:
    """Write 8 shape images + captions into `root/<repeats>_shapes/`; returns `root`."""
    folder = root / f"{repeats}_shapes"
    folder.mkdir(parents=True, exist_ok=True)
    for number, (shape, colour_name) in enumerate(zip(SHAPES, COLOURS, strict=True)):
        stem = f"{number:02d}_{colour_name}_{shape}"
        draw(shape, COLOURS[colour_name], size).save(folder / f"{stem}.png")
        caption = f"{TRIGGER}, a {colour_name} {shape}, flat colours, plain background"
        (folder / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
    return root
