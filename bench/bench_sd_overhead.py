"""Trainer overhead: loratui's SD trainer vs a bare diffusers + peft loop, same model, data and settings.

    python bench/bench_sd_overhead.py                         # tiny SD 1.5-layout model, 128 px, 3 repeats
    python bench/bench_sd_overhead.py --repeats 5 --steps 24 --resolution 256
    python bench/bench_sd_overhead.py --gpu                   # SD 1.5 architecture, 512 px, fp16 (needs CUDA)

CPU part: both sides train the same LoRA (to_q/to_k/to_v/to_out.0, rank 8, alpha 16) with AdamW (lr 2e-4,
weight decay 0.01), gradient clipping 1.0, batch 4, on the same drawn PNG images read from disk every step
(resize + centre crop), VAE-encoded every step (no latent cache), captions encoded by the frozen text encoder
every step, in the same sample order. The bare loop is what a minimal diffusers + peft script does: no events,
status file, TensorBoard, accelerate, per-sample generators or checkpoints. Runs are interleaved (each repeat
runs both, alternating which goes first). samples/s comes from consecutive step end times after the first
step; the figure per side is the median over all its steps and repeats, by wall clock and by process CPU time
(one torch thread; on a shared machine CPU time is the steadier measure of the work each loop does).
The overhead ratio is loratui / bare (target >= 0.97).

GPU part (`--gpu`): a random-weight model built from the real SD 1.5 configs bundled with loratui (fp16
weights), 512x512, batch 1 and 4, mixed precision fp16, through the loratui trainer; samples/s (median after
warm-up) and peak reserved CUDA memory from the step events.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_sd_common import job_for, machine, sd15_random_model, step_rates, tiny_model, write_dataset


def _config(work: Path, model: Path, data: Path, steps: int, resolution: int, tag: str, **extra) -> dict:
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
        "max_steps": steps,
        "resolution": resolution,
        "mixed_precision": "no",
        "seed": 0,
        **extra,
    }


def run_loratui(values: dict) -> dict[str, list[float]]:
    from loratui.runs.events import read_events
    from loratui.train.sd.trainer import train

    job = job_for(values)
    assert train(job) == "finished"
    events = read_events(job.run.events_path)
    return {"wall": step_rates(events), "cpu": step_rates(events, clock="process_cpu_s")}


def run_bare(values: dict) -> dict[str, list[float]]:
    """The same training with nothing but diffusers + peft + torch + Pillow."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from loratui.models.sd.loading import quiet_libraries
    from loratui.train.loop.plan import StepPlan

    res = values["resolution"]
    with quiet_libraries():
        pipe = StableDiffusionPipeline.from_pretrained(
            values["base_model"], local_files_only=True, safety_checker=None, feature_extractor=None
        )
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(values["seed"])
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    unet = inject_adapter_in_model(config, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=values["learning_rate"], weight_decay=0.01)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = sorted(Path(values["train_data_dir"]).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]

    def load(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        scale = res / min(image.size)
        size = (max(res, round(image.width * scale)), max(res, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        left, top = (size[0] - res) // 2, (size[1] - res) // 2
        array = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    plan = StepPlan(len(images), values["batch_size"], 1, values["max_steps"], values["seed"])
    unet.train()
    wall, cpu = [], []
    for _, _, indices in plan.iter_steps(0):
        pixels = torch.stack([load(images[i]) for i in indices])
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
            ids = tokenizer(
                [captions[i] for i in indices],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(indices),))
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, embeds).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        wall.append(time.time())
        cpu.append(time.process_time())
    n = values["batch_size"]
    return {
        "wall": [n / (b - a) for a, b in zip(wall, wall[1:], strict=False)],
        "cpu": [n / (b - a) for a, b in zip(cpu, cpu[1:], strict=False) if b > a],
    }


def cpu_benchmark(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loratui-bench-sd-") as tmp:
        work = Path(tmp)
        model = tiny_model(work)
        data = write_dataset(work / "data", 16, args.resolution)
        results: dict[str, dict[str, list[float]]] = {
            "loratui": {"wall": [], "cpu": []},
            "bare": {"wall": [], "cpu": []},
        }
        for repeat in range(args.repeats):
            order = ["loratui", "bare"] if repeat % 2 == 0 else ["bare", "loratui"]
            for side in order:
                values = _config(work, model, data, args.steps, args.resolution, f"{side}-{repeat}")
                rates = run_loratui(values) if side == "loratui" else run_bare(values)
                for clock in ("wall", "cpu"):
                    results[side][clock] += rates[clock]
                print(
                    f"repeat {repeat + 1} {side:8s} {statistics.median(rates['wall']):6.2f} samples/s wall, "
                    f"{statistics.median(rates['cpu']):6.2f} per CPU-s",
                    flush=True,
                )
                if args.verbose:
                    print("   cpu rates:", " ".join(f"{r:.2f}" for r in rates["cpu"]))
    print(
        f"\nmachine: {machine()}; tiny SD 1.5-layout model, {args.resolution} px, batch 4, "
        f"{args.steps} steps x {args.repeats} repeats"
    )
    for clock in ("wall", "cpu"):
        ours, bare = (statistics.median(results[s][clock]) for s in ("loratui", "bare"))
        unit = "samples/s" if clock == "wall" else "samples per CPU-second"
        print(f"| {clock} | loratui {ours:.2f} | bare {bare:.2f} | ratio {ours / bare:.3f} | ({unit})")


def gpu_benchmark(args: argparse.Namespace) -> None:
    import torch

    from loratui.runs.events import read_events
    from loratui.train.sd.trainer import train

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU")
    work = Path(args.work or tempfile.mkdtemp(prefix="loratui-bench-sd-gpu-"))
    model = sd15_random_model(work / "sd15-random-fp16")
    data = write_dataset(work / "data512", 32, 512)
    print(f"GPU: {torch.cuda.get_device_name()}; SD 1.5 architecture (random weights), 512x512, fp16")
    for batch in (1, 4):
        values = _config(work, model, data, args.steps, 512, f"gpu-b{batch}", mixed_precision="fp16")
        values["batch_size"] = batch
        torch.cuda.reset_peak_memory_stats()
        job = job_for(values)
        assert train(job) == "finished"
        events = read_events(job.run.events_path)
        rates = step_rates(events, skip=3)
        peak = max(e.get("memory_peak", 0) for e in events if e["type"] == "step")
        print(
            f"| batch {batch} | {statistics.median(rates):.2f} samples/s | peak {peak / 2**30:.2f} GiB |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="print every step's rate")
    parser.add_argument("--gpu", action="store_true", help="run the GPU benchmark instead (CUDA only)")
    parser.add_argument("--work", help="GPU: folder for the random model and data (kept between runs)")
    args = parser.parse_args()
    if args.gpu:
        args.steps = max(args.steps, 20)
        gpu_benchmark(args)
    else:
        cpu_benchmark(args)


if __name__ == "__main__":
    main()
