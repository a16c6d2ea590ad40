"""LoRA / QLoRA training of causal language models.

- `trainer`: the LLM training loop, `train(job)` (the worker) and `run_training(job)` (in-process callers).
- `setup`: output check, accelerator, base model, data, optimizer, resume from a checkpoint.
- `outputs`: what the loop writes besides training: evaluation, samples, checkpoints, the adapter export.
- `oom`: the LLM side of the OOM ladder: applying a rung to the live model and data, the chunked loss.
"""
