"""The processes of a run: started detached, supervised, one or several workers.

- `launch`: prepare the run directory and start the supervisor (returns data; `loratui.cli.launch` prints).
- `supervisor`: `python -m loratui.train.process.supervisor RUN_DIR`: runs the worker, restarts it after an
  out-of-memory restart request or a crash, from the last checkpoint.
- `launcher`: how the supervisor starts the worker: one bare process, or accelerate's launcher for several.
- `worker`: `python -m loratui.train.process.worker RUN_DIR`: runs the trainer of the config's family.
- `distributed`: what changes inside the loop with several processes (process groups, the per-step exchange,
  a dead peer); `batches`: how one step's samples are spread over them.
- `oom_dist`: every process retries with the same OOM rung.
- `preflight`: the checks run before a worker starts (the dataset check of `loratui check`).
"""
