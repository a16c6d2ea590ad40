"""Helpers for the LLM tests: small datasets in every format, configs and in-process jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loratui.config import ResolvedConfig, TrainConfig
from loratui.runs.rundir import create_run_dir
from loratui.train.job import WorkerJob

QA = [
    (
        "患者：头痛三天，体温正常，该吃什么药？",
        "建议多休息、多喝水，可短期服用对乙酰氨基酚；持续头痛请就医。",
    ),
    (
        "What helps a mild sore throat?",
        "Warm fluids, rest and salt-water gargles; see a doctor if it lasts a week.",
    ),
    ("咳嗽一周了怎么办？", "先观察是否发烧，多喝温水；超过两周或咳血请及时就医。"),
    (
        "Is it safe to take ibuprofen every day?",
        "Only short term; long daily use can hurt the stomach and kidneys.",
    ),
    ("孩子发烧38度要去医院吗？", "精神好可以先物理降温并补水；持续高烧或精神差请就医。"),
    ("How much water should adults drink?", "About two litres a day, more in heat or during exercise."),
    ("失眠有什么办法？", "固定作息，睡前少看手机，避免咖啡；长期失眠请咨询医生。"),
    ("What are signs of dehydration?", "Thirst, dark urine, dizziness and a dry mouth."),
]


def records(fmt: str, n: int = 8) -> list[dict[str, Any]]:
    """`n` records of one dataset format."""
    out = []
    for i in range(n):
        q, a = QA[i % len(QA)]
        if i >= len(QA):
            q = f"{q} ({i})"
        if fmt == "prompt_response":
            out.append({"prompt": q, "response": a})
        elif fmt == "alpaca":
            out.append({"instruction": q, "input": "", "output": a})
        elif fmt == "chat":
            out.append(
                {
                    "messages": [
                        {"role": "system", "content": "You are careful."},
                        {"role": "user", "content": q},
                        {"role": "assistant", "content": a},
                    ]
                }
            )
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
        elif fmt == "text":
            out.append({"text": f"{q} {a}"})
        else:
            raise ValueError(fmt)
    return out


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def make_config(base: Path, data: Path, out: Path, **overrides: Any) -> TrainConfig:
    """A small fast text-generation config."""
    values: dict[str, Any] = {
        "task_type": "text-generation",
        "model_family": "llm",
        "base_model": str(base),
        "train_data_dir": str(data),
        "output_dir": str(out / "adapter"),
        "runs_dir": str(out / "runs"),
        "lora_rank": 4,
        "learning_rate": 1e-2,
        "max_seq_len": 96,
        "batch_size": 2,
        "max_steps": 3,
        "mixed_precision": "no",
        "weight_decay": 0.0,
    }
    values.update(overrides)
    return TrainConfig(**values)


def make_job(
    cfg: TrainConfig, *, resume_from: Path | None = None, run=None, overwrite: bool = False
) -> WorkerJob:
    """A worker job with a fresh run directory (or `run`)."""
    run = run or create_run_dir(Path(cfg.runs_dir), cfg.name)
    return WorkerJob(run, ResolvedConfig(cfg, {}, "llm"), resume_from, overwrite)


class StopAfter:
    """A stop request that fires once `n` optimizer steps have completed (checked once per step)."""

    def __init__(self, n: int) -> None:
        import threading

        self.n = n
        self.checks = 0
        self.signal_name = "test"
        self.checkpoint_now = threading.Event()

    @property
    def requested(self) -> bool:
        self.checks += 1
        return self.checks >= self.n


def adapter_tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


def max_diff(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def single_thread():
    """Generator for a fixture: tiny models run much faster on one CPU thread (and deterministically)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def write_tiny_gguf(hf_folder: Path, dest: Path) -> Path:
    """Write the tiny Llama folder as an F32 GGUF file the way llama.cpp's converter lays it out
    (tensor names, q/k row permutation, byte-level BPE vocabulary). Needs the `gguf` package."""
    import gguf
    import numpy as np
    from safetensors.torch import load_file

    config = json.loads((hf_folder / "config.json").read_text())
    tok = json.loads((hf_folder / "tokenizer.json").read_text())
    tcfg = json.loads((hf_folder / "tokenizer_config.json").read_text())
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(config["hidden_size"] // heads)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda item: item[1])
    added = {t["content"] for t in tok["added_tokens"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in added else 1 for t, _ in vocab])
    merges = tok["model"]["merges"]
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(config["bos_token_id"])
    writer.add_eos_token_id(config["eos_token_id"])
    if config.get("pad_token_id") is not None:
        writer.add_pad_token_id(config["pad_token_id"])
    writer.add_add_bos_token(True)
    if tcfg.get("chat_template") or (hf_folder / "chat_template.jinja").exists():
        writer.add_chat_template((hf_folder / "chat_template.jinja").read_text())

    def permute(w: np.ndarray, n_head: int) -> np.ndarray:
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for key, tensor in load_file(hf_folder / "model.safetensors").items():
        array = tensor.float().numpy()
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            _, _, layer, module = key.removesuffix(".weight").split(".", 3)
            name = f"blk.{layer}.{names[module]}.weight"
            if module == "self_attn.q_proj":
                array = permute(array, heads)
            elif module == "self_attn.k_proj":
                array = permute(array, kv_heads)
        writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def write_llm_yaml(tmp_path: Path, base: Path, data: Path | None = None, **overrides: Any) -> Path:
    """`tmp_path/llm.yaml`: a text-generation config for the tiny model as a user writes it (a short run, rank 4,
    fp32), on `data` or on 8 prompt/response records written to `tmp_path/data/qa.jsonl`."""
    import yaml

    if data is None:
        data = write_jsonl(tmp_path / "data" / "qa.jsonl", records("prompt_response", 8))
    values = {
        "base_model": str(base),
        "task_type": "text-generation",
        "train_data_dir": str(data),
        "output_dir": str(tmp_path / "adapter"),
        "runs_dir": str(tmp_path / "runs"),
        "lora_rank": 4,
        "max_steps": 2,
        "batch_size": 2,
        "max_seq_len": 96,
        "mixed_precision": "no",
        **overrides,
    }
    path = tmp_path / "llm.yaml"
    path.write_text(yaml.safe_dump(values, allow_unicode=True), encoding="utf-8")
    return path
