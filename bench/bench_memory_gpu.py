"""Memory planner on a CUDA GPU: predicted peak vs the allocator's reserved peak + context, and an 8 GB check.

    python bench/bench_memory_gpu.py [--json results.json] [--skip-sdxl]

Needs one CUDA GPU (about 40 GB for every case; SDXL without checkpointing is not run) and writes model
folders with random weights (no downloads) to a temporary directory: SD1.5 and SDXL from the architecture
configs bundled in loratui/models/sd_configs, TinyLlama-1.1B from loratui/memory/arch_configs.

For each case the trainers' real step (loratui.train.memory_check.realstep) runs three optimizer steps on the GPU:

- measured = torch.cuda.max_memory_reserved() + CUDA context (NVML device memory after CUDA initialisation,
  minus what the allocator holds), compared with estimate_peak(config, device="cuda");
- the meter on CUDA (MemoryMeter(device="cuda")) is compared with torch.cuda.max_memory_allocated().

Then the "8 GB card" check: for an SD1.5 and a 1.1B Llama config that do not fit 8 GB, the recommender's top
option for an 8 GB card is trained for three steps with torch.cuda.set_per_process_memory_fraction limiting the
allocator to what an 8 GB card leaves (8 GiB - driver share - measured context); it must not run out of memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30


@contextlib.contextmanager
def init_on(device: str, dtype_name: str):
    """Build modules directly on `device` in `dtype_name` (a GPU initialises billions of weights in seconds);
    on the CPU modules are built as usual (fp32) and converted afterwards."""
    import torch

    if device == "cpu":
        yield
        return
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype_name))
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_sd_folder(name: str, dest: Path, device: str = "cpu") -> Path:
    """A diffusers pipeline folder with random fp16 weights for the bundled `name` architecture."""
    import diffusers
    import torch
    import transformers

    from loratui.models.sd.loading import bundled_config_folder

    if (dest / "model_index.json").is_file():
        return dest
    source = bundled_config_folder(name)
    shutil.copytree(source, dest)
    torch.manual_seed(0)
    with init_on(device, "float16"):
        unet = diffusers.UNet2DConditionModel.from_config(
            diffusers.UNet2DConditionModel.load_config(source / "unet")
        )
    unet.to(torch.float16).save_pretrained(dest / "unet", safe_serialization=True)
    del unet
    with init_on(device, "float16"):
        vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(source / "vae"))
    vae.to(torch.float16).save_pretrained(dest / "vae", safe_serialization=True)
    del vae
    for folder in ("text_encoder", "text_encoder_2"):
        if (source / folder).is_dir():
            config = transformers.AutoConfig.from_pretrained(source / folder)
            cls = getattr(transformers, (config.architectures or ["CLIPTextModel"])[0])
            with init_on(device, "float16"):
                encoder = cls(config)
            encoder.to(torch.float16).save_pretrained(dest / folder, safe_serialization=True)
    return dest


def build_llama_folder(dest: Path, work: Path, device: str = "cpu") -> Path:
    """TinyLlama-1.1B architecture, random bf16 weights, with the tiny model's tokenizer files."""
    import torch
    import transformers

    from loratui.memory.arch import bundled_llm_config
    from loratui.tiny_models import build_tiny_llama

    if (dest / "config.json").is_file():
        return dest
    values = bundled_llm_config("tinyllama-1.1b")
    config = transformers.LlamaConfig(
        **{k: v for k, v in values.items() if k not in ("architectures", "model_type")}
    )
    torch.manual_seed(0)
    with init_on(device, "bfloat16"):
        model = transformers.LlamaForCausalLM(config)
    model.to(torch.bfloat16).save_pretrained(dest, safe_serialization=True)
    tiny = build_tiny_llama(work / "tiny-llama")
    for item in tiny.iterdir():
        if item.name.startswith("tokenizer") or item.name in (
            "special_tokens_map.json",
            "chat_template.jinja",
        ):
            shutil.copy(item, dest / item.name)
    return dest


def cuda_context_bytes() -> int:
    """Device memory this process holds outside the caching allocator (context, cuBLAS handles)."""
    import torch

    from loratui.gpu import nvml

    before = nvml.snapshot()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    after = nvml.snapshot()
    if before.available and after.available:
        used = after.gpus[0].memory_used - before.gpus[0].memory_used
        return max(used - torch.cuda.memory_reserved(), 0)
    free, total = torch.cuda.mem_get_info()
    return max(total - free - torch.cuda.memory_reserved(), 0)


def run_case(label: str, cfg, family: str, context: int, *, fraction: float | None = None) -> dict:
    """Three real optimizer steps on the GPU; measured vs predicted."""
    import torch

    from loratui.memory.estimate import estimate_peak
    from loratui.memory.meter import MemoryMeter
    from loratui.train.memory_check.realstep import llm_real_step, sd_real_step

    predicted = estimate_peak(cfg, family=family, device="cuda")
    gc.collect()
    torch.cuda.empty_cache()
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(fraction)
    torch.cuda.reset_peak_memory_stats()
    row = {"case": label, "predicted_bytes": predicted.total_bytes, "breakdown": predicted.breakdown}
    started = time.perf_counter()
    step = None
    try:
        step = llm_real_step(cfg) if family == "llm" else sd_real_step(cfg, family)
        meter = MemoryMeter(device="cuda")
        for module in step.modules:
            meter.register_model(module)
        meter.register_optimizer(step.optimizer)
        with meter:
            for _ in range(3):
                step.run(None)
        torch.cuda.synchronize()
        row["oom"] = False
        row["meter_peak_bytes"] = meter.peak_bytes
        meter.close()
    except torch.OutOfMemoryError as exc:
        row["oom"] = True
        row["error"] = str(exc).splitlines()[0]
    row["seconds"] = round(time.perf_counter() - started, 1)
    row["max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    row["max_reserved_bytes"] = torch.cuda.max_memory_reserved()
    row["measured_bytes"] = row["max_reserved_bytes"] + context
    row["error_vs_measured"] = round(predicted.total_bytes / row["measured_bytes"] - 1, 4)
    if fraction is not None:
        torch.cuda.set_per_process_memory_fraction(1.0)
    del step
    gc.collect()
    torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in row.items() if k != "breakdown"}), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--skip-sdxl", action="store_true")
    args = parser.parse_args()
    import torch

    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.memory.integration import DRIVER_RESERVE, usable_from_total
    from loratui.memory.recommend import recommend
    from loratui.train.memory_check.realstep import write_image_dataset

    if not torch.cuda.is_available():
        print("no CUDA GPU: this benchmark needs one", file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="loratui-gpu-memory-") as tmp:
        root = Path(tmp)
        context = cuda_context_bytes()
        print(f"CUDA context: {context / 2**20:.0f} MiB on {torch.cuda.get_device_name(0)}", flush=True)
        sd15 = build_sd_folder("sd15", root / "sd15")
        llama = build_llama_folder(root / "llama-1.1b", root)
        data512 = write_image_dataset(root / "img512", 4, 512)

        def sd(base, data, **values) -> TrainConfig:
            values = {"mixed_precision": "fp16", "lora_rank": 16, **values}
            return TrainConfig(
                task_type="image-generation", base_model=str(base), train_data_dir=str(data), **values
            )

        def lm(**values) -> TrainConfig:
            values = {"mixed_precision": "bf16", "lora_rank": 16, **values}
            return TrainConfig(
                task_type="text-generation",
                model_family="llm",
                base_model=str(llama),
                train_data_dir=str(root),
                **values,
            )

        for batch in (1, 4):
            for ckpt in (False, True):
                cfg = sd(
                    sd15,
                    data512,
                    model_family="sd15",
                    resolution=512,
                    batch_size=batch,
                    gradient_checkpointing=ckpt,
                )
                rows.append(run_case(f"SD1.5 512² batch {batch} ckpt {ckpt}", cfg, "sd15", context))
        if not args.skip_sdxl:
            sdxl = build_sd_folder("sdxl", root / "sdxl")
            data1024 = write_image_dataset(root / "img1024", 4, 1024)
            cfg = sd(
                sdxl,
                data1024,
                model_family="sdxl",
                resolution=1024,
                batch_size=1,
                gradient_checkpointing=True,
            )
            rows.append(run_case("SDXL 1024² batch 1 ckpt", cfg, "sdxl", context))
        for seq in (512, 2048):
            cfg = lm(max_seq_len=seq, batch_size=4, gradient_checkpointing=False)
            rows.append(run_case(f"Llama-1.1B seq {seq} batch 4", cfg, "llm", context))

        total = torch.cuda.get_device_properties(0).total_memory
        card = usable_from_total(8 * GIB, "8 GB card")
        allocator_limit = 8 * GIB - DRIVER_RESERVE - context
        data8 = write_image_dataset(root / "img512x8", 8, 512)
        for label, cfg, family in (
            (
                "8 GB: SD1.5 512² batch 8 r32",
                sd(sd15, data8, model_family="sd15", resolution=512, batch_size=8, lora_rank=32),
                "sd15",
            ),
            ("8 GB: Llama-1.1B seq 2048 batch 8", lm(max_seq_len=2048, batch_size=8), "llm"),
        ):
            options = recommend(ResolvedConfig(cfg, {}, family), card.bytes, top=1)
            if not options:
                rows.append({"case": label, "oom": None, "error": "no option fits 8 GB"})
                continue
            row = run_case(
                f"{label} -> {options[0].changes}",
                options[0].config,
                family,
                context,
                fraction=allocator_limit / total,
            )
            row["recommended_changes"] = options[0].changes
            rows.append(row)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    bad = [r for r in rows if r.get("oom")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
