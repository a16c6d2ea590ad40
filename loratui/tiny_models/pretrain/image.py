"""``python -m loratui.tiny_models.pretrain image``: pretrain the shipped tiny SD-layout model on drawn scenes.

Three stages, seeded, on the CPU: (1) a small KL autoencoder (64 px -> 16x16x4 latents) learns to
reconstruct drawn scenes, its first three latent channels held close to the picture's colours; (2) a tiny CLIP
text encoder (generated tokenizer) and (3) a small UNet2DConditionModel learn together to denoise the scenes'
latents given their captions (epsilon prediction on Stable Diffusion 1.5's noise schedule with offset noise and
min-SNR weighting, 10 % empty captions for classifier-free guidance, an EMA of the weights); then the decoder
is fine-tuned on the frozen encoder's latents. The result is saved in fp16 as a diffusers
StableDiffusionPipeline folder and checked with the pixel check of `scenes.read_scene`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import shutil
import time
from importlib import resources
from pathlib import Path
from typing import Any

from loratui.tiny_models.clip_tokenizer import BOS, EOS, clip_vocab, write_clip_tokenizer
from loratui.tiny_models.common import LABEL_FILE, quiet_hf
from loratui.tiny_models.pretrain.scenes import (
    BACKGROUNDS,
    COLOURS,
    EXTRA_SHAPES,
    SHAPES,
    SIZE,
    all_scenes,
    draw_scene,
    random_scene,
    read_scene,
)

MODEL_NAME = "shapes-sd"
VAE_STEPS = 300
UNET_STEPS = 5000
UNET_BATCH = 32
DECODER_STEPS = 900
#: Weight of the loss that keeps the first three latent channels close to the picture's colours (4x4 means).
PREVIEW_WEIGHT = 0.5
#: Min-SNR loss weighting (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy").
MIN_SNR_GAMMA = 5.0
#: Offset noise (a per-channel constant added to the noise). SD 1.5's schedule leaves about 7 % of the picture
#: at the last timestep, and over 16x16 latents the noise's own mean is small, so without it the UNet learns to
#: read a picture's overall colour (here: mostly its background) from the noise rather than from the caption.
NOISE_OFFSET = 0.2
#: Samples per caption in the final pixel check, and the sampler settings of every pixel check.
CHECK_SEEDS = 2
CHECK_STEPS = 20
CHECK_GUIDANCE = 4.0

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 16,
    "mid_block_add_attention": False,
    "sample_size": SIZE,
    "scaling_factor": 1.0,
}
TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 64,
    "layer_norm_eps": 1e-05,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": SIZE // 4,
    "in_channels": 4,
    "out_channels": 4,
    # Attention at 8x8 and 4x4 only: self-attention over 16x16 latents would cost most of the CPU time.
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "cross_attention_dim": TEXT_CONFIG["hidden_size"],
    "attention_head_dim": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}

LABEL = """\
TINY PRETRAINED MODEL: shapes-sd (Stable Diffusion 1.5 layout, 64x64 px)

What it draws: one flat-coloured shape on a plain background, from captions such as
"a red circle on a white background" (shapes: {shapes}; colours: {colours};
backgrounds: {backgrounds}). Nothing else: it is a teaching model for `loratui demo`, not an image model.

Provenance: every weight was produced by loratui's seeded script
`python -m loratui.tiny_models.pretrain image` (loratui/tiny_models/pretrain/image.py) from pictures
drawn by loratui/tiny_models/pretrain/scenes.py; no other data and no other model were used. The
autoencoder also saw {extra} shapes; the diffusion model never saw them.
The tokenizer was generated from the small English corpus bundled with loratui; the text encoder was
trained together with the diffusion model on the caption templates. Training: offset noise {noise_offset},
min-SNR weighting (gamma {min_snr}), latent colour channels (weight {preview}).

Licence: Apache-2.0, the same as loratui.

This build: seed {seed}; autoencoder {vae_steps} steps, UNet {unet_steps} steps, decoder {decoder_steps} steps;
{wall:.0f} s wall,
{cpu:.0f} s CPU (torch threads: {threads}); pixel check on {checked} samples (every caption x {seeds} seed(s),
{steps} PNDM steps, guidance {guidance}): {accuracy:.0%} right in background, colour and shape together
(background {background:.0%}, colour {colour:.0%}, shape {shape:.0%}; chance: about 3 % together).
"""


def shipped_model_path() -> Path:
    """Where the shipped model lives in the package."""
    return Path(str(resources.files("loratui.tiny_models"))) / "pretrained" / MODEL_NAME


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _to_tensor(images: list[Any]) -> Any:
    import numpy as np
    import torch

    array = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def _scene_batch(rng: random.Random, size: int, shapes: tuple[str, ...]) -> tuple[Any, list[str]]:
    scenes = [random_scene(rng, shapes) for _ in range(size)]
    return _to_tensor([draw_scene(s, rng) for s in scenes]), [s.caption for s in scenes]


def train_vae(seed: int, steps: int, deadline: float, log: Any) -> tuple[Any, int]:
    """The autoencoder, trained on drawn scenes (all shapes) for `steps` (fewer if `deadline` comes first)."""
    import diffusers
    import torch

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKL(**VAE_CONFIG)
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    step = 0
    while step < steps and time.perf_counter() < deadline:
        images, _ = _scene_batch(rng, 8, SHAPES + EXTRA_SHAPES)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        mse = torch.nn.functional.mse_loss(recon, images)
        # The first three latent channels hold the picture's colours at latent resolution: a smooth, balanced
        # latent space in which a small diffusion model learns colours as easily as shapes.
        preview = torch.nn.functional.mse_loss(
            posterior.mean[:, :3], torch.nn.functional.avg_pool2d(images, 4)
        )
        loss = mse + PREVIEW_WEIGHT * preview + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log(f"vae step {step}: reconstruction mse {mse.item():.4f}")
    return vae.eval().requires_grad_(False), step


def finetune_decoder(vae: Any, seed: int, steps: int, deadline: float, log: Any) -> int:
    """Train the decoder alone on the frozen encoder's latents (which the UNet learns, so they stay put)."""
    import torch

    rng = random.Random(seed + 5)
    vae.decoder.requires_grad_(True)
    vae.post_quant_conv.requires_grad_(True)
    params = [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    step = 0
    while step < steps and time.perf_counter() < deadline:
        images, _ = _scene_batch(rng, 8, SHAPES + EXTRA_SHAPES)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean
        mse = torch.nn.functional.mse_loss(vae.decode(latents).sample, images)
        optimizer.zero_grad(set_to_none=True)
        mse.backward()
        optimizer.step()
        step += 1
        if step % 50 == 0:
            log(f"decoder step {step}: reconstruction mse {mse.item():.4f}")
    vae.requires_grad_(False)
    return step


def build_text_encoder(seed: int) -> Any:
    """The tiny CLIP text encoder for the generated tokenizer (seeded; trained with the UNet)."""
    import torch
    import transformers

    vocab, _ = clip_vocab()
    config = transformers.CLIPTextConfig(
        **TEXT_CONFIG,
        vocab_size=len(vocab),
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    torch.manual_seed(seed + 1)
    return transformers.CLIPTextModel(config)


def tokenize(tokenizer: Any, captions: list[str]) -> Any:
    """Token ids padded to the tokenizer's 77, as the pipeline pads them."""
    return tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def encode_pool(vae: Any, seed: int, count: int) -> tuple[Any, list[str], float]:
    """Latents (unscaled posterior means) and captions of `count` drawn scenes; their std for the scale."""
    import torch

    rng = random.Random(seed + 2)
    latents, captions = [], []
    with torch.no_grad():
        for _ in range(0, count, 64):
            images, names = _scene_batch(rng, 64, SHAPES)
            latents.append(vae.encode(images).latent_dist.mean)
            captions += names
    pool = torch.cat(latents)
    return pool, captions, float(pool.std())


def build_pipeline(vae: Any, unet: Any, text_encoder: Any, tokenizer: Any) -> Any:
    """A StableDiffusionPipeline of the parts, with the shipped PNDM scheduler."""
    import diffusers

    return diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=diffusers.PNDMScheduler.from_config(SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def pixel_check(
    pipe: Any, seeds: int = CHECK_SEEDS, steps: int = CHECK_STEPS, guidance: float = CHECK_GUIDANCE
) -> dict[str, float]:
    """Shares of samples (every caption x `seeds`) right in background, colour, shape and all three."""
    import torch

    pipe.set_progress_bar_config(disable=True)
    scenes = all_scenes()
    right = {"background": 0, "colour": 0, "shape": 0, "all": 0}
    for seed in range(seeds):
        images = pipe(
            [s.caption for s in scenes],
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=SIZE,
            width=SIZE,
            generator=torch.Generator().manual_seed(seed),
        ).images
        for image, scene in zip(images, scenes, strict=True):
            reading = read_scene(image)
            right["background"] += reading.background == scene.background
            right["colour"] += reading.colour == scene.colour
            right["shape"] += reading.shape == scene.shape
            right["all"] += reading.matches(scene)
    return {name: count / (len(scenes) * seeds) for name, count in right.items()}


def train_unet(
    pool: Any,
    caption_ids: Any,
    empty_ids: Any,
    text_encoder: Any,
    seed: int,
    steps: int,
    deadline: float,
    log: Any,
    check: Any = None,
    check_every: int = 0,
) -> tuple[Any, Any, int]:
    """The UNet and text encoder (their EMA weights), trained together on the scaled latent pool for
    `steps` (fewer at `deadline`). `check(unet, text_encoder)` is logged every `check_every` steps."""
    import copy

    import diffusers
    import torch

    torch.manual_seed(seed + 3)
    unet = diffusers.UNet2DConditionModel(**UNET_CONFIG)
    text_encoder.train().requires_grad_(True)
    models = torch.nn.ModuleList([unet, text_encoder])
    ema = copy.deepcopy(models).requires_grad_(False)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    optimizer = torch.optim.AdamW(models.parameters(), lr=1e-3, weight_decay=0.0)
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    snr_weight = snr.clamp(max=MIN_SNR_GAMMA) / snr  # epsilon prediction: min(SNR, gamma) / SNR
    generator = torch.Generator().manual_seed(seed + 4)
    started = time.perf_counter()
    batch, total, step = UNET_BATCH, steps, 0
    while step < total:
        index = torch.randint(0, pool.shape[0], (batch,), generator=generator)
        latents = pool[index]
        ids = caption_ids[index].clone()
        drop = torch.rand(batch, generator=generator) < 0.1  # empty captions, for classifier-free guidance
        ids[drop] = empty_ids
        noise = torch.randn(latents.shape, generator=generator)
        noise += NOISE_OFFSET * torch.randn((batch, latents.shape[1], 1, 1), generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        error = (unet(noisy, t, text_encoder(ids)[0]).sample - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (error * snr_weight[t]).mean()
        lr = 1e-3 * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / total)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), models.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        step += 1
        if step % 20 == 0 and total > step:  # past the deadline: finish with the schedule's tail
            left = deadline - time.perf_counter()
            per_step = (time.perf_counter() - started) / step
            if left < (total - step) * per_step:
                total = step + max(1, int(left / per_step))
                log(f"unet: the time limit allows {total} steps")
        if step % 200 == 0:
            log(f"unet step {step}/{total}: loss {loss.item():.4f}")
        if check is not None and check_every and step % check_every == 0 and step < total:
            shares = check(ema[0].eval(), ema[1].eval())
            log(f"unet step {step}: pixel check " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    return ema[0].eval(), ema[1].eval(), step


def save_pipeline(out: Path, vae: Any, unet: Any, text_encoder: Any) -> None:
    """Save the fp16 pipeline folder with the classic SD tokenizer layout."""
    import torch
    import transformers

    scratch = out.parent / f".{out.name}.tokenizer"
    folder = write_clip_tokenizer(scratch)
    pipe = build_pipeline(vae, unet, text_encoder, transformers.CLIPTokenizer.from_pretrained(folder))
    pipe.to(dtype=torch.float16)
    if out.exists():
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    shutil.rmtree(out / "tokenizer")
    shutil.move(str(folder), out / "tokenizer")
    shutil.rmtree(scratch, ignore_errors=True)


def check_model(
    path: Path, seeds: int = CHECK_SEEDS, steps: int = CHECK_STEPS, guidance: float = CHECK_GUIDANCE
) -> dict[str, float]:
    """The pixel check of the saved model (loaded in fp32, as the demo loads it)."""
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, torch_dtype=torch.float32)
    return pixel_check(pipe, seeds, steps, guidance)


def pretrain(
    out: Path,
    minutes: float = 60.0,
    seed: int = 0,
    vae_steps: int = VAE_STEPS,
    unet_steps: int = UNET_STEPS,
    decoder_steps: int = DECODER_STEPS,
    threads: int = 2,
    log: Any = None,
) -> dict[str, Any]:
    """Run the three stages and save the model in `out`; returns the build facts.

    The stages stop early (the UNet finishing its learning-rate schedule) to end within about `minutes`."""
    import torch

    log = log or (lambda text: print(text, flush=True))
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    random.seed(seed)
    torch.manual_seed(seed)
    wall, cpu = time.perf_counter(), _cpu_seconds()
    deadline = wall + minutes * 60 * 0.8 - 60  # leave time for the decoder, saving and the check
    with quiet_hf("transformers", "diffusers"):
        vae_deadline = wall + (deadline - wall) * 0.2
        vae, vae_steps = train_vae(seed, vae_steps, vae_deadline, log)
        pool, pool_captions, std = encode_pool(vae, seed, 4096)
        vae.register_to_config(scaling_factor=round(1.0 / std, 5))
        log(f"latent std {std:.3f} -> scaling factor {1.0 / std:.4f}")
        text_encoder = build_text_encoder(seed)
        import transformers

        scratch = write_clip_tokenizer(out.parent / f".{out.name}.check-tokenizer")
        tokenizer = transformers.CLIPTokenizer.from_pretrained(scratch)
        shutil.rmtree(scratch, ignore_errors=True)
        caption_ids = tokenize(tokenizer, pool_captions)
        empty_ids = tokenize(tokenizer, [""])[0]

        def check(unet: Any, encoder: Any) -> dict[str, float]:
            return pixel_check(build_pipeline(vae, unet, encoder, tokenizer), seeds=1)

        unet, text_encoder, unet_steps = train_unet(
            pool / std, caption_ids, empty_ids, text_encoder, seed, unet_steps, deadline, log, check, 500
        )
        decoder_steps = finetune_decoder(vae, seed, decoder_steps, deadline + 30, log)
        save_pipeline(out, vae, unet, text_encoder)
        shares = check_model(out)
    facts = {
        "seed": seed,
        "vae_steps": vae_steps,
        "unet_steps": unet_steps,
        "decoder_steps": decoder_steps,
        "wall": time.perf_counter() - wall,
        "cpu": _cpu_seconds() - cpu,
        "threads": torch.get_num_threads(),
        "checked": len(all_scenes()) * CHECK_SEEDS,
        "seeds": CHECK_SEEDS,
        "steps": CHECK_STEPS,
        "guidance": CHECK_GUIDANCE,
        "noise_offset": NOISE_OFFSET,
        "min_snr": MIN_SNR_GAMMA,
        "preview": PREVIEW_WEIGHT,
        "accuracy": round(shares["all"], 4),
        "background": round(shares["background"], 4),
        "colour": round(shares["colour"], 4),
        "shape": round(shares["shape"], 4),
    }
    (out / LABEL_FILE).write_text(
        LABEL.format(
            shapes=", ".join(SHAPES),
            colours=", ".join(COLOURS),
            backgrounds=", ".join(BACKGROUNDS),
            extra=", ".join(EXTRA_SHAPES),
            **facts,
        ),
        encoding="utf-8",
    )
    (out / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n", encoding="utf-8")
    torch.set_num_threads(previous_threads)
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratui.tiny_models.pretrain image", description=__doc__)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped model's)")
    parser.add_argument(
        "--minutes", type=float, default=60.0, help="time limit; stages end early (default 60)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=VAE_STEPS)
    parser.add_argument("--unet-steps", type=int, default=UNET_STEPS)
    parser.add_argument("--decoder-steps", type=int, default=DECODER_STEPS)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    args = parser.parse_args(argv)
    out = (args.out or shipped_model_path()).absolute()
    facts = pretrain(
        out, args.minutes, args.seed, args.vae_steps, args.unet_steps, args.decoder_steps, args.threads
    )
    print(
        f"saved {out}: pixel check {facts['accuracy']:.0%} right; "
        f"{facts['wall']:.0f} s wall, {facts['cpu']:.0f} s CPU"
    )
    return 0
