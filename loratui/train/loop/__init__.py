"""The training loop's shared pieces, used by both trainers.

- `plan`: how many optimizer steps a run has and which samples each step (and micro-batch) uses.
- `stepping`: one optimizer step over several micro-batches (gradient accumulation).
- `optim`: optimizers and learning-rate schedules.
- `precision`: mixed precision: resolve `auto`, dtypes of frozen weights.
- `checkpointing`: saving a checkpoint from the loop, with the RNG states.
- `reporting`: `Reporter`: events.jsonl, status.json, TensorBoard scalars, console lines.
- `signals`: `StopRequest`: SIGINT/SIGTERM ask for a checkpoint and a stop; it restores the handlers it replaced.
- `session`: start-up and shut-down shared by the trainers (the stop request and the `Reporter`).
"""
