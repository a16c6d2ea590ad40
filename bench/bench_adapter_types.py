"""Memory planner per SD adapter type: predicted vs metered peak of the SD trainer's real step on the CPU.

    python bench/bench_adapter_types.py [--json results.json]

For the tiny SD1.5 fixture (random weights, built offline), each adapter type (lora, locon, loha, lokr, dora)
is set up by the real SD trainer (rank 8, 64 px, no checkpointing, effective batch 4) and measured with
`MemoryMeter` at micro-batch 4 x 1 and 1 x 4 (two optimizer steps each), against
`estimate_peak(config, device="cpu")` calibrated from an empty fit cache. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TYPES = ("lora", "locon", "loha", "lokr", "dora")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LORATUI_CACHE_DIR"] = str(root / "cache")
        from loratui.tiny_models import build_tiny_sd
        from loratui.train.memory_check.accuracy import session_rows
        from loratui.train.memory_check.realstep import write_image_dataset
        from loratui.util.sizes import format_bytes

        base = build_tiny_sd(root / "sd15", "sd15")
        data = write_image_dataset(root / "images", 4, 64)
        results = []
        print("| network_type | micro-batch x accum | metered | predicted | error |")
        print("|---|---|---|---|---|")
        for kind in TYPES:
            rows = session_rows(
                "tiny-sd15", "sd", "sd15", base, data, 64, False, 8, batches=(4, 1), network_type=kind
            )
            for row in rows:
                results.append({"network_type": kind, **row.to_dict()})
                print(
                    f"| {kind} | {row.batch} x {row.accumulation} | {format_bytes(row.measured)} | "
                    f"{format_bytes(row.predicted)} | {row.error:+.2%} |"
                )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
