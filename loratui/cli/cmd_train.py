"""`loratui train`: resolve the config, check the data, and run training in a worker process."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from loratui.cli.common import EXIT_ERRORS, EXIT_UNUSABLE

if TYPE_CHECKING:
    from loratui.config.task_keys import IgnoredSetting


def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML training config."),
    preset: str | None = typer.Option(
        None,
        "--preset",
        help="VRAM-tier preset (see `loratui presets list`), or `auto`: the memory planner's top option.",
    ),
    vram: str | None = typer.Option(
        None,
        "--vram",
        help="With --preset auto or --dry-run: plan for a card of this size, e.g. 8GB (as printed on the card).",
    ),
    card: str | None = typer.Option(
        None, "--card", help='With --preset auto or --dry-run: plan for a known card, e.g. "RTX 4060".'
    ),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set lora_rank=16 (repeatable)."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the resolved config, its sources and the predicted peak memory; load and train nothing.",
    ),
    json_out: bool = typer.Option(False, "--json", help="With --dry-run: machine-readable output."),
    resume: str | None = typer.Option(
        None, "--resume", help="latest, a run directory, or a checkpoint folder."
    ),
    allow_changed_data: bool = typer.Option(
        False,
        "--allow-changed-data",
        help="With --resume: continue even though the base model or the dataset changed since the checkpoint.",
    ),
    skip_checks: bool = typer.Option(
        False, "--skip-checks", help="Train even if the dataset check has errors."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Allow replacing a different run's exported files."
    ),
    no_tui: bool = typer.Option(False, "--no-tui", help="Plain progress lines instead of the training view."),
    detach: bool = typer.Option(False, "--detach", help="Start the worker and return at once."),
    base_model: str | None = typer.Option(None, "--base-model", help="Base model path or local HF id."),
    train_data_dir: str | None = typer.Option(None, "--train-data-dir", help="Dataset folder or file."),
    output_dir: str | None = typer.Option(None, "--output-dir", help="Where the exported LoRA goes."),
    lora_rank: int | None = typer.Option(None, "--lora-rank", "--rank", help="LoRA rank."),
    lora_alpha: float | None = typer.Option(None, "--lora-alpha", "--alpha", help="LoRA alpha."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Micro-batch size."),
    gradient_accumulation_steps: int | None = typer.Option(None, "--grad-accum", help="Accumulation steps."),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs."),
    max_steps: int | None = typer.Option(None, "--max-steps", help="Stop after N optimizer steps."),
    learning_rate: float | None = typer.Option(None, "--learning-rate", "--lr", help="Learning rate."),
    resolution: int | None = typer.Option(None, "--resolution", help="Image resolution."),
    max_seq_len: int | None = typer.Option(None, "--max-seq-len", help="LLM max sequence length."),
    mixed_precision: str | None = typer.Option(None, "--mixed-precision", help="auto, no, fp16 or bf16."),
    seed: int | None = typer.Option(None, "--seed", help="Random seed."),
    allow_pickle: bool | None = typer.Option(None, "--allow-pickle", help="Allow .ckpt/.bin pickle weights."),
    trust_remote_code: bool | None = typer.Option(
        None, "--trust-remote-code", help="Allow code shipped in the model folder to run."
    ),
    simulate_vram: str | None = typer.Option(None, "--simulate-vram", help="Simulate a card, e.g. 3GiB."),
    no_oom_cache: bool = typer.Option(
        False, "--no-oom-cache", help="Do not start from settings that fitted this model on this GPU before."
    ),
    runs_dir: Path | None = typer.Option(None, "--runs-dir", help="Where run directories are created."),
    gpus: str | None = typer.Option(
        None,
        "--gpus",
        help="Multi-GPU: a count (4) or a list (0,2); one process per GPU, batch_size per GPU.",
    ),
    cpu_processes: int | None = typer.Option(
        None, "--cpu-processes", help="Run N processes on the CPU (gloo), to test multi-process training."
    ),
    accelerate_config: Path | None = typer.Option(
        None,
        "--accelerate-config",
        help="An accelerate config file (multi-node: run the same command on every machine, each with its "
        "machine_rank).",
    ),
    fsdp: bool = typer.Option(
        False,
        "--fsdp",
        help="With --gpus N: shard the frozen base model, the LoRA and the optimizer state over the GPUs "
        "(FSDP2), for models that do not fit one GPU (config key fsdp).",
    ),
) -> None:
    """Train a LoRA (image or text) from a YAML config, in a worker process that survives the terminal.

    Values resolve as: defaults < --preset < config file < --set < explicit flags.

    The worker runs in its own session, so training survives the terminal or SSH connection closing;
    follow it again with `loratui attach`.
    """
    from loratui.cli.common import console
    from loratui.config import ConfigError, check_paths, load_config
    from loratui.config.task_keys import ignored_settings

    processes = _processes(gpus, cpu_processes, accelerate_config, dry_run=dry_run)
    flags = {
        "base_model": base_model,
        "train_data_dir": train_data_dir,
        "output_dir": output_dir,
        "lora_rank": lora_rank,
        "lora_alpha": lora_alpha,
        "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "epochs": epochs,
        "max_steps": max_steps,
        "learning_rate": learning_rate,
        "resolution": resolution,
        "max_seq_len": max_seq_len,
        "mixed_precision": mixed_precision,
        "seed": seed,
        "allow_pickle": allow_pickle,
        "trust_remote_code": trust_remote_code,
        "simulate_vram": simulate_vram,
        "oom_cache": False if no_oom_cache else None,
        "runs_dir": str(runs_dir) if runs_dir else None,
        "fsdp": True if fsdp else None,
    }
    if config is None and resume is None and not base_model:
        typer.echo("error: give --config x.yaml (or --resume latest|RUN)", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    auto = preset is not None and preset.lower() == "auto"
    if auto and resume is not None:
        typer.echo(
            "error: --preset auto cannot change a run being resumed (its checkpoint holds the LoRA rank and "
            "optimizer state it was trained with); resume without --preset, and out-of-memory recovery lowers "
            "the batch split if needed",
            err=True,
        )
        raise typer.Exit(EXIT_UNUSABLE)
    count = processes.processes if processes is not None else 1
    if config is None and resume is not None:
        config = _resumed_config(resume, runs_dir)
    try:
        resolved = load_config(config, preset=None if auto else preset, overrides=set_, flags=flags)
    except ConfigError as exc:
        typer.echo(exc.render(), err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    if auto:
        resolved = _apply_auto(resolved, vram, card, out=None if json_out else console(), processes=count)
    path_problems = check_paths(resolved)
    ignored = ignored_settings(resolved)
    _refuse_fsdp_settings(resolved)

    if dry_run:
        prediction = _prediction(resolved, vram, card, processes=count)
        _print_dry_run(resolved, path_problems, json_out, prediction, processes, ignored)
        raise typer.Exit(EXIT_ERRORS if path_problems else 0)
    if path_problems:
        typer.echo(ConfigError(path_problems).render(), err=True)
        raise typer.Exit(EXIT_ERRORS)

    from loratui.cli.launch import launch_training

    out = console()
    print_ignored(ignored, out)
    code = launch_training(
        resolved,
        resume=resume,
        skip_checks=skip_checks,
        overwrite=overwrite,
        detach=detach,
        tui=not no_tui,
        out=out,
        processes=processes,
        allow_changed_data=allow_changed_data,
    )
    raise typer.Exit(code)


def _refuse_fsdp_settings(resolved) -> None:
    """Settings FSDP cannot train with, before anything starts (the worker checks them again)."""
    from loratui.train.process.fsdp import FsdpUnavailable, check_fsdp_settings, check_precision

    cfg = resolved.config
    if not cfg.fsdp or cfg.task_type != "text-generation":
        return
    try:
        check_fsdp_settings(cfg)
        check_precision(cfg.mixed_precision)
    except FsdpUnavailable as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERRORS) from None


def _resumed_config(resume: str, runs_dir: Path | None) -> Path:
    """The config.yaml of the run `--resume` names (a run directory carries its config, so resuming it needs
    no --config); `latest`: the newest run with a checkpoint in --runs-dir (default: the config default)."""
    from loratui.config import TrainConfig
    from loratui.runs.checkpoints import resolve_resume
    from loratui.runs.config_file import config_path

    where = runs_dir or Path(TrainConfig.model_fields["runs_dir"].default)
    try:
        run, _ = resolve_resume(resume, where)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNUSABLE) from None
    path = config_path(run.path)
    if not path.is_file():
        typer.echo(f"error: run {run.path} has no config.yaml; give the config with --config", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    return path


def _processes(gpus: str | None, cpu_processes: int | None, accelerate_config: Path | None, *, dry_run: bool):
    """The multi-process spec of --gpus/--cpu-processes/--accelerate-config (None: one process)."""
    from loratui.train.process.launcher import LaunchError, processes_from_options

    try:
        spec = processes_from_options(gpus, cpu_processes, accelerate_config)
    except LaunchError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_UNUSABLE) from None
    if spec is None or spec.cpu or dry_run:
        return spec
    visible = _cuda_devices()
    if visible == 0:
        typer.echo(
            "error: --gpus/--accelerate-config need CUDA GPUs and none is visible here; "
            "use --cpu-processes N to try multi-process training on the CPU",
            err=True,
        )
        raise typer.Exit(EXIT_UNUSABLE)
    wanted = max(spec.gpus) + 1 if spec.gpus else spec.per_node
    if wanted > visible:
        typer.echo(f"error: {spec.describe()} asked for, but only {visible} GPU(s) are visible", err=True)
        raise typer.Exit(EXIT_UNUSABLE)
    return spec


def _cuda_devices() -> int:
    """Visible CUDA devices (torch is imported here, not at start-up, to keep `--help` light)."""
    import torch

    return int(torch.cuda.device_count())


def _budget(vram: str | None, card: str | None):
    from loratui.cli.memory_args import usable_memory_or_exit

    return usable_memory_or_exit(vram=vram, card=card, purpose="--preset auto needs the card's memory")


def _apply_auto(resolved, vram: str | None, card: str | None, out, processes: int = 1):
    """`--preset auto`: the planner's top option for the card (per GPU with several processes); keys given by
    --set or flags stay fixed."""
    from loratui.memory.integration import NoFittingOption, apply_auto_preset
    from loratui.util.sizes import format_bytes

    budget = _budget(vram, card)
    fixed = frozenset(key for key, source in resolved.sources.items() if source in ("--set", "flag"))
    try:
        updated = apply_auto_preset(resolved, budget.bytes, fixed=fixed, processes=processes)
    except NoFittingOption as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(EXIT_ERRORS) from None
    if out is not None:
        changed = [
            f"{key}={getattr(updated.config, key)!r}"
            for key, source in updated.sources.items()
            if resolved.sources.get(key) != source
        ]
        out.print(
            f"preset auto for {budget.label} ({format_bytes(budget.bytes)} usable): "
            + (", ".join(changed) if changed else "your settings already fit"),
            highlight=False,
            markup=False,
        )
    return updated


def _prediction(resolved, vram: str | None, card: str | None, processes: int = 1) -> dict | None:
    """The planner's prediction for the resolved config (per GPU with several processes); on failure a dict
    with `error` only, so that the dry run still shows the config."""
    from loratui.memory.integration import dry_run_prediction

    budget = _budget(vram, card) if (vram or card) else None
    try:
        return dry_run_prediction(resolved, budget, processes=processes)
    except Exception as exc:  # the dry run must still show the config when the planner fails
        return {"error": f"{type(exc).__name__}: {exc}"}


def print_ignored(ignored: Sequence[IgnoredSetting], out) -> None:
    """One warning line (never wrapped) per key the run's task type does not read."""
    for item in ignored:
        out.print(f"warning: {item.message()}", highlight=False, markup=False, soft_wrap=True)


def _print_dry_run(
    resolved,
    problems,
    json_out: bool,
    prediction: dict | None = None,
    processes=None,
    ignored: Sequence[IgnoredSetting] = (),
) -> None:
    from dataclasses import asdict

    from rich.markup import escape
    from rich.table import Table

    from loratui.cli.common import console
    from loratui.data.regularization import epoch_line, epoch_plan

    if json_out:
        payload = {
            "config": resolved.config.model_dump(mode="json"),
            "sources": {key: source for key, _, source in resolved.source_rows()},
            "family": resolved.family,
            "preset": resolved.preset,
            "problems": [str(p) for p in problems],
            "ignored": [{"key": item.key, "source": item.source, "reason": item.reason} for item in ignored],
            "memory": prediction,
        }
        counts = epoch_plan(resolved.config)
        if counts is not None:
            payload["data"] = {**asdict(counts), "steps_per_epoch": counts.steps_per_epoch}
        if processes is not None:
            from loratui.train.process.batches import global_batch

            cfg = resolved.config
            payload["processes"] = {
                **processes.to_json(),
                "batch_size_per_device": cfg.batch_size,
                "global_batch": global_batch(
                    cfg.batch_size, cfg.gradient_accumulation_steps, processes.processes
                ),
                "memory_is_per_gpu": True,
            }
        typer.echo(json.dumps(payload, indent=2, ensure_ascii=False))
        return
    out = console()
    table = Table(title=f"resolved config (family: {resolved.family})", title_justify="left")
    table.add_column("key")
    table.add_column("value")
    table.add_column("from")
    for key, value, source in resolved.source_rows():
        style = "dim" if source == "default" else ""
        table.add_row(escape(key), escape(json.dumps(value, ensure_ascii=False)), escape(source), style=style)
    out.print(table)
    counts = epoch_plan(resolved.config)
    if counts is not None:
        cfg = resolved.config
        out.print(epoch_line(counts, cfg.epochs, cfg.max_steps), highlight=False, markup=False)
    if prediction is not None:
        from loratui.memory.integration import dry_run_lines

        if "error" in prediction:
            out.print(f"memory prediction unavailable: {prediction['error']}", highlight=False, markup=False)
        else:
            per_gpu = ""
            if resolved.config.fsdp:
                count = processes.processes if processes else 1
                per_gpu = f" (per GPU with fsdp: 1/{count} of the model, batch_size samples)"
            elif processes:
                per_gpu = " (per GPU: each process holds the model and batch_size samples)"
            for number, line in enumerate(dry_run_lines(prediction)):
                out.print(line + (per_gpu if number == 0 else ""), highlight=False, markup=False)
    if processes is not None:
        from loratui.cli.launch import distributed_summary

        out.print(distributed_summary(resolved, processes), highlight=False, markup=False)
    from loratui.train.loop.loggers import missing_logger_message

    missing = missing_logger_message(resolved.config.log_with)
    if missing:
        out.print(f"warning: {missing}", highlight=False, markup=False, soft_wrap=True)
    print_ignored(ignored, out)
    for problem in problems:
        out.print(f"[red]problem:[/red] {problem}", highlight=False)
