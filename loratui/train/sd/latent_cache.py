"""VAE latents for training samples, optionally cached in memory and on disk.

A cached latent is keyed by the exact pixels that were encoded (image content hash, bucket size, crop, flip;
see `SampleView.cache_key`) and by a fingerprint of the VAE, so a changed image, setting or base model never
reuses a stale latent. Latents are the mean of the VAE's posterior (no sampling), so cached and uncached
training see the same numbers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from loratui.train.sd.dataset import SampleView, SDDataset


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and (a sample of) its weights."""
    hasher = hashlib.blake2b(digest_size=8)
    hasher.update(json.dumps(dict(vae.config), sort_keys=True, default=str).encode())
    for name, param in vae.state_dict().items():
        flat = param.detach().reshape(-1)[:64].float().cpu()
        hasher.update(name.encode() + str(tuple(param.shape)).encode() + flat.numpy().tobytes())
    return hasher.hexdigest()


class LatentSource:
    """Turns sample views into latents [B, C, h, w] (fp32) on the training device."""

    def __init__(
        self,
        vae,
        dataset: SDDataset,
        *,
        device: torch.device,
        dtype: torch.dtype,
        cache: bool = False,
        disk_dir: Path | None = None,
    ):
        self.vae = vae
        self.dataset = dataset
        self.device = device
        self.dtype = dtype
        self.cache_enabled = cache or disk_dir is not None
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.memory: dict[str, torch.Tensor] = {}
        self.fingerprint = (
            f"{vae_fingerprint(vae)}-{str(dtype).removeprefix('torch.')}" if self.cache_enabled else ""
        )
        self.scaling = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift = float(shift) if shift is not None else 0.0
        self.encoded = 0  # VAE encodes done (for tests and statistics)

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Scaled latents (posterior mean) of a [B, 3, H, W] batch in [-1, 1]."""
        pixels = pixels.to(self.device, self.dtype)
        posterior = self.vae.encode(pixels).latent_dist
        self.encoded += pixels.shape[0]
        return ((posterior.mode() - self.shift) * self.scaling).float()

    def _disk_path(self, key: str) -> Path:
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}-{self.fingerprint}.safetensors"

    def _lookup(self, key: str) -> torch.Tensor | None:
        found = self.memory.get(key)
        if found is None and self.disk_dir is not None:
            path = self._disk_path(key)
            if path.is_file():
                from safetensors.torch import load_file

                found = load_file(str(path))["latents"]
                self.memory[key] = found
        return found

    def _store(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().cpu().contiguous()
        self.memory[key] = latents
        if self.disk_dir is not None:
            from safetensors.torch import save

            from loratui.util.atomic import atomic_write_bytes

            atomic_write_bytes(self._disk_path(key), save({"latents": latents}))

    def latents(self, views: Sequence[SampleView]) -> torch.Tensor:
        """Latents for views of one bucket size (encoding the ones not cached yet)."""
        if not self.cache_enabled:
            pixels = torch.stack([self.dataset.pixels(view) for view in views])
            return self.encode_pixels(pixels)
        found: dict[str, torch.Tensor] = {}
        missing = []
        for view in views:
            hit = self._lookup(view.cache_key)
            if hit is None:
                missing.append(view)
            else:
                found[view.cache_key] = hit
        if missing:
            encoded = self.encode_pixels(torch.stack([self.dataset.pixels(view) for view in missing]))
            for view, latent in zip(missing, encoded, strict=True):
                self._store(view.cache_key, latent)
                found[view.cache_key] = latent.cpu()
        return torch.stack([found[view.cache_key] for view in views]).to(self.device)

    def precompute(
        self,
        batch_size: int = 4,
        progress: Callable[[int, int], None] | None = None,
        share: tuple[int, int] = (0, 1),
    ) -> int:
        """Encode every (image, crop, flip) the run can use; returns how many were encoded now.

        `share=(i, n)`: only every n-th view from the i-th (one process's part of a split caching pass)."""
        index, count = share
        views = self.dataset.views_for_caching()[index::count]
        todo = [v for v in views if self._lookup(v.cache_key) is None]
        by_bucket: dict[tuple[int, int], list[SampleView]] = {}
        for view in todo:
            by_bucket.setdefault(view.bucket, []).append(view)
        done = 0
        for group in by_bucket.values():
            for start in range(0, len(group), batch_size):
                self.latents(group[start : start + batch_size])
                done += len(group[start : start + batch_size])
                if progress:
                    progress(done, len(todo))
        return done
