"""The trainers' real training step, set up without a run directory, for measuring memory with `MemoryMeter`.

This is what the accuracy checks compare predictions against: the SD and LLM trainers' own setup functions
(model loading, precision, LoRA placement, optimizer, accelerate preparation, caches) and their own micro-batch
loss inside the shared `optimizer_step`. Only the data is synthetic: LLM rows are filled to `max_seq_len`
(every token after the first a target, the worst case the estimator predicts), SD images are random pictures
of the training resolution.

Also here: mid-size model folders (SD1.x layout and Llama layout, tens of millions of parameters) built from
the tiny models' tokenizers, for accuracy checks beyond the tiny fixtures.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from loratui.memory.meter import MemoryMeter


class _QuietReporter:
    """Stands in for the trainers' Reporter during setup (warnings are not needed here)."""

    def event(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass
class RealStep:
    """Models to register with a meter, the optimizer, and `run()` = one optimizer step of the real loop."""

    modules: list[torch.nn.Module]
    optimizer: Any
    run: Callable[[int | None], None]  # micro-batch size (None: the config's batch_size)
    device: torch.device


def _fresh_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def llm_real_step(cfg: Any) -> RealStep:
    """The LLM trainer's setup and step for `cfg` (a TrainConfig with a local base_model)."""
    from loratui.models.checkpointing import offloaded_activations
    from loratui.models.llm.batches import Unit, collate
    from loratui.models.llm.lora import apply_lora_dtype, setup_lora
    from loratui.models.llm.loss import causal_loss_sum
    from loratui.train.llm import setup
    from loratui.train.loop.optim import optimizer_from_config
    from loratui.train.loop.plan import split_micro_batches
    from loratui.train.loop.stepping import optimizer_step

    accelerator, precision = setup.setup_accelerator(cfg)
    model, tokenizer, _ = setup.setup_base(cfg, precision)
    model = apply_lora_dtype(cfg, setup_lora(cfg, model))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = optimizer_from_config(cfg, params, 10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    model.train()
    generator = torch.Generator().manual_seed(cfg.seed)
    vocab = int(accelerator.unwrap_model(model).config.vocab_size)
    units = []
    for _ in range(cfg.effective_batch):
        ids = torch.randint(3, vocab, (cfg.max_seq_len,), generator=generator).tolist()
        units.append(Unit(ids, [-100] + ids[1:], cfg.max_seq_len - 1))
    pad_id = tokenizer.pad_token_id
    indices = list(range(len(units)))

    def micro_loss(batch_indices: list[int], normaliser: int) -> torch.Tensor:
        batch = collate([units[i] for i in batch_indices], pad_id).to(accelerator.device)
        with offloaded_activations(accelerator.device, cfg.activation_offload):
            loss = causal_loss_sum(model, batch, chunked=cfg.chunked_loss, autocast=accelerator.autocast)
        return loss / normaliser

    def run(micro_batch: int | None = None) -> None:
        optimizer_step(
            split_micro_batches(indices, micro_batch or cfg.batch_size),
            functools.partial(micro_loss, normaliser=sum(u.num_targets for u in units)),
            accelerator=accelerator,
            optimizer=optimizer,
            scheduler=scheduler,
            params=params,
            max_grad_norm=cfg.max_grad_norm,
            model=model,
        )

    return RealStep([model], optimizer, run, accelerator.device)


def write_image_dataset(folder: Path, count: int, resolution: int, seed: int = 0) -> Path:
    """`count` random RGB images of `resolution`² with a caption each."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")
        (folder / f"img{i:03d}.txt").write_text(f"a picture number {i}, random colours", encoding="utf-8")
    return folder


def _prepare_models(accelerator: Any, models: Any, train_text_encoder: bool) -> None:
    """accelerate's wrappers as the SD trainer installs them (`forward_unet`; older: in place)."""
    prepared = accelerator.prepare(models.unet)
    if hasattr(models, "forward_unet"):
        models.forward_unet = prepared
    else:
        models.unet = prepared
    if train_text_encoder:
        encoders = [accelerator.prepare(encoder) for encoder in models.text_encoders]
        if hasattr(models, "forward_text_encoders"):
            models.forward_text_encoders = encoders
        else:
            models.text_encoders = encoders


def sd_real_step(cfg: Any, family: str) -> RealStep:
    """The SD trainer's setup and step for `cfg` (local base_model and an image folder in train_data_dir)."""
    from loratui.config import ResolvedConfig
    from loratui.train.loop.plan import StepPlan, split_micro_batches
    from loratui.train.loop.stepping import optimizer_step
    from loratui.train.sd import setup
    from loratui.train.sd.trainer import LossContext

    _fresh_accelerate()
    reporter = _QuietReporter()
    job = SimpleNamespace(
        resolved=ResolvedConfig(cfg, {}, family), run=None, resume_from=None, overwrite=True
    )
    accelerator, precision = setup.setup_accelerator(cfg)
    dataset = setup.setup_dataset(cfg, reporter)
    models = setup.setup_models(job, precision, accelerator.device)
    latents, text = setup.setup_caches(cfg, job, models, dataset, reporter)
    lora, params = setup.setup_lora(cfg, models, reporter)
    setup.place_unet(models)
    plan = StepPlan(len(dataset), cfg.effective_batch, cfg.epochs, cfg.max_steps, cfg.seed)
    optimizer, scheduler = setup.setup_optimizer(cfg, models, lora, plan.total_steps)
    models.unet.train()
    _prepare_models(accelerator, models, cfg.train_text_encoder)
    if cfg.train_text_encoder:
        text.text_encoders = models.forward_text_encoders
    optimizer = accelerator.prepare(optimizer)
    context = LossContext(cfg, models, dataset, latents, text)
    indices = list(range(min(cfg.effective_batch, len(dataset))))

    def run(micro_batch: int | None = None) -> None:
        optimizer_step(
            split_micro_batches(indices, micro_batch or cfg.batch_size),
            lambda batch: context.micro_loss(batch, 0, len(indices)),
            accelerator=accelerator,
            optimizer=optimizer,
            scheduler=scheduler,
            params=params,
            max_grad_norm=cfg.max_grad_norm,
            model=models.unet,
        )

    on_cpu = accelerator.device.type == "cpu"
    modules = [models.unet, *(models.text_encoders if models.text_on_device or on_cpu else [])]
    if not (cfg.cache_latents or cfg.cache_latents_to_disk) or on_cpu:
        modules.append(models.vae)
    return RealStep(modules, optimizer, run, accelerator.device)


def measure_real_peak(
    step: RealStep, *, steps: int = 2, budget_bytes: int | None = None, micro_batch: int | None = None
) -> MemoryMeter:
    """Run `steps` optimizer steps of the real loop under a meter (weights and optimizer registered).

    `micro_batch` splits each optimizer step into micro-batches of that size (gradient accumulation)."""
    meter = MemoryMeter(budget_bytes=budget_bytes)
    for module in step.modules:
        meter.register_model(module)
    meter.register_optimizer(step.optimizer)
    meter.reset_peak()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with meter:
            for _ in range(steps):
                step.run(micro_batch)
    finally:
        torch.set_num_threads(previous)
    return meter


# --- mid-size reference models -------------------------------------------------------------------------------

MID_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
MID_SD15_UNET = {
    "block_out_channels": [64, 128, 128, 128],
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
}


def build_mid_llama(tiny_llama: Path, dest: Path) -> Path:
    """A Llama-layout model (~2M-parameter decoder at vocab 1000) with the tiny model's tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if (dest / "config.json").is_file():
        return dest
    config = AutoConfig.from_pretrained(tiny_llama, local_files_only=True)
    for key, value in MID_LLAMA.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    for item in Path(tiny_llama).iterdir():
        if item.name.startswith("tokenizer") or item.name in (
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            shutil.copy(item, tmp / item.name)
    tmp.rename(dest)
    return dest


def build_mid_sd15(tiny_sd15: Path, dest: Path) -> Path:
    """An SD1.x-layout pipeline with a wider UNet (same text encoder, VAE and tokenizer as the tiny one)."""
    from diffusers import UNet2DConditionModel

    if (dest / "model_index.json").is_file():
        return dest
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(tiny_sd15, tmp)
    config = json.loads((tmp / "unet" / "config.json").read_text(encoding="utf-8"))
    config.update(MID_SD15_UNET)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    shutil.rmtree(tmp / "unet")
    unet.save_pretrained(tmp / "unet", safe_serialization=True)
    tmp.rename(dest)
    return dest
