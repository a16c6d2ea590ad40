"""Stable Diffusion LoRA training (SD 1.x, SD 2.x, SDXL).

- `trainer`: the SD training loop, `train(job)`.
- `setup`: base model, LoRA, optimizer, dataset, latent and text caches, device placement.
- `dataset`: the image dataset as the trainer reads it (buckets, augmentation, captions).
- `latent_cache`: VAE latents of the training samples, cached in memory and on disk.
- `outputs`: what the loop writes besides training: checkpoints, samples, the kohya export.
- `oom`: the SD side of the OOM ladder: applying a rung to the live models, data and caches.
"""
