"""Out-of-memory recovery inside a run: catch the error, free memory, lower one setting, retry the step.

- `recovering`: `RecoveringStep`, which both trainers run instead of a bare optimizer step.
- `errors`: telling an out-of-memory error from others; `RestartNeeded`, `OomExhausted`, `EXIT_RESTART`.
- `step_memory`: the simulated card's meter, memory before/at a failure, leak checks, freeing.
- `planner_jump`: the memory planner's verdicts that let the ladder skip rungs, and the "nothing fits" text.
- `rank_exchange`: what the processes of a multi-process run agree on once per attempt.
- `ladder`: which setting to lower next (quality-preserving rungs first).
- `optimizer_swap`: the rung that switches a running AdamW to 8-bit AdamW, keeping its state.
- `record`: what the ladder leaves in the run directory (`oom.json`, the live settings; its only writer).
- `cache`: settings that fitted, per GPU and model, to start the next run from.

The family-specific rung appliers are `loratui.train.sd.oom` and `loratui.train.llm.oom`; several processes
agree on a rung through `loratui.train.process.oom_dist`.
"""
