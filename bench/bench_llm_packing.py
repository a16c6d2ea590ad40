"""Packing on a dataset of short samples: tokens/s with `packing: true` vs without, through loratui's trainer.

    python bench/bench_llm_packing.py                     # small random Llama, 400 short QA pairs, 3 repeats

Three variants, interleaved per repeat:
  packed       packing: true, batch_size 4 (rows of up to max_seq_len=512 tokens, many samples each)
  unpacked     packing: false, batch_size 4 (each row one short sample, padded to the longest in its batch)
  unpacked-big packing: false, batch_size chosen so a step holds about as many real tokens as a packed step

tokens/s counts real (non-padding) tokens per step after the first (warm-up), by wall clock and per
process-CPU-second (robust to other load on a shared machine); figures are medians over all steps of all
repeats. Packing keeps samples apart (position ids restart per sample, block-diagonal
attention), so it changes speed, not what each sample sees.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench_llm_common import build_model, job_for, machine, step_rates, write_dataset

SEQ = 512


def _values(work: Path, model: Path, data: Path, tag: str, steps: int, **extra) -> dict:
    values = {
        "task_type": "text-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(work / f"out-{tag}"),
        "runs_dir": str(work / "runs"),
        "lora_rank": 16,
        "batch_size": 4,
        "max_steps": steps,
        "max_seq_len": SEQ,
        "mixed_precision": "no",
        "seed": 0,
    }
    values.update(extra)
    return values


def _run(values: dict) -> tuple[dict[str, list[float]], dict]:
    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    job = job_for(values)
    result = run_training(job, console=False)
    events = read_events(job.run.events_path)
    rates = {"wall": step_rates(events), "cpu": step_rates(events, clock="process_cpu_s")}
    return rates, result.data.stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()

    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-llm-pack-") as tmp:
        work = args.work or Path(tmp)
        model = build_model(work / "model-small", "small")
        data = write_dataset(work / "short.jsonl", args.samples, short=True)
        _, stats = _run(_values(work, model, data, "probe", 1, packing=True))
        per_row = stats["train_samples"] / stats["train_rows"]
        big = max(4, round(4 * per_row))
        print(
            f"{stats['train_samples']} samples, {stats['tokens']} tokens, mean "
            f"{stats['tokens'] / stats['train_samples']:.0f} tokens/sample; packed into {stats['train_rows']} rows "
            f"({per_row:.1f} samples/row); unpacked-big batch_size {big}"
        )
        variants = {
            "packed": {"packing": True},
            "unpacked": {"packing": False},
            "unpacked-big": {"packing": False, "batch_size": big},
        }
        rates: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in variants}
        order = list(variants)
        for r in range(args.repeats):
            for name in order[r % 3 :] + order[: r % 3]:
                got, _ = _run(_values(work, model, data, f"{name}-{r}", args.steps, **variants[name]))
                for clock in ("wall", "cpu"):
                    rates[name][clock].extend(got[clock])
                print(
                    f"repeat {r + 1} {name:13s} median {statistics.median(got['wall']):8.0f} tokens/s wall, "
                    f"{statistics.median(got['cpu']):8.0f} tokens per CPU-s",
                    flush=True,
                )
        print(f"machine: {machine()}")
        for clock, label in (("wall", "tokens/s (wall clock)"), ("cpu", "tokens per process CPU second")):
            med = {name: statistics.median(values[clock]) for name, values in rates.items()}
            print(f"median {label}: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
            print(
                f"  ratio packed / unpacked (same batch_size) = {med['packed'] / med['unpacked']:.2f}; "
                f"packed / unpacked-big (same tokens per step) = {med['packed'] / med['unpacked-big']:.2f}"
            )


if __name__ == "__main__":
    main()
