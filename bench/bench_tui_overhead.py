"""Training speed with the training view attached vs headless, on the same run, in one benchmark run.

Trains the tiny SD 1.5 model on a small generated dataset in a detached worker (`loratui train --detach`,
nothing watching) and alternates windows of optimizer steps:

- headless: no viewer;
- viewed:   `loratui attach RUN` renders the training view in a real terminal (tmux, 120x40).

Alternating windows inside one run cancel out the load of other jobs on a shared machine, which changes
far more between separate runs than a viewer costs. Samples/s comes from the run's own step events; the
viewer's CPU time is read from /proc. Bound: viewed samples/s / headless samples/s >= 0.98.

    python bench/bench_tui_overhead.py [--windows 6] [--steps-per-window 8] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

BOUND = 0.98
BATCH = 2
SETTLE_STEPS = 2  # steps skipped after attaching or detaching (viewer start-up, replay of the history)


def make_project(root: Path, steps: int) -> Path:
    """Tiny SD model, 8 captioned 64x64 images, and a config; returns the config path."""
    from PIL import Image, ImageDraw

    from loratui.tiny_models import build_tiny_sd

    model = build_tiny_sd(root / "models" / "sd15", "sd15")
    data = root / "data"
    data.mkdir(parents=True)
    for i in range(8):
        image = Image.new("RGB", (64, 64), (240, 235, 225))
        ImageDraw.Draw(image).rectangle((8 + i, 8, 56, 56 - i), fill=(30 * i, 120, 200))
        image.save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"benchchar, a shape, sample {i}\n", encoding="utf-8")
    config = root / "bench.yaml"
    config.write_text(
        f"base_model: {model}\ntrain_data_dir: {data}\noutput_dir: {root / 'output' / 'bench'}\n"
        f"runs_dir: {root / 'runs'}\nresolution: 64\nlora_rank: 4\nbatch_size: {BATCH}\nmax_steps: {steps}\n"
        "learning_rate: 1e-4\nseed: 1\nlog_every_steps: 1\n",
        encoding="utf-8",
    )
    return config


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Run:
    """The detached training run and its step events."""

    def __init__(self, path: Path) -> None:
        from loratui.runs.events import EventReader

        self.path = path
        self.reader = EventReader(path / "events.jsonl")
        self.steps: list[tuple[int, float]] = []  # (step, event time)
        self.ended = False

    def poll(self) -> int:
        """Read new events; returns the last step seen."""
        for event in self.reader.poll():
            if event.get("type") == "step":
                self.steps.append((int(event["step"]), float(event["time"])))
            elif event.get("type") in ("run_finished", "run_failed", "run_stopped"):
                self.ended = True
        return self.steps[-1][0] if self.steps else 0

    def wait_steps(self, count: int, timeout: float = 1800) -> tuple[int, float]:
        """Wait until `count` more steps are done; returns the (step, time) reached."""
        target = self.poll() + count
        deadline = time.monotonic() + timeout
        while self.poll() < target:
            if self.ended or time.monotonic() > deadline:
                raise RuntimeError(f"the run ended or stalled before step {target} ({self.path})")
            time.sleep(0.2)
        return self.steps[-1]


def window_rate(start: tuple[int, float], end: tuple[int, float]) -> float:
    """Samples per second between two (step, time) points."""
    return (end[0] - start[0]) * BATCH / (end[1] - start[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6, help="windows per mode (alternating)")
    parser.add_argument("--steps-per-window", type=int, default=8, help="measured steps per window")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if shutil.which("tmux") is None:
        print("tmux is required (apt-get install -y tmux)", file=sys.stderr)
        return 2
    env = {
        **os.environ,
        "TERM": "xterm-256color",
        "LORATUI_FAKE_NVML": os.environ.get("LORATUI_FAKE_NVML", "none"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    per_window = args.steps_per_window + SETTLE_STEPS
    total_steps = 2 * args.windows * per_window + 6
    rates: dict[str, list[float]] = {"headless": [], "viewed": []}
    viewer_cpu, viewer_wall = 0.0, 0.0
    with tempfile.TemporaryDirectory(prefix="loratui-bench-tui-") as tmp:
        root = Path(tmp)
        config = make_project(root, total_steps)
        command = [
            sys.executable,
            "-m",
            "loratui",
            "train",
            "--config",
            str(config),
            "--detach",
            "--skip-checks",
        ]
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run = Run(next((root / "runs").iterdir()))
        run.wait_steps(4, timeout=600)  # model loading and the first steps are not measured
        socket = f"loratui-bench-{uuid.uuid4().hex[:8]}"
        tmux = ["tmux", "-L", socket]
        try:
            for index in range(2 * args.windows):
                mode = "viewed" if index % 2 else "headless"
                viewer = None
                if mode == "viewed":
                    attach = f"{sys.executable} -m loratui attach {run.path}"
                    subprocess.run(
                        [*tmux, "new-session", "-d", "-s", "view", "-x", "120", "-y", "40", attach],
                        env=env,
                        check=True,
                    )
                    pane = subprocess.run(
                        [*tmux, "list-panes", "-t", "view", "-F", "#{pane_pid}"],
                        env=env,
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    viewer = int(pane.stdout.split()[0])
                start = run.wait_steps(SETTLE_STEPS)
                cpu_start, wall_start = (cpu_seconds(viewer), time.monotonic()) if viewer else (0.0, 0.0)
                end = run.wait_steps(args.steps_per_window)
                if viewer:
                    viewer_cpu += cpu_seconds(viewer) - cpu_start
                    viewer_wall += time.monotonic() - wall_start
                    subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
                rates[mode].append(window_rate(start, end))
                print(f"window {index + 1:2d} {mode:8s} {rates[mode][-1]:.3f} samples/s", file=sys.stderr)
        finally:
            subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
            status = json.loads((run.path / "status.json").read_text())
            pid = status.get("extra", {}).get("supervisor_pid") or status.get("pid")
            if pid and not run.ended:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGTERM)  # checkpoint and stop if the benchmark was cut short
            deadline = time.monotonic() + 600
            while not run.ended and time.monotonic() < deadline:
                run.poll()
                time.sleep(0.5)
    headless, viewed = statistics.median(rates["headless"]), statistics.median(rates["viewed"])
    ratio = viewed / headless
    result = {
        "windows_per_mode": args.windows,
        "steps_per_window": args.steps_per_window,
        "headless_samples_per_s": [round(r, 4) for r in rates["headless"]],
        "viewed_samples_per_s": [round(r, 4) for r in rates["viewed"]],
        "median_headless": round(headless, 4),
        "median_viewed": round(viewed, 4),
        "ratio": round(ratio, 4),
        "viewer_cpu_fraction_of_one_core": round(viewer_cpu / viewer_wall, 4) if viewer_wall else None,
        "cpus": os.cpu_count(),
        "bound": BOUND,
        "ok": ratio >= BOUND,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        share = result["viewer_cpu_fraction_of_one_core"]
        print(
            f"headless {headless:.3f} samples/s, viewed {viewed:.3f} samples/s, ratio {ratio:.3f} "
            f"(bound >= {BOUND}): {'ok' if result['ok'] else 'BELOW BOUND'}; the viewer used "
            f"{share:.1%} of one core"
        )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
