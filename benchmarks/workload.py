"""The handlers' work, identical in every variant: a fixed CPU loop, awaited I/O, a stream.

The loop count is calibrated once by the harness (`calibrate`) and handed to every service
through `BENCH_CPU_LOOPS`, so all variants burn exactly the same instructions.
"""

from __future__ import annotations

import os
import statistics
import time

IO_SECONDS = 0.002  # the realistic handler's awaited I/O
CPU_SECONDS = 0.0005  # ... and its CPU, as calibrated
STREAM_CHUNKS = 16
CHUNK = b"x" * 1024

LOOPS = int(os.environ.get("BENCH_CPU_LOOPS", "10000"))


def burn(loops: int = LOOPS) -> int:
    """Pure-Python CPU work: `loops` multiply-adds."""
    total = 0
    for i in range(loops):
        total += i * i
    return total


def calibrate(target: float = CPU_SECONDS) -> int:
    """The loop count whose median thread CPU time is `target` seconds, here and now."""
    loops = 10_000
    for _ in range(3):
        samples = []
        for _ in range(41):
            start = time.thread_time()
            burn(loops)
            samples.append(time.thread_time() - start)
        loops = max(1, round(loops * target / statistics.median(samples)))
    return loops
