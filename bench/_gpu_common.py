"""Shared pieces of the GPU check (`bench/gpu_check.py`): model folders of real shapes built on the device,
the trainers' real step timed and measured, and the bare transformers+peft / diffusers+peft loops it is
compared with.

Models have random weights built from configs (nothing is downloaded). Large models are initialised directly
on the GPU in their 16-bit dtype (seconds instead of minutes on the CPU) and saved once per check.
"""

from __future__ import annotations

import gc
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "bench"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_llm_common import TOKENIZER_FILES  # noqa: E402
from bench_memory_gpu import init_on  # noqa: E402

# Published architectures (config.json values that shape memory; rope scaling and ids do not).
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": {
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
    },
    "Llama-3.1-8B": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
    },
}

LLM_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # loratui's default (loratui.models.llm.lora)
SD_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # loratui's default (loratui.models.sd.lora)


def build_llama_shape(dest: Path, values: dict[str, Any], *, device: str, dtype: str = "bfloat16") -> Path:
    """A Llama folder of the given shape with random weights (initialised on `device`), plus the bundled tiny
    tokenizer (ids < 1000, which any vocabulary of 1000 or more accepts). Reused when present."""
    import torch
    import transformers

    from loratui.tiny_models.llama import build_tiny_llama

    dest = Path(dest)
    if (dest / "config.json").is_file() and any(dest.glob("*.safetensors")):
        return dest
    tiny = build_tiny_llama(dest.parent / "tokenizer-source")
    config = transformers.LlamaConfig(
        **values,
        max_position_embeddings=8192,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        dtype=dtype,
    )
    torch.manual_seed(0)
    with init_on(device, dtype):
        model = transformers.LlamaForCausalLM(config)
    model.to(getattr(torch, dtype))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    del model
    free_memory()
    for name in TOKENIZER_FILES:
        if (tiny / name).exists():
            shutil.copyfile(tiny / name, tmp / name)
    tmp.rename(dest)
    return dest


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def reset_peaks() -> None:
    import torch

    free_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def cuda_peaks() -> tuple[int | None, int | None]:
    """(max_memory_allocated, max_memory_reserved) since the last reset; (None, None) on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return None, None
    return int(torch.cuda.max_memory_allocated()), int(torch.cuda.max_memory_reserved())


def finite(*values: Any) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def rate(units_per_step: float, seconds: list[float], warmup: int) -> float:
    """Units per second from per-step times, the first `warmup` steps left out (median of the rest)."""
    timed = seconds[warmup:] or seconds
    return units_per_step / statistics.median(timed)


@dataclass
class Measured:
    """One run of the trainers' real step: per-step seconds, peaks and the losses it returned."""

    seconds: list[float]
    allocated: int | None  # max_memory_allocated (CUDA) or the memory meter's peak (CPU)
    reserved: int | None  # max_memory_reserved (CUDA only)
    steps: int


def run_real_step(cfg: Any, family: str, steps: int, *, on_cpu: bool) -> Measured:
    """The trainers' own setup and optimizer step (`loratui.train.memory_check.realstep`), `steps` times.

    CUDA: peaks from the caching allocator (reset before the model is loaded). CPU: the memory meter's peak of
    the first step with weights and optimizer registered (the basis of the CPU accuracy checks); the later
    steps run without the meter, so their times are not slowed by it."""
    from loratui.memory.meter import MemoryMeter
    from loratui.train.memory_check.realstep import llm_real_step, sd_real_step

    reset_peaks()
    step = llm_real_step(cfg) if family == "llm" else sd_real_step(cfg, family)
    meter = None
    if on_cpu:
        meter = MemoryMeter()
        for module in step.modules:
            meter.register_model(module)
        meter.register_optimizer(step.optimizer)
        meter.reset_peak()
    seconds = []
    try:
        if meter is not None:  # CPU: the first step under the meter (memory), the others timed without it
            started = time.perf_counter()
            with meter:
                step.run(None)
            seconds.append(time.perf_counter() - started)
        for _ in range(steps - len(seconds)):
            started = time.perf_counter()
            step.run(None)
            synchronize()
            seconds.append(time.perf_counter() - started)
        allocated, reserved = cuda_peaks()
        if meter is not None:
            allocated = int(meter.peak_bytes)
    finally:
        if meter is not None:
            meter.close()
        del step
        free_memory()
    return Measured(seconds, allocated, reserved, steps)


# --- bare loops ------------------------------------------------------------------------------------------------


def bare_llm_loop(
    folder: Path, *, qlora: bool, seq: int, batch: int, steps: int, checkpointing: bool, device: str
) -> Measured:
    """What a minimal transformers + peft script does: bf16 base (or NF4 with k-bit preparation), LoRA rank 16
    on q,k,v,o, the model's own loss (`labels=`), bf16 autocast, clipping 1.0, AdamW. Random token rows."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    reset_peaks()
    kwargs: dict[str, Any] = {"dtype": torch.bfloat16 if device == "cuda" else torch.float32}
    if qlora:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
        kwargs["device_map"] = {"": torch.cuda.current_device()}
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **kwargs)
    if not qlora:
        model.to(device)
    model.config.use_cache = False
    ckpt = {"use_reentrant": False}
    if qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=checkpointing, gradient_checkpointing_kwargs=ckpt
        )
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt)
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(
        model, LoraConfig(r=16, lora_alpha=16, target_modules=LLM_TARGETS, task_type="CAUSAL_LM")
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    model.train()
    seconds = []
    try:
        for _ in range(steps):
            ids = torch.randint(3, vocab, (batch, seq), generator=generator).to(device)
            started = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            seconds.append(time.perf_counter() - started)
        allocated, reserved = cuda_peaks()
    finally:
        del model, optimizer, params
        free_memory()
    return Measured(seconds, allocated, reserved, steps)


def bare_sd_loop(
    folder: Path, *, family: str, resolution: int, batch: int, steps: int, checkpointing: bool, device: str
) -> Measured:
    """What a minimal diffusers + peft script does: fp16 UNet and text encoders (fp32 on the CPU; SDXL's VAE in
    fp32), LoRA rank 16 on to_q/to_k/to_v/to_out.0 in fp32, random pixels VAE-encoded and captions encoded
    every step, noise-prediction MSE under fp16 autocast with a GradScaler, clipping 1.0, AdamW."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, DiffusionPipeline
    from peft import LoraConfig, inject_adapter_in_model

    from loratui.models.sd.loading import quiet_libraries

    cuda = device == "cuda"
    half = torch.float16 if cuda else torch.float32
    reset_peaks()
    with quiet_libraries():
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=half)
    sdxl = family == "sdxl"
    pipe.to(device)
    if sdxl:
        pipe.vae.to(torch.float32)
    unet = pipe.unet
    for module in (unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    torch.manual_seed(0)
    unet = inject_adapter_in_model(LoraConfig(r=16, lora_alpha=16, target_modules=SD_TARGETS), unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prompts = [f"a picture number {i}, random colours" for i in range(batch)]
    generator = torch.Generator().manual_seed(0)
    unet.train()
    seconds = []
    try:
        for _ in range(steps):
            pixels = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
            started = time.perf_counter()
            with torch.no_grad():
                vae_in = pixels.to(pipe.vae.dtype)
                latents = pipe.vae.encode(vae_in).latent_dist.sample() * pipe.vae.config.scaling_factor
                latents = latents.to(half)
                if sdxl:
                    embeds, _, pooled, _ = pipe.encode_prompt(
                        prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
                    )
                    time_ids = torch.tensor(
                        [[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device
                    )
                    extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
                else:
                    ids = pipe.tokenizer(
                        prompts,
                        padding="max_length",
                        max_length=pipe.tokenizer.model_max_length,
                        truncation=True,
                        return_tensors="pt",
                    ).input_ids.to(device)
                    embeds = pipe.text_encoder(ids)[0]
                    extra = {}
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            with torch.autocast(device, dtype=torch.float16, enabled=cuda):
                prediction = unet(noisy, timesteps, embeds, **extra).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            synchronize()
            seconds.append(time.perf_counter() - started)
        allocated, reserved = cuda_peaks()
    finally:
        del pipe, unet, optimizer, params
        free_memory()
    return Measured(seconds, allocated, reserved, steps)
