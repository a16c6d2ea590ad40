"""Loss parity: loratui's trainers vs a bare loop written directly with diffusers + peft (SD) and transformers +
peft (LLM), on the same tiny model, data, seed and hyper-parameters.

    python bench/bench_loss_parity.py                        # SD and LLM, seeds 0 1 2
    python bench/bench_loss_parity.py --family llm --seeds 0 1 2 3 4

Both sides train LoRA with AdamW (weight decay 0.01), a constant learning rate, gradient clipping 1.0, fp32,
one torch thread:

- SD: the tiny SD 1.5-layout model, 16 drawn red circles (four shades, one caption), 64 px, rank 8, alpha 8 on
  to_q/to_k/to_v/to_out.0, lr 5e-3, batch 4, 60 steps. Loss: noise-prediction MSE at a uniform timestep.
- LLM: the tiny Llama, 32 raw-text sentences from one template, rank 8, alpha 8 on every linear layer and
  lm_head, lr 5e-3, batch 4, 60 steps. Loss: cross-entropy per token after the first.

The bare loops draw their own data order, noise and timesteps from the seed (a plain shuffle per epoch,
`torch.randn` / `torch.randint`), so the two sides see different random draws: "the same within noise" means
the mean difference is within the seed-to-seed spread. The final loss of a run is the mean training loss of
its last 10 steps (one step's diffusion loss depends too much on the timesteps drawn).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEPS = 60
BATCH = 4
RANK = 8
LAST_STEPS = 10  # the final loss is the mean over these last steps
SD_LR = 5e-3
LLM_LR = 5e-3
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
CAPTION = "a red circle, flat colour, plain background"
REDS = [(220, 40, 40), (200, 30, 50), (235, 60, 40), (190, 45, 30)]
OBJECTS = ["apple", "river", "lamp", "chair", "cloud", "stone", "bread", "glass"]
PLACES = ["table", "shelf", "floor", "window"]


def final_loss(losses: list[float]) -> float:
    return statistics.fmean(losses[-LAST_STEPS:])


def _common(work: Path, model: Path, data: Path, seed: int, tag: str) -> dict[str, Any]:
    return {
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(work / f"out-{tag}"),
        "runs_dir": str(work / "runs"),
        "lora_rank": RANK,
        "lora_alpha": RANK,
        "batch_size": BATCH,
        "max_steps": STEPS,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "lr_scheduler": "constant",
        "mixed_precision": "no",
        "seed": seed,
    }


def _loratui_losses(values: dict[str, Any], family: str) -> list[float]:
    """Train with loratui's own trainer in-process; the loss of every step from its events."""
    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.runs.events import read_events
    from loratui.runs.rundir import create_run_dir
    from loratui.train.job import WorkerJob

    cfg = TrainConfig(**values)
    run = create_run_dir(Path(cfg.runs_dir), cfg.name)
    job = WorkerJob(run, ResolvedConfig(cfg, {}, family), None, True)
    if family == "llm":
        from loratui.train.llm.trainer import run_training

        state = run_training(job, console=False).state
    else:
        from loratui.train.sd.trainer import train

        with contextlib.redirect_stdout(io.StringIO()):  # the worker's console progress lines
            state = train(job)
    assert state == "finished", state
    return [e["loss"] for e in read_events(run.events_path) if e["type"] == "step"]


def _epoch_batches(n: int, seed: int) -> Callable[[], list[list[int]]]:
    """Batches of indices, a fresh shuffle each epoch, from one seeded generator."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    pending: list[list[int]] = []

    def next_batch() -> list[int]:
        if not pending:
            order = torch.randperm(n, generator=generator).tolist()
            pending.extend(order[i : i + BATCH] for i in range(0, n - BATCH + 1, BATCH))
        return pending.pop(0)

    return next_batch


# --- Stable Diffusion --------------------------------------------------------------------------------------


def sd_setup(work: Path) -> tuple[Path, Path]:
    """The tiny SD model and 16 red circles with a sidecar caption each."""
    from PIL import Image, ImageDraw

    from loratui.tiny_models.sd import build_tiny_sd

    data = work / "sd-data"
    data.mkdir(parents=True)
    for i in range(16):
        image = Image.new("RGB", (64, 64), (245, 240, 230))
        ImageDraw.Draw(image).ellipse((12, 12, 52, 52), fill=REDS[i % len(REDS)])
        image.save(data / f"img{i:02d}.png")
        (data / f"img{i:02d}.txt").write_text(CAPTION + "\n", encoding="utf-8")
    return build_tiny_sd(work / "tiny-sd15", "sd15"), data


def sd_values(work: Path, model: Path, data: Path, seed: int, tag: str) -> dict[str, Any]:
    values = _common(work, model, data, seed, tag)
    values.update(task_type="image-generation", resolution=64, learning_rate=SD_LR)
    return values


def sd_bare(values: dict[str, Any]) -> list[float]:
    """The same training with nothing but diffusers + peft + torch + Pillow."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model
    from PIL import Image

    seed = values["seed"]
    pipe = StableDiffusionPipeline.from_pretrained(
        values["base_model"], local_files_only=True, safety_checker=None, feature_extractor=None
    )
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=SD_TARGETS)
    unet = inject_adapter_in_model(config, unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=values["learning_rate"], weight_decay=values["weight_decay"])
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    images = sorted(Path(values["train_data_dir"]).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]

    def pixels(path: Path) -> torch.Tensor:
        array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    next_batch = _epoch_batches(len(images), seed)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    losses = []
    for _ in range(values["max_steps"]):
        indices = next_batch()
        with torch.no_grad():
            batch = torch.stack([pixels(images[i]) for i in indices])
            latents = vae.encode(batch).latent_dist.mode() * vae.config.scaling_factor
            ids = tokenizer(
                [captions[i] for i in indices],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            embeds = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(indices),), generator=generator
        )
        noisy = scheduler.add_noise(latents, noise, timesteps)
        loss = F.mse_loss(unet(noisy, timesteps, embeds).sample.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, values["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# --- LLM ---------------------------------------------------------------------------------------------------


def llm_setup(work: Path) -> tuple[Path, Path]:
    """The tiny Llama and 32 raw-text sentences from one template (`text` records)."""
    from loratui.tiny_models import build_tiny_llama

    data = work / "llm-data"
    data.mkdir(parents=True)
    rows = [
        {"text": f"The {obj} is on the {place} near the green door."} for place in PLACES for obj in OBJECTS
    ]
    (data / "sentences.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return build_tiny_llama(work / "tiny-llama"), data


def llm_values(work: Path, model: Path, data: Path, seed: int, tag: str) -> dict[str, Any]:
    values = _common(work, model, data, seed, tag)
    values.update(
        task_type="text-generation",
        model_family="llm",
        max_seq_len=64,
        learning_rate=LLM_LR,
        target_modules=LLM_TARGETS,
    )
    return values


def llm_bare(values: dict[str, Any]) -> list[float]:
    """The same training with nothing but transformers + peft + torch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed = values["seed"]
    tokenizer = AutoTokenizer.from_pretrained(values["base_model"], local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        values["base_model"], local_files_only=True, dtype=torch.float32
    )
    model.config.use_cache = False
    torch.manual_seed(seed)
    config = LoraConfig(
        r=RANK, lora_alpha=RANK, lora_dropout=0.0, target_modules=LLM_TARGETS, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=values["learning_rate"], weight_decay=values["weight_decay"])
    texts = [
        json.loads(line)["text"]
        for path in sorted(Path(values["train_data_dir"]).glob("*.jsonl"))
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    encoded = [tokenizer(t)["input_ids"] + [tokenizer.eos_token_id] for t in texts]

    def collate(rows: list[list[int]]) -> dict[str, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}

    next_batch = _epoch_batches(len(encoded), seed)
    model.train()
    losses = []
    for _ in range(values["max_steps"]):
        loss = model(**collate([encoded[i] for i in next_batch()])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, values["max_grad_norm"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# --- report ------------------------------------------------------------------------------------------------

FAMILIES = {
    "sd": (sd_setup, sd_values, sd_bare, "sd15"),
    "llm": (llm_setup, llm_values, llm_bare, "llm"),
}


def compare(family: str, seeds: list[int], work: Path) -> None:
    setup, values_for, bare, kind = FAMILIES[family]
    model, data = setup(work)
    rows = []
    for seed in seeds:
        ours = _loratui_losses(values_for(work, model, data, seed, f"{family}-loratui-{seed}"), kind)
        plain = bare(values_for(work, model, data, seed, f"{family}-bare-{seed}"))
        assert len(ours) == len(plain) == STEPS, (len(ours), len(plain))
        rows.append((seed, ours, plain))
        print(
            f"{family} seed {seed}: loratui {final_loss(ours):.4f}, bare {final_loss(plain):.4f}", flush=True
        )
    print_table(family, rows)


def print_table(family: str, rows: list[tuple[int, list[float], list[float]]]) -> None:
    ours = [final_loss(r[1]) for r in rows]
    plain = [final_loss(r[2]) for r in rows]
    start_a = statistics.fmean(statistics.fmean(r[1][:LAST_STEPS]) for r in rows)
    start_b = statistics.fmean(statistics.fmean(r[2][:LAST_STEPS]) for r in rows)
    print(f"\n{family}: mean loss of the first {LAST_STEPS} steps: loratui {start_a:.4f}, bare {start_b:.4f}")
    print(f"| {family} seed | loratui final loss | bare final loss | relative difference |")
    print("|---|---|---|---|")
    for (seed, _, _), a, b in zip(rows, ours, plain, strict=True):
        print(f"| {seed} | {a:.4f} | {b:.4f} | {(a - b) / b:+.1%} |")
    mean_a, mean_b = statistics.fmean(ours), statistics.fmean(plain)
    print(f"| mean | {mean_a:.4f} | {mean_b:.4f} | {(mean_a - mean_b) / mean_b:+.1%} |")
    if len(rows) > 1:
        spread_a, spread_b = statistics.stdev(ours), statistics.stdev(plain)
        spread = max(spread_a, spread_b)
        verdict = "within" if abs(mean_a - mean_b) <= spread else "outside"
        print(
            f"seed-to-seed spread (standard deviation): loratui {spread_a:.4f}, bare {spread_b:.4f}; "
            f"mean difference {mean_a - mean_b:+.4f} is {verdict} the spread"
        )


def _quiet_progress_bars() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", choices=["sd", "llm", "both"], default="both")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    _quiet_progress_bars()
    families = ["sd", "llm"] if args.family == "both" else [args.family]
    with tempfile.TemporaryDirectory(prefix="loratui-bench-parity-") as tmp:
        for family in families:
            compare(family, args.seeds, Path(tmp))


if __name__ == "__main__":
    main()
