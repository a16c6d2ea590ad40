"""A fake NVML module for tests, demos and screenshots.

Spec (JSON file or dict): {"driver": "550.54", "cuda": 12040, "gpus": [{"name": ..., "uuid": ...,
"total": bytes, "used": bytes, "reserved": bytes, "util": 37, "mem_util": 20, "temp": 61,
"power": 250.0, "power_limit": 450.0, "processes": [{"pid": 1234, "name": "python", "used": bytes}]}]}.
A GPU field left out (or null) behaves like a call the driver does not support.
`"none"` as the spec simulates a machine without the NVIDIA driver.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

NVML_TEMPERATURE_GPU = 0
nvmlMemory_v2 = 0x02000028


class NVMLError(Exception):
    """Mirrors pynvml.NVMLError."""


class NVMLError_NotSupported(NVMLError):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class FakeNvml:
    """Implements the pynvml functions loratui calls, from a spec."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    nvmlMemory_v2 = nvmlMemory_v2

    def __init__(self, spec: dict[str, Any] | None):
        self.spec = spec
        self.initialised = False

    def _field(self, handle: int, key: str) -> Any:
        value = self.spec["gpus"][handle].get(key)
        if value is None:
            raise NVMLError_NotSupported(f"{key} not supported")
        return value

    def nvmlInit(self) -> None:
        if self.spec is None:
            raise NVMLError_LibraryNotFound("NVML Shared Library Not Found")
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.initialised = False

    def nvmlSystemGetDriverVersion(self) -> str:
        return self.spec.get("driver") or _unsupported()

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.spec.get("cuda") or _unsupported()

    def nvmlDeviceGetCount(self) -> int:
        return len(self.spec.get("gpus", []))

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        if index >= self.nvmlDeviceGetCount():
            raise NVMLError("invalid index")
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        return self._field(handle, "name")

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return self._field(handle, "uuid")

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        total, used = self._field(handle, "total"), self._field(handle, "used")
        if version is not None:
            reserved = self._field(handle, "reserved")
            return SimpleNamespace(total=total, used=used, free=total - used - reserved, reserved=reserved)
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._field(handle, "util"), memory=self._field(handle, "mem_util"))

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        return self._field(handle, "temp")

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        return int(self._field(handle, "power") * 1000)

    def nvmlDeviceGetEnforcedPowerLimit(self, handle: int) -> int:
        return int(self._field(handle, "power_limit") * 1000)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        procs = self.spec["gpus"][handle].get("processes") or []
        return [SimpleNamespace(pid=p["pid"], usedGpuMemory=p.get("used")) for p in procs]

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        for gpu in self.spec.get("gpus", []):
            for proc in gpu.get("processes") or []:
                if proc["pid"] == pid and proc.get("name"):
                    return proc["name"]
        raise NVMLError_NotSupported("no name")


def _unsupported() -> Any:
    raise NVMLError_NotSupported("not supported")


def load_fake_nvml(spec: str | dict[str, Any] | None) -> FakeNvml:
    """A FakeNvml from a dict, a JSON file path, inline JSON, or "none" (no driver)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("none", "no-driver", "")):
        return FakeNvml(None)
    if isinstance(spec, dict):
        return FakeNvml(spec)
    text = spec.strip()
    data = json.loads(text) if text.startswith("{") else json.loads(Path(text).read_text(encoding="utf-8"))
    return FakeNvml(data)


GIB = 1024**3

# Two cards, one busy with another job, one reporting only a few fields: used by tests and screenshots.
EXAMPLE_SPEC: dict[str, Any] = {
    "driver": "550.54.15",
    "cuda": 12040,
    "gpus": [
        {
            "name": "NVIDIA GeForce RTX 4090",
            "uuid": "GPU-1111aaaa-0000-0000-0000-000000000000",
            "total": 24 * GIB,
            "used": 6 * GIB,
            "reserved": GIB // 2,
            "util": 37,
            "mem_util": 21,
            "temp": 61,
            "power": 251.5,
            "power_limit": 450.0,
            "processes": [{"pid": 4242, "name": "python train_other.py", "used": 5 * GIB}],
        },
        {
            "name": "NVIDIA GeForce RTX 3060",
            "uuid": "GPU-2222bbbb-0000-0000-0000-000000000000",
            "total": 12 * GIB,
            "used": GIB // 4,
            "reserved": None,
            "util": 0,
            "mem_util": 0,
            "temp": None,
            "power": None,
            "power_limit": None,
            "processes": [],
        },
    ],
}
