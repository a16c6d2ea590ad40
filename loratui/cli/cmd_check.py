"""`loratui check`: dataset checks before a GPU hour is spent."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from loratui.cli.common import EXIT_UNUSABLE, console, fail, plain_output


def _task_of(task_type: str, method: str) -> str:
    """The check a config's dataset gets: image, text (SFT records) or preference (DPO/ORPO pairs)."""
    if task_type == "image-generation":
        return "image"
    return {"sft": "text", "kto": "kto"}.get(method, "preference")


def _settings_from_config(path: Path) -> dict[str, Any]:
    """The few config values the check needs (validated by ``loratui.config.load_config``)."""
    from loratui.config import ConfigError, load_config

    try:
        cfg = load_config(path).config
    except ConfigError as exc:
        fail(exc.render(), EXIT_UNUSABLE)
    except OSError as exc:
        fail(f"cannot read config {path}: {exc}", EXIT_UNUSABLE)
    return {
        "task": _task_of(cfg.task_type, cfg.method),
        "base_model": cfg.base_model or None,
        "data": Path(cfg.train_data_dir).expanduser() if cfg.train_data_dir else None,
        "metadata": Path(cfg.metadata_path).expanduser() if cfg.metadata_path else None,
        "resolution": cfg.resolution,
        "batch_size": cfg.batch_size,
        "max_seq_len": cfg.max_seq_len,
        "trigger_word": cfg.trigger_word,
        "caption_extensions": (cfg.caption_extension,),
        "trust_remote_code": cfg.trust_remote_code,
        "reg_data_dir": Path(cfg.reg_data_dir).expanduser() if cfg.reg_data_dir else None,
        "mask_dir": Path(cfg.mask_dir).expanduser() if cfg.mask_dir else None,
        "alpha_mask": cfg.alpha_mask,
    }


def check(
    path: Path | None = typer.Argument(
        None, help="Dataset folder (images + captions) or JSON/JSONL file/folder (default: the config's)."
    ),
    task: str | None = typer.Option(
        None,
        "--task",
        help="image, text, preference (chosen/rejected pairs) or kto (pairs or labelled completions); "
        "detected from the files if omitted.",
    ),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="Take resolution, batch size etc. from it."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    deep: bool = typer.Option(False, "--deep", help="Decode every image fully (slower, finds more)."),
    max_examples: int = typer.Option(
        5, "--max-examples", help="Example files shown per finding (0: all kept, up to 50)."
    ),
    resolution: int | None = typer.Option(None, "--resolution", help="Training resolution (default 512)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="For steps per epoch (default 1)."),
    trigger_word: str | None = typer.Option(
        None, "--trigger-word", help="Word every caption should contain."
    ),
    caption_extension: list[str] | None = typer.Option(
        None, "--caption-extension", help="Sidecar caption extension(s) read (default .txt and .caption)."
    ),
    metadata: Path | None = typer.Option(
        None, "--metadata", help="metadata.csv (default: PATH/metadata.csv)."
    ),
    reg_data_dir: Path | None = typer.Option(
        None, "--reg-data-dir", help="Regularization (class) images, checked like the dataset."
    ),
    mask_dir: Path | None = typer.Option(
        None, "--mask-dir", help="Loss masks named like the images: report missing and mis-sized ones."
    ),
    alpha_mask: bool = typer.Option(False, "--alpha-mask", help="Masks come from the images' alpha channel."),
    max_seq_len: int | None = typer.Option(
        None, "--max-seq-len", help="Text: report records longer than this."
    ),
    tokenizer: Path | None = typer.Option(
        None,
        "--tokenizer",
        help="Local tokenizer folder for token counts (default: from the config's base_model).",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow code shipped with the tokenizer folder (auto_map) to run."
    ),
) -> None:
    """Check a dataset and report findings by severity with counts, example files and fixes.

    Exit codes: 0 no errors, 1 errors found, 2 the input is unusable.
    """
    from loratui.data.check import run_checks, tokenizer_path_for
    from loratui.data.image_dataset import DEFAULT_CAPTION_EXTENSIONS
    from loratui.data.report_render import render_report

    settings: dict[str, Any] = _settings_from_config(config) if config is not None else {}
    target = path or settings.get("data")
    if target is None:
        fail("give a dataset PATH or a --config with train_data_dir", EXIT_UNUSABLE)
    if task is not None and task not in ("image", "text", "preference", "kto"):
        fail(f"--task must be image, text, preference or kto, not {task!r}", EXIT_UNUSABLE)
    task = task or settings.get("task")
    exts = tuple(caption_extension) if caption_extension else settings.get("caption_extensions")
    tok = tokenizer
    if tok is None and settings.get("base_model"):
        from loratui.data.check import detect_task

        tok = tokenizer_path_for(settings["base_model"], task or detect_task(target) or "image")
    report = run_checks(
        target,
        task=task,
        resolution=resolution or settings.get("resolution") or 512,
        batch_size=batch_size or settings.get("batch_size") or 1,
        tokenizer_path=tok,
        max_seq_len=max_seq_len or settings.get("max_seq_len"),
        trigger_word=trigger_word or settings.get("trigger_word"),
        deep=deep,
        metadata_path=metadata or settings.get("metadata"),
        caption_extensions=exts or DEFAULT_CAPTION_EXTENSIONS,
        trust_remote_code=trust_remote_code or bool(settings.get("trust_remote_code")),
        reg_data_dir=reg_data_dir or settings.get("reg_data_dir"),
        mask_dir=mask_dir or settings.get("mask_dir"),
        alpha_mask=alpha_mask or bool(settings.get("alpha_mask")),
    )
    shown = max_examples if max_examples > 0 else None
    if json_out:
        typer.echo(report.to_json(max_examples=shown))
    else:
        render_report(report, console(), max_examples=shown or 10**6, plain=plain_output())
    raise typer.Exit(report.exit_code)
