"""Wall time, peak GPU memory and peak process RSS of a stage, recorded in its manifest."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch


class Usage:
    def __init__(self):
        self.start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def snapshot(self) -> dict[str, float]:
        """RSS is the process's peak so far: run stages as separate commands for per-stage figures."""
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0
        return {
            "seconds": round(time.perf_counter() - self.start, 2),
            "peak_gpu_mb": round(gpu, 1),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


def peak_rss_mb() -> float:
    """VmHWM is this process image's own peak; ru_maxrss survives exec and may be the parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
