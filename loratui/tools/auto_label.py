"""Caption a folder of images (argparse wrapper around ``loratui caption``).

    python -m loratui.tools.auto_label --input data/style_train \
        --output data/style_train/metadata.csv --model blip-base

Same behaviour and exit codes as ``loratui caption`` (see ``loratui.data.caption_job``): local models only,
existing captions kept unless ``--overwrite``, atomic writes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from loratui.data.caption_models import MAX_NEW_TOKENS


def build_parser() -> argparse.ArgumentParser:
    """The command-line options."""
    p = argparse.ArgumentParser(
        prog="python -m loratui.tools.auto_label", description=__doc__.splitlines()[0]
    )
    p.add_argument("--input", "-i", type=Path, required=True, help="Folder of images to caption.")
    p.add_argument(
        "--output", "-o", type=Path, default=None, help="metadata.csv to write (default INPUT/metadata.csv)."
    )
    p.add_argument("--model", default="blip-base", help="blip-base, blip-large or a local model folder.")
    p.add_argument(
        "--format", dest="fmt", choices=("csv", "txt"), default="csv", help="metadata.csv or .txt sidecars."
    )
    p.add_argument("--prefix", default="", help='Text put before every caption, e.g. "mychar, ".')
    p.add_argument("--overwrite", action="store_true", help="Re-caption images that already have captions.")
    p.add_argument("--batch-size", type=int, default=8, help="Images per forward pass.")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available).")
    p.add_argument("--style", choices=("caption", "tags"), default="caption", help="Sentences or comma tags.")
    p.add_argument(
        "--replace", action="append", default=[], metavar="OLD=NEW", help="Text replacement. Repeatable."
    )
    p.add_argument("--append", default="", help="Text added after every caption.")
    p.add_argument("--caption-extension", default=".txt", help="Sidecar extension for --format txt.")
    p.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="Longest generated caption.")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parse ``argv`` and run the captioning; returns the exit code."""
    from loratui.data.caption_job import CaptionOptions, run_caption_job

    args = build_parser().parse_args(argv)
    opts = CaptionOptions(
        root=args.input,
        model=args.model,
        output=args.output,
        fmt=args.fmt,
        prefix=args.prefix,
        overwrite=args.overwrite,
        batch_size=args.batch_size,
        device=args.device,
        style=args.style,
        replace=args.replace,
        append=args.append,
        caption_extension=args.caption_extension,
        max_new_tokens=args.max_new_tokens,
    )
    return run_caption_job(opts, console=None, plain=True)


if __name__ == "__main__":
    raise SystemExit(main())
