"""The shipped tiny pretrained image model (`shapes-sd`) and the pixel check its samples are judged by."""

from __future__ import annotations

import random

import pytest
import torch

from loratui.tiny_models.pretrain.image import shipped_model_path
from loratui.tiny_models.pretrain.scenes import (
    SHAPES,
    Scene,
    all_scenes,
    draw_scene,
    random_scene,
    read_scene,
)

#: Three fixed prompts, each sampled with SEEDS; at least MIN_RIGHT of the samples must pass the pixel check
#: (background, shape colour and shape as captioned). Chance is about 1/36 per sample.
PROMPTS = (
    Scene("circle", "red", "white"),
    Scene("square", "blue", "black"),
    Scene("triangle", "yellow", "gray"),
)
SEEDS = (0, 1)
MIN_RIGHT = 4


def test_pixel_check_reads_every_drawn_scene():
    rng = random.Random(3)
    scenes = [random_scene(rng, (*SHAPES, "star")) for _ in range(150)] + all_scenes()
    for scene in scenes:
        assert read_scene(draw_scene(scene, rng)).matches(scene), scene


def test_star_detector_needs_five_points():
    """Stars have a strong 5-fold swing of their outline's radius; rings, ragged or hollow shapes do not."""
    from PIL import Image, ImageDraw

    rng = random.Random(5)
    for shape in ("star", "circle", "square", "triangle", "diamond", "ring"):
        for _ in range(10):
            reading = read_scene(draw_scene(random_scene(rng, (shape,)), rng))
            assert (reading.shape == "star") == (shape == "star"), (shape, reading)
    blob = Image.new("RGB", (64, 64), (245, 245, 245))  # a ragged blob with low solidity: not a star
    ImageDraw.Draw(blob).polygon([(10, 10), (50, 14), (30, 30), (54, 50), (12, 52)], fill=(220, 40, 40))
    reading = read_scene(blob)
    assert reading.solidity < 0.75 and reading.shape == "none", reading


def test_pixel_check_finds_no_shape_in_a_plain_picture():
    from PIL import Image

    reading = read_scene(Image.new("RGB", (64, 64), (128, 128, 128)))
    assert (reading.background, reading.shape) == ("gray", "none")


def test_shipped_model_folder_is_small_and_states_its_licence():
    folder = shipped_model_path()
    weights = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    assert 0 < weights <= 7 * 1024 * 1024
    assert not list(folder.rglob("*.bin")) and not list(folder.rglob("*.pt"))
    label = (folder / "LORATUI_TINY_MODEL.txt").read_text("utf-8")
    assert "Apache-2.0" in label and "python -m loratui.tiny_models.pretrain image" in label


def test_shipped_model_draws_what_the_caption_says():
    from loratui.sample.sd_sample import load_pipeline

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe, loaded = load_pipeline(str(shipped_model_path()))  # the path `loratui sample` takes
        assert loaded.family == "sd15"
        texts = [scene.caption for scene in PROMPTS for _ in SEEDS]
        generators = [torch.Generator("cpu").manual_seed(seed) for _ in PROMPTS for seed in SEEDS]
        images = pipe(
            texts, num_inference_steps=20, guidance_scale=4.0, width=64, height=64, generator=generators
        ).images
    finally:
        torch.set_num_threads(before)
    readings = [read_scene(image) for image in images]
    scenes = [scene for scene in PROMPTS for _ in SEEDS]
    right = sum(reading.matches(scene) for reading, scene in zip(readings, scenes, strict=True))
    assert right >= MIN_RIGHT, list(zip(scenes, readings, strict=True))


@pytest.mark.parametrize("width", [64, 128])
def test_shipped_model_renders_other_sizes(width):
    """The VAE's 4x scale: 64 px -> 16x16 latents; larger sizes work too."""
    from loratui.sample.sd_sample import generate, load_pipeline

    pipe, _ = load_pipeline(str(shipped_model_path()))
    image = generate(pipe, "a red circle on a white background", steps=2, width=width, height=width)
    assert image.size == (width, width)
