"""The `loratui` Typer application. Heavy libraries are imported inside the commands."""

from __future__ import annotations

import typer

from loratui import __version__
from loratui.cli import (
    cmd_attach,
    cmd_caption,
    cmd_check,
    cmd_demo,
    cmd_export,
    cmd_gpu,
    cmd_presets,
    cmd_recommend,
    cmd_runs,
    cmd_sample,
    cmd_stop,
    cmd_train,
    cmd_wizard,
)

app = typer.Typer(
    name="loratui",
    help=(
        "LoRA fine-tuning in the terminal: inspect the GPU, pick settings that fit, check the dataset, "
        "train with OOM recovery and export kohya/A1111 .safetensors or PEFT adapters."
    ),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,  # plain click help: keeps `loratui --help` fast (no rich/markdown/pygments import)
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loratui {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """LoRA fine-tuning in the terminal."""


app.command("wizard")(cmd_wizard.wizard)
app.command("train")(cmd_train.train)
app.command("gpu")(cmd_gpu.gpu)
app.command("recommend")(cmd_recommend.recommend)
app.add_typer(cmd_presets.app, name="presets")
app.command("check")(cmd_check.check)
app.command("caption")(cmd_caption.caption)
app.command("export")(cmd_export.export)
app.command("sample")(cmd_sample.sample)
app.command("runs")(cmd_runs.runs)
app.command("attach")(cmd_attach.attach)
app.command("stop")(cmd_stop.stop)
app.command("demo")(cmd_demo.demo)


def main() -> None:
    """Console-script entry point."""
    app()
