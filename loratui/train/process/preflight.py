"""Checks run before a worker is started: the dataset check (same code as `loratui check`). Prints nothing;
`loratui.cli.launch` shows the result."""

from __future__ import annotations

from dataclasses import dataclass, field

from loratui.config import ResolvedConfig
from loratui.data.check import run_checks
from loratui.data.findings import Finding


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
    task = "image" if cfg.task_type == "image-generation" else "text"
    report = run_checks(
        cfg.train_data_dir,
        task=task,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        metadata_path=cfg.metadata_path,
        caption_extensions=(cfg.caption_extension,),
        trigger_word=cfg.trigger_word,
        max_seq_len=cfg.max_seq_len,
    )
    return PreflightResult([f for f in report.findings if f.severity == "error"])
