"""How the supervisor starts training processes: one bare worker, or accelerate's launcher with several.

`loratui train --gpus 4` (or `--gpus 0,2`, `--cpu-processes 2`, `--accelerate-config FILE`) records a
`Processes` spec in the run's launch.json; the supervisor turns it into
`python -m accelerate.commands.launch ... -m loratui.train.process.worker RUN_DIR`, which starts one worker per
device (torch.distributed's elastic agent: when one worker dies, it terminates the others and exits non-zero).
Without a spec, or with one process, the worker runs bare as before.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

UNSUPPORTED_TYPES = ("FSDP", "DEEPSPEED", "MEGATRON_LM", "XLA", "TPU")
RESUME_FLAG = "--resume-from"  # the worker's option for the checkpoint a restart continues from


class LaunchError(ValueError):
    """A multi-process option that cannot work (shown to the user as is)."""


@dataclass
class Processes:
    """How many training processes, on which devices, from which accelerate config."""

    processes: int = 1
    gpus: list[int] = field(default_factory=list)  # CUDA device ids (empty: all visible)
    cpu: bool = False  # --cpu-processes: gloo on the CPU (tests)
    accelerate_config: str | None = None
    num_machines: int = 1
    machine_rank: int = 0
    distributed_type: str | None = None

    @property
    def launcher(self) -> bool:
        """Whether the worker goes through accelerate's launcher."""
        return self.processes > 1 or self.accelerate_config is not None

    @property
    def main_node(self) -> bool:
        return self.machine_rank == 0

    @property
    def per_node(self) -> int:
        return max(1, self.processes // max(1, self.num_machines))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> Processes:
        data = data or {}
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        """'2 processes (GPUs 0,2)', '4 processes on 2 machines (this is machine 0)' ..."""
        where = (
            "CPU, gloo" if self.cpu else (f"GPUs {','.join(map(str, self.gpus))}" if self.gpus else "GPUs")
        )
        text = f"{self.processes} process(es) ({where})"
        if self.num_machines > 1:
            text += f" on {self.num_machines} machines (this is machine {self.machine_rank})"
        return text


def parse_gpus(value: str) -> tuple[int, list[int]]:
    """`--gpus 4` -> (4, []); `--gpus 0,2` -> (2, [0, 2])."""
    text = value.strip()
    if re.fullmatch(r"\d+", text) and "," not in text:
        count = int(text)
        if count < 1:
            raise LaunchError("--gpus needs at least 1 GPU")
        return count, []
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LaunchError(f"--gpus {value!r}: give a count (4) or a list of GPU ids (0,2)") from None
    if not ids or len(set(ids)) != len(ids) or min(ids) < 0:
        raise LaunchError(f"--gpus {value!r}: give a count (4) or a list of distinct GPU ids (0,2)")
    return len(ids), ids


def read_accelerate_config(path: Path) -> dict[str, Any]:
    """The user's accelerate config file (YAML or JSON), as a dict."""
    import yaml

    if not path.is_file():
        raise LaunchError(f"--accelerate-config {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LaunchError(f"--accelerate-config {path}: not valid YAML/JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LaunchError(f"--accelerate-config {path}: expected a mapping of accelerate settings")
    return data


def processes_from_options(
    gpus: str | None, cpu_processes: int | None, accelerate_config: Path | None
) -> Processes | None:
    """The spec for `loratui train`'s options (None: one bare worker, as without them)."""
    if cpu_processes is not None and (gpus or accelerate_config):
        raise LaunchError(
            "--cpu-processes is for CPU tests; it cannot be combined with --gpus/--accelerate-config"
        )
    if cpu_processes is not None:
        if cpu_processes < 1:
            raise LaunchError("--cpu-processes needs at least 1 process")
        return Processes(processes=cpu_processes, cpu=True)
    spec = Processes()
    if accelerate_config is not None:
        data = read_accelerate_config(accelerate_config)
        kind = str(data.get("distributed_type") or "").upper()
        if any(kind.startswith(bad) for bad in UNSUPPORTED_TYPES):
            raise LaunchError(unsupported_type_message(accelerate_config, kind))
        spec.accelerate_config = str(accelerate_config.resolve())
        spec.distributed_type = kind or None
        spec.num_machines = int(data.get("num_machines") or 1)
        spec.machine_rank = int(data.get("machine_rank") or 0)
        spec.processes = int(data.get("num_processes") or 1)
        ids = str(data.get("gpu_ids") or "all")
        if ids != "all":
            spec.gpus = [int(i) for i in ids.split(",") if i.strip()]
    if gpus:
        count, ids = parse_gpus(gpus)
        spec.gpus = ids
        spec.processes = count * spec.num_machines
    if not spec.launcher and not spec.gpus:
        return None
    return spec


def unsupported_type_message(path: Path, kind: str) -> str:
    """Why an accelerate config's distributed_type is refused, and what to use instead."""
    start = f"--accelerate-config {path}: distributed_type {kind} is not supported"
    if kind.startswith("FSDP"):
        return (
            f"{start} through accelerate's config; loratui shards with FSDP itself: use distributed_type: "
            "MULTI_GPU and add --fsdp (or fsdp: true in the training config)"
        )
    if kind.startswith("DEEPSPEED"):
        return (
            f"{start}: loratui does not train with DeepSpeed (ZeRO). For a model that does not fit one GPU use "
            "distributed_type: MULTI_GPU with --fsdp (FSDP shards the base, the LoRA and the optimizer state "
            "like ZeRO-3); for data parallelism leave --fsdp out"
        )
    return (
        f"{start}; loratui trains LoRA with data parallelism (DDP: every process holds the whole LoRA, rank 0 "
        "saves it) or, with --fsdp, sharded. Use distributed_type: MULTI_GPU"
    )


def launcher_command(
    run_path: Path, spec: Processes, *, gpu: str | None = None, resume_from: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that start the training processes of `run_path`.

    Without the user's own accelerate config, the launcher gets one written into the run directory
    (`accelerate.yaml`): accelerate would otherwise fill every option not on the command line from the user's
    default config (`accelerate config`), whose `gpu_ids`, `machine_rank` or `main_process_ip` belong to other
    jobs. `--gpus` ids count among the GPUs this process sees (an existing CUDA_VISIBLE_DEVICES is respected).
    `gpu` (launch.json's, the GPU picked in the TUI) becomes the workers' CUDA_VISIBLE_DEVICES; `resume_from`
    is the checkpoint a restarted worker continues from (instead of launch.json's).
    """
    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    worker = ["-m", "loratui.train.process.worker", str(run_path)]
    if resume_from is not None:
        worker += [RESUME_FLAG, str(resume_from)]
    if spec.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the workers train on the CPU even where a GPU is present
    elif spec.gpus:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpu_ids(spec.gpus, env.get("CUDA_VISIBLE_DEVICES")))
    if not spec.launcher:
        return [sys.executable, *worker], env
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if spec.accelerate_config:
        cmd += ["--config_file", spec.accelerate_config]
        if spec.processes > 1 and spec.num_machines == 1:
            cmd += ["--multi_gpu"]
        cmd += ["--num_processes", str(spec.processes)]
        if spec.gpus:  # chosen through CUDA_VISIBLE_DEVICES above; the file's gpu_ids must not narrow them
            cmd += ["--gpu_ids", "all"]
    else:
        cmd += ["--config_file", str(_own_accelerate_config(run_path, spec))]
        cmd += ["--multi_gpu", "--num_processes", str(spec.processes), "--num_machines", "1"]
        cmd += [
            "--machine_rank",
            "0",
            "--gpu_ids",
            "all",
            "--main_process_port",
            "0",
            "--dynamo_backend",
            "no",
        ]
    cmd += ["--monitor_interval", "0.5"]  # notice a dead worker (and stop the others) within half a second
    return [*cmd, *worker], env


def physical_gpu_ids(ids: list[int], visible: str | None) -> list[str]:
    """`--gpus` ids (0-based among the visible GPUs) as CUDA_VISIBLE_DEVICES entries."""
    if visible is None or not visible.strip():
        return [str(i) for i in ids]
    names = [name.strip() for name in visible.split(",") if name.strip()]
    if max(ids) >= len(names):
        raise LaunchError(
            f"--gpus {','.join(map(str, ids))}: only {len(names)} GPU(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={visible}); ids count from 0 among those"
        )
    return [names[i] for i in ids]


def _own_accelerate_config(run_path: Path, spec: Processes) -> Path:
    """The accelerate config of a one-machine launch, written into the run directory."""
    import yaml

    from loratui.util.atomic import atomic_write_text

    settings = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": spec.processes,
        "gpu_ids": "all",
        "mixed_precision": "no",  # each worker's Accelerator sets the run's precision itself
        "use_cpu": False,
        "rdzv_backend": "static",
        "same_network": True,
        "main_training_function": "main",
        "debug": False,
    }
    path = Path(run_path) / "accelerate.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(settings, sort_keys=False))
    return path


# --- reading the launcher's report -----------------------------------------------------------------------------

_ROOT_CAUSE = re.compile(
    r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+).*?exitcode\s*:\s*(-?\d+)", re.DOTALL
)


RESTART_TAG = "[loratui] restart requested by rank"
_RESTART = re.compile(re.escape(RESTART_TAG) + r" (\d+): (.*)")


def _log_text(log: Path, start: int) -> str:
    """worker.log from byte `start` (where this attempt's output begins) to the end."""
    try:
        with log.open("rb") as handle:
            handle.seek(max(0, start))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def launcher_root_cause(log: Path, start: int = 0) -> tuple[int, int] | None:
    """(rank, exit code) of the first worker that failed, from the elastic agent's report in the log (this
    attempt's part, from byte `start`)."""
    matches = list(_ROOT_CAUSE.finditer(_log_text(log, start)))
    if not matches:
        return None
    rank, code = matches[-1].groups()
    return int(rank), int(code)


def restart_request(log: Path, start: int = 0) -> tuple[int, str] | None:
    """(rank, reason) of a worker that asked for a restart after running out of memory (`RESTART_TAG` line),
    in this attempt's part of the log. A worker asks when out-of-memory recovery needs a fresh process; its
    peers then lose it and stop, so the whole group is started again."""
    found = _RESTART.search(_log_text(log, start))
    return (int(found.group(1)), found.group(2).strip()) if found else None


def describe_exit(code: int) -> str:
    """'exit code 1' or 'SIGKILL'."""
    import signal

    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"
