"""Keys that do nothing for the run's task type are reported (config file, --set, flags, preset), never
dropped silently; defaults and values equal to the default are not."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import FIELD_NAMES, load_config
from loratui.config.task_keys import IMAGE_ONLY, TEXT_ONLY, ignored_settings


def _write(tmp_path: Path, text: str) -> Path:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"")
    path = tmp_path / "c.yaml"
    path.write_text(f"base_model: {model}\ntrain_data_dir: {data}\n{text}", encoding="utf-8")
    return path


def test_image_run_reports_llm_keys_with_where_they_were_set(tmp_path: Path) -> None:
    config = _write(tmp_path, "task_type: image-generation\npacking: true\nchunked_loss: false\n")
    resolved = load_config(config, overrides=["load_in_4bit=true"], flags={"max_seq_len": 512})
    found = {item.key: item for item in ignored_settings(resolved)}
    assert list(found) == ["max_seq_len", "load_in_4bit", "packing", "chunked_loss"]  # schema order
    assert (
        found["packing"].source == f"config {config}:4"
        and found["chunked_loss"].source == f"config {config}:5"
    )
    assert found["load_in_4bit"].source == "--set" and found["max_seq_len"].source == "flag"
    message = found["packing"].message()
    assert message.startswith(f"`packing` (config {config}:4) does nothing for image runs: ")
    assert message.endswith("; remove it") and "\n" not in message


def test_text_run_reports_image_keys(tmp_path: Path) -> None:
    config = _write(
        tmp_path, "task_type: text-generation\nresolution: 768\ntrigger_word: zxc\ncache_latents: true\n"
    )
    found = ignored_settings(load_config(config))
    assert [item.key for item in found] == ["resolution", "trigger_word", "cache_latents"]
    assert all("text runs" in item.message() for item in found)


def test_defaults_inferred_keys_and_used_keys_are_not_reported(tmp_path: Path) -> None:
    config = _write(tmp_path, "task_type: image-generation\npacking: false\nresolution: 768\nlora_rank: 4\n")
    assert ignored_settings(load_config(config)) == []  # packing false is the default; the rest are read
    text = _write(tmp_path, "task_type: text-generation\nmax_seq_len: 256\nval_split: 0.2\n")
    assert ignored_settings(load_config(text)) == []
    # the 12gb preset's sd15 section sets load_in_4bit: false (the default): nothing to report
    preset = _write(tmp_path, "task_type: image-generation\n")
    assert ignored_settings(load_config(preset, preset="12gb")) == []


def test_every_task_only_key_is_a_config_key_of_one_task() -> None:
    assert set(TEXT_ONLY) <= set(FIELD_NAMES) and set(IMAGE_ONLY) <= set(FIELD_NAMES)
    assert not set(TEXT_ONLY) & set(IMAGE_ONLY)
    assert all(reason and "\n" not in reason for reason in [*TEXT_ONLY.values(), *IMAGE_ONLY.values()])


def test_dry_run_shows_the_warnings_in_text_and_json(tmp_path: Path) -> None:
    config = _write(tmp_path, "task_type: image-generation\npacking: true\n")
    runner = CliRunner()
    text = runner.invoke(app, ["train", "--config", str(config), "--dry-run"], env={"COLUMNS": "200"})
    assert text.exit_code == 0, text.output
    assert f"warning: `packing` (config {config}:4) does nothing for image runs" in text.output
    data = runner.invoke(
        app, ["train", "--config", str(config), "--set", "chunked_loss=false", "--dry-run", "--json"]
    )
    payload = json.loads(data.output)
    assert [(i["key"], i["source"]) for i in payload["ignored"]] == [
        ("packing", f"config {config}:4"),
        ("chunked_loss", "--set"),
    ]
    clean = runner.invoke(
        app, ["train", "--config", str(_write(tmp_path, "lora_rank: 4\n")), "--dry-run", "--json"]
    )
    assert json.loads(clean.output)["ignored"] == []


def test_train_warns_before_the_worker_starts(tmp_path: Path, monkeypatch) -> None:
    config = _write(tmp_path, "task_type: image-generation\nload_in_4bit: true\n")
    started: list[str] = []

    def fake_launch(resolved, *, out, **_):
        started.append(resolved.config.task_type)
        out.print("worker started")
        return 0

    monkeypatch.setattr("loratui.cli.launch.launch_training", fake_launch)
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-tui"], env={"NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    assert started == ["image-generation"]
    lines = result.output.splitlines()
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: `load_in_4bit`"))
    assert warning < lines.index("worker started")
