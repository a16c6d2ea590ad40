"""Whether bitsandbytes (4-bit NF4 loading, 8-bit AdamW) can run here, and why not when it cannot.

bitsandbytes runs on CUDA, and from version 0.50 also on the CPU (NF4 `Linear4bit` forward/backward and
`AdamW8bit`). `bitsandbytes_problem(device_type, feature)` returns None when the feature can run on that
device, else one sentence saying what to install or change.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging

#: the first bitsandbytes release whose NF4 layers and 8-bit optimizers run on the CPU
CPU_MIN_VERSION = (0, 50)
INSTALL = 'pip install "loratui[quant]"'


def bitsandbytes_version() -> tuple[int, ...] | None:
    """The installed bitsandbytes version as numbers (major, minor, ...), or None when it is not installed."""
    if importlib.util.find_spec("bitsandbytes") is None:
        return None
    try:
        text = importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        return None
    numbers: list[int] = []
    for piece in text.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        numbers.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(numbers)


def bitsandbytes_problem(device_type: str, feature: str) -> str | None:
    """None when bitsandbytes can run `feature` (e.g. "load_in_4bit (QLoRA)") on `device_type` ("cuda" or
    "cpu"); otherwise why not and the fix."""
    version = bitsandbytes_version()
    if version is None:
        return f"{feature} needs bitsandbytes: {INSTALL}"
    if device_type == "cuda":
        return None
    if device_type != "cpu":
        return f"{feature} runs on CUDA GPUs and on the CPU, not on {device_type}"
    if version < CPU_MIN_VERSION:
        found = ".".join(str(n) for n in version)
        wanted = ".".join(str(n) for n in CPU_MIN_VERSION)
        return (
            f"{feature} on the CPU needs bitsandbytes >= {wanted} (installed: {found}): "
            f'pip install -U "bitsandbytes>={wanted}" (or {INSTALL})'
        )
    return None


def quiet_cpu_kernel_notice() -> None:
    """bitsandbytes' CPU backend tries an optional hub kernel when imported and logs a warning when it cannot
    have it (always, offline); its built-in CPU kernels are used instead. Keep that warning off the run log."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
