"""`loratui demo`: the whole job on bundled tiny models and data, offline."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    task: str = typer.Option("image", "--task", help="image (Stable Diffusion LoRA) or text (LLM LoRA)."),
    out: Path = typer.Option(
        Path("loratui-demo"), "--out", help="Folder for the demo's models, data and run."
    ),
    steps: int | None = typer.Option(None, "--steps", help="Training steps (default: the demo's own)."),
) -> None:
    """Run the whole job offline on a small bundled model and dataset (no download, no GPU).

    Checks a bundled dataset, trains a LoRA for a few dozen steps, exports it and reloads it to show the
    model before and after: for text, a small Llama shipped with loratui answers held-out and trained
    questions of a medical Q&A set, side by side, with the validation loss drop.
    """
    from loratui.cli.common import EXIT_UNUSABLE, console, optional_dependencies

    if task not in ("image", "text"):
        typer.echo("error: --task must be image or text", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    with optional_dependencies(f"demo --task {task}"):  # any other import error raises as it is
        if task == "image":
            from loratui.demo.image_demo import run_demo
        else:
            from loratui.demo.text_demo import run_demo
        code = run_demo(out, steps=steps, console=console())
    raise typer.Exit(code)
