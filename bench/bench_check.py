"""Benchmark `loratui check` on a generated image dataset (default: 10,000 512x512 PNG/JPEG + captions).

    python bench/bench_check.py                 # generate in a temp dir, check, delete
    python bench/bench_check.py --keep /tmp/ds  # generate once into /tmp/ds (reused on later runs)
    python bench/bench_check.py --deep          # time --deep as well

Half of the images are PNG, half JPEG (quality 90); each has a .txt caption. Pictures are smooth colour
fields plus mild noise so file sizes resemble photos (PNG ~0.5-0.8 MB, JPEG ~0.1 MB). The check runs
in-process through `loratui.data.check.run_checks`, exactly what `loratui check PATH` calls.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 512
_NOISE: list[np.ndarray] = []


def _noise(i: int) -> np.ndarray:
    """One of 16 precomputed mild noise fields (per worker process)."""
    if not _NOISE:
        rng = np.random.default_rng(12345)
        _NOISE.extend(rng.normal(0, 6, (SIZE, SIZE, 3)).astype(np.int16) for _ in range(16))
    return _NOISE[i % 16]


def _make(args: tuple[Path, int]) -> int:
    root, i = args
    rng = np.random.default_rng(i)
    grid = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB").resize(
        (SIZE, SIZE), Image.Resampling.BICUBIC
    )
    arr = np.asarray(grid, dtype=np.int16) + _noise(i)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    sub = root / "10_subject" if i % 4 else root
    if i % 2:
        path = sub / f"img_{i:05d}.jpg"
        im.save(path, quality=90)
    else:
        path = sub / f"img_{i:05d}.png"
        im.save(path, compress_level=1)
    (sub / f"img_{i:05d}.txt").write_text(f"mychar, a photo, tag{i % 50}, detail {i % 7}\n", encoding="utf-8")
    return path.stat().st_size


def generate(root: Path, n: int) -> int:
    """Write n images with captions under root; returns total image bytes."""
    (root / "10_subject").mkdir(parents=True, exist_ok=True)
    with Pool(os.cpu_count() or 2) as pool:
        return sum(pool.imap_unordered(_make, [(root, i) for i in range(n)], chunksize=64))


def _count_images(root: Path) -> int:
    return sum(1 for p in root.rglob("*") if p.suffix in (".png", ".jpg"))


def run(root: Path, deep: bool) -> tuple[float, float, object]:
    """Time one in-process check: (wall seconds, CPU seconds of this process, report)."""
    from loratui.data.check import run_checks

    start, cpu = time.perf_counter(), time.process_time()
    report = run_checks(root, resolution=512, batch_size=1, deep=deep)
    return time.perf_counter() - start, time.process_time() - cpu, report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10_000, help="Number of images (default 10000).")
    parser.add_argument("--keep", type=Path, default=None, help="Generate into / reuse this folder.")
    parser.add_argument("--deep", action="store_true", help="Also time --deep (decodes every image).")
    parser.add_argument("--repeat", type=int, default=2, help="Timed runs in default mode (default 2).")
    args = parser.parse_args(argv)

    root = args.keep or Path(tempfile.mkdtemp(prefix="loratui-bench-"))
    try:
        if _count_images(root) != args.n:
            shutil.rmtree(root, ignore_errors=True)
            start = time.perf_counter()
            total = generate(root, args.n)
            print(f"generated {args.n} images ({total / 1e9:.2f} GB) in {time.perf_counter() - start:.1f} s")
        print(f"python {sys.version.split()[0]}, {platform.machine()}, {os.cpu_count()} CPU cores")
        modes = [False] * args.repeat + ([True] if args.deep else [])
        for deep in modes:
            seconds, cpu, report = run(root, deep)
            n = report.summary["images"]  # type: ignore[attr-defined]
            codes = sorted(report.codes())  # type: ignore[attr-defined]
            print(
                f"{'deep' if deep else 'default'}: {n} files in {seconds:.2f} s = {n / seconds:.0f} files/s, "
                f"{cpu:.1f} CPU-s, load average {os.getloadavg()[0]:.1f} "
                f"(exit code {report.exit_code}; findings: {', '.join(codes)})"  # type: ignore[attr-defined]
            )
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
