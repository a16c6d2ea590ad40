"""The one module that talks to NVML.

`snapshot()` initialises NVML lazily, reads every GPU in one pass and returns frozen dataclasses. Fields a
driver does not support (or that fail) are None; nothing here raises to callers.

For tests and demos, `$LORATUI_FAKE_NVML` may point at a JSON file describing fake GPUs (see
`loratui.gpu.fake_nvml`), or be `none` to simulate a machine without an NVIDIA driver.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class GpuProcess:
    """A compute process using a GPU."""

    pid: int
    name: str | None
    used_memory: int | None  # bytes; None where the driver cannot tell (WDDM, MIG)


@dataclass(frozen=True)
class GpuSnapshot:
    """One GPU at one moment. Memory in bytes, power in watts, temperature in °C."""

    index: int
    name: str
    uuid: str | None = None
    memory_total: int | None = None
    memory_free: int | None = None
    memory_used: int | None = None
    memory_reserved: int | None = None  # driver-reserved, from the v2 memory call where it exists
    utilization_gpu: int | None = None  # percent
    utilization_memory: int | None = None  # percent
    temperature: int | None = None
    power_draw: float | None = None
    power_limit: float | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def memory_used_by_others(self) -> int | None:
        """Bytes used by listed processes (what another job on the card holds)."""
        known = [p.used_memory for p in self.processes if p.used_memory is not None]
        return sum(known) if known else None


@dataclass(frozen=True)
class SystemSnapshot:
    """Every GPU plus driver facts. `available` is False on machines without a driver or GPU."""

    available: bool
    reason: str = ""
    driver_version: str | None = None
    cuda_driver_version: str | None = None
    gpus: tuple[GpuSnapshot, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_lock = threading.Lock()
_state: dict[str, Any] = {"module": None, "initialised": False, "error": None, "key": None}


def _load_module() -> ModuleType | Any:
    fake = os.environ.get("LORATUI_FAKE_NVML")
    if fake:
        from loratui.gpu.fake_nvml import load_fake_nvml

        return load_fake_nvml(fake)
    import pynvml  # from nvidia-ml-py

    return pynvml


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _init() -> tuple[Any | None, str]:
    """Initialise NVML once per process (and again if the fake spec changes). Returns (module, error)."""
    key = os.environ.get("LORATUI_FAKE_NVML", "")
    with _lock:
        if _state["initialised"] and _state["key"] == key:
            return _state["module"], _state["error"] or ""
        module, error = None, ""
        try:
            module = _load_module()
            module.nvmlInit()
        except ImportError:
            module, error = None, "nvidia-ml-py is not installed"
        except Exception as exc:  # NVMLError subclasses, OSError from a broken library
            module, error = None, _describe_init_error(exc)
        _state.update(module=module, initialised=True, error=error, key=key)
        return module, error


def _describe_init_error(exc: Exception) -> str:
    text = _text(exc)
    lowered = text.lower()
    if "not found" in lowered or "library" in lowered or "driver not loaded" in lowered:
        return "no NVIDIA driver found"
    return f"NVML unavailable: {text}"


def reset() -> None:
    """Forget the NVML state (tests switch fake specs with this)."""
    with _lock:
        module = _state["module"]
        if module is not None:
            with contextlib.suppress(Exception):
                module.nvmlShutdown()
        _state.update(module=None, initialised=False, error=None, key=None)


def _query(func: Callable[..., T], *args: Any, default: T | None = None) -> T | None:
    """Call an NVML function; any failure (not supported, lost GPU, ...) gives `default`."""
    try:
        return func(*args)
    except Exception:
        return default


def _processes(nv: Any, handle: Any) -> tuple[GpuProcess, ...]:
    raw = _query(nv.nvmlDeviceGetComputeRunningProcesses, handle, default=[]) or []
    result = []
    for proc in raw:
        pid = int(getattr(proc, "pid", 0))
        used = getattr(proc, "usedGpuMemory", None)
        name = _query(nv.nvmlSystemGetProcessName, pid)
        result.append(GpuProcess(pid, _text(name) if name is not None else None, int(used) if used else None))
    return tuple(result)


def _memory(nv: Any, handle: Any) -> tuple[int | None, int | None, int | None, int | None]:
    v2 = getattr(nv, "nvmlMemory_v2", None)
    info = _query(nv.nvmlDeviceGetMemoryInfo, handle, v2) if v2 is not None else None
    reserved = None
    if info is not None:
        reserved = getattr(info, "reserved", None)
    else:
        info = _query(nv.nvmlDeviceGetMemoryInfo, handle)
    if info is None:
        return None, None, None, None
    return (
        getattr(info, "total", None),
        getattr(info, "free", None),
        getattr(info, "used", None),
        reserved,
    )


def _gpu(nv: Any, index: int) -> GpuSnapshot | None:
    handle = _query(nv.nvmlDeviceGetHandleByIndex, index)
    if handle is None:
        return None
    total, free, used, reserved = _memory(nv, handle)
    util = _query(nv.nvmlDeviceGetUtilizationRates, handle)
    power = _query(nv.nvmlDeviceGetPowerUsage, handle)
    limit = _query(nv.nvmlDeviceGetEnforcedPowerLimit, handle)
    temperature = _query(nv.nvmlDeviceGetTemperature, handle, getattr(nv, "NVML_TEMPERATURE_GPU", 0))
    name = _query(nv.nvmlDeviceGetName, handle, default="unknown GPU")
    uuid = _query(nv.nvmlDeviceGetUUID, handle)
    return GpuSnapshot(
        index=index,
        name=_text(name),
        uuid=_text(uuid) if uuid is not None else None,
        memory_total=total,
        memory_free=free,
        memory_used=used,
        memory_reserved=reserved,
        utilization_gpu=getattr(util, "gpu", None) if util is not None else None,
        utilization_memory=getattr(util, "memory", None) if util is not None else None,
        temperature=int(temperature) if temperature is not None else None,
        power_draw=power / 1000.0 if power is not None else None,
        power_limit=limit / 1000.0 if limit is not None else None,
        processes=_processes(nv, handle),
    )


def _cuda_version(nv: Any) -> str | None:
    raw = _query(nv.nvmlSystemGetCudaDriverVersion)
    if raw is None:
        raw = _query(getattr(nv, "nvmlSystemGetCudaDriverVersion_v2", lambda: None))
    if not raw:
        return None
    return f"{int(raw) // 1000}.{int(raw) % 1000 // 10}"


def snapshot() -> SystemSnapshot:
    """Read every GPU now. Never raises."""
    try:
        nv, error = _init()
        if nv is None:
            return SystemSnapshot(False, error or "NVML unavailable")
        count = _query(nv.nvmlDeviceGetCount, default=0) or 0
        gpus = tuple(g for g in (_gpu(nv, i) for i in range(count)) if g is not None)
        driver = _query(nv.nvmlSystemGetDriverVersion)
        if not gpus:
            return SystemSnapshot(False, "no NVIDIA GPU found", _text(driver) if driver else None)
        return SystemSnapshot(
            True,
            "",
            _text(driver) if driver is not None else None,
            _cuda_version(nv),
            gpus,
        )
    except Exception as exc:  # last line of defence: callers treat this as CPU-only
        return SystemSnapshot(False, f"NVML error: {exc}")
