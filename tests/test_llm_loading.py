"""Offline base-model loading: HF folders, cached hub ids, GGUF/GGML, pickles, remote code, tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from llm_helpers import make_config, make_job, records, single_thread, write_jsonl, write_tiny_gguf

from loratui.config.base_model import guess_task_type
from loratui.models.llm.loading import (
    ModelLoadError,
    base_model_reference,
    load_base,
    load_causal_lm,
    load_tokenizer,
    resolve_base,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


def _copy(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(*skip))
    return dest


def test_hf_folder_loads_offline(tiny_llama: Path) -> None:
    model, tok, source = load_base(str(tiny_llama))
    assert source.kind == "hf-folder" and base_model_reference(source) == str(tiny_llama.resolve())
    assert model.dtype == torch.float32 and tok.pad_token == "<pad>"
    assert guess_task_type(str(tiny_llama), "") == "text-generation"  # `loratui sample` routes it here


def test_bf16_weights(tiny_llama: Path) -> None:
    model = load_causal_lm(resolve_base(str(tiny_llama)), dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16


def test_ggml_file_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "llama-2-7b-chat.ggmlv3.q4_0.bin"
    path.write_bytes(b"tjgg" + bytes(32))
    with pytest.raises(ModelLoadError, match="GGML v3 files cannot be trained.*Hugging Face weights.*GGUF"):
        load_base(str(path))


def test_gguf_without_the_gguf_package_says_how_to_install(tmp_path: Path, monkeypatch) -> None:
    import transformers.utils

    monkeypatch.setattr(transformers.utils, "is_gguf_available", lambda *args, **kwargs: False)
    path = tmp_path / "model.Q4_K_M.gguf"
    path.write_bytes(b"GGUF" + bytes(32))
    source = resolve_base(str(path))
    assert source.kind == "gguf" and source.gguf_file == path.name
    with pytest.raises(ModelLoadError, match=r"pip install 'loratui\[gguf\]'"):
        load_base(str(path))


def test_hub_id_missing_from_cache_gives_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as err:
        resolve_base("someorg/Some-Model-1B", cache_dir=tmp_path)
    text = str(err.value)
    assert "not in the local Hugging Face cache" in text and str(tmp_path) in text
    assert "hf download someorg/Some-Model-1B --local-dir ./models/Some-Model-1B" in text


def test_hub_id_in_the_local_cache_loads(tmp_path: Path, tiny_llama: Path) -> None:
    repo = tmp_path / "models--someorg--tiny"
    snapshot = _copy(tiny_llama, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    source = resolve_base("someorg/tiny", cache_dir=tmp_path)
    assert source.kind == "hub-id" and source.folder == snapshot
    assert base_model_reference(source) == "someorg/tiny"
    assert load_causal_lm(source).config.model_type == "llama"


def test_cached_hub_id_routes_to_the_text_sampler(tmp_path: Path, tiny_llama: Path, monkeypatch) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "models--someorg--chat-1b"
    _copy(tiny_llama, repo / "snapshots" / "abc")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    assert guess_task_type("someorg/chat-1b", "") is None  # not in the default cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    assert guess_task_type("someorg/chat-1b", "") == "text-generation"


def test_pickle_weights_need_allow_pickle(tmp_path: Path, tiny_llama: Path) -> None:
    from safetensors.torch import load_file

    folder = _copy(tiny_llama, tmp_path / "pickled", skip=("*.safetensors",))
    torch.save(load_file(tiny_llama / "model.safetensors"), folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights.*allow_pickle: true"):
        load_base(str(folder))
    model, _, _ = load_base(str(folder), allow_pickle=True)
    assert model.config.model_type == "llama"


def test_folder_without_tokenizer(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy(
        tiny_llama, tmp_path / "notok", skip=("tokenizer*", "chat_template.jinja", "special_tokens*")
    )
    with pytest.raises(ModelLoadError, match="no tokenizer in .*copy the tokenizer files"):
        load_base(str(folder))


def test_remote_code_needs_the_flag(tmp_path: Path, tiny_llama: Path) -> None:
    folder = _copy(tiny_llama, tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="my_custom_lm", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="ships its own model code.*trust_remote_code: true"):
        load_causal_lm(resolve_base(str(folder)))


def test_missing_and_wrong_paths(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="base model not found"):
        resolve_base(str(tmp_path / "nothing"))
    (tmp_path / "weights.ckpt").write_bytes(b"PK")
    with pytest.raises(ModelLoadError, match="pickle file"):
        resolve_base(str(tmp_path / "weights.ckpt"))


def test_tokenizer_without_pad_token(tiny_llama_nopad: Path) -> None:
    tok = load_tokenizer(resolve_base(str(tiny_llama_nopad)))
    assert tok.pad_token == tok.eos_token == "</s>"


def test_gguf_file_loads_dequantised_and_trains(tmp_path: Path, tiny_llama: Path) -> None:
    pytest.importorskip("gguf")
    from loratui.train.llm.trainer import run_training

    path = write_tiny_gguf(tiny_llama, tmp_path / "tiny-f32.gguf")
    model, tok, source = load_base(str(path))
    hf_model, hf_tok, _ = load_base(str(tiny_llama))
    text = "患者：头痛三天 hello"
    assert tok(text).input_ids == hf_tok(text).input_ids
    ids = torch.tensor([hf_tok(text).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf_model(ids).logits)
    data = write_jsonl(tmp_path / "qa.jsonl", records("prompt_response", 4))
    result = run_training(
        make_job(make_config(path, data, tmp_path, max_steps=1, max_seq_len=160)), console=False
    )
    config = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert result.state == "finished" and config["base_model_name_or_path"] == str(path.resolve())
