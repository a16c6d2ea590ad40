"""Text conditioning for SD 1.x/2.x and SDXL, with optional caching of frozen text-encoder outputs.

SD 1.x/2.x condition on the text encoder's last hidden state. SDXL concatenates the penultimate hidden
states of both encoders and adds the second encoder's pooled (projected) output plus the size/crop
micro-conditioning (`add_time_ids`), as diffusers' SDXL pipeline does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TEXT_BATCH = 8  # captions encoded at once when text-encoder outputs are cached


class TextConditioner:
    """Encodes captions; caches outputs per caption when the text encoders are frozen and `cache` is set."""

    def __init__(
        self, tokenizers: list, text_encoders: list, *, sdxl: bool, device: torch.device, cache: bool = False
    ):
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders
        self.sdxl = sdxl
        self.device = device
        self.cache_enabled = cache
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _ids(self, tokenizer, captions: Sequence[str]) -> torch.Tensor:
        tokens = tokenizer(
            list(captions),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        return tokens.input_ids.to(self.device)

    def _run(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.sdxl:
            ids = self._ids(self.tokenizers[0], captions)
            return self.text_encoders[0](ids)[0], None
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders, strict=True):
            out = encoder(self._ids(tokenizer, captions), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last encoder's projected pooled output
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings [B, 77, D], pooled embeddings [B, P] for SDXL else None)."""
        if not self.cache_enabled:
            return self._run(captions)
        missing = sorted({c for c in captions if c not in self.memory})
        if missing:
            with torch.no_grad():
                embeds, pooled = self._run(missing)
            for i, caption in enumerate(missing):
                self.memory[caption] = (
                    embeds[i].detach().cpu(),
                    pooled[i].detach().cpu() if pooled is not None else None,
                )
        embeds = torch.stack([self.memory[c][0] for c in captions]).to(self.device)
        if not self.sdxl:
            return embeds, None
        return embeds, torch.stack([self.memory[c][1] for c in captions]).to(self.device)


def sdxl_added_conditions(
    pooled: torch.Tensor, time_ids: Sequence[Sequence[int]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """SDXL's `added_cond_kwargs`: pooled text embeddings and (original size, crop, target size) ids."""
    ids = torch.tensor([list(t) for t in time_ids], device=pooled.device, dtype=dtype)
    return {"text_embeds": pooled.to(dtype), "time_ids": ids}
