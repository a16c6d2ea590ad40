"""`--skip-checks` reaches the worker: the SD loader refuses datasets with errors unless allowed."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from loratui.config import load_config
from loratui.train.process.launch import prepare_run
from loratui.train.sd.dataset import DatasetError, load_dataset


def _dataset_with_missing_caption(root):
    root.mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 64), color).save(root / name)
    (root / "a.txt").write_text("a red square", encoding="utf-8")  # b.png has no caption: an error


def test_errors_refused_by_default_and_skipped_when_allowed(tmp_path) -> None:
    data = tmp_path / "data"
    _dataset_with_missing_caption(data)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"train_data_dir: {data}\nresolution: 64\ntask_type: image\n")
    cfg = load_config(cfg_path).config
    with pytest.raises(DatasetError, match="cannot be trained on"):
        load_dataset(cfg)
    warnings: list[str] = []
    dataset = load_dataset(cfg, warn=warnings.append, allow_errors=True)
    assert len(dataset.records) == 2
    assert any("b.png" in w for w in warnings)


def test_skip_checks_is_written_for_the_worker(tmp_path) -> None:
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(f"train_data_dir: {tmp_path}\nruns_dir: {tmp_path / 'runs'}\ntask_type: image\n")
    run, _ = prepare_run(load_config(cfg_path), resume=None, overwrite=False, skip_checks=True)
    assert json.loads((run.path / "launch.json").read_text())["skip_checks"] is True
