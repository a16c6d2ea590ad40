"""Memory planner per optimizer: predicted vs metered peak of the SD and LLM trainers' real step on the CPU.

    python bench/bench_optimizers.py [--json results.json]

For the tiny SD1.5 pipeline and the tiny Llama (random weights, built offline), each optimizer (adamw, prodigy,
adafactor, schedulefree_adamw, came, lion) is set up by the real trainer (rank 8, 64 px / 64 tokens, no
checkpointing, effective batch 4 as 2 x 2) and measured with `MemoryMeter` over two optimizer steps, against
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

OPTIMIZERS = ("adamw", "prodigy", "adafactor", "schedulefree_adamw", "came", "lion")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ["LORATUI_CACHE_DIR"] = tempfile.mkdtemp()
    from loratui.tiny_models import build_tiny_llama, build_tiny_sd
    from loratui.train.memory_check.accuracy import session_rows
    from loratui.train.memory_check.realstep import write_image_dataset

    work = Path(tempfile.mkdtemp())
    sd, llama = build_tiny_sd(work / "sd15", "sd15"), build_tiny_llama(work / "llama")
    images = write_image_dataset(work / "images", 4, 64)
    rows = []
    for name in OPTIMIZERS:
        for row in session_rows(
            "tiny-sd15", "sd", "sd15", sd, images, 64, False, 8, batches=(2,), optimizer=name
        ):
            rows.append({"optimizer": name, **row.to_dict()})
        for row in session_rows(
            "tiny-llama", "llm", "llm", llama, work, 64, False, 8, batches=(2,), optimizer=name
        ):
            rows.append({"optimizer": name, **row.to_dict()})
    print("| optimizer | model | measured (B) | predicted (B) | error |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['model']} | {r['measured']} | {r['predicted']} | {r['error']:+.2%} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
