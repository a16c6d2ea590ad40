"""FLUX.1 (dev, schnell) and the Flux-derived Chroma: architecture configs, loading and LoRA naming."""
