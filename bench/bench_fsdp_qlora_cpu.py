"""FSDP's QLoRA path on the CPU: a 4-bit NF4 base (bf16 `quant_storage`) sharded over 2 gloo processes.

Each process loads the built-in tiny Llama in 4-bit (bitsandbytes runs NF4 on the CPU), adds the same LoRA,
computes the reference LoRA gradients of the whole batch unsharded, then shards a second copy with
`loratui.train.process.fsdp.shard_model` and runs its half of the batch. FSDP averages the gradient shards over
the processes, so the gathered gradients must equal the reference. Prints the largest difference per process.

    OMP_NUM_THREADS=1 python bench/bench_fsdp_qlora_cpu.py
"""

from __future__ import annotations

import os
import socket
import sys
import tempfile
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def _load(base: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(base), quantization_config=quant, device_map={"": "cpu"}, dtype=torch.bfloat16
    )
    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    return get_peft_model(model, lora)


def _worker(rank: int, world: int, base: Path, port: int, out: Path) -> None:
    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from loratui.train.process.fsdp import shard_model

    ids = torch.randint(4, 200, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    reference = _load(base)
    reference(input_ids=ids, labels=ids).loss.backward()
    wanted = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    sharded = shard_model(_load(base), torch.device("cpu"))
    mine = ids[
        rank::world
    ]  # the same number of tokens on each rank: the mean of the losses is the whole loss
    sharded(input_ids=mine, labels=mine).loss.backward()
    worst = max(
        float((p.grad.full_tensor() - wanted[n]).abs().max())
        for n, p in sharded.named_parameters()
        if p.requires_grad
    )
    (out / f"rank{rank}.txt").write_text(f"{worst:.3e}")
    dist.destroy_process_group()


def main() -> None:
    import torch.multiprocessing as mp

    from loratui.tiny_models import build_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        base = build_tiny_llama(Path(tmp) / "llama")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        mp.spawn(_worker, args=(2, base, port, Path(tmp)), nprocs=2)
        for rank in range(2):
            diff = (Path(tmp) / f"rank{rank}.txt").read_text()
            print(f"rank {rank}: max |gathered LoRA gradient - unsharded| = {diff}")


if __name__ == "__main__":
    main()
