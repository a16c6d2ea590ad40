"""Base-model loading: diffusers folders, single-file LDM checkpoints, bundled configs, CLIP vocab, wrong files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sd_helpers import pipeline_to_ldm_file, unet_to_ldm

from loratui.models.sd.loading import (
    BaseModelError,
    bundled_config_folder,
    clip_bpe_vocab,
    load_sd_pipeline,
)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LORATUI_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "loratui-cache"))


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return module.state_dict()


def _assert_same_weights(a, b) -> None:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        left, right = getattr(a, name, None), getattr(b, name, None)
        if left is None and right is None:
            continue
        sa, sb = _state(left), _state(right)
        assert set(sa) == set(sb), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


def test_clip_vocabulary_matches_openai_clip_ids():
    vocab, merges = clip_bpe_vocab()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert (vocab["!"], vocab["a"], vocab["a</w>"]) == (0, 64, 320)
    import transformers

    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(bundled_config_folder("sd15") / "tokenizer"))
    # ids of the openai/clip-vit-large-patch14 tokenizer that SD 1.x uses
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer("A photo of a DOG").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    assert tokenizer.model_max_length == 77
    sd2 = transformers.CLIPTokenizer.from_pretrained(str(bundled_config_folder("sd2-v") / "tokenizer"))
    assert sd2.pad_token == "!" and tokenizer.pad_token == "<|endoftext|>"


@pytest.mark.parametrize(
    ("name", "unet", "text", "text2"),
    [
        ("sd15", 859_520_964, 123_060_480, None),
        ("sd2-v", 865_910_724, 340_387_840, None),
        ("sdxl", 2_567_463_684, 123_060_480, 694_659_840),
    ],
)
def test_bundled_configs_build_the_real_architectures(name, unet, text, text2):
    import diffusers
    import transformers
    from accelerate import init_empty_weights

    folder = bundled_config_folder(name)
    index = json.loads((folder / "model_index.json").read_text())
    with init_empty_weights():
        model = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(folder / "unet")
        )
        vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(folder / "vae"))
        encoders = [
            getattr(transformers, index[n][1])(transformers.CLIPTextConfig.from_pretrained(folder / n))
            for n in ("text_encoder", "text_encoder_2")
            if n in index
        ]
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(model) == unet and count(vae) == 83_653_863
    assert [count(e) for e in encoders] == [text] + ([text2] if text2 else [])
    # the LDM key layout of this architecture converts back onto it (what single-file loading relies on)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    ldm = unet_to_ldm(model.state_dict(), dict(model.config))
    converted = convert_ldm_unet_checkpoint(ldm, dict(model.config))
    assert {k: tuple(v.shape) for k, v in converted.items()} == {
        k: tuple(v.shape) for k, v in model.state_dict().items()
    }


@pytest.mark.parametrize("fixture", ["tiny_sd15", "tiny_sd2v", "tiny_sdxl"])
def test_single_file_checkpoint_loads_like_the_folder(fixture, request, tmp_path):
    folder = request.getfixturevalue(fixture)
    single = pipeline_to_ldm_file(folder, tmp_path / "model.safetensors")
    from_file = load_sd_pipeline(single, config_dir=folder)
    from_folder = load_sd_pipeline(folder)
    assert from_file.kind == "single-file" and from_folder.kind == "diffusers-folder"
    assert (
        from_file.family
        == from_folder.family
        == {"tiny_sd15": "sd15", "tiny_sd2v": "sd2", "tiny_sdxl": "sdxl"}[fixture]
    )
    assert from_file.prediction_type == from_folder.prediction_type
    _assert_same_weights(from_file.pipeline, from_folder.pipeline)


def test_sd2_variant_from_name_metadata_or_setting(tmp_path):
    from loratui.models.sd.loading import _sd2_config_name

    notes: list[str] = []
    assert _sd2_config_name(Path("v2-1_512-ema-pruned.safetensors"), {}, "auto", notes) == "sd2"
    assert _sd2_config_name(Path("v2-1_768-ema-pruned.safetensors"), {}, "auto", notes) == "sd2-v"
    assert not notes
    assert (
        _sd2_config_name(
            Path("x.safetensors"), {"modelspec.architecture": "stable-diffusion-v2-768-v"}, "auto", notes
        )
        == "sd2-v"
    )
    assert _sd2_config_name(Path("x.safetensors"), {}, "epsilon", notes) == "sd2"
    assert (
        _sd2_config_name(Path("mymodel.safetensors"), {}, "auto", notes) == "sd2-v"
        and "prediction_type" in notes[0]
    )


def test_wrong_files_get_clear_messages(tiny_sd15, tmp_path):
    lora = tmp_path / "style.safetensors"
    save_file(
        {"lora_unet_x.lora_down.weight": torch.zeros(2, 2), "lora_unet_x.lora_up.weight": torch.zeros(2, 2)},
        lora,
    )
    with pytest.raises(BaseModelError, match="LoRA file, not a base model"):
        load_sd_pipeline(lora)

    vae = tmp_path / "vae-ft-mse.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_out.weight": torch.zeros(1)}, vae)
    with pytest.raises(BaseModelError, match="is a VAE"):
        load_sd_pipeline(vae)

    llm = tmp_path / "model.safetensors"
    save_file(
        {
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(1),
            "model.embed_tokens.weight": torch.zeros(1),
        },
        llm,
    )
    with pytest.raises(BaseModelError, match="language model"):
        load_sd_pipeline(llm)

    full = pipeline_to_ldm_file(tiny_sd15, tmp_path / "v1-5-pruned.safetensors")
    cut = tmp_path / "v1-5-cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(BaseModelError, match="truncated"):
        load_sd_pipeline(cut)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(BaseModelError, match="not a Stable Diffusion checkpoint"):
        load_sd_pipeline(junk)

    with pytest.raises(BaseModelError, match="not found"):
        load_sd_pipeline(tmp_path / "nothing.safetensors")

    with pytest.raises(BaseModelError, match="does not download"):
        load_sd_pipeline("someone/not-a-cached-model")


def test_pickle_checkpoints_need_allow_pickle(tiny_sd15, tmp_path):
    single = pipeline_to_ldm_file(tiny_sd15, tmp_path / "model.safetensors")
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(str(single)), "global_step": 1}, ckpt)
    with pytest.raises(BaseModelError, match="allow-pickle"):
        load_sd_pipeline(ckpt, config_dir=tiny_sd15)
    loaded = load_sd_pipeline(ckpt, config_dir=tiny_sd15, allow_pickle=True)
    assert loaded.family == "sd15"
    _assert_same_weights(loaded.pipeline, load_sd_pipeline(tiny_sd15).pipeline)


def test_config_rejects_resolution_not_multiple_of_8():
    from loratui.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="multiple of 8"):
        load_config(flags={"base_model": "x.safetensors", "resolution": 500})
