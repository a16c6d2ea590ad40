"""Plain descriptions of a traced training shape (no torch import)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Regime:
    """Settings that change the shape of activation memory (one fitted model each)."""

    precision: str = (
        "fp32"  # fp32 | amp16 | qlora16 | qlora32 (NF4 base, compute and other weights 16/32-bit)
    )
    checkpointing: bool = False
    dropout: bool = False
    targets: tuple[str, ...] | None = None  # None: the trainer's default targets
    network: str = "lora"  # SD adapter type and its options (`loratui.models.sd.adapters.spec_key`)
    chunked_loss: bool = False  # LLM: output head + loss a chunk of tokens at a time
    offload: bool = False  # LLM: saved activations in host memory until backward (GPU only)
    lora_dtype: str = "fp32"  # LLM: dtype of the LoRA weights (`lora_dtype`: fp32 | bf16)
    autocast: str = "cuda"  # whose autocast rules a 16-bit step follows: "cuda" or "cpu" (`tracemode.RULES`)

    def key(self) -> str:
        targets = "default" if self.targets is None else ",".join(self.targets)
        network = "" if self.network == "lora" else f"|net={self.network}"
        key = f"{self.precision}|ckpt={int(self.checkpointing)}|drop={int(self.dropout)}|t={targets}{network}"
        key += ("|loss=chunked" if self.chunked_loss else "") + ("|offload=1" if self.offload else "")
        key += f"|lora={self.lora_dtype}" if self.lora_dtype != "fp32" else ""
        return key + (f"|autocast={self.autocast}" if self.autocast != "cuda" else "")


@dataclass(frozen=True)
class Point:
    """One traced shape: micro-batch, tokens (sequence length, or latent pixels for SD) and LoRA rank."""

    batch: int
    tokens: int
    rank: int
