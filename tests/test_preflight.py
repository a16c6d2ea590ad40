"""The dataset check before a worker starts: a typed result the CLI prints, and no silent pass on failure."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.cli.launch import launch_training, print_preflight
from loratui.config import load_config
from loratui.train.process.preflight import run_preflight


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: object = "", **_: object) -> None:
        self.lines.append(str(text))


def _config(tmp_path, *, missing_caption: bool):
    data = tmp_path / "data"
    data.mkdir()
    for name, color in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 64), color).save(data / name)
        if not (missing_caption and name == "b.png"):
            (data / name).with_suffix(".txt").write_text(f"a {color} square", encoding="utf-8")
    path = tmp_path / "c.yaml"
    path.write_text(
        f"train_data_dir: {data}\nresolution: 64\ntask_type: image\nruns_dir: {tmp_path / 'runs'}\n"
    )
    return load_config(path)


def test_a_clean_dataset_passes_and_prints_nothing(tmp_path) -> None:
    result = run_preflight(_config(tmp_path, missing_caption=False))
    assert result.ok and result.errors == [] and not result.blocked(skip_checks=False)
    out = Lines()
    print_preflight(result, skip_checks=False, out=out)
    assert out.lines == []


def test_errors_block_unless_skipped_and_are_printed_with_examples(tmp_path) -> None:
    result = run_preflight(_config(tmp_path, missing_caption=True))
    assert not result.ok and all(f.severity == "error" for f in result.errors)
    assert result.blocked(skip_checks=False) and not result.blocked(skip_checks=True)
    out = Lines()
    print_preflight(result, skip_checks=False, out=out)
    assert out.lines[0] == f"dataset check found {len(result.errors)} error(s); not training:"
    assert any("b.png" in line for line in out.lines)
    assert out.lines[-1] == "run `loratui check PATH` for the full report, or pass --skip-checks"
    skipped = Lines()
    print_preflight(result, skip_checks=True, out=skipped)
    assert (
        "continuing anyway (--skip-checks)" in skipped.lines[0] and "--skip-checks" not in skipped.lines[-1]
    )


def test_launch_stops_before_the_run_directory_when_blocked(tmp_path) -> None:
    resolved = _config(tmp_path, missing_caption=True)
    out = Lines()
    code = launch_training(
        resolved, resume=None, skip_checks=False, overwrite=False, detach=True, tui=False, out=out
    )
    assert code == 1 and not (tmp_path / "runs").exists()


def test_a_check_that_fails_to_import_fails_loudly(tmp_path, monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise ImportError("cannot import name 'imagehash' from 'loratui.data.perceptual_hash'")

    monkeypatch.setattr("loratui.train.process.preflight.run_checks", broken)
    resolved = _config(tmp_path, missing_caption=False)
    with pytest.raises(ImportError, match="imagehash"):
        run_preflight(resolved)
    with pytest.raises(ImportError, match="imagehash"):
        launch_training(
            resolved, resume=None, skip_checks=True, overwrite=False, detach=True, tui=False, out=Lines()
        )
    assert not (tmp_path / "runs").exists()


def test_the_train_command_does_not_start_when_the_check_cannot_run(tmp_path, monkeypatch) -> None:
    def broken(*_args, **_kwargs):
        raise ImportError("No module named 'PIL._imaging'")

    monkeypatch.setattr("loratui.train.process.preflight.run_checks", broken)
    _config(tmp_path, missing_caption=False)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    result = CliRunner().invoke(
        app, ["train", "--config", str(tmp_path / "c.yaml"), "--base-model", str(model), "--no-tui"]
    )
    assert isinstance(result.exception, ImportError) and "PIL._imaging" in str(result.exception)
    assert result.exit_code != 0 and not (tmp_path / "runs").exists()


def test_a_check_module_that_cannot_be_imported_is_not_skipped(monkeypatch) -> None:
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "loratui.data.check", None)  # importing it raises ImportError
    monkeypatch.delitem(sys.modules, "loratui.train.process.preflight")
    with pytest.raises(ImportError, match=r"loratui\.data\.check"):
        importlib.import_module("loratui.train.process.preflight")
