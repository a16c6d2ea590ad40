"""Learning checks: a short CPU run of the real trainers lowers the held-out loss of the tiny SD and LLM models
by a stated margin against the untrained adapter.

The held-out samples are never trained on and are scored the same way before and after training (fixed noise
and timesteps for SD; the same tokens and loss mask for the LLM). The tiny models have random weights, so the
datasets are ones an adapter can fit in a few dozen steps: one picture family with one caption, one question
and answer template.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from llm_helpers import make_config, single_thread, write_jsonl
from llm_helpers import make_job as make_llm_job
from sd_helpers import draw_shape, events_of, seed_like_config
from sd_helpers import make_job as make_sd_job

# Held-out loss after training / held-out loss with the untrained adapter must be at most this.
# Measured on a 2-core CPU (torch CPU build): 0.71 with the test's seed 0 (0.75 and 0.78 with seeds 1 and 2).
SD_MAX_LOSS_RATIO = 0.85
# Measured: 0.37 with seed 0 (0.32 and 0.35 with seeds 1 and 2); the untrained adapter scores 6.94 ≈ ln(1000).
LLM_MAX_LOSS_RATIO = 0.60

SD_STEPS = 30
LLM_STEPS = 40

one_thread = pytest.fixture(autouse=True)(single_thread)


# --- Stable Diffusion ------------------------------------------------------------------------------------

CAPTION = "a red circle, flat colour, plain background"
TRAIN_REDS = [(220, 40, 40), (200, 30, 50), (235, 60, 40), (190, 45, 30)]
HELD_OUT_RED = (210, 50, 45)  # a red between the training ones, never trained on
HELD_OUT_SAMPLES = 16


def _circle_dataset(root: Path, n: int = 8) -> Path:
    """`n` red circles in four shades, all with the same caption (metadata.csv)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        draw_shape("circle", TRAIN_REDS[i % len(TRAIN_REDS)], (64, 64)).save(root / f"img{i:02d}.png")
        rows.append(f'img{i:02d}.png,"{CAPTION}"')
    (root / "metadata.csv").write_text("filename,prompt\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return root


@torch.no_grad()
def _sd_held_out_loss(pipe, unet) -> float:
    """Noise-prediction MSE of `unet` on the held-out circle: the same noise and timesteps at every call."""
    from diffusers import DDPMScheduler

    pixels = np.asarray(draw_shape("circle", HELD_OUT_RED, (64, 64)), dtype=np.float32) / 127.5 - 1.0
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]
    latents = pipe.vae.encode(image).latent_dist.mean * pipe.vae.config.scaling_factor
    latents = latents.expand(HELD_OUT_SAMPLES, -1, -1, -1)
    tokens = pipe.tokenizer(
        [CAPTION],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    text = pipe.text_encoder(tokens)[0].expand(HELD_OUT_SAMPLES, -1, -1)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(
        0, scheduler.config.num_train_timesteps, (HELD_OUT_SAMPLES,), generator=generator
    )
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, encoder_hidden_states=text).sample
    return float((prediction.float() - noise).pow(2).mean())


def test_sd_short_run_lowers_held_out_loss(tiny_sd15: Path, tmp_path: Path) -> None:
    from loratui.models.sd.loading import load_sd_pipeline
    from loratui.models.sd.lora import LoraPlan, inject_lora, load_lora_state, plan_targets
    from loratui.runs.checkpoints import load_checkpoint
    from loratui.train.sd.trainer import train

    data = _circle_dataset(tmp_path / "data")
    config = seed_like_config(
        tmp_path,
        tiny_sd15,
        data,
        epochs=None,
        max_steps=SD_STEPS,
        batch_size=2,
        learning_rate="1e-2",
        save_steps=1000,
        seed=0,
    )
    job = make_sd_job(config)
    assert train(job) == "finished"
    assert [e["step"] for e in events_of(job.run, "step")] == list(range(1, SD_STEPS + 1))
    checkpoint = load_checkpoint(job.run.latest_checkpoint())
    assert checkpoint.step == SD_STEPS

    pipe = load_sd_pipeline(tiny_sd15).pipeline
    pipe.unet.eval()
    base = _sd_held_out_loss(pipe, pipe.unet)
    cfg = job.resolved.config
    components = {"unet": pipe.unet}
    plan = LoraPlan(
        targets=plan_targets(cfg.target_modules, components, train_text_encoder=cfg.train_text_encoder),
        rank=cfg.lora_rank,
        alpha=cfg.effective_alpha,
    )
    inject_lora(components, plan)
    untrained = _sd_held_out_loss(pipe, pipe.unet)
    load_lora_state(components, checkpoint.lora_state)
    trained = _sd_held_out_loss(pipe, pipe.unet)

    assert untrained == pytest.approx(base, rel=1e-5)  # an untrained adapter (B = 0) is the base model
    assert trained <= SD_MAX_LOSS_RATIO * untrained, (untrained, trained)


# --- LLM -------------------------------------------------------------------------------------------------

TRAIN_OBJECTS = ["apple", "river", "lamp", "chair", "cloud", "stone", "bread", "glass"]
HELD_OUT_OBJECTS = ["door", "horse", "paper", "tree"]  # never trained on


def _qa_rows(objects: list[str]) -> list[dict[str, str]]:
    return [
        {"prompt": f"Where is the {o}?", "response": f"The {o} is on the green table near the window."}
        for o in objects
    ]


@torch.no_grad()
def _llm_held_out_loss(model, units, pad_id: int) -> float:
    """Mean cross-entropy per answer token over the held-out units."""
    from loratui.models.llm.batches import collate
    from loratui.models.llm.loss import token_loss_sum

    model.eval()
    batch = collate(units, pad_id)
    return float(token_loss_sum(model, batch)) / batch.num_targets


def test_llm_short_run_lowers_held_out_loss(tiny_llama: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from loratui.models.llm.batches import build_llm_data
    from loratui.models.llm.loading import load_base
    from loratui.train.llm.trainer import run_training

    write_jsonl(tmp_path / "train" / "qa.jsonl", _qa_rows(TRAIN_OBJECTS))
    write_jsonl(tmp_path / "held_out" / "qa.jsonl", _qa_rows(HELD_OUT_OBJECTS))
    # The random lm_head caps how far attention/MLP adapters alone can move the logits (about 6.94 -> 5.9 in
    # 200 steps), so the adapter covers lm_head too.
    cfg = make_config(
        tiny_llama,
        tmp_path / "train",
        tmp_path,
        max_steps=LLM_STEPS,
        batch_size=4,
        learning_rate=1e-2,
        target_modules=["all-linear", "lm_head"],
        seed=0,
    )
    result = run_training(make_llm_job(cfg), console=False)
    assert result.state == "finished" and result.step == LLM_STEPS

    tokenizer = result.tokenizer
    held_out = build_llm_data(
        tmp_path / "held_out", tokenizer, result.template, max_seq_len=cfg.max_seq_len
    ).train
    assert len(held_out) == len(HELD_OUT_OBJECTS) and all(u.num_targets > 0 for u in held_out)

    adapter = str(result.adapter_dir)
    untrained_model = get_peft_model(load_base(str(tiny_llama))[0], LoraConfig.from_pretrained(adapter))
    trained_model = PeftModel.from_pretrained(load_base(str(tiny_llama))[0], adapter)
    untrained = _llm_held_out_loss(untrained_model, held_out, tokenizer.pad_token_id)
    trained = _llm_held_out_loss(trained_model, held_out, tokenizer.pad_token_id)

    assert trained <= LLM_MAX_LOSS_RATIO * untrained, (untrained, trained)
