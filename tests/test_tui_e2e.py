"""End to end in a real terminal (tmux): wizard -> train the tiny SD model -> detach -> `loratui attach`
shows progress -> the run finishes -> the exported file and its usage string are shown."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Tmux:
    """One detached tmux session on a private socket."""

    def __init__(self, cwd: Path, env: dict[str, str], width: int = 100, height: int = 30) -> None:
        self.socket = f"loratui-e2e-{uuid.uuid4().hex[:8]}"
        self.env = env
        self._tmux(
            "new-session",
            "-d",
            "-s",
            "e2e",
            "-x",
            str(width),
            "-y",
            str(height),
            "-c",
            str(cwd),
            "bash --norc --noprofile",
        )

    def _tmux(self, *args: str) -> str:
        result = subprocess.run(
            ["tmux", "-L", self.socket, *args],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
        return result.stdout

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "e2e", *keys)

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-t", "e2e", "-l", text)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "e2e")

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.3)
        raise AssertionError(f"{text!r} did not appear; screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(
            ["tmux", "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=30
        )


def make_dataset(root: Path, n: int = 4) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        image = Image.new("RGB", (64, 64), (240, 235, 225))
        ImageDraw.Draw(image).ellipse((12 + i, 12, 50, 52 - i), fill=(200, 40 * i, 60))
        image.save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"e2echar, a red shape, sample {i}\n", encoding="utf-8")
    return root


def test_wizard_train_detach_attach_finish(tmp_path, tiny_sd15) -> None:
    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    (work / "models" / "sd15").symlink_to(tiny_sd15, target_is_directory=True)
    make_dataset(work / "data" / "e2e")
    (work / "start.yaml").write_text(
        "base_model: models/sd15\ntrain_data_dir: data/e2e\noutput_dir: output/e2e\nresolution: 64\n"
        "lora_rank: 4\nbatch_size: 1\nmax_steps: 40\nsave_steps: 20\nlearning_rate: 1e-3\nseed: 3\n",
        encoding="utf-8",
    )
    bin_dir = Path(sys.executable).parent
    env = {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "TERM": "xterm-256color",
        "LANG": "C.UTF-8",
        "LORATUI_FAKE_NVML": "none",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parent.parent),
    }
    loratui = f"{sys.executable} -m loratui"
    tmux = Tmux(work, env)
    try:
        tmux.type(f"{loratui} wizard --config start.yaml; echo WIZARD-EXIT=$?")
        tmux.send("Enter")
        tmux.wait_for("Hardware: which GPU", 60)
        tmux.wait_for("No NVIDIA GPU available")
        for title in (
            "Task and base model",
            "Dataset check",
            "Captions",
            "Settings that fit",
            "Review and save",
            "Train a Stable Diffusion",
        ):
            tmux.send("C-n")
            tmux.wait_for(title, 60)
        tmux.wait_for("Start training")
        tmux.send("Enter")
        tmux.wait_for("d detach", 60)
        tmux.wait_for("step ", 180)  # the first optimizer step arrived in the training view
        tmux.send("d")
        screen = tmux.wait_for("WIZARD-EXIT=0", 30)
        runs = list((work / "runs").iterdir())
        assert len(runs) == 1
        tmux.type(f"clear; {loratui} attach; echo ATTACH-EXIT=$?")
        tmux.send("Enter")
        screen = tmux.wait_for(f"run {runs[0].name}", 60)
        screen = tmux.wait_for("Exported:", 300)
        assert "<lora:e2e:" in " ".join(screen.split())
        assert "Training finished." in screen
        tmux.send("q")
        tmux.wait_for("ATTACH-EXIT=0", 30)
    finally:
        tmux.close()
    exported = work / "output" / "e2e" / "e2e.safetensors"
    assert exported.exists()
