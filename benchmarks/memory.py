"""Peak memory of a region: CUDA allocator statistics, or the process's resident set on CPU.

CPU memory and glibc: by default freed blocks stay in glibc's heap (and its mmap threshold grows
after frees), so the RSS peak partly measures fragmentation. With EXACT_MALLOC_ENV set at process
start every allocation of 64 KiB or more is its own mapping, unmapped when freed, and the RSS
peak is the live-tensor peak (slower: page faults).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from typing import Optional


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# glibc tunables read at process start: a fixed mmap threshold (which also stops glibc from raising
# it after frees) makes every tensor its own mapping, unmapped when freed.
EXACT_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _hwm_bytes() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS so the baseline RSS is the live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory over a region: CUDA allocator stats, else Linux VmHWM (reset through
    /proc/self/clear_refs), else a sampling thread reading /proc/self/statm."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = ""
        self._sampler: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            self.kind = "cuda max_memory_allocated"
            return self
        _malloc_trim()
        self.base = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.kind = "rss (VmHWM)"
        except OSError:
            self.kind = "rss (sampled every 2 ms)"
            self._sampled = self.base
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._sampled = max(self._sampled, _rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak = max(self._sampled, _rss_bytes())
        else:
            self.peak = _hwm_bytes() or _rss_bytes()
