"""Estimator: parameter counts agree with the trainers, real architectures from configs only, fallbacks."""

from __future__ import annotations

import json
import time

import pytest

from loratui.config import TrainConfig
from loratui.memory.arch import arch_from_config, bundled_sd_configs
from loratui.memory.estimate import Estimate, estimate_peak, planner_for
from loratui.memory.regime import Point, Regime
from loratui.memory.tables import table_for
from loratui.util.sizes import GIB

SD15 = {
    "task_type": "image-generation",
    "model_family": "sd15",
    "base_model": "runwayml/stable-diffusion-v1-5",
}
SDXL = {"task_type": "image-generation", "model_family": "sdxl", "base_model": "stabilityai/sdxl-base-1.0"}
LLAMA7 = {"task_type": "text-generation", "model_family": "llm", "base_model": "meta-llama/Llama-2-7b-hf"}


def _trainable(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize(
    ("family", "targets", "train_te"),
    [("sd15", None, False), ("sd15", ["to_q", "ff.net"], True), ("sdxl", None, True)],
)
def test_sd_lora_counts_match_the_trainer(family, targets, train_te, tiny_sd15, tiny_sdxl) -> None:
    from loratui.memory import probe

    base = tiny_sd15 if family == "sd15" else tiny_sdxl
    cfg = TrainConfig(
        task_type="image-generation", model_family=family, base_model=str(base), target_modules=targets
    )
    planner = planner_for(cfg)
    models = probe.build_sd(planner.spec.configs, "cpu", "fp32")
    params = probe.add_sd_lora(
        models, Regime("fp32", targets=tuple(targets) if targets else None), 8, train_text_encoder=train_te
    )
    assert planner.summary.lora_params(8, targets, train_text_encoder=train_te) == _trainable(params)
    unet = sum(p.numel() for p in models.unet.parameters() if not p.requires_grad)
    assert planner.summary.components["unet"].params == unet


@pytest.mark.parametrize("targets", [None, ["all-linear"], ["q_proj", "down_proj"]])
def test_llm_lora_counts_match_the_trainer(targets, tiny_llama) -> None:
    from loratui.memory import probe

    cfg = TrainConfig(
        task_type="text-generation", model_family="llm", base_model=str(tiny_llama), target_modules=targets
    )
    planner = planner_for(cfg)
    config = planner.spec.configs["model"]
    model = probe.add_llm_lora(
        probe.build_llm(config, planner.spec.num_layers, "cpu", _f32()),
        Regime("fp32", targets=tuple(targets) if targets else None),
        8,
    )
    assert planner.summary.lora_params(8, targets) == _trainable(
        p for p in model.parameters() if p.requires_grad
    )
    assert planner.summary.components["model"].params == sum(
        p.numel() for p in model.parameters() if not p.requires_grad
    )


def _f32():
    import torch

    return torch.float32


@pytest.mark.parametrize(
    ("values", "low_gib", "high_gib"),
    [
        # SD1.5 LoRA r16, 512², batch 1, fp16 (frozen weights in fp16: less than the PEFT README's fp32 15.5 GB)
        ({**SD15, "lora_rank": 16, "mixed_precision": "fp16"}, 3, 9),
        # SDXL 1024², checkpointing, cached latents + TE outputs, 8-bit AdamW, dim 8: sd-scripts 8-10 GB
        (
            {
                **SDXL,
                "resolution": 1024,
                "lora_rank": 8,
                "gradient_checkpointing": True,
                "cache_latents": True,
                "cache_text_encoder_outputs": True,
                "optimizer": "adamw8bit",
                "mixed_precision": "fp16",
            },
            6,
            11,
        ),
        # 7B QLoRA, batch 1, seq 1024, checkpointing: LLaMA-Factory about 6 GB
        ({**LLAMA7, "load_in_4bit": True, "gradient_checkpointing": True, "max_seq_len": 1024}, 4, 9),
        # 7B 16-bit LoRA, batch 2, seq 2048, checkpointing: torchtune (8B) 16.2 GiB
        (
            {
                **LLAMA7,
                "batch_size": 2,
                "max_seq_len": 2048,
                "gradient_checkpointing": True,
                "mixed_precision": "bf16",
            },
            14,
            22,
        ),
    ],
)
def test_real_architectures_from_configs_only(values, low_gib, high_gib) -> None:
    cfg = TrainConfig(**values)
    started = time.perf_counter()
    estimate = estimate_peak(cfg, device="cuda")
    assert time.perf_counter() - started < 3.0
    assert isinstance(estimate, Estimate)
    assert low_gib * GIB <= estimate.total_bytes <= high_gib * GIB, estimate.breakdown
    assert sum(estimate.breakdown.values()) == estimate.total_bytes
    assert estimate.breakdown["cuda_context"] > 0 and estimate.breakdown["fragmentation"] > 0
    assert any("assuming" in note for note in estimate.notes)
    assert "shipped table" in estimate.method and 0 < estimate.error_band <= 0.2


def test_breakdown_reacts_to_settings() -> None:
    base = TrainConfig(**LLAMA7, max_seq_len=2048, batch_size=2, mixed_precision="bf16")
    peaks = {
        "base": estimate_peak(base).total_bytes,
        "ckpt": estimate_peak(base.model_copy(update={"gradient_checkpointing": True})).total_bytes,
        "qlora": estimate_peak(
            base.model_copy(update={"load_in_4bit": True, "gradient_checkpointing": True})
        ).total_bytes,
        "batch4": estimate_peak(base.model_copy(update={"batch_size": 4})).total_bytes,
        "seq4k": estimate_peak(base.model_copy(update={"max_seq_len": 4096})).total_bytes,
    }
    assert peaks["ckpt"] < peaks["base"] < peaks["batch4"]
    assert peaks["qlora"] < peaks["ckpt"] and peaks["base"] < peaks["seq4k"]
    qlora = estimate_peak(base.model_copy(update={"load_in_4bit": True}))
    assert qlora.breakdown["weights"] < 0.4 * estimate_peak(base).breakdown["weights"]
    logits = estimate_peak(base).breakdown["logits_loss"]
    assert 0.5 * GIB < logits < 4 * GIB  # b·s·V fp32 buffers: 2 x 2048 x 32000 x 4 B each
    cpu = estimate_peak(base, device="cpu")
    assert "cuda_context" not in cpu.breakdown


def test_sd_caching_removes_the_vae_from_training() -> None:
    cfg = TrainConfig(
        **SD15, resolution=512, gradient_checkpointing=False, mixed_precision="fp16", batch_size=4
    )
    plain = estimate_peak(cfg)
    cached = estimate_peak(cfg.model_copy(update={"cache_latents": True}))
    assert "vae" in plain.breakdown and "vae" not in cached.breakdown
    assert cached.total_bytes < plain.total_bytes
    # SDXL at 1024²: the trainer encodes every latent before the UNet goes to the GPU, so the caching pass
    # holds only the VAE and its activations; the text encoders leave the GPU once their outputs are cached
    xl_cfg = TrainConfig(**SDXL, resolution=1024, gradient_checkpointing=True, cache_latents=True)
    xl = estimate_peak(xl_cfg)
    assert "unet_weights" in xl.breakdown and "vae" not in xl.breakdown
    xl_text = estimate_peak(xl_cfg.model_copy(update={"cache_text_encoder_outputs": True}))
    assert "text_encoders" in xl.breakdown and "text_encoders" not in xl_text.breakdown
    assert xl_text.total_bytes < xl.total_bytes
    assert any("leave the GPU" in note for note in xl_text.notes)
    # batch 16 at 1024²: encoding the latents is the peak; the VAE pass alone, no UNet on the card
    caching = estimate_peak(xl_cfg.model_copy(update={"batch_size": 16, "gradient_accumulation_steps": 1}))
    assert caching.phase == "latent caching (before training)"
    assert set(caching.breakdown) >= {"vae", "encoding"}
    assert not {"unet_weights", "text_encoders", "lora_params"} & set(caching.breakdown)
    # batch 1: training is the peak again, with the UNet and without the VAE
    one = estimate_peak(xl_cfg.model_copy(update={"batch_size": 1, "gradient_accumulation_steps": 1}))
    assert one.phase == "micro-batch forward/backward"
    assert "unet_weights" in one.breakdown and "vae" not in one.breakdown
    # captions that change every epoch cannot be cached: the text encoders stay
    shuffled = estimate_peak(
        xl_cfg.model_copy(update={"cache_text_encoder_outputs": True, "shuffle_tags": True})
    )
    assert "text_encoders" in shuffled.breakdown


def test_sd_architecture_matches_shipped_table() -> None:
    for family, name in (("sd15", "sd15"), ("sdxl", "sdxl"), ("sd2", "sd2")):
        spec = arch_from_config(TrainConfig(task_type="image-generation", model_family=family))
        assert spec.configs["unet"] == bundled_sd_configs(name)["unet"]
        assert table_for(spec.fingerprint) is not None, name
    spec = arch_from_config(TrainConfig(task_type="text-generation", base_model="x/Llama-2-13b-hf"))
    assert spec.configs["model"]["hidden_size"] == 5120 and table_for(spec.fingerprint) is not None


def test_diffusers_folder_with_extra_config_keys_matches_the_table(tmp_path) -> None:
    """Configs saved by other library versions list more (default) keys: still SD1.5's table."""
    configs = bundled_sd_configs("sd15")
    folder = tmp_path / "my-sd15-finetune"
    extra = {
        "unet": {"class_embed_type": None, "transformer_layers_per_block": 1, "_diffusers_version": "0.9.0"},
        "vae": {"force_upcast": True, "mid_block_add_attention": True},
        "text_encoder": {"dropout": 0.0, "torch_dtype": "float16"},
    }
    for name, config in configs.items():
        (folder / name).mkdir(parents=True)
        data = {k: v for k, v in config.items() if k != "_class"} | extra.get(name, {})
        (folder / name / "config.json").write_text(json.dumps(data))
    (folder / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
        )
    )
    cfg = TrainConfig(task_type="image-generation", base_model=str(folder))
    estimate = estimate_peak(cfg)
    assert "shipped table" in estimate.method and not estimate.notes


def test_unknown_architecture_falls_back_to_analytic(tmp_path) -> None:
    folder = tmp_path / "weird-lm"
    folder.mkdir()
    config = {
        "model_type": "madeupformer",
        "hidden_size": 1024,
        "num_hidden_layers": 8,
        "vocab_size": 32000,
        "num_attention_heads": 8,
        "intermediate_size": 4096,
    }
    (folder / "config.json").write_text(json.dumps(config))
    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(folder))
    estimate = estimate_peak(cfg)
    assert estimate.method.startswith("analytic")
    assert estimate.error_band >= 0.3
    assert any("cannot build the architecture" in note and "madeupformer" in note for note in estimate.notes)
    assert sum(estimate.breakdown.values()) == estimate.total_bytes
    assert any("parameters, counted from its config.json" in note for note in estimate.notes)


def test_unknown_architecture_size_from_weight_files_else_stated_as_assumed(tmp_path) -> None:
    """Without vocab_size the config gives no parameter count: the weight files' headers do (nothing is
    loaded); with neither, the 7B assumption is stated in the notes."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "odd-lm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "madeupformer", "hidden_size": 256}))
    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(folder))
    guessed = estimate_peak(cfg)
    assert any("7.00B parameters, ASSUMED" in note for note in guessed.notes)
    save_file({"embed": torch.zeros(1000, 256), "proj": torch.zeros(256, 1024)}, folder / "model.safetensors")
    counted = estimate_peak(cfg)
    assert any("0.5M parameters, counted from its .safetensors headers" in note for note in counted.notes)
    assert counted.breakdown["weights"] == (1000 * 256 + 256 * 1024) * 2  # 16-bit on the GPU


def test_meta_trace_agrees_with_cpu_trace(tiny_llama) -> None:
    """The meta-device trace (used for GPU tables) sees the same memory as running the step on the CPU."""
    from loratui.memory import probe

    llm = planner_for(
        TrainConfig(task_type="text-generation", model_family="llm", base_model=str(tiny_llama))
    )
    point = Point(2, 64, 8)
    for ckpt in (False, True):
        regime = Regime("fp32", ckpt)
        config = llm.spec.configs["model"]
        cpu = probe.trace_llm(config, 2, regime, [point], "cpu")[0]
        meta = probe.trace_llm(config, 2, regime, [point], "meta")[0]
        assert abs(meta.peak / cpu.peak - 1) < 0.06


@pytest.mark.slow
def test_meta_trace_agrees_with_cpu_trace_sd(tiny_sd15) -> None:
    from loratui.memory import probe

    sd = planner_for(
        TrainConfig(task_type="image-generation", model_family="sd15", base_model=str(tiny_sd15))
    )
    for ckpt in (False, True):
        cpu = probe.trace_sd_unet(sd.spec.configs, Regime("fp32", ckpt), [Point(2, 64, 8)], "cpu")[0]
        meta = probe.trace_sd_unet(sd.spec.configs, Regime("fp32", ckpt), [Point(2, 64, 8)], "meta")[0]
        assert abs(meta.peak / cpu.peak - 1) < 0.06


def test_estimate_accepts_resolved_and_mapping(tmp_path) -> None:
    from loratui.config import load_config

    path = tmp_path / "x.yaml"
    path.write_text("task_type: text-generation\nbase_model: meta-llama/Llama-2-7b-hf\nmax_seq_len: 512\n")
    resolved = load_config(path)
    by_resolved = estimate_peak(resolved)
    by_dict = estimate_peak({**LLAMA7, "max_seq_len": 512}, family="llm")
    assert by_resolved.total_bytes == by_dict.total_bytes
    with pytest.raises(ValueError):
        estimate_peak(resolved, device="tpu")


def test_data_parallel_estimate_is_per_gpu() -> None:
    cfg = TrainConfig(**SDXL, resolution=1024, gradient_checkpointing=True)
    one = estimate_peak(cfg)
    two = estimate_peak(cfg, processes=2)
    assert two.breakdown["ddp_buckets"] == one.breakdown["lora_params"] > 0
    assert two.total_bytes == one.total_bytes + two.breakdown["ddp_buckets"]
    assert sum(two.breakdown.values()) == two.total_bytes
    assert any("per GPU" in note and "2 processes" in note for note in two.notes)
    assert estimate_peak(cfg, processes=1) == one


def test_a_family_the_tracer_cannot_build_is_sized_from_its_own_keys(tmp_path, monkeypatch) -> None:
    """A Bloom-like model type transformers does not know, spelling its dimensions n_layer / n_embed: the
    analytic estimate reads them (not 7B, not 32 layers) and says it is analytic, with its band."""
    import json

    from loratui.config import TrainConfig
    from loratui.memory import estimate as estimate_module
    from loratui.memory.estimate import estimate_peak

    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path / "cache"))
    estimate_module._PLANNERS.clear()
    folder = tmp_path / "tiny-bloom"
    folder.mkdir()
    config = {"architectures": ["BloomyForCausalLM"], "model_type": "bloomy", "n_embed": 64, "n_layer": 3}
    (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 4, "vocab_size": 1000}))
    cfg = TrainConfig(task_type="text-generation", model_family="llm", base_model=str(folder), lora_rank=4)
    estimate = estimate_peak(cfg, device="cpu")
    estimate_module._PLANNERS.clear()
    assert estimate.method.startswith("analytic")
    assert estimate.error_band == 0.35
    # 3 x (4 x 64² attention + 2 x 64 x 256 MLP) + 1000 x 64 tied embeddings
    sized = [n for n in estimate.notes if "parameters" in n]
    assert sized == [
        "0.2M parameters, counted from its config.json; 3 layers (config.json n_layer); analytic "
        "estimate, error band ±35%"
    ]
    assert estimate.breakdown["weights"] == 4 * (3 * (4 * 64 * 64 + 2 * 64 * 256) + 1000 * 64)
