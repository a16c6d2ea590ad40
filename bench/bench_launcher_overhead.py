"""Single-GPU overhead of accelerate's launcher: samples/s of the same run with and without it.

    python bench/bench_launcher_overhead.py                              # built-in ~7M Llama (CPU-sized)
    python bench/bench_launcher_overhead.py --size 1b --seq 2048         # TinyLlama-1.1B shape (a GPU)
    python bench/bench_launcher_overhead.py --config x.yaml --steps 60 --repeats 2   # your own SD/LLM config

Each measurement is a fresh run directory trained by the worker exactly as `loratui train` starts it: once bare
(`python -m loratui.train.process.worker RUN`, what one GPU uses) and once through
`python -m accelerate.commands.launch --num_processes 1 -m loratui.train.process.worker RUN`. samples/s is the median
of the step events after the first `--warmup` steps. Prints both figures and their ratio (launcher / bare;
1.00 means no overhead). Without --config, a random-weight Llama of `--size` (bench_llm_common) is built and
trained on the bundled QA records. Needs a GPU for the figure that matters; on a CPU it measures CPU training.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from bench_llm_common import build_model, write_dataset


def _run_once(config: Path, steps: int, through_launcher: bool, runs_dir: Path) -> tuple[float, float]:
    """(median samples/s, wall seconds) of one run."""
    from loratui.config import load_config
    from loratui.runs.events import read_events
    from loratui.train.process.launch import prepare_run

    resolved = load_config(config, flags={"max_steps": steps, "runs_dir": str(runs_dir), "save_steps": None})
    resolved.config.output_dir = str(runs_dir / "out")
    resolved.config.sample_prompts = []
    run, _ = prepare_run(resolved, resume=None, overwrite=True)
    worker = ["-m", "loratui.train.process.worker", str(run.path)]
    launcher = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    launcher += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    argv = [sys.executable, *(launcher if through_launcher else []), *worker]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    started = time.perf_counter()
    with (run.path / "worker.log").open("ab") as log:
        code = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"training failed ({code}); see {run.path / 'worker.log'}")
    rates = [e["samples_per_s"] for e in read_events(run.events_path) if e["type"] == "step"]
    return statistics.median(rates[ARGS.warmup :] or rates), wall


def _builtin_config(work: Path, size: str, seq: int) -> Path:
    """A config for a random-weight Llama of `size` on the bundled QA records (nothing downloaded)."""
    model = build_model(work / f"llama-{size}", size, dtype="float32" if size == "small" else "bfloat16")
    data = write_dataset(work / "qa.jsonl", 256)
    values = {
        "task_type": "text-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "lora_rank": 16,
        "batch_size": 4,
        "max_seq_len": seq,
        "learning_rate": 1e-4,
        "mixed_precision": "no" if size == "small" else "bf16",
        "seed": 0,
    }
    path = work / "config.yaml"
    path.write_text(yaml.safe_dump(values), encoding="utf-8")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a training config (default: the built-in Llama)")
    parser.add_argument("--size", choices=("small", "1b"), default="small", help="built-in Llama size")
    parser.add_argument("--seq", type=int, default=256, help="built-in config: max_seq_len")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="step events ignored at the start")
    parser.add_argument("--repeats", type=int, default=1)
    global ARGS
    ARGS = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loratui-launcher-bench-") as tmp:
        config = ARGS.config or _builtin_config(Path(tmp), ARGS.size, ARGS.seq)
        results: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for repeat in range(ARGS.repeats):
            for through in (False, True):  # alternate, so drift (clocks, thermals) hits both
                results[through].append(
                    _run_once(config, ARGS.steps, through, Path(tmp) / f"{repeat}{through}")
                )
        bare = statistics.median(r for r, _ in results[False])
        launched = statistics.median(r for r, _ in results[True])
        print(f"bare worker:        {bare:10.3f} samples/s (wall {results[False][0][1]:.1f} s)")
        print(f"through launcher:   {launched:10.3f} samples/s (wall {results[True][0][1]:.1f} s)")
        print(f"ratio launcher/bare: {launched / bare:.3f}")


ARGS: argparse.Namespace

if __name__ == "__main__":
    main()
