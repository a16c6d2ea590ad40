"""Block swap on a FLUX.1-dev-architecture transformer with random weights: samples/s and peak memory.

    python bench/bench_flux_block_swap.py                          # CUDA: 512^2 and 1024^2, bf16 and fp8 base
    python bench/bench_flux_block_swap.py --swap 0 8 16 --sizes 512
    python bench/bench_flux_block_swap.py --device cpu --layers 1 1 --sizes 256 --steps 2   # the code path only

The transformer is built from `loratui/models/flux/configs/flux1-dev.json` (`--layers D S` shortens it to D
double and S single blocks) with random bf16 weights, the default Flux LoRA targets at rank 16, gradient
checkpointing, and random inputs of the given image size (1024 packed tokens at 512^2, 4096 at 1024^2) with
512 T5 tokens. For each `blocks_to_swap` it reports samples/s (median of the steps after the first), the peak
CUDA memory of the step, and the loss's largest difference from the unswapped run on the same inputs
(block swap must not change it). The base is stored as `--base` says (bf16, fp8 or both).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources


def build(layers: tuple[int, int] | None):
    import torch
    from diffusers import FluxTransformer2DModel

    config = json.loads(
        resources.files("loratui.models.flux").joinpath("configs", "flux1-dev.json").read_text("utf-8")
    )["transformer"]["config"]
    if layers:
        config.update(num_layers=layers[0], num_single_layers=layers[1])
    with torch.device("meta"):
        model = FluxTransformer2DModel(**config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=generator)
        for buffer in model.buffers():
            buffer.zero_()
    return model.requires_grad_(False)


def run(model, device, swap: int, size: int, steps: int, base: str) -> dict[str, float]:
    import torch

    from loratui.models.flux.flow_match import image_ids, text_ids
    from loratui.models.flux.lora import TRANSFORMER, plan_flux_targets
    from loratui.models.flux.parts import FluxParts
    from loratui.models.sd.lora import LoraPlan, inject_lora
    from loratui.train.flux.setup import FluxModels, place_transformer, setup_base_storage

    parts = FluxParts("dev", model, None, None, None, None, None, None, "random FLUX.1-dev architecture")
    models = FluxModels(parts, "flux", device, torch.bfloat16, guidance_scale=1.0, t5_max_length=512)
    if not any("lora_A" in name for name, _ in model.named_modules()):
        plan = LoraPlan(
            targets=plan_flux_targets(None, {TRANSFORMER: model}, train_text_encoder=False), rank=16, alpha=16
        )
        torch.manual_seed(0)
        inject_lora({TRANSFORMER: model}, plan)
        model.enable_gradient_checkpointing()
    if base != "bf16" and models.base_weights_dtype != base:
        setup_base_storage(models, base)
    models.blocks_to_swap = swap
    place_transformer(models)
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(1)
    tokens, cfg = (size // 16) ** 2, model.config
    inputs = {
        "hidden_states": torch.randn(1, tokens, cfg.in_channels, generator=generator).to(
            device, torch.bfloat16
        ),
        "encoder_hidden_states": torch.randn(1, 512, cfg.joint_attention_dim, generator=generator).to(
            device, torch.bfloat16
        ),
        "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=generator).to(
            device, torch.bfloat16
        ),
        "timestep": torch.tensor([0.5], device=device, dtype=torch.bfloat16),
        "guidance": torch.ones(1, device=device, dtype=torch.bfloat16),
        "img_ids": image_ids(size // 8, size // 8, device, torch.bfloat16),
        "txt_ids": text_ids(512, device, torch.bfloat16),
        "return_dict": False,
    }
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    model.train()
    for _ in range(steps):
        started = time.perf_counter()
        out = model(**inputs)[0]
        loss = out.float().pow(2).mean()
        loss.backward()
        for param in params:
            param.grad = None
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        losses.append(float(loss.detach()))
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    rate = 1 / statistics.median(times[1:] or times)
    return {"samples_per_s": rate, "peak_gib": peak, "loss": losses[0]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--layers", type=int, nargs=2, help="double and single blocks (default: FLUX.1's 19 38)"
    )
    parser.add_argument("--swap", type=int, nargs="+", default=[0, 8, 16, 24])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--base", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8", "nf4"])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: use --device cpu (with --layers 1 1) to run the code path")
    print(
        f"device {device}; FLUX.1-dev transformer {args.layers or '(19, 38)'} blocks, random bf16 weights, LoRA rank 16"
    )
    print("| base | size | blocks_to_swap | samples/s | peak GiB | loss - unswapped |")
    print("|---|---|---|---|---|---|")
    for base in args.base:
        model = build(tuple(args.layers) if args.layers else None)
        for size in args.sizes:
            reference = None
            for swap in args.swap:
                result = run(model, device, swap, size, args.steps, base)
                reference = result["loss"] if reference is None else reference
                print(
                    f"| {base} | {size} | {swap} | {result['samples_per_s']:.3f} | {result['peak_gib']:.2f} "
                    f"| {abs(result['loss'] - reference):.1e} |",
                    flush=True,
                )
        del model


if __name__ == "__main__":
    main()
