"""Damaged checkpoints: a manifest written last, checked before use; `--resume latest` (or a run directory) falls
back to the newest intact checkpoint and says what it skipped; a damaged checkpoint given explicitly is a
one-line error naming the intact one; an export needs only intact weights; leftover temporary folders go."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from llm_helpers import single_thread, write_llm_yaml
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import load_config
from loratui.runs.checkpoints import (
    MANIFEST,
    DamagedCheckpoint,
    checkpoint_problems,
    damaged_newer,
    load_checkpoint,
    resolve_resume,
    write_checkpoint,
)
from loratui.runs.rundir import RunDir, create_run_dir

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _fake_run(tmp_path: Path, steps=(2, 4)) -> RunDir:
    run = create_run_dir(tmp_path / "runs", "demo")
    run.status_path.write_text(json.dumps({"state": "stopped", "started_at": 1.0}), encoding="utf-8")
    for step in steps:
        write_checkpoint(
            run,
            step,
            lora_state={"a.lora_A.weight": torch.full((2, 3), float(step))},
            training_state={"optimizer": {"state": {}, "param_groups": []}, "rng": {"torch": torch.ones(4)}},
            meta={"family": "llm"},
            config_yaml="name: demo\n",
        )
    return run


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_manifest_is_written_and_intact_checkpoints_pass(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    manifest = json.loads((run.checkpoints_dir / "step-4" / MANIFEST).read_text())
    assert set(manifest["files"]) == {"meta.json", "lora.safetensors", "training_state.pt", "config.yaml"}
    assert checkpoint_problems(run.checkpoints_dir / "step-4") == []
    assert resolve_resume("latest", tmp_path / "runs", "demo") == (run, run.checkpoints_dir / "step-4")


@pytest.mark.parametrize("damage", ["truncated_state", "missing_lora", "changed_lora"])
def test_latest_skips_a_damaged_newest_checkpoint(tmp_path: Path, damage: str) -> None:
    run = _fake_run(tmp_path)
    newest = run.checkpoints_dir / "step-4"
    if damage == "truncated_state":
        _truncate(newest / "training_state.pt")
    elif damage == "missing_lora":
        (newest / "lora.safetensors").unlink()
    else:
        data = bytearray((newest / "lora.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (newest / "lora.safetensors").write_bytes(bytes(data))
    for spec in ("latest", str(run.path)):
        assert resolve_resume(spec, tmp_path / "runs", "demo") == (run, run.checkpoints_dir / "step-2")
    (skipped,) = damaged_newer(run.checkpoints_dir / "step-2")
    assert skipped.startswith(f"skipped damaged checkpoint {newest}: ")
    with pytest.raises(DamagedCheckpoint) as caught:
        resolve_resume(str(newest), tmp_path / "runs")
    message = str(caught.value)
    assert "\n" not in message and f"checkpoint {newest} is damaged" in message
    assert f"--resume {run.checkpoints_dir / 'step-2'}" in message


def test_old_checkpoints_without_manifest_are_checked_as_far_as_possible(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    for step in (2, 4):
        (run.checkpoints_dir / f"step-{step}" / MANIFEST).unlink()
    assert checkpoint_problems(run.checkpoints_dir / "step-2") == []
    _truncate(run.checkpoints_dir / "step-4" / "training_state.pt")
    (problem,) = checkpoint_problems(run.checkpoints_dir / "step-4")
    assert "training_state.pt is not a complete archive" in problem
    assert checkpoint_problems(run.checkpoints_dir / "step-4", state=False) == []  # the weights are fine
    _truncate(run.checkpoints_dir / "step-4" / "lora.safetensors")
    assert "lora.safetensors" in checkpoint_problems(run.checkpoints_dir / "step-4", state=False)[0]
    assert resolve_resume("latest", tmp_path / "runs", "demo")[1] == run.checkpoints_dir / "step-2"


def test_weights_only_load_ignores_a_damaged_optimizer_state(tmp_path: Path) -> None:
    run = _fake_run(tmp_path)
    newest = run.checkpoints_dir / "step-4"
    _truncate(newest / "training_state.pt")
    ckpt = load_checkpoint(newest, training_state=False)
    assert float(ckpt.lora_state["a.lora_A.weight"][0, 0]) == 4.0
    with pytest.raises(DamagedCheckpoint, match="training_state.pt is .* bytes"):
        load_checkpoint(newest)


def test_leftover_temporary_folders_are_cleaned_at_the_next_checkpoint(tmp_path: Path) -> None:
    run = _fake_run(tmp_path, steps=(2,))
    leftover = run.checkpoints_dir / ".step-4.k2j3h4.tmp"
    leftover.mkdir()
    (leftover / "lora.safetensors").write_bytes(b"partial")
    stale_old = run.checkpoints_dir / ".step-2.old"  # step-2 exists: a stale copy
    stale_old.mkdir()
    moved_aside = run.checkpoints_dir / ".step-3.old"  # a crash between the two renames: the only copy
    moved_aside.mkdir()
    (moved_aside / "meta.json").write_text('{"step": 3}', encoding="utf-8")
    _fake_run_write(run, 6)
    names = sorted(p.name for p in run.checkpoints_dir.iterdir())
    assert names == ["step-2", "step-3", "step-6"]


def _fake_run_write(run: RunDir, step: int) -> None:
    write_checkpoint(
        run,
        step,
        lora_state={"a.lora_A.weight": torch.zeros(2, 3)},
        training_state={"rng": {}},
        meta={},
        config_yaml="",
    )


# --- a real run: resume latest through the CLI, and export --------------------------------------------------


def _llm_config(tmp_path: Path, base: Path) -> Path:
    return write_llm_yaml(tmp_path, base, max_steps=3, save_steps=1)


def _train_in_process(config: Path) -> RunDir:
    from loratui.train.process import worker
    from loratui.train.process.launch import prepare_run, release_locks

    run, _ = prepare_run(load_config(config), resume=None, overwrite=False)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert worker.main([str(run.path)]) == 0
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        release_locks(run)  # as the supervisor does when its run ends
    return run


def test_resume_latest_through_the_cli_skips_a_truncated_newest_checkpoint(
    tmp_path: Path, tiny_llama: Path
) -> None:
    config = _llm_config(tmp_path, tiny_llama)
    run = _train_in_process(config)
    newest = run.checkpoints_dir / "step-3"
    _truncate(newest / "training_state.pt")
    (run.checkpoints_dir / ".step-9.x1y2.tmp").mkdir()  # a write interrupted by a crash
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "-c", str(config), "--resume", "latest", "--no-tui"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert f"warning: skipped damaged checkpoint {newest}: training_state.pt is" in out
    assert f"resuming from {run.checkpoints_dir / 'step-2'}" in out
    assert "Traceback" not in out and "finished" in out
    assert checkpoint_problems(newest) == []  # step 3 was trained again and written anew
    assert not (run.checkpoints_dir / ".step-9.x1y2.tmp").exists()

    _truncate(newest / "training_state.pt")
    result = CliRunner().invoke(app, ["export", str(run.path), "--out", str(tmp_path / "exported")])
    assert result.exit_code == 0, result.output
    marker = json.loads((tmp_path / "exported" / "loratui_adapter.json").read_text())
    assert marker["step"] == 3  # the weights of the newest checkpoint are intact: they are exported

    (newest / "lora.safetensors").unlink()
    result = CliRunner().invoke(app, ["train", "-c", str(config), "--resume", str(newest), "--no-tui"])
    assert result.exit_code == 1
    assert f"checkpoint {newest} is damaged (lora.safetensors is missing" in result.output
    assert f"use --resume {run.checkpoints_dir / 'step-2'}" in result.output
