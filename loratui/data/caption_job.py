"""The captioning command shared by ``loratui caption`` and ``python -m loratui.tools.auto_label``.

Plans first (cheap, no model), then resolves and loads the model from local files only, captions in
batches with a progress bar (rich with ETA on a terminal, plain lines otherwise) and prints a summary.
Returns the exit code: 0 done (or nothing to do), 1 some images could not be read, 2 unusable input
(no images, model not available locally, a metadata.csv that would lose rows if rewritten).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loratui.data.caption_models import MAX_NEW_TOKENS


@dataclass
class CaptionOptions:
    """Everything the captioning command takes."""

    root: Path
    model: str = "blip-base"
    output: Path | None = None
    fmt: str = "csv"
    prefix: str = ""
    overwrite: bool = False
    batch_size: int = 8
    device: str | None = None
    style: str = "caption"
    replace: list[str] = field(default_factory=list)
    append: str = ""
    caption_extension: str = ".txt"
    max_new_tokens: int = MAX_NEW_TOKENS
    trust_remote_code: bool = False
    mode: str | None = None  # keep | append | overwrite (None: from ``overwrite``)
    general_threshold: float = 0.35
    character_threshold: float = 0.85
    include_rating: bool = False
    underscores_to_spaces: bool = True
    exclude_tags: list[str] = field(default_factory=list)
    task: str = "<MORE_DETAILED_CAPTION>"

    def tagger_options(self) -> Any:
        """The WD tagger settings of these options."""
        from loratui.data.wd_tagger import TaggerOptions

        return TaggerOptions(
            general_threshold=self.general_threshold,
            character_threshold=self.character_threshold,
            include_rating=self.include_rating,
            underscores_to_spaces=self.underscores_to_spaces,
            exclude_tags=list(self.exclude_tags),
        )


def _say(console: Any, text: str, plain: bool, err: bool = False) -> None:
    if plain or console is None:
        print(text, file=sys.stderr if err else sys.stdout, flush=True)
    else:
        from rich.markup import escape

        console.print(f"[red]{escape(text)}[/]" if err else escape(text))


class _PlainProgress:
    """Progress lines for logs and pipes: at most one every ``every`` seconds, plus the last one."""

    def __init__(self, total: int, every: float = 2.0) -> None:
        self.total, self.every = total, every
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int, rel: str) -> None:
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate > 0 else 0.0
        print(f"captioned {done}/{total} images ({rate:.1f} img/s, ETA {eta:.0f}s) {rel}", flush=True)


def run_caption_job(opts: CaptionOptions, console: Any = None, plain: bool = True) -> int:
    """Run the whole captioning command; returns the exit code."""
    from loratui.data.caption_models import ModelNotAvailable, load_captioner, resolve_caption_model
    from loratui.data.caption_text import parse_replacements
    from loratui.data.captioning import STYLES, CaptionError, caption_dataset, plan_captions

    try:
        if opts.batch_size < 1:
            raise CaptionError("--batch-size must be at least 1")
        if opts.style not in STYLES:
            raise CaptionError(f"--style must be caption or tags, not {opts.style!r}")
        replacements = parse_replacements(opts.replace)
        plan = plan_captions(
            opts.root,
            fmt=opts.fmt,
            output=opts.output,
            overwrite=opts.overwrite,
            caption_extension=opts.caption_extension,
            mode=opts.mode,
        )
        opts.tagger_options().validate()
    except (CaptionError, ValueError) as exc:
        _say(console, f"error: {exc}", plain, err=True)
        return 2
    skipped = len(plan.skipped_existing)
    if not plan.todo:
        _say(
            console,
            f"Nothing to caption: all {skipped} images already have captions "
            "(--mode append adds tags, --mode overwrite redoes them).",
            plain,
        )
        return 0
    try:
        model_path = resolve_caption_model(opts.model)
        captioner = load_captioner(
            model_path,
            opts.device,
            max_new_tokens=opts.max_new_tokens,
            trust_remote_code=opts.trust_remote_code,
            tagger_options=opts.tagger_options(),
            task=opts.task,
        )
    except ModelNotAvailable as exc:
        _say(console, f"error: {exc}", plain, err=True)
        return 2
    device = getattr(captioner, "device", "cpu")
    where = plan.target if plan.fmt == "csv" else f"{plan.caption_extension} files next to the images"
    _say(console, f"Captioning {len(plan.todo)} images with {model_path} on {device} into {where}", plain)
    kwargs = dict(
        prefix=opts.prefix,
        overwrite=opts.overwrite,
        batch_size=opts.batch_size,
        style=opts.style,
        replacements=replacements,
        append=opts.append,
        plan=plan,
    )
    try:
        if plain or console is None:
            result = caption_dataset(
                opts.root, captioner, on_progress=_PlainProgress(len(plan.todo)), **kwargs
            )
        else:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            columns = (
                TextColumn("captioning"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=console) as progress:
                task = progress.add_task("caption", total=len(plan.todo))
                result = caption_dataset(
                    opts.root,
                    captioner,
                    on_progress=lambda done, total, rel: progress.update(task, completed=done),
                    **kwargs,
                )
    except CaptionError as exc:
        _say(console, f"error: {exc}", plain, err=True)
        return 2
    target = result.output if result.fmt == "csv" else f"{plan.caption_extension} sidecar files"
    line = f"Wrote {len(result.written)} captions to {target} in {result.seconds:.1f}s"
    if skipped:
        line += f"; kept {skipped} existing captions (--mode append adds tags, --mode overwrite redoes them)"
    _say(console, line + ".", plain)
    for rel, text in result.written[:3]:
        _say(console, f"  {rel}: {text}", plain)
    for note in result.notes:
        _say(console, f"note: {note}", plain)
    for rel, reason in result.failed:
        _say(console, f"error: {rel}: {reason}", plain, err=True)
    return 1 if result.failed else 0
