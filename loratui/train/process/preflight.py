"""Checks run before a worker is started: the dataset check (same code as `loratui check`)."""

from __future__ import annotations

from loratui.config import ResolvedConfig


def run_preflight(resolved: ResolvedConfig, *, skip_checks: bool, out) -> bool:
    """Run the dataset checks; False (after printing the errors) when training must not start."""
    try:
        from loratui.data.check import run_checks
    except ImportError:
        return True
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
    errors = [f for f in report.findings if f.severity == "error"]
    if not errors:
        return True
    verb = "continuing anyway (--skip-checks)" if skip_checks else "not training"
    out.print(f"dataset check found {len(errors)} error(s); {verb}:", markup=False)
    for finding in errors:
        out.print(f"  - {finding.message} (fix: {finding.fix})", markup=False)
        for example in finding.examples[:3]:
            where = f"{example.path}:{example.line}" if example.line else example.path
            out.print(f"      {where}", markup=False)
    if not skip_checks:
        out.print("run `loratui check PATH` for the full report, or pass --skip-checks", markup=False)
    return skip_checks
