"""The SD trainer's view of an image dataset: repeats, buckets, crops, captions, and bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sd_helpers import draw_shape, make_image_dataset

from loratui.config import load_config
from loratui.train.sd.dataset import (
    DatasetError,
    choose_bucket,
    load_dataset,
    make_buckets,
    process_caption,
    resized_size,
)


def _cfg(data: Path, **values):
    flags = {
        "base_model": "model.safetensors",
        "train_data_dir": str(data),
        "resolution": 64,
        "seed": 3,
        **values,
    }
    return load_config(flags=flags).config


def test_kohya_repeats_expand_the_epoch(tmp_path):
    make_image_dataset(tmp_path / "data", 3, metadata=False, subfolder="10_mychar")
    make_image_dataset(tmp_path / "data", 2, metadata=False, subfolder="2_style")
    dataset = load_dataset(_cfg(tmp_path / "data"))
    assert dataset.num_images == 5 and len(dataset) == 3 * 10 + 2 * 2
    assert dataset.dataset_dirs() == {
        "10_mychar": {"n_repeats": 10, "img_count": 3},
        "2_style": {"n_repeats": 2, "img_count": 2},
    }
    assert dataset.tag_frequency()["10_mychar"]["flat colour"] == 3
    # repeats of one image are different samples: their randomness differs
    views = [dataset.view(i, 0) for i in range(len(dataset)) if dataset.sample_records[i] == 0]
    assert len(views) == 10 and len({v.index for v in views}) == 10


def test_buckets_and_no_upscale():
    buckets = make_buckets(512)
    assert (512, 512) in buckets and (384, 640) in buckets and (640, 384) in buckets
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert choose_bucket((1200, 800), buckets, 512, no_upscale=True) == (640, 384)
    assert choose_bucket((800, 1200), buckets, 512, no_upscale=False) == (384, 640)
    assert choose_bucket((300, 200), buckets, 512, no_upscale=True) == (256, 192)  # never enlarged
    assert choose_bucket((300, 200), buckets, 512, no_upscale=False) == (640, 384)
    assert resized_size((1200, 800), (640, 384)) == (640, 427)
    assert resized_size((1000, 800), (512, 512)) == (640, 512)


def test_bucketed_dataset_crops_flips_and_pixels(tmp_path):
    make_image_dataset(tmp_path / "data", 4, sizes=[(256, 128), (128, 256), (200, 200), (100, 60)])
    dataset = load_dataset(_cfg(tmp_path / "data", resolution=128, bucket=True, flip_aug=True))
    buckets = {r.rel: r.bucket for r in dataset.records}
    assert (
        buckets["img00.png"][0] > buckets["img00.png"][1]
        and buckets["img01.png"][0] < buckets["img01.png"][1]
    )
    assert buckets["img03.png"] == (64, 64)  # smaller than 128^2: not upscaled
    flips = [dataset.view(i, e).flip for e in range(4) for i in range(4)]
    assert any(flips) and not all(flips)
    for index in range(4):
        view = dataset.view(index, 0)
        pixels = dataset.pixels(view)
        assert tuple(pixels.shape) == (3, view.bucket[1], view.bucket[0])
        assert pixels.min() >= -1 and pixels.max() <= 1
    view = dataset.view(0, 0)
    assert dataset.view(0, 0) == view  # deterministic
    from dataclasses import replace

    mirrored = dataset.pixels(replace(view, flip=not view.flip))
    assert torch.equal(mirrored, dataset.pixels(view).flip(-1))
    assert len({v.cache_key for v in dataset.views_for_caching()}) == 8  # 4 images x (flipped, not flipped)


def test_caption_processing_is_deterministic_per_sample():
    text = "mychar, red hair, smiling, outdoors, night"
    assert (
        process_caption(
            "red hair",
            trigger_word="mychar",
            shuffle_tags=False,
            keep_tokens=0,
            caption_dropout=0,
            seed=1,
            epoch=0,
            index=0,
        )
        == "mychar, red hair"
    )
    assert (
        process_caption(
            text,
            trigger_word="MyChar",
            shuffle_tags=False,
            keep_tokens=0,
            caption_dropout=0,
            seed=1,
            epoch=0,
            index=0,
        )
        == text
    )
    shuffled = {
        process_caption(
            text,
            trigger_word=None,
            shuffle_tags=True,
            keep_tokens=1,
            caption_dropout=0,
            seed=1,
            epoch=e,
            index=0,
        )
        for e in range(12)
    }
    assert len(shuffled) > 1 and all(s.startswith("mychar, ") for s in shuffled)
    assert all(sorted(s.split(", ")) == sorted(text.split(", ")) for s in shuffled)
    again = process_caption(
        text, trigger_word=None, shuffle_tags=True, keep_tokens=1, caption_dropout=0, seed=1, epoch=3, index=0
    )
    assert again == process_caption(
        text, trigger_word=None, shuffle_tags=True, keep_tokens=1, caption_dropout=0, seed=1, epoch=3, index=0
    )
    dropped = [
        process_caption(
            text,
            trigger_word=None,
            shuffle_tags=False,
            keep_tokens=0,
            caption_dropout=0.5,
            seed=1,
            epoch=0,
            index=i,
        )
        for i in range(200)
    ]
    assert 60 < dropped.count("") < 140


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="No supported images"):
        load_dataset(_cfg(tmp_path / "empty"))


def test_images_without_captions_are_listed(tmp_path):
    data = make_image_dataset(tmp_path / "data", 3, metadata=False)
    (data / "img01.txt").unlink()
    draw_shape("circle", (1, 2, 3)).save(data / "extra.png")
    with pytest.raises(DatasetError) as info:
        load_dataset(_cfg(data))
    message = str(info.value)
    assert "without a caption" in message and "img01.png" in message and "extra.png" in message
    assert "img00.png" not in message


def test_wrong_caption_extension_is_explained(tmp_path):
    data = make_image_dataset(tmp_path / "data", 2, metadata=False)
    for txt in data.glob("*.txt"):
        txt.rename(txt.with_suffix(".caption"))
    with pytest.raises(DatasetError, match="caption_extension"):
        load_dataset(_cfg(data))
    assert load_dataset(_cfg(data, caption_extension=".caption")).num_images == 2


def test_captions_without_images_are_warned_about(tmp_path):
    data = make_image_dataset(tmp_path / "data", 2, metadata=False)
    (data / "ghost.txt").write_text("a ghost", encoding="utf-8")
    warnings: list[str] = []
    dataset = load_dataset(_cfg(data), warn=warnings.append)
    assert dataset.num_images == 2
    assert any("ghost.txt" in w for w in warnings)


def test_metadata_errors_have_line_numbers(tmp_path):
    data = make_image_dataset(tmp_path / "data", 3)
    (data / "metadata.csv").write_text("file,caption\nimg00.png,a\n", encoding="utf-8")
    with pytest.raises(DatasetError, match=r"metadata.csv:1"):
        load_dataset(_cfg(data))
    (data / "metadata.csv").write_text(
        'filename,prompt\nimg00.png,"a circle\nimg01.png,a square\nimg02.png,a, b\n', encoding="utf-8"
    )
    with pytest.raises(DatasetError) as info:
        load_dataset(_cfg(data))
    assert "metadata.csv:2" in str(info.value)


def test_corrupt_images_are_skipped_or_stop_training(tmp_path):
    data = make_image_dataset(tmp_path / "data", 12, metadata=False)
    (data / "img03.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    warnings: list[str] = []
    dataset = load_dataset(_cfg(data), warn=warnings.append)
    assert dataset.num_images == 11
    assert any("img03.png" in w and "unreadable" in w for w in warnings)
    (data / "img04.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="2 of 12 images cannot be read"):
        load_dataset(_cfg(data))
