"""Training, one folder per question a reader asks.

- `loop/`: the pieces both trainers share (step plan, accumulated optimizer step, checkpoints, reporting,
  stop signals, optimizers, precision, start-up and shut-down).
- `sd/`, `flux/`, `llm/`: one trainer per model family (SD 1.x/2.x/XL; FLUX.1 and Chroma; text models): its
  setup, its loop and its side of the OOM ladder.
- `oom/`: out-of-memory recovery inside a run (`RecoveringStep`, the ladder, what it records and caches).
- `process/`: the worker and supervisor processes, the launcher of one or several processes, preflight.
- `job.py`: `WorkerJob`, what a trainer is handed (run directory and resolved config).
- `memory_check/`: development only: the memory planner's predictions against the trainers' real step.

The model pieces without a loop (loading, LoRA injection, losses, SD conditioning) are in `loratui.models`.
"""
