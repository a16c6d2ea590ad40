"""Text conditioning of FLUX.1 (CLIP-L pooled + T5 sequence) and Chroma (T5 sequence with its mask).

FLUX.1 reads T5's last hidden state over `t5_max_length` tokens (padded, no attention mask in T5, as
diffusers' FluxPipeline) and CLIP-L's pooled output (77 tokens). Chroma reads T5 only, run with the attention
mask, and the transformer attends to the caption's tokens plus the first padding token.

Outputs are cached per caption when asked (frozen encoders and fixed captions): T5 always once, CLIP-L too
unless it is trained (its LoRA then runs every step with gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

TEXT_BATCH = 8


@dataclass
class Conditioning:
    """What the transformer reads from the captions of one micro-batch."""

    t5: torch.Tensor  # [B, L, D]
    pooled: torch.Tensor | None  # [B, P] (CLIP-L), None for Chroma
    mask: torch.Tensor  # [B, L] T5 token mask (the transformer reads it for Chroma only)


@dataclass
class FluxTextConditioner:
    """Encodes captions with T5 (and CLIP-L); `cache_t5` / `cache_clip` keep the outputs per caption."""

    t5: Any
    t5_tokenizer: Any
    clip: Any | None
    clip_tokenizer: Any | None
    max_length: int
    device: torch.device
    chroma: bool = False
    cache_t5: bool = False
    cache_clip: bool = False
    t5_memory: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    clip_memory: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def cache_enabled(self) -> bool:
        """True when no text encoder needs the device during training steps."""
        return self.cache_t5 and (self.clip is None or self.cache_clip)

    def _t5_run(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.t5 is None:
            raise RuntimeError("T5 was released after caching; a caption that was not cached came up")
        tokens = self.t5_tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        hidden = self.t5(ids, attention_mask=mask if self.chroma else None)[0]
        if self.chroma:  # the caption's tokens and the first padding token
            lengths = mask.sum(dim=1, keepdim=True)
            mask = (torch.arange(mask.shape[1], device=mask.device)[None, :] <= lengths).to(mask.dtype)
        return hidden, mask

    def _clip_run(self, captions: Sequence[str]) -> torch.Tensor:
        tokens = self.clip_tokenizer(
            list(captions),
            padding="max_length",
            max_length=self.clip_tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return self.clip(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output

    def precompute(self, captions: Sequence[str]) -> int:
        """Encode every caption not cached yet (in batches); returns how many were encoded."""
        todo = sorted({c for c in captions if c not in self.t5_memory or self._clip_missing(c)})
        for start in range(0, len(todo), TEXT_BATCH):
            self.encode(todo[start : start + TEXT_BATCH])
        return len(todo)

    def _clip_missing(self, caption: str) -> bool:
        return self.clip is not None and self.cache_clip and caption not in self.clip_memory

    def encode(self, captions: Sequence[str]) -> Conditioning:
        captions = list(captions)
        t5, mask = self._t5(captions)
        pooled = None if self.clip is None else self._clip(captions)
        return Conditioning(t5, pooled, mask)

    def _t5(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cache_t5:
            with torch.no_grad():
                return self._t5_run(captions)
        missing = sorted({c for c in captions if c not in self.t5_memory})
        if missing:
            with torch.no_grad():
                hidden, mask = self._t5_run(missing)
            for i, caption in enumerate(missing):
                self.t5_memory[caption] = (hidden[i].detach().cpu(), mask[i].detach().cpu())
        hidden = torch.stack([self.t5_memory[c][0] for c in captions]).to(self.device)
        mask = torch.stack([self.t5_memory[c][1] for c in captions]).to(self.device)
        return hidden, mask

    def encode_clip(self, captions: list[str]) -> torch.Tensor:
        """CLIP-L's pooled output [B, P] (cached or live as `encode` does)."""
        return self._clip(list(captions))

    def _clip(self, captions: list[str]) -> torch.Tensor:
        if not self.cache_clip:
            return self._clip_run(captions)  # with gradients when CLIP-L is trained
        missing = sorted({c for c in captions if c not in self.clip_memory})
        if missing:
            with torch.no_grad():
                pooled = self._clip_run(missing)
            for i, caption in enumerate(missing):
                self.clip_memory[caption] = pooled[i].detach().cpu()
        return torch.stack([self.clip_memory[c] for c in captions]).to(self.device)
