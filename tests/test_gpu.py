"""NVML wrapper and `loratui gpu` with a fake NVML: several GPUs, busy processes, missing fields, no driver."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from loratui.cli.app import app
from loratui.gpu import nvml
from loratui.gpu.fake_nvml import EXAMPLE_SPEC, GIB


def test_snapshot_reads_every_field(fake_nvml) -> None:
    fake_nvml(EXAMPLE_SPEC)
    snap = nvml.snapshot()
    assert snap.available and snap.driver_version == "550.54.15" and snap.cuda_driver_version == "12.4"
    first, second = snap.gpus
    assert first.name == "NVIDIA GeForce RTX 4090" and first.uuid.startswith("GPU-1111")
    assert first.memory_total == 24 * GIB and first.memory_used == 6 * GIB
    assert first.memory_reserved == GIB // 2 and first.memory_free == 24 * GIB - 6 * GIB - GIB // 2
    assert (first.utilization_gpu, first.temperature, first.power_draw) == (37, 61, 251.5)
    assert first.processes[0].pid == 4242 and first.processes[0].used_memory == 5 * GIB
    assert first.memory_used_by_others == 5 * GIB
    # the second card does not support reserved memory, temperature or power: None, no exception
    assert second.memory_reserved is None and second.memory_free == 12 * GIB - GIB // 4
    assert second.temperature is None and second.power_draw is None and second.processes == ()


def test_no_driver_is_a_normal_state(fake_nvml) -> None:
    fake_nvml("none")
    snap = nvml.snapshot()
    assert not snap.available and "no NVIDIA driver" in snap.reason and snap.gpus == ()


def test_driver_without_gpus(fake_nvml) -> None:
    fake_nvml({"driver": "550", "cuda": 12040, "gpus": []})
    snap = nvml.snapshot()
    assert not snap.available and "no NVIDIA GPU" in snap.reason


def test_broken_calls_never_raise(fake_nvml, monkeypatch) -> None:
    fake_nvml(EXAMPLE_SPEC)
    module, _ = nvml._init()

    def boom(*_args):
        raise RuntimeError("GPU is lost")

    monkeypatch.setattr(module, "nvmlDeviceGetUtilizationRates", boom)
    monkeypatch.setattr(module, "nvmlDeviceGetComputeRunningProcesses", boom)
    snap = nvml.snapshot()
    assert snap.available and snap.gpus[0].utilization_gpu is None and snap.gpus[0].processes == ()
    monkeypatch.setattr(module, "nvmlDeviceGetCount", boom)
    assert not nvml.snapshot().available


def test_real_machine_without_gpu_does_not_raise(monkeypatch) -> None:
    monkeypatch.delenv("LORATUI_FAKE_NVML", raising=False)
    nvml.reset()
    snap = nvml.snapshot()
    assert isinstance(snap.available, bool)
    nvml.reset()


def test_cli_one_line_and_exit_0_without_driver(fake_nvml) -> None:
    fake_nvml("none")
    result = CliRunner().invoke(app, ["gpu"])
    assert result.exit_code == 0
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "No NVIDIA GPU available" in lines[0] and "CPU" in lines[0]


def test_cli_table_and_json(fake_nvml) -> None:
    fake_nvml(EXAMPLE_SPEC)
    runner = CliRunner()
    table = runner.invoke(app, ["gpu"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert table.exit_code == 0, table.output
    for text in (
        "RTX 4090",
        "RTX 3060",
        "6.0 GiB / 24.0 GiB",
        "37%",
        "61°C",
        "4242",
        "550.54.15",
        "CUDA 12.4",
    ):
        assert text in table.output
    data = json.loads(runner.invoke(app, ["gpu", "--json"]).output)
    assert data["available"] is True and len(data["gpus"]) == 2
    assert data["gpus"][0]["processes"][0]["used_memory"] == 5 * GIB
    assert data["gpus"][1]["temperature"] is None


def test_cli_watch_with_count(fake_nvml) -> None:
    fake_nvml(EXAMPLE_SPEC)
    result = CliRunner().invoke(app, ["gpu", "--watch", "--count", "2", "--interval", "0.1", "--json"])
    assert result.exit_code == 0 and result.output.count('"available": true') == 2
