"""Flux trainer overhead vs a bare diffusers + peft loop, and block swap throughput, on the tiny FLUX.1-dev model.

    python bench/bench_flux_overhead.py                       # overhead: 128 px, batch 4, 16 steps x 3 repeats
    python bench/bench_flux_overhead.py --swap                # block swap: samples/s with 0 / 1 / 2 / 3 blocks swapped
    python bench/bench_flux_overhead.py --repeats 5 --steps 24

Overhead: both sides train the same LoRA (the default Flux targets: the double blocks' attention and MLP
projections, the single blocks' q/k/v, proj_mlp, proj_out; rank 8, alpha 16) with AdamW (lr 2e-4, weight decay
0.01), gradient clipping 1.0, batch 4, on the same PNG images read from disk every step (resize + centre
crop), AE-encoded every step (no latent cache), captions encoded by T5 and CLIP-L every step, sigmoid timestep
sampling, guidance 1.0, in the same sample order. The bare loop is what a minimal diffusers + peft script does
(tokenizers and encoders called directly, not through the pipeline's `encode_prompt`, which tokenizes twice
and walks every module for LoRA scaling on each call): no events, status file, accelerate, per-sample
generators or checkpoints. Runs are interleaved (each repeat
runs both, alternating which goes first). samples/s comes from consecutive step end times after the first
step; each side's figure is the median over all its steps and repeats, by wall clock and by process CPU time
(one torch thread; on a shared machine CPU time is the steadier measure). The ratio is loratui / bare
(target >= 0.97).

Block swap: the loratui trainer with latents and text cached (the transformer's work only), gradient
checkpointing on, 0 to 3 of the 4 tiny blocks swapped. On the CPU a swap moves nothing (the device is the
CPU), so this measures the hooks' own cost; the per-step loss must equal the unswapped run's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sd_common import machine, step_rates, write_dataset  # noqa: E402


def _config(work: Path, model: Path, data: Path, steps: int, resolution: int, tag: str, **extra) -> dict:
    return {
        "task_type": "image-generation",
        "model_family": "flux",
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
        "timestep_sampling": "sigmoid",
        "seed": 0,
        **extra,
    }


def job_for(values: dict):
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    cfg = TrainConfig(**values)
    run = create_run_dir(Path(cfg.runs_dir), cfg.name)
    return WorkerJob(run, ResolvedConfig(cfg, {}, "flux"), None, True)


def run_loratui(values: dict) -> dict[str, list[float]]:
    from loratui.runs.events import read_events
    from loratui.train.flux.trainer import train

    job = job_for(values)
    assert train(job) == "finished"
    events = read_events(job.run.events_path)
    return {
        "wall": step_rates(events),
        "cpu": step_rates(events, clock="process_cpu_s"),
        "loss": [e["loss"] for e in events if e["type"] == "step"],
    }


def run_bare(values: dict) -> dict[str, list[float]]:
    """The same training with nothing but diffusers + peft + torch + Pillow."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import FluxPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    from loratui.models.flux.lora import default_transformer_paths
    from loratui.models.sd.lora import adaptable_modules
    from loratui.train.loop.plan import StepPlan

    res = values["resolution"]
    pipe = FluxPipeline.from_pretrained(values["base_model"], local_files_only=True)
    transformer, vae = pipe.transformer, pipe.vae
    for module in (transformer, vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    torch.manual_seed(values["seed"])
    targets = default_transformer_paths(adaptable_modules(transformer))
    transformer = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, target_modules=targets), transformer)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=values["learning_rate"], weight_decay=0.01)
    images = sorted(Path(values["train_data_dir"]).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
    max_length = min(512, pipe.tokenizer_2.model_max_length)

    def load(path: Path) -> torch.Tensor:
        image = Image.open(path).convert("RGB")
        scale = res / min(image.size)
        size = (max(res, round(image.width * scale)), max(res, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC if scale > 1 else Image.Resampling.LANCZOS)
        left, top = (size[0] - res) // 2, (size[1] - res) // 2
        array = np.asarray(image.crop((left, top, left + res, top + res)), dtype=np.float32) / 127.5 - 1
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    plan = StepPlan(len(images), values["batch_size"], 1, values["max_steps"], values["seed"])
    transformer.train()
    wall, cpu = [], []
    for _, _, indices in plan.iter_steps(0):
        pixels = torch.stack([load(images[i]) for i in indices])
        batch = [captions[i] for i in indices]
        with torch.no_grad():
            latents = vae.encode(pixels).latent_dist.mode()
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
            t5_ids = pipe.tokenizer_2(
                batch, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
            ).input_ids
            prompt_embeds = pipe.text_encoder_2(t5_ids)[0]
            clip_ids = pipe.tokenizer(
                batch, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            pooled = pipe.text_encoder(clip_ids).pooler_output
            text_ids = torch.zeros(prompt_embeds.shape[1], 3)
        b, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigmas = torch.sigmoid(torch.randn(b))
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        prediction = transformer(
            hidden_states=FluxPipeline._pack_latents(noisy, b, c, h, w),
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            timestep=sigmas,
            guidance=torch.ones(b),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32),
            txt_ids=text_ids,
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - latents, b, c, h, w)
        loss = F.mse_loss(prediction.float(), target.float())
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


def overhead(args: argparse.Namespace, work: Path, model: Path) -> None:
    data = write_dataset(work / "data", 16, args.resolution)
    results = {side: {"wall": [], "cpu": []} for side in ("loratui", "bare")}
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
    print(
        f"\nmachine: {machine()}; tiny FLUX.1-dev-layout model, {args.resolution} px, batch 4, "
        f"{args.steps} steps x {args.repeats} repeats"
    )
    for clock in ("wall", "cpu"):
        ours, bare = (statistics.median(results[s][clock]) for s in ("loratui", "bare"))
        unit = "samples/s" if clock == "wall" else "samples per CPU-second"
        print(f"| {clock} | loratui {ours:.2f} | bare {bare:.2f} | ratio {ours / bare:.3f} | ({unit})")


def block_swap(args: argparse.Namespace, work: Path, model: Path) -> None:
    data = write_dataset(work / "data", 16, args.resolution)
    counts = (0, 1, 2, 3)
    results = {n: {"wall": [], "cpu": []} for n in counts}
    losses: dict[int, list[float]] = {}
    for repeat in range(args.repeats):
        for n in counts if repeat % 2 == 0 else reversed(counts):
            values = _config(
                work,
                model,
                data,
                args.steps,
                args.resolution,
                f"swap{n}-{repeat}",
                blocks_to_swap=n,
                cache_latents=True,
                cache_text_encoder_outputs=True,
                gradient_checkpointing=True,
            )
            rates = run_loratui(values)
            losses.setdefault(n, rates["loss"])
            for clock in ("wall", "cpu"):
                results[n][clock] += rates[clock]
            print(
                f"repeat {repeat + 1} blocks_to_swap {n}: {statistics.median(rates['cpu']):6.2f} per CPU-s",
                flush=True,
            )
    print(f"\nmachine: {machine()}; tiny FLUX.1-dev-layout model (4 blocks), {args.resolution} px, batch 4")
    base = {clock: statistics.median(results[0][clock]) for clock in ("wall", "cpu")}
    for n in counts:
        diff = max(abs(a - b) for a, b in zip(losses[n], losses[0], strict=True))
        wall, cpu = (statistics.median(results[n][c]) for c in ("wall", "cpu"))
        print(
            f"| {n} | {wall:.2f} samples/s | {cpu:.2f} per CPU-s | {cpu / base['cpu']:.3f} of unswapped "
            f"| max loss difference {diff:.1e} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--swap", action="store_true", help="measure block swap instead of the overhead")
    args = parser.parse_args()

    import torch

    from loratui.tiny_models import build_tiny_flux

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="loratui-bench-flux-") as tmp:
        work = Path(tmp)
        model = build_tiny_flux(work / "tiny-flux-dev", "dev")
        (block_swap if args.swap else overhead)(args, work, model)


if __name__ == "__main__":
    main()
