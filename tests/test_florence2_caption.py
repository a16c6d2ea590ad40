"""Florence-2 detailed captions through transformers' native `Florence2ForConditionalGeneration`, with a tiny
random model built here from its config classes (byte-level BART tokenizer, 64x64 images)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from loratui.cli.app import app

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "Florence2ForConditionalGeneration"):
    pytest.skip("this transformers has no native Florence-2", allow_module_level=True)

runner = CliRunner()


def build_tiny_florence2(dest: Path) -> Path:
    """A random-weight Florence-2 folder (config, safetensors, processor) that loads with from_pretrained."""
    import torch
    from transformers import (
        BartConfig,
        BartTokenizer,
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        Florence2VisionConfig,
    )

    from loratui.tiny_models.bpe import byte_alphabet

    dest.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>", *byte_alphabet()])}
    (dest / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (dest / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = BartTokenizer(
        str(dest / "vocab.json"), str(dest / "merges.txt"), extra_special_tokens={"image_token": "<image>"}
    )
    vision = Florence2VisionConfig(
        depths=[1, 1, 1, 1], embed_dim=[8, 8, 16, 16], num_heads=[1, 1, 2, 2], num_groups=[1, 1, 2, 2],
        window_size=2, projection_dim=16, max_position_embeddings=8, max_temporal_embeddings=4,
        drop_path_rate=0.0,
    )  # fmt: skip
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=128,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=None,
    )  # fmt: skip
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    model = Florence2ForConditionalGeneration(config).eval()
    images = CLIPImageProcessorPil(size={"height": 64, "width": 64}, do_center_crop=False)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.zeros(1, 3, 64, 64)).pooler_output
    images.image_seq_length = features.shape[1]  # image tokens the text encoder receives
    Florence2Processor(image_processor=images, tokenizer=tokenizer).save_pretrained(dest)
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def florence(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_florence2(tmp_path_factory.mktemp("florence") / "florence-2-tiny")


def test_native_florence2_runs_the_task_prompt(florence: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loratui.data.caption_models import Florence2Captioner, ModelNotAvailable, load_captioner

    captioner = load_captioner(florence, "cpu", max_new_tokens=5)
    assert isinstance(captioner, Florence2Captioner) and captioner.task == "<MORE_DETAILED_CAPTION>"
    prompts: list[str] = []
    real_generate = captioner.model.generate

    def spy(**inputs):
        prompts.extend(
            captioner.processor.tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True)
        )
        return real_generate(**inputs)

    monkeypatch.setattr(captioner.model, "generate", spy)
    out = captioner.caption([Image.new("RGB", (80, 48), (200, 10, 10)), Image.new("RGB", (64, 64), "white")])
    assert len(out) == 2 and all(isinstance(t, str) and t for t in out)
    assert prompts == ["Describe with a paragraph what is shown in the image."] * 2
    prompts.clear()
    detailed = load_captioner(florence, "cpu", max_new_tokens=5, task="<DETAILED_CAPTION>")
    monkeypatch.setattr(detailed.model, "generate", spy)
    detailed.caption([Image.new("RGB", (64, 64), "blue")])
    assert prompts == ["Describe in detail what is shown in the image."]
    with pytest.raises(ModelNotAvailable, match="--task must be one of"):
        load_captioner(florence, "cpu", task="<OD>")


def test_florence2_cli_and_remote_code_refused(florence: Path, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    Image.new("RGB", (64, 64), (10, 200, 10)).save(root / "a.png")
    args = ["caption", str(root), "--model", str(florence), "--format", "txt", "--device", "cpu"]
    result = runner.invoke(app, [*args, "--task", "<DETAILED_CAPTION>", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert (root / "a.txt").read_text(encoding="utf-8").strip()
    refused = runner.invoke(
        app, ["caption", str(root), "--model", str(shipped_copy(florence, tmp_path)), "--mode", "overwrite"]
    )
    assert refused.exit_code == 2 and "--trust-remote-code" in refused.output
    assert not (tmp_path / "ran.txt").exists()


def shipped_copy(florence: Path, tmp_path: Path) -> Path:
    """The tiny model as a folder that ships its own model code (auto_map), like microsoft/Florence-2-*."""
    import shutil

    shipped = tmp_path / "shipped"
    shutil.copytree(florence, shipped)
    config = json.loads((florence / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_florence2.ShippedFlorence2"}
    (shipped / "config.json").write_text(json.dumps(config))
    marker = tmp_path / "ran.txt"
    (shipped / "modeling_florence2.py").write_text(
        "from pathlib import Path\n"
        "from transformers import Florence2ForConditionalGeneration\n\n\n"
        "class ShippedFlorence2(Florence2ForConditionalGeneration):\n"
        "    def generate(self, *args, **kwargs):\n"
        f"        Path({str(marker)!r}).write_text('shipped code ran')\n"
        "        return super().generate(*args, **kwargs)\n"
    )
    return shipped


def test_shipped_florence2_code_runs_only_with_the_flag(florence: Path, tmp_path: Path, monkeypatch) -> None:
    import transformers.dynamic_module_utils as dynamic_modules

    from loratui.data.caption_models import ModelNotAvailable, load_captioner

    # the folder's code is copied into transformers' modules cache: keep it out of the user's home
    monkeypatch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))

    shipped = shipped_copy(florence, tmp_path)
    with pytest.raises(ModelNotAvailable, match="--trust-remote-code"):
        load_captioner(shipped, "cpu")
    captioner = load_captioner(shipped, "cpu", max_new_tokens=4, trust_remote_code=True)
    assert type(captioner.model).__name__ == "ShippedFlorence2"
    assert captioner.caption([Image.new("RGB", (64, 64), "red")])[0]
    assert (tmp_path / "ran.txt").read_text() == "shipped code ran"
