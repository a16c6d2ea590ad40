"""Latent caching: second-epoch samples/s of the loratui SD trainer with `cache_latents` vs without.

    python bench/bench_sd_cache.py                        # tiny SD 1.5-layout model, 256 px, 3 repeats
    python bench/bench_sd_cache.py --resolution 128 --repeats 5

Same model, data (drawn PNGs with captions, read from disk), settings and sample order on both sides; only
`cache_latents` differs. With caching every (image, crop, flip) is VAE-encoded once before the first step, so
epoch 2 skips image decoding, resizing and the VAE; without it, every step does all three. Epoch 1 is
excluded (it includes the warm-up). samples/s comes from consecutive step end times inside epoch 2, by wall
clock and by process CPU time (one torch thread); the figure per side is the median over steps and repeats,
runs interleaved. With a real SD model on a GPU the VAE is a larger share of a step than with this tiny model.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from bench_sd_common import job_for, machine, step_rates, tiny_model, write_dataset


def _config(work: Path, model: Path, data: Path, resolution: int, cache: bool, tag: str) -> dict:
    return {
        "task_type": "image-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(work / f"out-{tag}"),
        "runs_dir": str(work / "runs"),
        "lora_rank": 8,
        "lora_alpha": 16,
        "learning_rate": 2e-4,
        "batch_size": 4,
        "epochs": 2,
        "resolution": resolution,
        "mixed_precision": "no",
        "cache_latents": cache,
        "seed": 0,
    }


def run(values: dict) -> dict[str, list[float]]:
    from loratui.runs.events import read_events
    from loratui.train.sd.trainer import train

    job = job_for(values)
    assert train(job) == "finished"
    events = read_events(job.run.events_path)
    return {
        clock: step_rates(events, clock=key, epoch=1)
        for clock, key in (("wall", "time"), ("cpu", "process_cpu_s"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    results = {side: {"wall": [], "cpu": []} for side in ("cached", "uncached")}
    with tempfile.TemporaryDirectory(prefix="loratui-bench-sd-cache-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        data = write_dataset(work / "data", args.images, args.resolution * 2)
        for repeat in range(args.repeats):
            order = ["cached", "uncached"] if repeat % 2 == 0 else ["uncached", "cached"]
            for side in order:
                rates = run(_config(work, model, data, args.resolution, side == "cached", f"{side}-{repeat}"))
                for clock in ("wall", "cpu"):
                    results[side][clock] += rates[clock]
                print(
                    f"repeat {repeat + 1} {side:9s} epoch 2: {statistics.median(rates['wall']):6.2f} samples/s wall, "
                    f"{statistics.median(rates['cpu']):6.2f} per CPU-s",
                    flush=True,
                )
    print(
        f"\nmachine: {machine()}; tiny SD 1.5-layout model, {args.images} images of {args.resolution * 2} px "
        f"trained at {args.resolution} px, batch 4, {args.repeats} repeats"
    )
    for clock in ("wall", "cpu"):
        cached, plain = (statistics.median(results[s][clock]) for s in ("cached", "uncached"))
        print(f"| {clock} | cached {cached:.2f} | uncached {plain:.2f} | ratio {cached / plain:.2f} |")


if __name__ == "__main__":
    main()
