"""Scalar loggers of a run: TensorBoard and (optional) Weights & Biases, behind one small interface.

    loggers = open_loggers(LoggerSettings.from_config(cfg), run.logs_dir, run.name, warn)
    loggers.add_scalar("loss", 0.12, step)
    loggers.close()

`log_with: [tensorboard, wandb]` picks them. W&B runs offline unless the user chose otherwise: with
`WANDB_MODE` or `WANDB_API_KEY` set in the environment loratui passes no mode and wandb does what they say;
otherwise the run is written under `<run dir>/logs/wandb/offline-run-*` and uploaded later with
`wandb sync <that folder>`. Without the `wandb` package: `pip install "loratui[wandb]"`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

WANDB_EXTRA = 'pip install "loratui[wandb]"'


class MissingLogger(RuntimeError):
    """A logger asked for whose package is not installed; the message names the extra."""


class ScalarLogger(Protocol):
    """What every logger does: record one number at a step, flush, close."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class LoggerSettings:
    """Which loggers a run writes to, and the W&B names."""

    log_with: tuple[str, ...] = ("tensorboard",)
    wandb_project: str = "loratui"
    wandb_run_name: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # recorded as the W&B run's config

    @classmethod
    def from_config(cls, cfg: Any) -> LoggerSettings:
        return cls(
            log_with=tuple(cfg.log_with),
            wandb_project=cfg.wandb_project,
            wandb_run_name=cfg.wandb_run_name,
            config=cfg.model_dump(mode="json"),
        )


class TensorBoardLogger:
    """torch's SummaryWriter into the run's logs folder."""

    name = "tensorboard"

    def __init__(self, logs_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(logs_dir))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()


def wandb_mode(environ: dict[str, str] | None = None) -> str | None:
    """ "offline" unless the environment says how W&B should run (WANDB_MODE, or an API key: online)."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE") or env.get("WANDB_API_KEY"):
        return None  # the user's choice; wandb reads it itself
    return "offline"


def wandb_run_id(run_name: str) -> str:
    """A W&B run id from the run directory's name, so a restarted worker continues the same W&B run."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64] or "loratui"


class WandbLogger:
    """One W&B run per loratui run (resumed by id after a worker restart)."""

    name = "wandb"

    def __init__(self, settings: LoggerSettings, logs_dir: Path, run_name: str):
        try:
            import wandb
        except ImportError:
            raise MissingLogger(
                f"log_with: wandb needs the wandb package: {WANDB_EXTRA} (or leave wandb out of log_with)"
            ) from None
        self.wandb = wandb
        logs_dir.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "project": settings.wandb_project,
            "name": settings.wandb_run_name or run_name,
            "id": wandb_run_id(run_name),
            "resume": "allow",
            "dir": str(logs_dir),
            "config": settings.config,
        }
        mode = wandb_mode()
        if mode:
            kwargs["mode"] = mode
        self.mode = mode or os.environ.get("WANDB_MODE") or "online"
        self.run = wandb.init(**kwargs)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.run.log({tag: value}, step=step)

    def flush(self) -> None:
        return None  # wandb writes as it goes

    def close(self) -> None:
        self.run.finish()


class ScalarLoggers:
    """Every logger a run writes to; a scalar goes to each of them."""

    def __init__(self, loggers: list[Any]):
        self.loggers = loggers

    @property
    def names(self) -> list[str]:
        return [logger.name for logger in self.loggers]

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        for logger in self.loggers:
            logger.add_scalar(tag, value, step)

    def flush(self) -> None:
        for logger in self.loggers:
            logger.flush()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def missing_logger_message(log_with: list[str] | tuple[str, ...]) -> str | None:
    """Said before training starts when `log_with` names a logger whose package is not installed."""
    import importlib.util

    if "wandb" in log_with and importlib.util.find_spec("wandb") is None:
        return (
            f"log_with: wandb, but the wandb package is not installed: {WANDB_EXTRA}; the run logs to the "
            "other loggers and events.jsonl only"
        )
    return None


def open_loggers(
    settings: LoggerSettings, logs_dir: Path, run_name: str, report: Callable[[str, str], None]
) -> ScalarLoggers:
    """Open the loggers of `settings.log_with`. A logger that cannot start is reported (`report("warning",
    message)`) and left out: the run's events still carry every number; a missing package names its extra."""

    def warn(message: str) -> None:
        report("warning", message)

    loggers: list[Any] = []
    for name in settings.log_with:
        try:
            if name == "tensorboard":
                loggers.append(TensorBoardLogger(logs_dir))
            elif name == "wandb":
                logger = WandbLogger(settings, logs_dir, run_name)
                loggers.append(logger)
                if logger.mode == "offline":
                    report(
                        "info",
                        f"W&B logs offline to {logs_dir / 'wandb'}; upload with `wandb sync "
                        f"{logs_dir / 'wandb'}/offline-run-*` (set WANDB_MODE=online to log live)",
                    )
            else:
                warn(f"unknown logger {name!r} in log_with; use tensorboard or wandb")
        except MissingLogger as exc:
            warn(str(exc))
        except Exception as exc:  # a broken logger must not stop training
            warn(f"{name} logging disabled: {exc}")
    return ScalarLoggers(loggers)
