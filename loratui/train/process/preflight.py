"""Checks run before a worker is started: the dataset check (same code as `loratui check`), whether the
run directory and the output can be written, and whether the disk holds a few checkpoints. Prints nothing;
`loratui.cli.launch` shows the result."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loratui.config import ResolvedConfig
from loratui.data.check import run_checks
from loratui.data.findings import Finding
from loratui.util.atomic import probe_writable
from loratui.util.disk import device_of, free_bytes
from loratui.util.sizes import format_bytes

FEW_CHECKPOINTS = 3  # fewer than this many checkpoints fitting on the runs_dir's disk gets a warning


class OutputProblem(RuntimeError):
    """The run directory or the output cannot be written; the message says which and what to do."""


@dataclass(frozen=True)
class PreflightResult:
    """What the dataset check found that stops training (unless `--skip-checks`)."""

    errors: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing stops training."""
        return not self.errors

    def blocked(self, *, skip_checks: bool) -> bool:
        """True when training must not start."""
        return not self.ok and not skip_checks


def run_preflight(resolved: ResolvedConfig) -> PreflightResult:
    """Run the dataset checks of the resolved config and return the errors among the findings."""
    cfg = resolved.config
    task = (
        "image"
        if cfg.task_type == "image-generation"
        else {"sft": "text", "kto": "kto"}.get(cfg.method, "preference")
    )
    report = run_checks(
        cfg.train_data_dir,
        task=task,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        metadata_path=cfg.metadata_path,
        caption_extensions=(cfg.caption_extension,),
        trigger_word=cfg.trigger_word,
        max_seq_len=cfg.max_seq_len,
        reg_data_dir=cfg.reg_data_dir if task == "image" else None,
        mask_dir=cfg.mask_dir if task == "image" else None,
        alpha_mask=cfg.alpha_mask and task == "image",
    )
    return PreflightResult([f for f in report.findings if f.severity == "error"])


def _created_folder(folder: Path, key: str) -> Path:
    """`folder` made if missing; an existing file or an unwritable ancestor is an `OutputProblem`."""
    if folder.exists() and not folder.is_dir():
        raise OutputProblem(f"{key} {folder} is a file, not a folder; choose another {key}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputProblem(
            f"{key} {folder} cannot be created ({exc.strerror or exc}); choose another {key} or fix its "
            "permissions"
        ) from None
    return folder


def _writable(folder: Path, key: str, what: str) -> None:
    problem = probe_writable(folder)
    if problem is not None:
        raise OutputProblem(
            f"{key} {folder} is not writable ({problem.strerror or problem}), so {what} could not be saved; "
            f"choose another {key} or make it writable"
        )


def check_outputs(resolved: ResolvedConfig, *, run_path: Path | None = None, output: bool = True) -> None:
    """Raise `OutputProblem` unless the run directory (`run_path` when resuming, else a new one under
    runs_dir) and the exported files' place can be written: a probe file is created and removed in each, before
    any training time is spent. An image LoRA is a file inside output_dir (made here when missing); a text
    LoRA is the output_dir folder itself, written inside it when it exists (a mount point, a symlink), else
    next to it. `output=False`: only the run directory (a machine that does not export)."""
    cfg = resolved.config
    if run_path is not None:
        _writable(Path(run_path), "the run directory", "checkpoints")
    else:
        _writable(_created_folder(Path(cfg.runs_dir).expanduser(), "runs_dir"), "runs_dir", "the run")
    if not output:
        return
    out = Path(cfg.output_dir).expanduser()
    if cfg.task_type == "image-generation":
        _writable(_created_folder(out, "output_dir"), "output_dir", "the LoRA")
        target = out / f"{cfg.name}.safetensors"
        if target.is_dir():
            raise OutputProblem(f"{target} is a folder; choose another output_name or output_dir")
        return
    if out.exists() and not out.is_dir():
        raise OutputProblem(f"output_dir {out} is a file, not a folder; choose another output_dir")
    if out.is_dir():
        _writable(out, "output_dir", "the adapter")
    else:
        _writable(_created_folder(out.parent, "output_dir's parent"), "output_dir's parent", "the adapter")


def checkpoint_size(resolved: ResolvedConfig) -> tuple[int, int] | None:
    """(LoRA tensor bytes, optimizer state bytes) of one checkpoint as the memory planner predicts them, or
    None when the planner cannot tell (an unknown base model)."""
    from loratui.memory.estimate import estimate_peak

    try:
        breakdown = estimate_peak(resolved, device="cpu").breakdown
    except Exception:  # the warning is a courtesy: a planner failure must not stop the run
        return None
    lora, state = int(breakdown.get("lora_params", 0)), int(breakdown.get("optimizer_state", 0))
    return (lora, state) if lora else None


def disk_space_warning(resolved: ResolvedConfig, *, few: int = FEW_CHECKPOINTS) -> str | None:
    """A warning when the runs_dir's disk holds fewer than `few` checkpoints (None when it holds more, or
    when the size cannot be told)."""
    runs_dir = Path(resolved.config.runs_dir).expanduser()
    free = free_bytes(runs_dir)
    size = checkpoint_size(resolved)
    if free is None or size is None or free >= few * sum(size):
        return None
    lora, state = size
    return (
        f"only {format_bytes(free)} free on {device_of(runs_dir)} ({runs_dir}): a checkpoint needs about "
        f"{format_bytes(lora + state)} (LoRA tensors {format_bytes(lora)} + optimizer state "
        f"{format_bytes(state)}), so fewer than {few} fit; free some space, use another runs_dir or lower "
        "keep_last_n"
    )
