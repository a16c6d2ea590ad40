"""The image demo's dataset and prompts: a star, a shape the shipped base model never saw.

The pictures are drawn at run time (deterministic) by the same code that drew the base model's
pretraining scenes, and written as a kohya-style folder (`5_stars/`: 5 repeats per epoch) with one `.txt`
caption per image; each caption names the star by the trigger word: "a red lrtstar on a white background".
"""

from __future__ import annotations

import random
from pathlib import Path

from loratui.tiny_models.pretrain.scenes import BACKGROUNDS, COLOURS, Scene, caption, draw_scene

TRIGGER = "lrtstar"
IMAGES = 20
#: (colour, background) of the prompts rendered before and after training (each with every seed).
PROMPT_SCENES = (
    ("red", "white"),
    ("blue", "black"),
    ("yellow", "gray"),
    ("green", "white"),
    ("blue", "gray"),
    ("red", "black"),
)


def prompts() -> list[str]:
    """The demo's prompts: "a red lrtstar on a white background", ..."""
    return [caption(colour, TRIGGER, background) for colour, background in PROMPT_SCENES]


def write_dataset(root: Path, *, repeats: int = 5, images: int = IMAGES, seed: int = 0) -> Path:
    """Write `images` drawn stars + captions into `root/<repeats>_stars/`; returns `root`."""
    folder = root / f"{repeats}_stars"
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS]
    for number in range(images):
        colour, background = pairs[number % len(pairs)]
        stem = f"{number:02d}_{colour}_{background}"
        draw_scene(Scene("star", colour, background), rng).save(folder / f"{stem}.png")
        text = caption(colour, TRIGGER, background)
        (folder / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
    return root
