"""NVML wrapper and `loratui gpu` with a fake NVML: several GPUs, busy processes, missing fields, no driver."""

from __future__ import annotations

import json

import pytest
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


def test_values_follow_what_the_driver_reports(fake_nvml) -> None:
    """A card without the v2 memory call, a process whose memory the driver cannot tell, CUDA 11.8."""
    fake_nvml(
        {
            "driver": "520.61.05",
            "cuda": 11080,
            "gpus": [
                {
                    "name": "Tesla T4",
                    "total": 16 * GIB,
                    "used": 3 * GIB,
                    "util": 99,
                    "mem_util": 40,
                    "temp": 80,
                    "power": 69.75,
                    "power_limit": 70.0,
                    "processes": [{"pid": 7, "name": "other", "used": None}, {"pid": 8}],
                }
            ],
        }
    )
    snap = nvml.snapshot()
    assert snap.available and snap.reason == "" and snap.cuda_driver_version == "11.8"
    (gpu,) = snap.gpus
    assert (gpu.index, gpu.name, gpu.uuid) == (0, "Tesla T4", None)
    assert (gpu.memory_total, gpu.memory_used, gpu.memory_free) == (16 * GIB, 3 * GIB, 13 * GIB)
    assert gpu.memory_reserved is None
    assert (gpu.utilization_gpu, gpu.utilization_memory, gpu.temperature) == (99, 40, 80)
    assert (gpu.power_draw, gpu.power_limit) == (69.75, 70.0)
    assert [(p.pid, p.name, p.used_memory) for p in gpu.processes] == [(7, "other", None), (8, None, None)]
    assert gpu.memory_used_by_others is None


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


def test_real_machine_answers_consistently(monkeypatch) -> None:
    """Whatever this machine has: GPUs with no reason, or no GPU with a reason; never an exception."""
    monkeypatch.delenv("LORATUI_FAKE_NVML", raising=False)
    nvml.reset()
    try:
        snap = nvml.snapshot()
    finally:
        nvml.reset()
    if snap.available:
        assert snap.gpus and snap.reason == "" and [g.index for g in snap.gpus] == list(range(len(snap.gpus)))
    else:
        assert snap.gpus == () and snap.reason


class _BrokenNvml:
    """An NVML module whose initialisation fails with `error`."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def nvmlInit(self) -> None:
        raise self.error


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ImportError("No module named 'pynvml'"), "nvidia-ml-py is not installed"),
        (OSError("NVML Shared Library Not Found"), "no NVIDIA driver found"),
        (RuntimeError("Driver Not Loaded"), "no NVIDIA driver found"),
        (RuntimeError("Insufficient Permissions"), "NVML unavailable: Insufficient Permissions"),
    ],
)
def test_failed_initialisation_names_the_reason(monkeypatch, error: Exception, reason: str) -> None:
    monkeypatch.delenv("LORATUI_FAKE_NVML", raising=False)

    def load() -> _BrokenNvml:
        if isinstance(error, ImportError):
            raise error
        return _BrokenNvml(error)

    monkeypatch.setattr(nvml, "_load_module", load)
    nvml.reset()
    try:
        snap = nvml.snapshot()
    finally:
        nvml.reset()
    assert not snap.available and snap.reason == reason and snap.gpus == ()
    assert snap.driver_version is None and snap.cuda_driver_version is None


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
