"""The small Llama shipped in the package (``loratui/tiny_models/pretrained/health-llama``) and its
pretraining script: it loads like a user's model, is small, and has learnt its domain."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from loratui.tiny_models.pretrain.text import (
    TextPretrainSettings,
    held_out_sentences,
    perplexity,
    pretrain,
    shipped_text_model,
)
from loratui.tiny_models.pretrain.text_corpus import generate_sentences

MAX_WEIGHT_BYTES = 3 * 2**20
#: The shipped model's perplexity on held-out sentences of its domain must be at least this many times
#: lower than the same network's at random initialisation (measured: about 2100 vs 3).
PERPLEXITY_FACTOR = 100
HELD_OUT = 120


def safetensors_dtypes(path: Path) -> set[str]:
    with path.open("rb") as handle:
        size = struct.unpack("<Q", handle.read(8))[0]
        header = json.loads(handle.read(size))
    return {entry["dtype"] for name, entry in header.items() if name != "__metadata__"}


@pytest.fixture(scope="module")
def shipped() -> tuple:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = shipped_text_model()
    return folder, AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def test_shipped_model_is_a_small_fp16_llama_folder_with_provenance(shipped: tuple) -> None:
    folder, model, tokenizer = shipped
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= MAX_WEIGHT_BYTES
    assert safetensors_dtypes(weights) == {"F16"}
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype.is_floating_point
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "头痛怎么办？"}], tokenize=False)
    assert chat.startswith("<s>[INST] 头痛怎么办？ [/INST]")
    readme = (folder / "README.md").read_text("utf-8")
    assert "Apache-2.0" in readme and "python -m loratui.tiny_models.pretrain text" in readme
    figures = json.loads((folder / "pretraining.json").read_text("utf-8"))
    assert figures["cpu_seconds"] > 0 and figures["settings"]["seed"] == 0


def test_shipped_model_perplexity_on_its_domain_is_far_below_a_random_models(shipped: tuple) -> None:
    import torch
    from transformers import LlamaForCausalLM

    _, model, tokenizer = shipped
    settings = TextPretrainSettings(held_out_sentences=HELD_OUT)
    held_out = held_out_sentences(settings, set(generate_sentences(settings.sentences, settings.seed)))
    assert len(held_out) >= HELD_OUT // 2
    trained = perplexity(model, tokenizer, held_out)
    torch.manual_seed(0)
    random_model = LlamaForCausalLM(model.config).eval()
    untrained = perplexity(random_model, tokenizer, held_out)
    assert trained * PERPLEXITY_FACTOR < untrained, (trained, untrained)


def test_shipped_model_continues_a_sentence_on_topic(shipped: tuple) -> None:
    import torch

    _, model, tokenizer = shipped
    ids = tokenizer("发烧的时候，建议", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    assert "。" in text and "reserved" not in text, text
    assert sum("\u4e00" <= ch <= "\u9fff" for ch in text) >= 6, text


def test_pretraining_writes_a_folder_that_loads_with_the_auto_classes(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    settings = TextPretrainSettings(
        sentences=1500, held_out_sentences=40, tokenizer_sentences=500, steps=3, batch_size=4, seq_len=32
    )
    figures = pretrain(tmp_path / "model", settings, log=lambda _: None)
    assert figures["held_out_perplexity"] < figures["random_init_perplexity"]
    assert figures["wall_seconds"] > 0 and figures["cpu_seconds"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert model.config.vocab_size == len(tokenizer) == settings.vocab_size
    assert "seed 0" in (tmp_path / "model" / "README.md").read_text("utf-8")


def test_generated_sentences_are_seeded_and_not_the_demo_answers() -> None:
    from importlib import resources

    assert generate_sentences(50, 3) == generate_sentences(50, 3) != generate_sentences(50, 4)
    qa = resources.files("loratui.demo").joinpath("text_assets", "medical_qa.jsonl").read_text("utf-8")
    answers = [json.loads(line)["response"] for line in qa.splitlines() if line.strip()]
    corpus = set(generate_sentences(TextPretrainSettings.sentences, 0))
    pieces = {p for a in answers for p in a.replace("。", "。\n").replace(". ", ".\n").splitlines() if p}
    assert not pieces & corpus


def test_the_pretrain_command_dispatches_to_the_text_script(capsys: pytest.CaptureFixture[str]) -> None:
    from loratui.tiny_models.pretrain.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["text", "--help"])
    assert exit_info.value.code == 0 and "--out" in capsys.readouterr().out


@pytest.mark.slow
def test_the_seeded_script_reproduces_the_shipped_quality(tmp_path: Path) -> None:
    from loratui.tiny_models.pretrain.text import main

    assert main(["--out", str(tmp_path / "model")]) == 0
    figures = json.loads((tmp_path / "model" / "pretraining.json").read_text("utf-8"))
    shipped = json.loads((shipped_text_model() / "pretraining.json").read_text("utf-8"))
    assert figures["held_out_perplexity"] <= shipped["held_out_perplexity"] * 1.25, (figures, shipped)
    assert (tmp_path / "model" / "model.safetensors").stat().st_size <= MAX_WEIGHT_BYTES
