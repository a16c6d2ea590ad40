"""What both demos share: plain printing, one training thread, and starting the run."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def say(console: Any, text: str = "") -> None:
    """Print `text` as is (no rich markup or highlighting: paths and prompts contain brackets)."""
    console.print(text, markup=False, highlight=False)


@dataclass
class DemoSession:
    """The console, the demo's folder, its step count and when it started."""

    console: Any
    out: Path
    steps: int
    started: float = field(default_factory=time.perf_counter)

    def say(self, text: str = "") -> None:
        say(self.console, text)

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def start_run(self, config_path: Path) -> tuple[Any, Any]:
        """(resolved config, run directory) for `config_path`; the demo replaces its previous output."""
        from loratui.config import load_config
        from loratui.train.process.launch import prepare_run

        resolved = load_config(config_path)
        run, _ = prepare_run(resolved, resume=None, overwrite=True)
        return resolved, run


@contextlib.contextmanager
def demo_session(
    out: Path, steps: int | None, default_steps: int, console: Any = None
) -> Iterator[DemoSession]:
    """A demo's session; torch trains on one thread meanwhile (a tiny model trains faster so)."""
    import torch

    if console is None:
        from rich.console import Console

        console = Console()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield DemoSession(console, Path(out).absolute(), steps or default_steps)
    finally:
        torch.set_num_threads(threads)
