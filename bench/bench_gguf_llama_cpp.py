"""GGUF export checked in llama.cpp itself: logits of `--format gguf` files run by llama.cpp vs PyTorch + PEFT.

For each family a tiny random model and a random LoRA (all linear layers, rank 4, B non-zero) are built; then
  - merged:    `export --format gguf --merge --quant f16` run alone in llama.cpp,
  - base+lora: the base written by the same GGUF writer in f32, with the `--format gguf` adapter applied by
               llama.cpp (`llama_adapter_lora_init` + `llama_set_adapter_lora`, what `llama-cli --lora` does),
and the last-token logits are compared with PEFT's (max abs difference; the adapter's own effect on the logits
is printed next to it for scale). Each llama.cpp run is a subprocess, so a model llama.cpp refuses or aborts on
is reported, not fatal.

llama.cpp is reached through the CPU library of the `llama-cpp-cffi` wheel (its C API, no Python wrapper):
    pip download llama-cpp-cffi==0.4.42 --no-deps --only-binary=:all: -d /tmp/w
    unzip /tmp/w/*.whl 'llama/_llama_cpp_cpu*' -d /tmp/llama_cffi
    python bench/bench_gguf_llama_cpp.py --cffi /tmp/llama_cffi/llama
The wheel's library needs a libstdc++ from GCC 14 or later.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

IDS = [1, 40, 41, 300, 301, 302, 500, 7]
SIZES = {
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
}
# llama.cpp picks Gemma's attention scale by model size (layer count), so Gemma runs with 26 layers and
# query_pre_attn_scalar = head_dim, as in Gemma 2 2B / Gemma 3 1B.
FAMILIES = {
    "mistral": ("MistralConfig", {}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "num_hidden_layers": 26, "query_pre_attn_scalar": 16}),
    "gemma3": ("Gemma3TextConfig", {"head_dim": 16, "num_hidden_layers": 26, "query_pre_attn_scalar": 16}),
    "phi3": ("Phi3Config", {}),
}


def run_llama_cpp(cffi_dir: str, model: str, lora: str | None, out: str) -> None:
    """Child process: evaluate IDS in llama.cpp and save the last token's logits."""
    import types

    import numpy as np

    package = types.ModuleType("llama")
    package.__path__ = [cffi_dir]
    sys.modules["llama"] = package
    from llama._llama_cpp_cpu import ffi, lib

    lib.llama_backend_init()
    handle = lib.llama_model_load_from_file(model.encode(), lib.llama_model_default_params())
    if handle == ffi.NULL:
        raise SystemExit("llama.cpp could not load the model")
    params = lib.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 64, 64, 1, 1
    ctx = lib.llama_init_from_model(handle, params)
    if lora:
        adapter = lib.llama_adapter_lora_init(handle, lora.encode())
        if adapter == ffi.NULL or lib.llama_set_adapter_lora(ctx, adapter, 1.0) != 0:
            raise SystemExit("llama.cpp could not load the adapter")
    tokens = ffi.new("llama_token[]", IDS)
    if lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(IDS))) != 0:
        raise SystemExit("llama_decode failed")
    n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(handle))
    logits = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, -1), 4 * n_vocab), dtype=np.float32)
    np.save(out, logits.copy())


def build(family: str, folder: Path, tokenizer_from: Path) -> Path:
    import torch
    import transformers

    name, extra = FAMILIES[family]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, name)(**{**SIZES, **extra}))
    model.save_pretrained(folder)
    for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tokenizer_from / file, folder / file)
    return folder


def make_adapter(base: Path, dest: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from loratui.models.llm.adapter_files import adapter_config_dict, write_adapter

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    return write_adapter(
        dest,
        tensors=get_peft_model_state_dict(peft_model),
        adapter_config=adapter_config_dict(peft_model.peft_config["default"], str(base)),
        chat_template=None,
    )


def reference(base: Path, adapter: Path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = model(input_ids=torch.tensor([IDS])).logits[0, -1].numpy()
        tuned = PeftModel.from_pretrained(model, str(adapter))(input_ids=torch.tensor([IDS])).logits[0, -1]
    return plain, tuned.numpy()


def in_llama_cpp(cffi_dir: str, model: Path, lora: Path | None, work: Path) -> tuple[object, str]:
    import numpy as np

    out = work / "logits.npy"
    out.unlink(missing_ok=True)
    args = [sys.executable, __file__, "--cffi", cffi_dir, "--child", str(model), str(lora or ""), str(out)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
        return None, (errors[-1] if errors else f"exit code {done.returncode}")[:120]
    return np.load(out), ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cffi", required=True, help="folder holding llama-cpp-cffi's _llama_cpp_cpu library"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--families", default="llama," + ",".join(FAMILIES))
    args = parser.parse_args()
    if args.child:
        model, lora, out = args.child
        run_llama_cpp(args.cffi, model, lora or None, out)
        return

    import numpy as np
    from transformers import AutoModelForCausalLM

    from loratui.export.gguf_export import write_model_gguf
    from loratui.export.llm_export import export_adapter
    from loratui.models.llm.loading import resolve_base
    from loratui.tiny_models import build_tiny_llama

    rows = []
    with tempfile.TemporaryDirectory(prefix="loratui-gguf-bench-") as tmp:
        work = Path(tmp)
        llama = build_tiny_llama(work / "tiny-llama")
        for family in args.families.split(","):
            # neutral folder names: llama.cpp changes token attributes for models *named* phi3 (general.name),
            # which expects Phi-3's own vocabulary
            (work / family).mkdir(exist_ok=True)
            base = llama if family == "llama" else build(family, work / family / "base", llama)
            adapter = make_adapter(base, work / family / "adapter")
            plain, tuned = reference(base, adapter)
            merged = export_adapter(
                adapter, fmt="gguf", merge=True, quant="f16", out=work / f"{family}-m"
            ).path
            lora = export_adapter(adapter, fmt="gguf", out=work / f"{family}-lora.gguf").path
            base_gguf = work / f"{family}-base.gguf"
            model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True)
            write_model_gguf(
                model, resolve_base(str(base)), base_gguf, quant="f32", chat_template=None, name="b"
            )
            row = {"family": family, "adapter effect": float(np.abs(tuned - plain).max())}
            for label, (model_file, lora_file) in {
                "merged f16": (merged, None),
                "base f32 + lora": (base_gguf, lora),
            }.items():
                logits, error = in_llama_cpp(args.cffi, model_file, lora_file, work)
                row[label] = float(np.abs(logits - tuned).max()) if logits is not None else error
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| family | adapter effect | merged f16 vs PEFT | base f32 + lora vs PEFT |\n|---|---|---|---|")
    for row in rows:
        cells = [f"{v:.1e}" if isinstance(v, float) else v for v in list(row.values())[1:]]
        print(f"| {row['family']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
