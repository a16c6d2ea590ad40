"""`loratui --help` start-up: wall time and heavy imports.

Runs the installed console script (the real entry point, not a shell shim) N times and reports the median and
max wall time, the median CPU time (user + system: what a busy shared machine does not inflate), and lists any
heavy module imported (`python -X importtime`). Bound: median wall time <= 0.3 s, no heavy module.

    python bench/bench_cli_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

HEAVY = ("torch", "diffusers", "transformers", "peft", "textual", "accelerate")
BOUND_S = 0.3


def entry_point() -> list[str]:
    """The console script installed next to this interpreter, else `python -m loratui`."""
    script = Path(sysconfig.get_path("scripts")) / "loratui"
    if script.is_file():
        return [sys.executable, str(script)]
    found = shutil.which("loratui")
    return [found] if found else [sys.executable, "-m", "loratui"]


def heavy_imports(command: list[str]) -> list[str]:
    """Top-level packages from HEAVY that `command --help` imports."""
    script = command[1:] if command[0] == sys.executable else command  # a console script is a Python file
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *script, "--help"], capture_output=True, text=True, check=True
    )
    found = set()
    for line in proc.stderr.splitlines():
        if "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name.split(".")[0] in HEAVY:
                found.add(name.split(".")[0])
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    command = entry_point()
    subprocess.run([*command, "--help"], capture_output=True, check=True)  # warm the file cache
    times, cpu_times = [], []
    for _ in range(args.runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([*command, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu_times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    result = {
        "command": " ".join(command) + " --help",
        "runs": args.runs,
        "median_s": round(statistics.median(times), 3),
        "max_s": round(max(times), 3),
        "cpu_median_s": round(statistics.median(cpu_times), 3),
        "heavy_imports": heavy_imports(command),
        "bound_s": BOUND_S,
    }
    result["ok"] = result["median_s"] <= BOUND_S and not result["heavy_imports"]
    print(json.dumps(result, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
