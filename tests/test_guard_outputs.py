"""Outputs that must not be lost or found broken only after training: two runs on one output_dir, outputs
that cannot be written (a file, read-only, a symlink, a mount point), and a disk that fills up."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, records, single_thread, write_jsonl, write_llm_yaml
from sd_helpers import make_image_dataset, seed_like_config
from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.config import ResolvedConfig
from loratui.models.llm.adapter_files import MARKER_FILE, write_adapter
from loratui.runs.checkpoints import write_checkpoint
from loratui.runs.events import read_events
from loratui.runs.lock import LockHeld
from loratui.runs.rundir import create_run_dir, list_runs
from loratui.runs.status import RunStatus
from loratui.train.process import launch as core
from loratui.train.process.preflight import OutputProblem, check_outputs, disk_space_warning
from loratui.util import atomic
from loratui.util.disk import NoSpaceLeft

REPO = Path(__file__).resolve().parents[1]
ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _llm(tmp_path: Path, tiny_llama: Path, **overrides) -> ResolvedConfig:
    data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    return ResolvedConfig(make_config(tiny_llama, data, tmp_path, **overrides), {}, "llm")


def _llm_yaml(tmp_path: Path, tiny_llama: Path, **overrides) -> Path:
    return write_llm_yaml(tmp_path, tiny_llama, **overrides)


def _unwritable(monkeypatch: pytest.MonkeyPatch, folder: Path, code: int = errno.EROFS) -> None:
    """Simulate a read-only `folder` (tests run as root, which chmod does not stop): creating a file in it
    fails as on a read-only mount."""
    real = tempfile.mkstemp

    def mkstemp(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == folder.resolve():
            raise OSError(code, os.strerror(code), str(folder))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# --- 1. two runs, one output_dir --------------------------------------------------------------------------


def _holder(run, monkeypatch: pytest.MonkeyPatch) -> subprocess.Popen:
    """Start `run` with a stand-in supervisor (a sleeping process) that inherits its locks as the real one does."""
    from loratui.runs.lock import child_env
    from loratui.train.process import supervisor

    def spawn(run, locks=None):
        return subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(60)"],
            pass_fds=tuple(locks or ()),
            env=child_env(locks or {}),
        )

    monkeypatch.setattr(supervisor, "spawn_supervisor", spawn)
    return core.start_worker(run)


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved = _llm(tmp_path, tiny_llama)
    first, _ = core.prepare_run(resolved, resume=None, overwrite=False)
    process = _holder(first, monkeypatch)
    try:
        with pytest.raises(LockHeld) as refused:
            core.prepare_run(_llm(tmp_path, tiny_llama), resume=None, overwrite=False)
        message = str(refused.value)
        assert f"output_dir {tmp_path / 'adapter'} is in use by run {first.name}" in message
        assert "choose another output_dir" in message
        assert [s.run for s in list_runs(tmp_path / "runs")] == [first]  # nothing created for the refused run
        write_checkpoint(
            first,
            1,
            lora_state={"base_model.model.layer.lora_A.weight": torch.zeros(4, 8)},
            training_state={"optimizer": {}},
            meta={},
            config_yaml=first.config_path.read_text(encoding="utf-8"),
        )
        with pytest.raises(LockHeld, match=f"run {first.name} .*still running.*loratui stop {first.name}"):
            core.prepare_run(_llm(tmp_path, tiny_llama), resume=str(first.path), overwrite=False)
    finally:
        process.kill()
        process.wait()
    # the lock died with the process that held it: no stale lock after a crash
    second, _ = core.prepare_run(_llm(tmp_path, tiny_llama), resume=None, overwrite=False)
    core.release_locks(second)


def test_two_trains_started_together_one_is_refused_and_the_export_is_intact(
    tmp_path: Path, tiny_llama: Path
) -> None:
    config = _llm_yaml(tmp_path, tiny_llama, max_steps=30)  # the first still trains when the second starts
    cmd = [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui"]
    procs = [
        subprocess.Popen(
            cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 1], outputs
    winner, loser = (outputs[0], outputs[1]) if codes[0] == 0 else (outputs[1], outputs[0])
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 1, outputs  # the refused run created nothing
    run = runs[0].run
    assert f"error: output_dir {tmp_path / 'adapter'} is in use by run {run.name}" in loser
    assert "Traceback" not in loser and "finished" in winner
    marker = json.loads((tmp_path / "adapter" / MARKER_FILE).read_text())
    assert marker["run"] == run.name and marker["step"] == 30
    assert not list(tmp_path.glob(".adapter.lock"))  # the finished run removed its lock file


# --- 3. outputs that cannot be written ------------------------------------------------------------------------


def _sd(tmp_path: Path, tiny_sd15: Path, **overrides) -> Path:
    data = make_image_dataset(tmp_path / "data", 4)
    return seed_like_config(tmp_path, tiny_sd15, data, max_steps=1, **overrides)


def test_sd_output_dir_that_is_a_file_is_refused_before_training(tmp_path: Path, tiny_sd15: Path) -> None:
    (tmp_path / "out").write_text("not a folder")
    config = _sd(tmp_path, tiny_sd15, output_dir=str(tmp_path / "out"))
    proc = subprocess.run(
        [sys.executable, "-m", "loratui", "train", "--config", str(config), "--no-tui"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (
        f"error: output_dir {tmp_path / 'out'} is a file, not a folder; choose another output_dir"
        in proc.stdout
    )
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not list_runs(tmp_path / "runs")  # refused before a run directory or a worker


def test_read_only_runs_dir_is_refused_through_the_cli(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only simulated with a monkeypatched probe (tests run as root; chmod does not stop root)."""
    config = _llm_yaml(tmp_path, tiny_llama)
    (tmp_path / "runs").mkdir()
    _unwritable(monkeypatch, tmp_path / "runs")
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-tui"])
    assert result.exit_code == 1, result.output
    assert f"error: runs_dir {tmp_path / 'runs'} is not writable (Read-only file system)" in result.output
    assert "choose another runs_dir" in result.output and "Traceback" not in result.output
    assert list((tmp_path / "runs").iterdir()) == []


@pytest.mark.skipif(ROOT, reason="root writes into a chmod 555 folder: see the simulated variants")
def test_read_only_output_dir_by_chmod(tmp_path: Path, tiny_llama: Path) -> None:
    """Real permissions (skipped when running as root, which they do not stop)."""
    resolved = _llm(tmp_path, tiny_llama)
    out = Path(resolved.config.output_dir)
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(OutputProblem, match="is not writable"):
            check_outputs(resolved)
    finally:
        out.chmod(0o755)


def test_read_only_output_dir_and_run_dir_are_refused(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Read-only simulated with a monkeypatched probe (tests run as root)."""
    resolved = _llm(tmp_path, tiny_llama)
    out = Path(resolved.config.output_dir)
    out.mkdir()
    _unwritable(monkeypatch, out, errno.EPERM)
    with pytest.raises(OutputProblem) as refused:
        check_outputs(resolved)
    assert str(refused.value) == (
        f"output_dir {out} is not writable (Operation not permitted), so the adapter could not be saved; "
        "choose another output_dir or make it writable"
    )
    run = create_run_dir(tmp_path / "runs", "r")
    _unwritable(monkeypatch, run.path)
    with pytest.raises(OutputProblem, match="the run directory .* is not writable"):
        check_outputs(resolved, run_path=run.path)
    (tmp_path / "llm-file").write_text("x")
    resolved.config.output_dir = str(tmp_path / "llm-file")
    with pytest.raises(OutputProblem, match="is a file, not a folder"):
        check_outputs(resolved)


def _adapter(out: Path, run: str = "r1") -> Path:
    return write_adapter(
        out,
        tensors={"base_model.model.x.lora_A.weight": torch.ones(2, 2)},
        adapter_config={"base_model_name_or_path": "b", "r": 2},
        chat_template=None,
        run_name=run,
        step=1,
    )


def test_symlinked_output_dir_is_followed_not_renamed_aside(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link_out"
    link.symlink_to(real)
    _adapter(link)
    _adapter(link)  # the same run again: replaces the adapter, through the link
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert (real / "adapter_model.safetensors").is_file()
    assert not (tmp_path / ".link_out.old").exists() and sorted(p.name for p in tmp_path.iterdir()) == [
        "link_out",
        "real",
    ]


def test_mount_point_output_dir_gets_files_written_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A mount point cannot be mounted here: `os.path.ismount` says the folder is one."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    (mount / "keep.txt").write_text("user file")
    inode = mount.stat().st_ino
    real = os.path.ismount
    monkeypatch.setattr(atomic.os.path, "ismount", lambda p: Path(p) == mount or real(p))
    monkeypatch.setattr(
        "loratui.models.llm.adapter_files.check_output", lambda *a, **k: None
    )  # the folder holds a user file
    _adapter(mount)
    _adapter(mount)
    assert mount.stat().st_ino == inode  # the same folder, never replaced
    assert (mount / "adapter_model.safetensors").is_file() and (mount / "keep.txt").read_text() == "user file"
    assert not [p for p in mount.iterdir() if p.name.endswith(".tmp")]


def test_folder_that_cannot_be_renamed_is_written_inside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renaming the folder aside fails as for a busy mount point (EBUSY): the files are written inside it."""
    out = tmp_path / "out"
    _adapter(out)
    inode = out.stat().st_ino
    real = os.replace

    def replace(src, dst):
        if Path(src) == out:
            raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(src))
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    _adapter(out)
    assert out.stat().st_ino == inode and (out / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# --- 7. disk full ---------------------------------------------------------------------------------------------


Usage = namedtuple("Usage", "total used free")


def _checkpoint(run, step: int = 60) -> Path:
    return write_checkpoint(
        run,
        step,
        lora_state={"a": torch.zeros(256, 256)},
        training_state={"optimizer": {"state": {0: {"exp_avg": torch.zeros(256, 256)}}}},
        meta={},
        config_yaml="",
    )


def test_checkpoint_write_on_a_full_disk_names_device_path_and_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = create_run_dir(tmp_path / "runs", "r")

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loratui.runs.checkpoints.torch.save", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(NoSpaceLeft) as failed:
        _checkpoint(run)
    message = str(failed.value)
    target = run.checkpoints_dir / "step-60"
    assert (
        message.startswith("no space left on ")
        and f"({target}); a checkpoint needs about 512.0 KiB" in message
    )
    assert "(LoRA tensors 256.0 KiB + optimizer state 256.0 KiB), 1000 B free" in message
    assert run.checkpoints() == [] and not list(run.checkpoints_dir.iterdir())  # no partial folder left

    # torch's own write failure carries no errno: the free space tells it apart
    def torch_full(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr("loratui.runs.checkpoints.torch.save", torch_full)
    with pytest.raises(NoSpaceLeft, match="no space left on"):
        _checkpoint(run)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**12, 0, 10**12))
    with pytest.raises(RuntimeError, match="enforce fail"):  # plenty of space: not called a full disk
        _checkpoint(run)


def test_disk_full_mid_run_fails_clearly_with_the_step_reached(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import signal

    from loratui.train.process import worker

    resolved = _llm(tmp_path, tiny_llama, max_steps=6, save_steps=2)
    run, _ = core.prepare_run(resolved, resume=None, overwrite=False)
    core.release_locks(run)
    real = torch.save

    def save(obj, path, *a, **k):
        if "step-4" in str(Path(path).parent.name) or ".step-4." in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **k)

    monkeypatch.setattr("loratui.runs.checkpoints.torch.save", save)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        code = worker.main([str(run.path)])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert code == 1
    status = RunStatus.read(run.status_path)
    assert status.state == "failed" and status.step == 4  # the step reached, not 0
    assert status.message.startswith("no space left on ") and "a checkpoint needs about" in status.message
    failed = [e for e in read_events(run.events_path) if e["type"] == "run_failed"]
    assert len(failed) == 1 and f"loratui train --resume {run.path}" in failed[0]["error"]
    assert "NoSpaceLeft" not in failed[0]["error"]
    assert [p.name for p in run.checkpoints()] == ["step-2"]  # the earlier checkpoint survived


def test_status_is_rewritten_in_place_when_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = create_run_dir(tmp_path / "runs", "r")
    RunStatus(state="running", step=59).write(run.status_path)

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("loratui.runs.status.atomic_write_text", full)
    RunStatus(state="failed", step=60, message="no space left").write(run.status_path)
    status = RunStatus.read(run.status_path)
    assert (status.state, status.step) == ("failed", 60)


def test_low_free_space_is_warned_at_start(
    tmp_path: Path, tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolved = _llm(tmp_path, tiny_llama)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**12, 0, 10**12))
    assert disk_space_warning(resolved) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 2048, 2048))
    warning = disk_space_warning(resolved)
    assert warning is not None and warning.startswith("only 2.0 KiB free on ")
    assert (
        "a checkpoint needs about" in warning
        and "optimizer state" in warning
        and "fewer than 3 fit" in warning
    )

    # through the CLI: the warning is printed before the worker starts
    config = _llm_yaml(tmp_path, tiny_llama)
    started = []

    def start_worker(run):
        core.release_locks(run)
        started.append(run)
        return subprocess.Popen([sys.executable, "-c", "pass"])

    monkeypatch.setattr("loratui.cli.launch.start_worker", start_worker)
    result = CliRunner().invoke(app, ["train", "--config", str(config), "--no-tui", "--detach"])
    assert result.exit_code == 0, result.output
    assert "warning: only 2.0 KiB free on " in result.output and len(started) == 1
