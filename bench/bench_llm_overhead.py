"""Trainer overhead: loratui's LLM trainer vs a bare transformers + peft loop, same model, data and batches.

    python bench/bench_llm_overhead.py                    # small random Llama (~7M params), 3 repeats
    python bench/bench_llm_overhead.py --repeats 5 --steps 30

All sides train the same LoRA (q,k,v,o; rank 16) on the same tokenized micro-batches in the same order
(loratui's data pipeline tokenizes once, outside the timing). The bare loop is forward, loss, backward,
clip, AdamW step, scheduler step, zero_grad: no events, no status file, no TensorBoard, no accelerate. It runs
twice: with the model's own loss (`labels=`, what most scripts do) and with loratui's loss (cross-entropy
summed over target tokens / target tokens of the step), which isolates the trainer's overhead. Runs are
interleaved (each repeat runs every variant, starting with a different one) so machine load affects all alike.
tokens/s counts real (non-padding) tokens per step (from consecutive step end times) after the first step
(warm-up); the figure per variant is the median over all its steps and repeats. Besides wall-clock tokens/s,
tokens per process-CPU-second are reported: on a shared machine other processes inflate wall time at random,
while CPU time (with one torch thread) measures the work each loop does. The overhead ratio is
loratui / bare-same-loss (target >= 0.97).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench_llm_common import build_model, job_for, machine, step_rates, write_dataset


def _config(work: Path, model: Path, data: Path, steps: int, tag: str) -> dict:
    return {
        "task_type": "text-generation",
        "base_model": str(model),
        "train_data_dir": str(data),
        "output_dir": str(work / f"out-{tag}"),
        "runs_dir": str(work / "runs"),
        "lora_rank": 16,
        "learning_rate": 1e-4,
        "batch_size": 4,
        "max_steps": steps,
        "max_seq_len": 256,
        "mixed_precision": "no",
        "seed": 0,
    }


def run_loratui(values: dict) -> dict[str, list[float]]:
    from loratui.runs.events import read_events
    from loratui.train.llm.trainer import run_training

    job = job_for(values)
    run_training(job, console=False)
    events = read_events(job.run.events_path)
    return {"wall": step_rates(events), "cpu": step_rates(events, clock="process_cpu_s")}


def run_bare(values: dict, same_loss: bool = False) -> dict[str, list[float]]:
    """The same training with nothing but transformers + peft + torch: the model's own loss (`labels=`), or
    with `same_loss` the token-sum cross-entropy over target positions that loratui uses."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loratui.models.llm.batches import build_llm_data, collate
    from loratui.train.loop.plan import StepPlan, split_micro_batches

    tok = AutoTokenizer.from_pretrained(values["base_model"], local_files_only=True)
    data = build_llm_data(values["train_data_dir"], tok, tok.chat_template, max_seq_len=values["max_seq_len"])
    model = AutoModelForCausalLM.from_pretrained(values["base_model"], local_files_only=True)
    model.config.use_cache = False
    torch.manual_seed(values["seed"])
    model = get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM",
        ),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=values["learning_rate"], weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    plan = StepPlan(len(data.train), values["batch_size"], 1, values["max_steps"], values["seed"])
    model.train()
    times, cpu, tokens = [], [], []
    for _, _, indices in plan.iter_steps():
        for micro in split_micro_batches(indices, values["batch_size"]):
            batch = collate([data.train[i] for i in micro], tok.pad_token_id)
            if same_loss:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
                labels = batch.labels[:, 1:]
                keep = labels != -100
                loss = (
                    F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum") / batch.num_targets
                )
            else:
                loss = model(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels
                ).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.time())
        cpu.append(time.process_time())
        tokens.append(sum(len(data.train[i].input_ids) for i in indices))
    return {
        clock: [n / (b - a) for n, a, b in zip(tokens[1:], stamps, stamps[1:], strict=False)]
        for clock, stamps in (("wall", times), ("cpu", cpu))
    }


def reporter_cost(work: Path, calls: int = 50) -> float:
    """Wall-clock seconds per `Reporter.step` call (event line, status.json with fsync, TensorBoard scalars):
    the per-step bookkeeping that CPU time alone would not show when it waits for the disk."""
    from loratui.runs.rundir import create_run_dir
    from loratui.train.loop.reporting import Reporter

    reporter = Reporter(create_run_dir(work / "runs", "reporter-cost"), calls + 1, console=False)
    reporter.started()
    reporter.step(1, 0, 1.0, 1e-4, 4)  # first call opens the TensorBoard writer
    start = time.perf_counter()
    for step in range(2, calls + 2):
        reporter.step(
            step, 0, 1.0, 1e-4, 4, grad_norm=0.5, tokens=512, tokens_per_s=1000.0, target_tokens=100
        )
    elapsed = (time.perf_counter() - start) / calls
    reporter.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samples", type=int, default=80)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--work", type=Path, default=None, help="folder for model/data (default: a temp dir)")
    args = parser.parse_args()

    import warnings

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        work = args.work or Path(tmp)
        model = build_model(work / "model-small", "small")
        data = write_dataset(work / "data.jsonl", args.samples)
        runners = {
            "bare": run_bare,
            "bare-same-loss": lambda v: run_bare(v, same_loss=True),
            "loratui": run_loratui,
        }
        rates: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runners}
        order = list(runners)
        for r in range(args.repeats):
            for name in order[r % 3 :] + order[: r % 3]:  # rotate who goes first
                values = _config(work, model, data, args.steps, f"{name}-{r}")
                got = runners[name](values)
                for clock in ("wall", "cpu"):
                    rates[name][clock].extend(got[clock])
                print(
                    f"repeat {r + 1} {name:15s} median {statistics.median(got['wall']):8.0f} tokens/s wall, "
                    f"{statistics.median(got['cpu']):8.0f} tokens per CPU-s",
                    flush=True,
                )
        print(f"machine: {machine()}")
        cost = reporter_cost(work)
        step_s = 4 * 128 / statistics.median(rates["loratui"]["cpu"])
        print(
            f"Reporter.step: {cost * 1000:.2f} ms wall per step (~{100 * cost / step_s:.1f}% of a "
            f"~{step_s * 1000:.0f} ms step of this model)"
        )
        for clock, label in (("wall", "tokens/s (wall clock)"), ("cpu", "tokens per process CPU second")):
            med = {name: statistics.median(values[clock]) for name, values in rates.items()}
            print(f"median {label}: " + ", ".join(f"{k} {v:.0f}" for k, v in med.items()))
            print(
                f"  ratio loratui / bare-same-loss = {med['loratui'] / med['bare-same-loss']:.3f} (trainer overhead); "
                f"loratui / bare (model's own loss) = {med['loratui'] / med['bare']:.3f}"
            )


if __name__ == "__main__":
    main()
