"""How long BlockManager(num_blocks) takes to build, and what it holds, for pools up to the ~8M blocks
that a small model gets at 0.9 of a 141 GB GPU.

    python benchmarks/block_pool_startup.py [--blocks 344000 8000000]
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time
import tracemalloc

from cupaged.engine.block_manager import BlockManager


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, nargs="+", default=[344_000, 8_000_000])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}")
    print(f"{'blocks':>10} {'build ms (median)':>18} {'min..max':>16} {'Python MiB':>11} {'first 1k allocs ms':>19}")
    for n in args.blocks:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            bm = BlockManager(n, 16)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()
        bm = BlockManager(n, 16)
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        t0 = time.perf_counter()
        for _ in range(1000):
            bm._allocate()
        alloc = time.perf_counter() - t0
        print(f"{n:>10} {statistics.median(times) * 1e3:>18.3f} {min(times) * 1e3:>7.3f}..{max(times) * 1e3:<8.3f} "
              f"{held / 2**20:>11.2f} {alloc * 1e3:>19.3f}")


if __name__ == "__main__":
    main()
