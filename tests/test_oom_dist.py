"""Several processes agree on the OOM rung: a 2-process gloo group on the CPU (bounded by timeouts)."""

from __future__ import annotations

import json
import socket
import time
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from loratui.train.process.oom_dist import agree_max, any_rank, world_size

TIMEOUT_S = 120


class _Accelerator:
    """What `optimizer_step` needs from accelerate, for one plain process of a gloo group."""

    num_processes = 1  # no DDP wrapper here: every micro-batch syncs nothing
    device = torch.device("cpu")
    scaler = None

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()


class _Events:
    def __init__(self) -> None:
        self.items: list[dict] = []

    def event(self, type: str, step: int | None = None, **fields) -> None:
        self.items.append({"type": type, "step": step, **fields})


def _rank_main(rank: int, world: int, port: int, out_dir: str, side_group: bool = False) -> None:
    import os

    import torch.distributed as dist

    from loratui.config import ResolvedConfig, TrainConfig
    from loratui.runs.rundir import create_run_dir
    from loratui.train.oom.recovering import RecoveringStep

    os.environ["LORATUI_CACHE_DIR"] = str(Path(out_dir) / f"cache{rank}")
    os.environ["LORATUI_OOM_PLANNER"] = "0"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    if side_group:  # as with NCCL training: the small per-step collectives go through a group of their own
        from loratui.train.process.distributed import CONTROL

        CONTROL.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=60))
    try:
        result = {
            "world": world_size(),
            "max": agree_max(rank * 10 + 3),
            "any_false": any_rank(False),
            "any_one": any_rank(rank == 1),
        }
        cfg = TrainConfig(task_type="text-generation", model_family="llm", batch_size=4, runs_dir=out_dir)
        run = create_run_dir(Path(out_dir) / f"rank{rank}", "toy")
        job = SimpleNamespace(run=run, resolved=ResolvedConfig(cfg, {}, "llm"))
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        events = _Events()
        step = RecoveringStep(
            job,
            events,
            accelerator=_Accelerator(),
            optimizer=optimizer,
            scheduler=scheduler,
            params=list(model.parameters()),
            max_grad_norm=None,
            model=model,
        )
        data = torch.arange(32, dtype=torch.float32).reshape(8, 4)
        sizes: list[int] = []

        def micro_loss(batch):
            sizes.append(len(batch))
            if rank == 0 and len(batch) > 2:  # only rank 0's card is too small for 4 samples
                raise torch.OutOfMemoryError("CUDA out of memory (rank 0)")
            return model(data[list(batch)]).sum() / 4

        step.run(1, [0, 1, 2, 3], micro_loss)
        step.run(2, [4, 5, 6, 7], micro_loss)
        result.update(
            batch_size=cfg.batch_size,
            accumulation=cfg.gradient_accumulation_steps,
            sizes=sizes,
            events=[(e["type"], e.get("rung")) for e in events.items],
            weight=model.weight.tolist(),
        )
        (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        from loratui.train.process.distributed import finish

        finish()  # the worker's own end: barrier on the control group, close every group, forget the side group


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_one_process_is_a_no_op() -> None:
    assert world_size() == 1 and agree_max(7) == 7 and any_rank(True) and not any_rank(False)


@pytest.mark.parametrize("side_group", [False, True], ids=["default-group", "control-group"])
def test_two_processes_agree_on_the_rung(tmp_path: Path, side_group: bool) -> None:
    import torch.multiprocessing as mp

    context = mp.start_processes(
        _rank_main,
        args=(2, _free_port(), str(tmp_path), side_group),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.time() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            if time.time() > deadline:
                pytest.fail("the 2-process group did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["world"] == 2 and result["max"] == 13
        assert result["any_false"] is False and result["any_one"] is True
        # both ranks abandoned step 1 (rank 1 because rank 0 ran out of memory) and retried with 2 x 2
        assert (result["batch_size"], result["accumulation"]) == (2, 2)
        assert result["events"] == [["oom", "micro_batch"], ["oom_recovered", "micro_batch"]]
    assert results[0]["sizes"] == [4, 2, 2, 2, 2] and results[1]["sizes"] == [4, 2, 2, 2, 2]
    assert results[0]["weight"] == results[1]["weight"]  # the same updates on both ranks
