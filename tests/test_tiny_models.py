"""Tests for loratui.tiny_models: the tiny random-weight model folders used by the demo and the tests."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from loratui.tiny_models import (
    LABEL_FILE,
    MARKER_FILE,
    build_tiny_blip,
    build_tiny_llama,
    build_tiny_sd,
    is_tiny_model,
    read_marker,
)

CHINESE_PROMPT = "患者：头痛三天，体温正常，该吃什么药？"
CAPTION = "a photo of sks dog sitting on the grass in the park"

# Parameter-count ceilings: the models must stay tiny so the demo trains on a 2-core CPU in seconds.
MAX_UNET_PARAMS = 5_000_000
MAX_VAE_PARAMS = 1_500_000
MAX_TEXT_ENCODER_PARAMS = 300_000
MAX_LLAMA_PARAMS = 300_000
MAX_BLIP_PARAMS = 150_000

# Block layout of the real checkpoints (only widths differ in the tiny ones).
SD1_LAYOUT = {
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 2,
}
SDXL_LAYOUT = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "addition_embed_type": "text_time",
}


def _pipeline_cls(family: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def sd_folders(tiny_sd15: Path, tiny_sd2v: Path, tiny_sdxl: Path) -> dict[str, Path]:
    return {"sd15": tiny_sd15, "sd2-v": tiny_sd2v, "sdxl": tiny_sdxl}


@pytest.fixture(scope="module")
def sd_pipes(sd_folders: dict[str, Path]) -> dict[str, object]:
    return {family: _pipeline_cls(family).from_pretrained(path) for family, path in sd_folders.items()}


# ------------------------------------------------------------------------------------------------
# Package hygiene
# ------------------------------------------------------------------------------------------------


def test_import_is_cheap() -> None:
    code = (
        "import sys, loratui.tiny_models as t; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers', 'tokenizers') if m in sys.modules]; "
        "assert not heavy, heavy; assert callable(t.build_tiny_sd)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_bundled_configs_ship_inside_the_package() -> None:
    from importlib import resources

    root = resources.files("loratui.tiny_models")
    for name in (
        "sd15.json",
        "sd2-v.json",
        "sdxl.json",
        "llama.json",
        "blip.json",
        "llama_chat_template.jinja",
    ):
        assert root.joinpath("configs").joinpath(name).is_file(), name
    for name in ("en.txt", "zh.txt"):
        assert root.joinpath("corpus").joinpath(name).is_file(), name


# ------------------------------------------------------------------------------------------------
# Stable Diffusion
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_sd_folder_layout_and_label(sd_folders: dict[str, Path], family: str) -> None:
    root = sd_folders[family]
    index = json.loads((root / "model_index.json").read_text())
    expected = {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    if family == "sdxl":
        expected |= {"text_encoder_2", "tokenizer_2"}
        assert index["_class_name"] == "StableDiffusionXLPipeline"
    else:
        assert index["_class_name"] == "StableDiffusionPipeline"
    for sub in expected:
        assert (root / sub).is_dir(), sub
        assert sub in index
    assert (root / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (root / "text_encoder" / "model.safetensors").is_file()
    assert not list(root.rglob("*.bin")), "weights must be safetensors"
    for tok in ("tokenizer", "tokenizer_2") if family == "sdxl" else ("tokenizer",):
        for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
            assert (root / tok / name).is_file(), f"{tok}/{name}"
    assert "NOT A REAL MODEL" in (root / LABEL_FILE).read_text()
    marker = read_marker(root)
    assert marker is not None and marker["settings"] == {"family": family, "seed": 0}
    assert is_tiny_model(root) and is_tiny_model(root / "unet")


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_unet_block_layout_matches_real_architecture(sd_pipes: dict, family: str) -> None:
    cfg = sd_pipes[family].unet.config
    layout = SDXL_LAYOUT if family == "sdxl" else SD1_LAYOUT
    for key, value in layout.items():
        got = tuple(cfg[key]) if isinstance(value, tuple) else cfg[key]
        assert got == value, key
    tlpb = cfg.transformer_layers_per_block
    assert min(tlpb if isinstance(tlpb, list | tuple) else [tlpb]) >= 1
    assert cfg.in_channels == 4 and cfg.out_channels == 4
    assert all(c % cfg.norm_num_groups == 0 for c in cfg.block_out_channels)
    assert cfg.use_linear_projection is (family != "sd15")


def _expected_attention_modules(family: str) -> set[str]:
    """Names of every attn1.to_q the real architecture has (transformer depth per block for SDXL)."""
    if family == "sdxl":
        down = {1: 2, 2: 2}  # block index -> transformer layers (real SDXL: 2 and 10)
        names = {
            f"down_blocks.{b}.attentions.{a}.transformer_blocks.{t}"
            for b, n in down.items()
            for a in (0, 1)
            for t in range(n)
        }
        names |= {f"mid_block.attentions.0.transformer_blocks.{t}" for t in range(2)}
        names |= {
            f"up_blocks.{b}.attentions.{a}.transformer_blocks.{t}"
            for b in (0, 1)
            for a in (0, 1, 2)
            for t in range(2)
        }
    else:
        names = {f"down_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in (0, 1, 2) for a in (0, 1)}
        names |= {"mid_block.attentions.0.transformer_blocks.0"}
        names |= {f"up_blocks.{b}.attentions.{a}.transformer_blocks.0" for b in (1, 2, 3) for a in (0, 1, 2)}
    return {n + ".attn1.to_q" for n in names}


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_unet_module_names_match_real_architecture(sd_pipes: dict, family: str) -> None:
    unet = sd_pipes[family].unet
    names = {n for n, _ in unet.named_modules()}
    got = {n for n in names if n.endswith("attn1.to_q")}
    assert got == _expected_attention_modules(family)
    if family == "sdxl":
        assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in names
        assert not any(n.startswith("down_blocks.0.attentions") for n in names)
        assert "add_embedding.linear_1" in names
    else:
        assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in names
        assert "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k" in names
        assert not any(n.startswith("down_blocks.3.attentions") for n in names)
    for suffix in ("attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "ff.net.0.proj", "ff.net.2"):
        assert f"up_blocks.1.attentions.2.transformer_blocks.0.{suffix}" in names, suffix
    proj_in = unet.get_submodule("down_blocks.1.attentions.0.proj_in")
    expected_proj = torch.nn.Linear if family != "sd15" else torch.nn.Conv2d
    assert isinstance(proj_in, expected_proj)


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_text_encoders_fit_unet_and_tokenizer(sd_pipes: dict, family: str) -> None:
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    pipe = sd_pipes[family]
    te1 = pipe.text_encoder
    assert type(te1) is CLIPTextModel
    assert te1.config.max_position_embeddings == 77
    assert te1.config.vocab_size == len(pipe.tokenizer)
    hidden = te1.config.hidden_size
    if family == "sdxl":
        te2 = pipe.text_encoder_2
        assert type(te2) is CLIPTextModelWithProjection
        assert te2.config.max_position_embeddings == 77
        assert te2.config.vocab_size == len(pipe.tokenizer_2)
        assert te2.config.hidden_act == "gelu"
        hidden += te2.config.hidden_size
        ucfg = pipe.unet.config
        assert (
            ucfg.projection_class_embeddings_input_dim
            == 6 * ucfg.addition_time_embed_dim + te2.config.projection_dim
        )
    assert pipe.unet.config.cross_attention_dim == hidden
    assert te1.config.hidden_act == ("gelu" if family == "sd2-v" else "quick_gelu")


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_schedulers_and_vae_like_the_real_ones(sd_pipes: dict, family: str) -> None:
    pipe = sd_pipes[family]
    expected = {
        "sd15": ("PNDMScheduler", "epsilon"),
        "sd2-v": ("DDIMScheduler", "v_prediction"),
        "sdxl": ("EulerDiscreteScheduler", "epsilon"),
    }
    assert (type(pipe.scheduler).__name__, pipe.scheduler.config.prediction_type) == expected[family]
    assert pipe.scheduler.config.num_train_timesteps == 1000
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == (0.13025 if family == "sdxl" else 0.18215)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        latents = pipe.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert latents.shape == (1, 4, 8, 8)


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_unet_forward_on_latents(sd_pipes: dict, family: str) -> None:
    unet = sd_pipes[family].unet
    latents = torch.randn(2, 4, 8, 8)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    kwargs = {}
    if family == "sdxl":
        text_embeds = torch.randn(2, sd_pipes[family].text_encoder_2.config.projection_dim)
        kwargs["added_cond_kwargs"] = {
            "text_embeds": text_embeds,
            "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2),
        }
    with torch.no_grad():
        out = unet(latents, torch.tensor([10, 500]), encoder_hidden_states=context, **kwargs).sample
    assert out.shape == latents.shape
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_pipeline_renders_64px_image_in_2_steps(sd_pipes: dict, family: str) -> None:
    pipe = sd_pipes[family]
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        CAPTION, num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    )
    image = result.images[0]
    assert image.size == (64, 64)
    arr = pipe(CAPTION, num_inference_steps=2, height=64, width=64, output_type="np").images
    assert arr.shape == (1, 64, 64, 3)
    assert (arr >= 0).all() and (arr <= 1).all()


def test_sdxl_pipeline_default_size_is_small(sd_pipes: dict) -> None:
    pipe = sd_pipes["sdxl"]
    assert pipe.default_sample_size * pipe.vae_scale_factor == 256


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_sd_models_stay_tiny(sd_pipes: dict, family: str) -> None:
    pipe = sd_pipes[family]
    assert _n_params(pipe.unet) < MAX_UNET_PARAMS
    assert _n_params(pipe.vae) < MAX_VAE_PARAMS
    assert _n_params(pipe.text_encoder) < MAX_TEXT_ENCODER_PARAMS
    if family == "sdxl":
        assert _n_params(pipe.text_encoder_2) < MAX_TEXT_ENCODER_PARAMS


def _sgm_name(name: str, layers_per_block: int = 2) -> str:
    """diffusers UNet attention name -> SGM/LDM name (the layout kohya-ss uses for SDXL LoRAs)."""
    if m := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2]) + 1}.1.{m[3]}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(m[1]) * (layers_per_block + 1) + int(m[2])}.1.{m[3]}"
    raise ValueError(name)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_kohya_lora_names_map_onto_the_tiny_unet(sd_folders: dict[str, Path], family: str) -> None:
    """A kohya-format LoRA (SGM block names for SDXL) loads through diffusers' converter onto every target."""
    pipe = _pipeline_cls(family).from_pretrained(sd_folders[family])
    gen = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}

    def add(key: str, layer: torch.nn.Linear) -> None:
        state[f"{key}.lora_down.weight"] = torch.randn(4, layer.in_features, generator=gen)
        state[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 4, generator=gen)
        state[f"{key}.alpha"] = torch.tensor(4.0)

    pattern = re.compile(r"attn[12]\.to_(q|k|v|out\.0)$")
    targets = sorted(
        n for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)
    )
    for name in targets:
        kohya = _sgm_name(name) if family == "sdxl" else name
        add("lora_unet_" + kohya.replace(".", "_"), pipe.unet.get_submodule(name))
    te_pattern = re.compile(r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
    te_targets = [
        n
        for n, m in pipe.text_encoder.named_modules()
        if isinstance(m, torch.nn.Linear) and te_pattern.search(n)
    ]
    for name in te_targets:
        add(
            ("lora_te1_" if family == "sdxl" else "lora_te_") + name.replace(".", "_"),
            pipe.text_encoder.get_submodule(name),
        )

    pipe.load_lora_weights(state, adapter_name="kohya")
    loaded = sorted(n for n, m in pipe.unet.named_modules() if "kohya" in getattr(m, "lora_A", {}))
    assert loaded == targets
    te_loaded = [n for n, m in pipe.text_encoder.named_modules() if "kohya" in getattr(m, "lora_A", {})]
    assert len(te_loaded) == len(te_targets) == 6 * pipe.text_encoder.config.num_hidden_layers


# ------------------------------------------------------------------------------------------------
# CLIP tokenizers
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "sub", "pad"),
    [
        ("sd15", "tokenizer", "<|endoftext|>"),
        ("sd2-v", "tokenizer", "!"),
        ("sdxl", "tokenizer", "<|endoftext|>"),
        ("sdxl", "tokenizer_2", "!"),
    ],
)
def test_clip_tokenizer_pads_to_77_like_sd(
    sd_folders: dict[str, Path], family: str, sub: str, pad: str
) -> None:
    import transformers

    tok = transformers.CLIPTokenizer.from_pretrained(sd_folders[family] / sub)
    assert tok.model_max_length == 77
    assert tok.pad_token == pad
    assert tok.bos_token == "<|startoftext|>" and tok.eos_token == "<|endoftext|>"
    ids = tok(CAPTION, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
    assert len(ids) == 77
    n_words = len(CAPTION.split())
    assert ids[0] == tok.bos_token_id
    eos_at = ids.index(tok.eos_token_id)
    assert n_words <= eos_at - 1 <= 2 * n_words, "common caption words should be (nearly) whole tokens"
    assert set(ids[eos_at + 1 :]) == {tok.pad_token_id}
    assert tok.decode(ids, skip_special_tokens=True) == CAPTION
    long = tok(" ".join([CAPTION] * 20), padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == tok.eos_token_id
    fast_cls = getattr(transformers, "CLIPTokenizerFast", None)
    if fast_cls is not None:
        assert fast_cls.from_pretrained(sd_folders[family] / sub)(CAPTION).input_ids == tok(CAPTION).input_ids
    assert (
        transformers.AutoTokenizer.from_pretrained(sd_folders[family] / sub)(CAPTION).input_ids
        == tok(CAPTION).input_ids
    )


def test_clip_vocab_has_every_byte_symbol(tiny_sd15: Path) -> None:
    from loratui.tiny_models.bpe import byte_alphabet

    vocab = json.loads((tiny_sd15 / "tokenizer" / "vocab.json").read_text("utf-8"))
    alphabet = byte_alphabet()
    assert len(alphabet) == 256
    assert [vocab[s] for s in alphabet] == list(range(256))
    assert [vocab[s + "</w>"] for s in alphabet] == list(range(256, 512))
    assert vocab["<|startoftext|>"] == len(vocab) - 2 and vocab["<|endoftext|>"] == len(vocab) - 1
    merges = (tiny_sd15 / "tokenizer" / "merges.txt").read_text("utf-8").splitlines()
    assert merges[0].startswith("#version")
    assert "t h" in merges[1:] and len(merges) - 1 == len(vocab) - 514


def test_clip_tokenizer_never_fails_on_unusual_text(tiny_sd15: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    text = f"{CHINESE_PROMPT} café 🙂 ẞ"
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids[1:-1]
    assert tok.decode(ids, skip_special_tokens=True).replace(" ", "") == text.lower().replace(" ", "")


# ------------------------------------------------------------------------------------------------
# Llama
# ------------------------------------------------------------------------------------------------


def test_llama_loads_with_auto_classes(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        64,
        2,
        4,
        2,
    )
    assert cfg.max_position_embeddings == 2048 and cfg.tie_word_embeddings is False
    assert model.get_input_embeddings().weight.data_ptr() != model.get_output_embeddings().weight.data_ptr()
    assert cfg.vocab_size == len(tok) == 1000
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", "<pad>")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, tok.pad_token_id)
    assert (tiny_llama / "model.safetensors").is_file() and (tiny_llama / "tokenizer.json").is_file()
    assert _n_params(model) < MAX_LLAMA_PARAMS
    assert "NOT A REAL MODEL" in (tiny_llama / LABEL_FILE).read_text()


def test_llama_tokenizer_handles_chinese_and_english(tiny_llama: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    for text, max_tokens in ((CHINESE_PROMPT, 2 * len(CHINESE_PROMPT)), (CAPTION, 2 * len(CAPTION.split()))):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.unk_token_id not in ids
        assert len(ids) - 1 <= max_tokens
        assert tok.decode(ids, skip_special_tokens=True) == text
    odd = "Zebra-striped xylophones 🎶 & naïve café ünïcödé: ½ ∑ ¥"
    assert tok.decode(tok(odd).input_ids, skip_special_tokens=True) == odd
    batch = tok([CAPTION, "hi"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape[0] == 2 and (batch.input_ids[1] == tok.pad_token_id).any()


def test_llama_chat_template_and_generate(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    messages = [
        {"role": "system", "content": "You are a careful doctor."},
        {"role": "user", "content": CHINESE_PROMPT},
        {"role": "assistant", "content": "多喝水，注意休息。"},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == (
        f"<s>[INST] <<SYS>>\nYou are a careful doctor.\n<</SYS>>\n\n{CHINESE_PROMPT} [/INST] 多喝水，注意休息。 </s>"
    )
    prompt = tok.apply_chat_template(
        messages[:2], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    assert prompt["input_ids"][0, 0].item() == tok.bos_token_id
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template(
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tokenize=False
        )


def test_llama_nopad_has_no_pad_token(tiny_llama_nopad: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_nopad)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_nopad)
    assert tok.pad_token is None and model.config.pad_token_id is None
    assert "<pad>" not in tok.get_vocab()
    assert model.config.vocab_size == len(tok)
    inputs = tok(CHINESE_PROMPT, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert out.shape[1] > inputs.input_ids.shape[1]


def test_llama_options(tmp_path: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig

    path = build_tiny_llama(tmp_path / "l", seed=3, chat_template=False, vocab_size=600)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) == 600 and LlamaConfig.from_pretrained(path).vocab_size == 600
    assert not tok.chat_template
    with pytest.raises(ValueError):
        build_tiny_llama(tmp_path / "bad", vocab_size=100)


def test_llama_accepts_peft_lora(tiny_llama: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # 2 layers x (q: 64->64, k/v: 64->32 (GQA), o: 64->64) at rank 4
    assert trainable == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64))


# ------------------------------------------------------------------------------------------------
# BLIP
# ------------------------------------------------------------------------------------------------


def test_blip_captions_an_image(tiny_blip: Path) -> None:
    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_blip)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip)
    images = [Image.new("RGB", (120, 90), (200, 30, 40)), Image.new("RGB", (50, 70), (10, 200, 40))]
    inputs = processor(images=images, return_tensors="pt")
    assert inputs["pixel_values"].shape == (2, 3, 64, 64)
    out = model.generate(**inputs, max_new_tokens=10)
    captions = processor.batch_decode(out, skip_special_tokens=True)
    assert len(captions) == 2 and all(isinstance(c, str) and c for c in captions)
    assert (
        out[0, 0].item()
        == model.config.text_config.bos_token_id
        == processor.tokenizer.convert_tokens_to_ids("[DEC]")
    )
    conditional = processor(images=images[0], text="a photo of", return_tensors="pt")
    assert processor.batch_decode(model.generate(**conditional, max_new_tokens=5), skip_special_tokens=True)[
        0
    ].startswith("a photo of")
    assert _n_params(model) < MAX_BLIP_PARAMS
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_blip_tokenizer_is_bert_style(tiny_blip: Path) -> None:
    from transformers import AutoTokenizer

    vocab = (tiny_blip / "vocab.txt").read_text("utf-8").splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = AutoTokenizer.from_pretrained(tiny_blip)
    ids = tok("A zebra-striped xylophone, 42!").input_ids
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "a zebra - striped xylophone, 42!"


# ------------------------------------------------------------------------------------------------
# Determinism, idempotency, atomicity
# ------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_files(
    tmp_path: Path, tiny_sd15: Path, tiny_llama: Path, tiny_blip: Path
) -> None:
    assert _tree_digest(build_tiny_sd(tmp_path / "sd", "sd15", seed=0)) == _tree_digest(tiny_sd15)
    assert _tree_digest(build_tiny_llama(tmp_path / "llama", seed=0)) == _tree_digest(tiny_llama)
    assert _tree_digest(build_tiny_blip(tmp_path / "blip", seed=0)) == _tree_digest(tiny_blip)


def test_different_seed_gives_different_weights(tmp_path: Path, tiny_sd15: Path) -> None:
    from safetensors.torch import load_file

    other = build_tiny_sd(tmp_path / "sd", "sd15", seed=1)
    a = load_file(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(other / "unet" / "diffusion_pytorch_model.safetensors")
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    assert a.keys() == b.keys() and not torch.equal(a[key], b[key])
    # the tokenizer does not depend on the seed
    assert (tiny_sd15 / "tokenizer" / "vocab.json").read_bytes() == (
        other / "tokenizer" / "vocab.json"
    ).read_bytes()


def test_builders_leave_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    build_tiny_llama(tmp_path / "l", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tokenizers_are_identical_across_processes() -> None:
    code = (
        "import hashlib, json; from loratui.tiny_models.clip_tokenizer import clip_vocab; "
        "from loratui.tiny_models.llama import make_llama_tokenizer; "
        "blob = json.dumps(clip_vocab()) + make_llama_tokenizer(1000, True).to_str(); "
        "print(hashlib.sha256(blob.encode()).hexdigest())"
    )
    root = Path(__file__).resolve().parents[1]
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1


def test_rebuild_is_a_no_op(tiny_llama: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in tiny_llama.rglob("*")}
    start = time.perf_counter()
    assert build_tiny_llama(tiny_llama) == tiny_llama
    assert time.perf_counter() - start < 1.0
    assert {p: p.stat().st_mtime_ns for p in tiny_llama.rglob("*")} == before


def test_stale_build_is_replaced_and_no_temp_folders_remain(tmp_path: Path) -> None:
    dest = tmp_path / "blip"
    build_tiny_blip(dest, seed=0)
    build_tiny_blip(dest, seed=5)
    marker = json.loads((dest / MARKER_FILE).read_text())
    assert marker["settings"] == {"seed": 5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blip"]


def test_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_tiny_llama(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_tiny_sd(tmp_path / "x", family="sd3")
    from loratui.tiny_models.common import atomic_build

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"0")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        atomic_build(tmp_path / "y", "test", {"seed": 0}, [], broken, kind="test")
    assert list(tmp_path.iterdir()) == []
