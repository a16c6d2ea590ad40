"""`loratui caption`: automatic captioning with a local model."""

from __future__ import annotations

from pathlib import Path

import typer

from loratui.cli.common import console, plain_output


def caption(
    path: Path = typer.Argument(..., help="Folder of images to caption."),
    model: str = typer.Option(
        "blip-base",
        "--model",
        help="blip-base, blip-large, or a local model folder (never downloaded): BLIP, Florence-2, or a "
        "WD tagger folder (model.onnx + selected_tags.csv).",
    ),
    output: Path | None = typer.Option(None, "--output", "-o", help="Write captions to this metadata.csv."),
    fmt: str = typer.Option("csv", "--format", help="csv (one metadata.csv) or txt (sidecar files)."),
    prefix: str = typer.Option("", "--prefix", help='Text put before every caption, e.g. "mychar, ".'),
    skip_existing: bool = typer.Option(
        True, "--skip-existing/--overwrite", help="Keep existing captions (--overwrite = --mode overwrite)."
    ),
    mode: str | None = typer.Option(
        None,
        "--mode",
        help="Images that already have a caption: keep (skip them, default), append (add new tags after "
        "theirs, duplicates dropped) or overwrite.",
    ),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass."),
    device: str | None = typer.Option(None, "--device", help="cuda or cpu (default: cuda when available)."),
    style: str = typer.Option("caption", "--style", help="caption (sentences) or tags (comma-separated)."),
    replace: list[str] | None = typer.Option(
        None, "--replace", help="OLD=NEW text replacement on generated captions. Repeatable."
    ),
    append: str = typer.Option("", "--append", help='Text added after every caption, e.g. "masterpiece".'),
    caption_extension: str = typer.Option(
        ".txt", "--caption-extension", help="Sidecar extension for --format txt."
    ),
    max_new_tokens: int = typer.Option(
        48, "--max-new-tokens", help="Longest caption the model may generate."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow code shipped with the model folder (auto_map) to run."
    ),
    general_threshold: float = typer.Option(
        0.35, "--general-threshold", help="WD tagger: lowest probability for a general tag."
    ),
    character_threshold: float = typer.Option(
        0.85, "--character-threshold", help="WD tagger: lowest probability for a character tag."
    ),
    include_rating: bool = typer.Option(
        False, "--include-rating", help="WD tagger: put the most probable rating tag first."
    ),
    underscores_to_spaces: bool = typer.Option(
        True,
        "--underscores-to-spaces/--keep-underscores",
        help="WD tagger: long_hair -> long hair (kaomojis such as ^_^ are kept).",
    ),
    exclude_tags: str = typer.Option(
        "", "--exclude-tags", help='WD tagger: comma-separated tags never written, e.g. "simple background".'
    ),
    task: str = typer.Option(
        "<MORE_DETAILED_CAPTION>",
        "--task",
        help="Florence-2: <MORE_DETAILED_CAPTION>, <DETAILED_CAPTION> or <CAPTION>.",
    ),
) -> None:
    """Caption images with BLIP, Florence-2 or a WD booru tagger and write metadata.csv or .txt files.

    Existing captions are kept unless --mode append or --mode overwrite; writes are atomic.
    """
    from loratui.data.caption_job import CaptionOptions, run_caption_job

    opts = CaptionOptions(
        root=path,
        model=model,
        output=output,
        fmt=fmt,
        prefix=prefix,
        overwrite=not skip_existing,
        batch_size=batch_size,
        device=device,
        style=style,
        replace=list(replace or []),
        append=append,
        caption_extension=caption_extension,
        max_new_tokens=max_new_tokens,
        trust_remote_code=trust_remote_code,
        mode=mode,
        general_threshold=general_threshold,
        character_threshold=character_threshold,
        include_rating=include_rating,
        underscores_to_spaces=underscores_to_spaces,
        exclude_tags=[t.strip() for t in exclude_tags.split(",") if t.strip()],
        task=task,
    )
    plain = plain_output()
    raise typer.Exit(run_caption_job(opts, console(), plain=plain))
