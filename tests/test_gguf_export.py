"""`loratui export --format gguf`: llama.cpp LoRA adapters and merged GGUF models + Ollama Modelfiles.

Files are read back with the `gguf` package and compared with the PEFT adapter / merged weights; merged models are
also loaded through transformers' GGUF reader (which undoes llama.cpp's q/k row order) and must give PEFT's logits.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from llm_helpers import make_config, make_job, records, single_thread, write_jsonl, write_tiny_gguf

gguf = pytest.importorskip("gguf")

from loratui.cli.cmd_export import run_text_export  # noqa: E402
from loratui.export.gguf_layout import UnsupportedArchitecture, layout_for  # noqa: E402
from loratui.export.llm_export import export_adapter  # noqa: E402
from loratui.export.ollama import chat_format, modelfile_text  # noqa: E402
from loratui.export.result import UnusableExportRequest  # noqa: E402
from loratui.models.llm.adapter_files import OutputConflict  # noqa: E402

IDS = [1, 40, 41, 300, 301, 302, 500, 7]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from single_thread()


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def print(self, text: str = "", **_: object) -> None:
        self.lines.append(str(text))


def llama_cpp_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter order for q/k rows of Hugging Face Llama weights (pairs interleaved per head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def make_adapter(base: Path, dest: Path, *, targets: object = "all-linear", **lora: object) -> Path:
    """A PEFT adapter folder for `base` with random (non-zero) A and B, written as loratui writes adapters."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from loratui.models.llm.adapter_files import adapter_config_dict, write_adapter

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type="CAUSAL_LM", **lora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    template = base / "chat_template.jinja"
    return write_adapter(
        dest,
        tensors=get_peft_model_state_dict(peft_model),
        adapter_config=adapter_config_dict(peft_model.peft_config["default"], str(base)),
        chat_template=template.read_text() if template.is_file() else None,
    )


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(model, str(adapter)).eval()(input_ids=torch.tensor([IDS])).logits


def gguf_logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(input_ids=torch.tensor([IDS])).logits


def read(path: Path) -> tuple[dict[str, object], dict[str, np.ndarray], dict[str, object]]:
    """(metadata, {tensor: float32 array in numpy (row-major) order}, {tensor: GGML type name})."""
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arrays = {
        t.name: gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32) for t in reader.tensors
    }
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    return fields, arrays, types


def peft_pairs(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{`model.layers.0.self_attn.q_proj`: (A, B)} from an adapter folder."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    return {
        key.removeprefix("base_model.model.").removesuffix(".lora_A.weight"): (
            tensor.numpy(),
            tensors[key.replace("lora_A", "lora_B")].numpy(),
        )
        for key, tensor in tensors.items()
        if key.endswith("lora_A.weight")
    }


GGUF_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_module(module: str) -> str:
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{GGUF_MODULES[rest]}"


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("gguf") / "llama-adapter")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """A tiny Qwen2 (q/k/v biases, tied embeddings) with the tiny Llama's tokenizer and a ChatML template."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    folder = tmp_path_factory.mktemp("gguf") / "qwen2"
    base = json.loads((tiny_llama / "config.json").read_text())
    config = Qwen2Config(
        vocab_size=base["vocab_size"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=base["bos_token_id"],
        eos_token_id=base["eos_token_id"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.1)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, folder / name)
    (folder / "chat_template.jinja").write_text(CHATML)
    return folder


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    from loratui.train.llm.trainer import run_training

    tmp = tmp_path_factory.mktemp("gguf_run")
    data = write_jsonl(tmp / "qa.jsonl", records("chat", 4))
    job = make_job(make_config(tiny_llama, data, tmp, max_steps=2, save_steps=2, max_seq_len=128))
    run_training(job, console=False)
    return job.run.path


# --- adapters ----------------------------------------------------------------------------------------------


def test_adapter_gguf_holds_the_lora_in_llama_cpp_naming_and_order(
    llama_adapter: Path, tmp_path: Path
) -> None:
    exported = export_adapter(llama_adapter, fmt="gguf", out=tmp_path / "a.gguf")
    assert exported.kind == "gguf-adapter" and exported.path == tmp_path / "a.gguf"
    assert "--lora" in exported.usage
    fields, arrays, types = read(exported.path)
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama" and fields["adapter.lora.alpha"] == 8.0
    pairs = peft_pairs(llama_adapter)
    assert len(pairs) == 14  # 2 layers x 7 linear layers
    expected = {f"{gguf_module(m)}.weight.lora_{ab}" for m in pairs for ab in "ab"}
    assert set(arrays) == expected and set(types.values()) == {"F32"}
    heads = {"q_proj": 4, "k_proj": 2}
    for module, (a, b) in pairs.items():
        name = gguf_module(module)
        np.testing.assert_array_equal(arrays[f"{name}.weight.lora_a"], a)  # (rank, in): GGUF [in, rank]
        n_head = heads.get(module.rsplit(".", 1)[-1])
        want_b = llama_cpp_rows(b, n_head) if n_head else b
        np.testing.assert_array_equal(
            arrays[f"{name}.weight.lora_b"], want_b
        )  # (out, rank): GGUF [rank, out]
        assert not n_head or not np.array_equal(want_b, b)  # the q/k order really changed


def test_adapter_applied_the_llama_cpp_way_gives_peft_logits(
    llama_adapter: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """W + alpha/rank * B @ A on every named tensor of a llama.cpp-layout base (written independently of the
    exporter) is what `llama-cli --lora` computes; read through transformers it must equal PEFT."""
    adapter = export_adapter(llama_adapter, fmt="gguf", out=tmp_path / "a.gguf").path
    fields, lora, _ = read(adapter)
    base_path = write_tiny_gguf(tiny_llama, tmp_path / "base.gguf")
    reader = gguf.GGUFReader(str(base_path))
    writer = gguf.GGUFWriter(str(tmp_path / "applied.gguf"), "llama")
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    applied = 0
    for tensor in reader.tensors:
        weight = np.array(tensor.data, dtype=np.float32)
        if f"{tensor.name}.lora_a" in lora:
            a, b = lora[f"{tensor.name}.lora_a"], lora[f"{tensor.name}.lora_b"]
            weight = weight + float(fields["adapter.lora.alpha"]) / a.shape[0] * (b @ a)
            applied += 1
        writer.add_tensor(tensor.name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert applied == 14
    torch.testing.assert_close(
        gguf_logits(tmp_path / "applied.gguf"), peft_logits(tiny_llama, llama_adapter), atol=1e-4, rtol=1e-4
    )


@pytest.mark.parametrize(
    ("lora", "scales"),
    [
        ({"use_rslora": True}, {"q_proj": 8 / 2, "v_proj": 8 / 2}),  # lora_alpha / sqrt(rank)
        ({"rank_pattern": {"v_proj": 8}, "alpha_pattern": {"v_proj": 2}}, {"q_proj": 8 / 4, "v_proj": 2 / 8}),
    ],
)
def test_peft_scales_are_kept_under_llama_cpp_alpha_over_rank(
    lora: dict, scales: dict, tiny_llama: Path, tmp_path: Path
) -> None:
    """llama.cpp multiplies B @ A by adapter.lora.alpha / rank (each tensor's rank); the product must be PEFT's."""
    adapter = make_adapter(tiny_llama, tmp_path / "a", targets=["q_proj", "v_proj"], **lora)
    fields, arrays, _ = read(export_adapter(adapter, fmt="gguf", out=tmp_path / "a.gguf").path)
    alpha = float(fields["adapter.lora.alpha"])
    for proj, scale in scales.items():
        a, b = peft_pairs(adapter)[f"model.layers.1.self_attn.{proj}"]
        name = gguf_module(f"model.layers.1.self_attn.{proj}")
        got_a, got_b = arrays[f"{name}.weight.lora_a"], arrays[f"{name}.weight.lora_b"]
        want = scale * b @ a
        if proj == "q_proj":
            want = llama_cpp_rows(want, 4)
        np.testing.assert_allclose(alpha / got_a.shape[0] * got_b @ got_a, want, rtol=1e-5, atol=1e-7)


def test_adapter_quant_types(llama_adapter: Path, tmp_path: Path) -> None:
    _, f32, _ = read(export_adapter(llama_adapter, fmt="gguf", out=tmp_path / "f32.gguf").path)
    _, f16, types = read(
        export_adapter(llama_adapter, fmt="gguf", quant="f16", out=tmp_path / "f16.gguf").path
    )
    assert set(types.values()) == {"F16"}
    for name, array in f32.items():
        np.testing.assert_allclose(f16[name], array, rtol=1e-3, atol=1e-6)
    _, bf16, types = read(
        export_adapter(llama_adapter, fmt="gguf", dtype="bf16", out=tmp_path / "bf16.gguf").path
    )
    assert set(types.values()) == {"BF16"}
    for name, array in f32.items():
        np.testing.assert_allclose(bf16[name], array, rtol=1 / 128, atol=1e-6)
    _, _, types = read(export_adapter(llama_adapter, fmt="gguf", quant="q8_0", out=tmp_path / "q8.gguf").path)
    # A rows (64/128 inputs) split into 32-value blocks; B rows (rank 4) cannot and stay f16
    assert {t for n, t in types.items() if n.endswith("lora_a")} == {"Q8_0"}
    assert {t for n, t in types.items() if n.endswith("lora_b")} == {"F16"}


# --- merged models -------------------------------------------------------------------------------------------


def merged_state(base: Path, adapter: Path) -> dict[str, np.ndarray]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.float().numpy() for k, v in merged.state_dict().items()}


def test_merged_gguf_reads_back_as_the_merged_weights_and_runs(
    llama_adapter: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    exported = export_adapter(llama_adapter, fmt="gguf", merge=True, quant="f16", out=tmp_path / "m16")
    assert exported.kind == "gguf-merged" and exported.path == tmp_path / "m16" / "model.gguf"
    fields, arrays, types = read(exported.path)
    assert fields["general.type"] == "model" and fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2 and fields["llama.attention.head_count_kv"] == 2
    tok = json.loads((tiny_llama / "tokenizer.json").read_text())
    assert fields["tokenizer.ggml.model"] == "gpt2"
    assert len(fields["tokenizer.ggml.tokens"]) == 1000 and fields["tokenizer.ggml.tokens"][1] == "<s>"
    assert len(fields["tokenizer.ggml.merges"]) == len(tok["model"]["merges"])
    token_types = fields["tokenizer.ggml.token_type"]
    assert token_types[1] == gguf.TokenType.CONTROL and token_types[300] == gguf.TokenType.NORMAL
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert fields["tokenizer.chat_template"] == (llama_adapter / "chat_template.jinja").read_text()

    state = merged_state(tiny_llama, llama_adapter)
    assert len(arrays) == len(state)
    heads = {"q_proj": 4, "k_proj": 2}
    for key, value in state.items():
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif "layernorm" in key:
            _, _, layer, norm, _ = key.split(".")
            name = f"blk.{layer}.{'attn_norm' if norm == 'input_layernorm' else 'ffn_norm'}.weight"
        else:
            name = gguf_module(key.removesuffix(".weight")) + ".weight"
            n_head = heads.get(key.split(".")[-2])
            value = llama_cpp_rows(value, n_head) if n_head else value
        assert types[name] == ("F32" if value.ndim == 1 else "F16")
        np.testing.assert_allclose(arrays[name], value, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(
        gguf_logits(exported.path), peft_logits(tiny_llama, llama_adapter), atol=5e-3, rtol=5e-3
    )

    modelfile = (tmp_path / "m16" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert "chat format: llama2-chat" in modelfile and 'TEMPLATE """' in modelfile and "[INST]" in modelfile
    assert 'PARAMETER stop "[/INST]"' in modelfile and 'PARAMETER stop "</s>"' in modelfile


def test_merged_q8_0_dequantises_to_the_merged_weights(
    llama_adapter: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    path = export_adapter(llama_adapter, fmt="gguf", merge=True, quant="q8_0", out=tmp_path / "q8.gguf").path
    assert path == tmp_path / "q8.gguf" and (tmp_path / "Modelfile").is_file()
    fields, arrays, types = read(path)
    assert fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    state = merged_state(tiny_llama, llama_adapter)
    weight = state["model.layers.1.mlp.down_proj.weight"]
    assert types["blk.1.ffn_down.weight"] == "Q8_0" and types["blk.1.ffn_norm.weight"] == "F32"
    got = arrays["blk.1.ffn_down.weight"]
    step = np.abs(weight).reshape(weight.shape[0], -1, 32).max(axis=-1, keepdims=True) / 127
    assert np.all(
        np.abs(got - weight).reshape(step.shape[0], -1, 32) <= step * 0.6 + 1e-7
    )  # half a step, scale d in f16
    assert np.abs(got - weight).max() > 0  # really quantised
    torch.testing.assert_close(
        gguf_logits(path), peft_logits(tiny_llama, llama_adapter), atol=0.05, rtol=0.05
    )


def test_qwen2_adapter_and_merged_model(tiny_qwen2: Path, tmp_path: Path) -> None:
    adapter = make_adapter(tiny_qwen2, tmp_path / "qwen-adapter")
    fields, arrays, _ = read(export_adapter(adapter, fmt="gguf", out=tmp_path / "q.gguf").path)
    assert fields["general.architecture"] == "qwen2"
    for module, (a, b) in peft_pairs(adapter).items():  # no row reordering outside the llama architecture
        np.testing.assert_array_equal(arrays[f"{gguf_module(module)}.weight.lora_a"], a)
        np.testing.assert_array_equal(arrays[f"{gguf_module(module)}.weight.lora_b"], b)

    merged = export_adapter(adapter, fmt="gguf", merge=True, quant="f32", out=tmp_path / "m").path
    fields, arrays, _ = read(merged)
    state = merged_state(tiny_qwen2, adapter)
    assert "output.weight" not in arrays  # tied embeddings: llama.cpp reuses token_embd
    np.testing.assert_array_equal(arrays["blk.0.attn_q.bias"], state["model.layers.0.self_attn.q_proj.bias"])
    np.testing.assert_array_equal(
        arrays["blk.1.attn_k.weight"], state["model.layers.1.self_attn.k_proj.weight"]
    )
    assert fields["tokenizer.ggml.pre"] == "qwen2" and fields["tokenizer.chat_template"] == CHATML
    torch.testing.assert_close(gguf_logits(merged), peft_logits(tiny_qwen2, adapter), atol=1e-4, rtol=1e-4)
    modelfile = (tmp_path / "m" / "Modelfile").read_text()
    assert "chat format: chatml" in modelfile and "<|im_start|>" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile


FAMILIES = {
    "mistral": ("MistralConfig", {}),
    "qwen3": ("Qwen3Config", {"hidden_size": 256, "num_attention_heads": 2, "num_key_value_heads": 1}),
    "gemma2": ("Gemma2Config", {"head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16}),
    "phi3": ("Phi3Config", {}),
}


def tiny_family(family: str, folder: Path, tokenizer_from: Path) -> Path:
    """A 2-layer random model of `family` with the tiny Llama's tokenizer (vocabulary 1000)."""
    import transformers

    name, sizes = FAMILIES[family]
    values = {
        "vocab_size": 1000,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 3,
        **sizes,
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**values))
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / file, folder / file)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_export_adapter_names_and_merged_models(
    family: str, tiny_llama: Path, tmp_path: Path
) -> None:
    """Each family: adapter tensors under llama.cpp's names; the merged file read by transformers' GGUF loader
    (its own name map, Gemma norm offset, Phi-3 fused layers, q/k order) gives PEFT's logits."""
    base = tiny_family(family, tmp_path / family, tiny_llama)
    adapter = make_adapter(base, tmp_path / "adapter")
    fields, arrays, _ = read(export_adapter(adapter, fmt="gguf", out=tmp_path / "a.gguf").path)
    arch = {"mistral": "llama"}.get(family, family)
    assert fields["general.architecture"] == arch
    modules = {"phi3": ("attn_qkv", "attn_output", "ffn_up", "ffn_down")}.get(
        family, tuple(GGUF_MODULES.values())
    )
    assert set(arrays) == {f"blk.{i}.{m}.weight.lora_{ab}" for i in (0, 1) for m in modules for ab in "ab"}

    merged = export_adapter(adapter, fmt="gguf", merge=True, quant="f32", out=tmp_path / "m").path
    fields, arrays, _ = read(merged)
    if family.startswith("gemma"):  # llama.cpp multiplies by the stored norm weight, Gemma by 1 + weight
        state = merged_state(base, adapter)
        np.testing.assert_array_equal(arrays["output_norm.weight"], state["model.norm.weight"] + 1)
    torch.testing.assert_close(gguf_logits(merged), peft_logits(base, adapter), atol=1e-4, rtol=1e-4)


def test_moe_attention_adapter_exports_and_experts_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
    )
    base = tmp_path / "moe"
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / file, base / file)
    attention = make_adapter(base, tmp_path / "attn", targets=["q_proj", "v_proj"])
    fields, arrays, _ = read(export_adapter(attention, fmt="gguf", out=tmp_path / "a.gguf").path)
    assert fields["general.architecture"] == "qwen3moe"
    assert set(arrays) == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in (0, 1) for m in "qv" for ab in "ab"}
    with pytest.raises(UnsupportedArchitecture, match="merged GGUF export of mixture-of-experts"):
        export_adapter(attention, fmt="gguf", merge=True, out=tmp_path / "m")
    experts = make_adapter(base, tmp_path / "experts", targets="all-linear")
    with pytest.raises(UnsupportedArchitecture, match="expert layers cannot be exported"):
        export_adapter(experts, fmt="gguf", out=tmp_path / "e.gguf")
    assert not (tmp_path / "e.gguf").exists() and not (tmp_path / "m").exists()


def test_merged_from_a_gguf_base_copies_its_tokenizer(
    llama_adapter: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    base = write_tiny_gguf(tiny_llama, tmp_path / "base.gguf")
    adapter = tmp_path / "on-gguf"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    merged = export_adapter(adapter, fmt="gguf", merge=True, quant="f32", out=tmp_path / "m").path
    fields, _, _ = read(merged)
    base_fields, _, _ = read(base)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert fields[key] == base_fields[key]
    assert fields["tokenizer.chat_template"] == (llama_adapter / "chat_template.jinja").read_text()
    torch.testing.assert_close(
        gguf_logits(merged), peft_logits(tiny_llama, llama_adapter), atol=1e-4, rtol=1e-4
    )


def test_sentencepiece_style_tokenizer_is_written_with_scores(
    llama_adapter: Path, tiny_llama: Path, tmp_path: Path
) -> None:
    """A Llama-2/Mistral/Gemma style tokenizer.json (BPE with byte fallback) becomes llama.cpp's `llama` model:
    byte tokens typed BYTE, scores falling with the merge order, ids past the tokenizer padded as unused."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    for piece in ["▁", "h", "e", "l", "o", "▁h", "he", "ll", "▁he", "llo", "▁hello"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("▁", "h"), ("h", "e"), ("l", "l"), ("▁h", "e"), ("ll", "o"), ("▁he", "llo")]
    base = tmp_path / "spm-base"
    shutil.copytree(tiny_llama, base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (base / name).unlink()
    LlamaTokenizer(vocab=vocab, merges=merges).save_pretrained(base)
    adapter = tmp_path / "adapter"
    shutil.copytree(llama_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(base)}))
    fields, _, _ = read(export_adapter(adapter, fmt="gguf", merge=True, quant="f32", out=tmp_path / "m").path)
    tokens, scores, types = (fields[f"tokenizer.ggml.{k}"] for k in ("tokens", "scores", "token_type"))
    assert fields["tokenizer.ggml.model"] == "llama" and len(tokens) == len(scores) == len(types) == 1000
    assert tokens[3] == "<0x00>" and types[3] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    assert tokens[vocab["▁hello"]] == "▁hello" and types[vocab["▁hello"]] == gguf.TokenType.NORMAL
    normal = [scores[i] for i in range(len(vocab)) if types[i] == gguf.TokenType.NORMAL]
    assert normal == sorted(normal, reverse=True) and len(set(normal)) == len(normal) == 11
    assert tokens[len(vocab)] == f"[PAD{len(vocab)}]" and types[-1] == gguf.TokenType.UNUSED


# --- the command ---------------------------------------------------------------------------------------------


def test_cli_exports_a_run_as_gguf_and_never_replaces_silently(trained_run: Path, tmp_path: Path) -> None:
    out = Lines()
    assert run_text_export(trained_run, fmt="gguf", console=out) == 0
    written = trained_run / "exports" / "adapter-f32.gguf"
    assert out.lines[0] == f"adapter: {written}" and "--lora" in out.lines[-1]
    fields, arrays, _ = read(written)
    assert (
        fields["general.type"] == "adapter" and len(arrays) == 2 * 2 * 7
    )  # A and B of q,k,v,o,gate,up,down (the default targets) in 2 layers
    before = written.read_bytes()
    again = Lines()
    assert run_text_export(trained_run, fmt="gguf", console=again) == 1 and "--overwrite" in again.lines[-1]
    assert run_text_export(trained_run, fmt="gguf", overwrite=True, console=Lines()) == 0
    assert written.read_bytes() == before

    merged = Lines()
    assert run_text_export(trained_run, fmt="gguf", merge=True, quant="q8_0", console=merged) == 0
    folder = trained_run / "exports" / "merged-gguf-q8_0"
    assert (folder / "model.gguf").is_file() and any("Modelfile" in line for line in merged.lines)
    assert run_text_export(trained_run, fmt="gguf", merge=True, quant="q8_0", console=Lines()) == 1

    bad = Lines()
    assert (
        run_text_export(trained_run, fmt="gguf", quant="q4_k", console=bad) == 2 and "q8_0" in bad.lines[-1]
    )
    assert run_text_export(trained_run, quant="q8_0", console=bad) == 2 and "GGUF" in bad.lines[-1]
    assert run_text_export(trained_run, fmt="gguf", dtype="fp16", quant="f16", console=bad) == 2


def test_missing_gguf_package_names_the_extra(llama_adapter: Path, tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from loratui.cli.app import app

    monkeypatch.setitem(sys.modules, "gguf", None)
    result = CliRunner().invoke(
        app, ["export", str(llama_adapter), "--format", "gguf", "-o", str(tmp_path / "x")]
    )
    assert result.exit_code == 2 and 'pip install "loratui[gguf]"' in result.output
    assert not (tmp_path / "x").exists()


def test_unsupported_family_and_conflicts(llama_adapter: Path, tmp_path: Path) -> None:
    from transformers import GPT2Config

    with pytest.raises(UnsupportedArchitecture, match="model_type 'gpt2'.*supported: gemma2"):
        layout_for(GPT2Config())
    (tmp_path / "dir.gguf").mkdir()
    with pytest.raises(OutputConflict, match="is a folder"):
        export_adapter(llama_adapter, fmt="gguf", out=tmp_path / "dir.gguf")
    with pytest.raises(UnusableExportRequest, match="--quant must be one of"):
        export_adapter(llama_adapter, fmt="gguf", quant="q4_0")


# --- Modelfile ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("markers", "name"),
    [
        ("<|start_header_id|>{{ role }}<|end_header_id|>{{ content }}<|eot_id|>", "llama3-instruct"),
        (CHATML, "chatml"),
        ("<start_of_turn>user {{ x }}<end_of_turn>", "gemma-instruct"),
        ("<|user|>{{ x }}<|end|><|assistant|>", "phi-3"),
        ("[INST] {{ x }} [/INST]", "mistral-instruct"),
        ("[INST] <<SYS>>{{ x }}<</SYS>> [/INST]", "llama2-chat"),
    ],
)
def test_chat_formats_are_recognised(markers: str, name: str) -> None:
    fmt = chat_format(markers)
    assert fmt is not None and fmt.name == name
    text = modelfile_text("model.gguf", markers, "</s>")
    assert (
        f"chat format: {name}" in text
        and f'TEMPLATE """{fmt.template}"""' in text
        and ".Content" in fmt.template
    )
    assert all(f"PARAMETER stop {json.dumps(stop)}" in text for stop in fmt.stops)


def test_unknown_chat_format_leaves_the_template_to_the_gguf() -> None:
    text = modelfile_text("m.gguf", "{{ messages }}", "<eos>")
    assert text.startswith("FROM ./m.gguf\n") and "TEMPLATE" not in text.replace("Add a TEMPLATE", "")
    assert 'PARAMETER stop "<eos>"' in text
