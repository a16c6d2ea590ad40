"""Development tools of the memory planner; the product never imports them.

- `calibrate`: regenerates the shipped tables (`arch_configs/tables/NAME.json`):
  `python -m loratui.memory.dev.calibrate [NAME ...]`.

The check of predictions against the trainers' real step lives in `loratui.train.memory_check` (it runs the
trainers' code, which sits above the planner).
"""
