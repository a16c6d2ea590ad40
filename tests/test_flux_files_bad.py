"""Wrong files given for a Flux base model get a message that says what the file is and what to do."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratui.config.base_model import inspect_base_model
from loratui.models.flux.detect import FluxFileError, require_transformer
from loratui.models.flux.single_file import load_flux_single_file, write_single_files_from_folder


@pytest.fixture(scope="module")
def dev_files(tiny_flux_dev, tmp_path_factory) -> dict[str, Path]:
    return write_single_files_from_folder(tiny_flux_dev, tmp_path_factory.mktemp("flux-files"))


def _load(transformer, files, **changes):
    parts = {"vae": files["vae"], "clip_l": files["clip_l"], "t5xxl": files["t5xxl"]} | changes
    return load_flux_single_file(transformer, dtype=torch.float32, **parts)


def test_sd_checkpoint_given_as_the_transformer(tmp_path):
    sd = tmp_path / "v1-5-pruned-emaonly.safetensors"
    save_file(
        {
            "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
            "first_stage_model.encoder.conv_in.weight": torch.zeros(4, 3, 3, 3),
        },
        str(sd),
    )
    with pytest.raises(FluxFileError) as err:
        load_flux_single_file(sd)
    message = str(err.value)
    assert "is a Stable Diffusion checkpoint (sd15), not a Flux transformer" in message
    assert "model_family: sd15" in message and "flux1-dev.safetensors" in message


def test_lora_given_as_the_transformer(tmp_path):
    lora = tmp_path / "my_flux_lora.safetensors"
    save_file(
        {
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 16),
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(48, 4),
            "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(4.0),
        },
        str(lora),
    )
    assert inspect_base_model(str(lora)).kind == "lora"
    with pytest.raises(FluxFileError, match=r"is a LoRA file, not a base model: give it as `init_lora`"):
        require_transformer(lora)


def test_truncated_transformer(dev_files, tmp_path):
    cut = tmp_path / "flux1-dev.safetensors"
    data = dev_files["transformer"].read_bytes()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(FluxFileError) as err:
        _load(cut, dev_files)
    assert f"{cut} is truncated: {len(data) * 2 // 3:,} bytes on disk, {len(data):,} expected" in str(
        err.value
    )
    assert "download it again" in str(err.value)
    header_only = tmp_path / "header.safetensors"
    header_only.write_bytes(data[:20])
    with pytest.raises(FluxFileError, match="not a readable .safetensors file"):
        _load(header_only, dev_files)


def test_t5_missing_names_the_file_and_where_it_lives(dev_files):
    with pytest.raises(FluxFileError) as err:
        load_flux_single_file(dev_files["transformer"], vae=dev_files["vae"], clip_l=dev_files["clip_l"])
    message = str(err.value)
    assert message.startswith(
        "FLUX.1-dev needs the T5-XXL text encoder, which flux1.safetensors does not hold"
    )
    assert "set `t5xxl: PATH`" in message and "t5xxl_fp16.safetensors" in message
    assert "comfyanonymous/flux_text_encoders" in message and "ComfyUI/models/text_encoders" in message


def test_parts_in_the_wrong_slot(dev_files):
    with pytest.raises(FluxFileError) as err:
        _load(dev_files["transformer"], dev_files, vae=dev_files["t5xxl"])
    assert "vae: " in str(err.value) and "is a T5-XXL text encoder" in str(err.value)
    assert "(use it as `t5xxl`)" in str(err.value) and "ae.safetensors" in str(err.value)
    with pytest.raises(FluxFileError, match=r"is an autoencoder .*give it as `vae: "):
        _load(dev_files["vae"], dev_files)
    with pytest.raises(FluxFileError, match="clip_l: .* not the CLIP-L text encoder"):
        _load(dev_files["transformer"], dev_files, clip_l=dev_files["transformer"])


def test_t5_tokenizer_missing(dev_files, tmp_path):
    for part in ("transformer", "vae", "clip_l", "t5xxl"):
        shutil.copy(dev_files[part], tmp_path / dev_files[part].name)
    shutil.copytree(dev_files["transformer"].parent / "clip_tokenizer", tmp_path / "clip_tokenizer")
    moved = {part: tmp_path / path.name for part, path in dev_files.items()}
    with pytest.raises(FluxFileError) as err:
        _load(moved["transformer"], moved)
    message = str(err.value)
    assert message.startswith("the T5-XXL tokenizer was not found")
    assert (
        "`t5_tokenizer` folder next to it" in message
        and "tokenizer_2" in message
        and str(tmp_path) in message
    )


def test_incomplete_transformer_names_missing_blocks(dev_files, tmp_path):
    from safetensors.torch import load_file

    state = load_file(str(dev_files["transformer"]))
    broken = tmp_path / "broken.safetensors"
    save_file({k: v for k, v in state.items() if not k.startswith("double_blocks.0.")}, str(broken))
    with pytest.raises(FluxFileError, match=r"do not fit together: double_blocks \[0\] are missing"):
        _load(broken, dev_files)


def test_unreadable_t5_tokenizer_folder(dev_files, tmp_path):
    for part in ("transformer", "vae", "clip_l", "t5xxl"):
        shutil.copy(dev_files[part], tmp_path / dev_files[part].name)
    shutil.copytree(dev_files["transformer"].parent / "clip_tokenizer", tmp_path / "clip_tokenizer")
    (tmp_path / "t5_tokenizer").mkdir()
    (tmp_path / "t5_tokenizer" / "spiece.model").write_bytes(b"not a sentencepiece model")
    moved = {part: tmp_path / path.name for part, path in dev_files.items()}
    with pytest.raises(FluxFileError, match=r"the T5 tokenizer in .*t5_tokenizer could not be read"):
        _load(moved["transformer"], moved)
