"""Entry points the CLI calls (Textual is imported here, never by `loratui --help`)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path


def _leave(code: int) -> int:
    """Return `code`; if workers still run in threads (a planner trace, captioning), exit at once rather
    than wait for them: their writes are atomic, and training runs in its own process anyway."""
    busy = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if busy:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def open_training_view(run_dir: Path) -> int:
    """Show the training view of `run_dir` until the user detaches (0; training goes on) or quits after
    the run ended (0 finished, 130 stopped, 1 failed)."""
    from loratui.tui.training_app import TrainingApp

    app = TrainingApp(Path(run_dir))
    code = app.run()
    return _leave(int(code or 0))


def run_wizard(config: Path | None = None) -> int:
    """Run the wizard, optionally pre-filled from `config`. Returns the process exit code."""
    from loratui.tui.wizard_app import WizardApp
    from loratui.tui.wizard_state import WizardState

    app = WizardApp(WizardState(config_path=Path(config) if config else None))
    code = app.run()
    return _leave(int(code or 0))
