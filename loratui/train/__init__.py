"""Training: the shared loop pieces (plain functions/classes) and one trainer per model family.

Shared pieces: `seeding` (data order and per-sample randomness), `plan` (optimizer steps and micro-batches),
`stepping` (one accumulated optimizer step), `precision`, `optim`, `checkpointing`, `reporting`, `signals`.
Trainers: `sd_trainer` (Stable Diffusion) and `llm_trainer` (causal LMs). `launch` starts the worker process
(`worker`) that runs a trainer against a run directory.
"""
