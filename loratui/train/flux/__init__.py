"""FLUX.1 (dev, schnell) and Chroma LoRA training.

- `trainer`: the Flux training loop, `train(job)`.
- `setup`: base model (stored bf16 / fp8 / NF4, block swap), LoRA, optimizer, dataset, latent and text caches.
- `outputs`: what the loop writes besides training: checkpoints, samples, the LoRA file.
- `oom`: the Flux side of the OOM ladder: applying rungs to the live models, data and caches.

The dataset, latent cache and bucketing are the image trainer's (`loratui.train.sd.dataset`,
`loratui.train.sd.latent_cache`).
"""
