"""Wall time of the whole `loratui recommend --config X --vram 24GB` process for 7B/8B configs (configs only).

    python bench/bench_recommend.py [--runs 7] [--json results.json]

Cases: a folder with Llama-2-7b-hf's published config.json, one with Llama-3.1-8B's, and the shipped Llama-2-7B
architecture (a hub id not cached here). Each case is run once to warm the disk cache (`$LORATUI_CACHE_DIR`, a
fresh temporary folder), then `--runs` times; the median and range are printed. No weights, no network.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_recommend_speed import LLAMA2_7B_HF, LLAMA31_8B  # noqa: E402


def _config(folder: Path, name: str, base_model: str) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        "\n".join(
            [
                f"base_model: {base_model}",
                "task_type: text-generation",
                f"train_data_dir: {folder}",
                "lora_rank: 64",
                "batch_size: 8",
                "max_seq_len: 2048",
                "mixed_precision: bf16",
            ]
        )
        + "\n"
    )
    return path


def _once(config: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "loratui", "recommend", "--config", str(config), "--vram", "24GB"],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, config in (("llama-2-7b-hf", LLAMA2_7B_HF), ("llama-3.1-8b", LLAMA31_8B)):
            (folder / name).mkdir()
            (folder / name / "config.json").write_text(json.dumps(config))
        cases = {
            "Llama-2-7b-hf folder": _config(folder, "l2", str(folder / "llama-2-7b-hf")),
            "Llama-3.1-8B folder": _config(folder, "l31", str(folder / "llama-3.1-8b")),
            "shipped Llama-2-7B": _config(folder, "hub", "meta-llama/Llama-2-7b-hf"),
        }
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LORATUI_CACHE_DIR": str(folder / "cache"),
            "HF_HUB_OFFLINE": "1",
        }
        for name, config in cases.items():
            first = _once(config, env)
            times = [_once(config, env) for _ in range(args.runs)]
            results[name] = {
                "first": first,
                "median": statistics.median(times),
                "min": min(times),
                "max": max(times),
            }
            print(
                f"{name:<22} first {first:5.2f} s   median {results[name]['median']:5.2f} s "
                f"({min(times):.2f}-{max(times):.2f} s, {args.runs} runs)",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
