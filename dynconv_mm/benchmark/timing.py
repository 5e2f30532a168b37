"""Timing and peak-memory measurement (CPU and CUDA).

Times are medians over ``repeats`` runs after ``warmup`` runs that are not counted. On CUDA every
run is bracketed by ``torch.cuda.synchronize``. Peak memory:

* CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at the start of the run;
* CPU: resident-set size sampled every millisecond from ``/proc/self/statm`` by a background thread
  during one run, above the RSS at its start, after asking glibc to return freed memory
  (``malloc_trim``). It is an estimate (allocator caching, other threads), good to ~10%.

Large CPU allocations: glibc maps blocks above a threshold freshly from the kernel (a page fault per
4 KiB page on first write) and moves that threshold up as such blocks are freed, so how much a
computation that allocates fresh tensors pays for page faults depends on the process's history.
:func:`keep_freed_memory` fixes the other end: glibc keeps every freed block for reuse, and nothing
page-faults after the first run (``tools/benchmark/benchmark.py --malloc keep``).
"""
from __future__ import annotations

import ctypes
import os
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

__all__ = ['Timing', 'measure_time', 'measure_interleaved', 'measure_peak_memory', 'synchronize',
           'keep_freed_memory', 'read_bandwidth']


@dataclass
class Timing:
    """Median and spread of repeated runs (seconds)."""

    median: float
    times: List[float]

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def iqr(self) -> float:
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


def synchronize(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def measure_time(fn: Callable[[], object], device: str = 'cpu', warmup: int = 1, repeats: int = 5,
                 min_time: float = 0.0, max_repeats: int = 100) -> Timing:
    """Run ``fn`` ``warmup`` times unmeasured, then ``repeats`` times, and more (up to ``max_repeats``)
    until the timed runs add up to ``min_time`` seconds; median wall time. Cheap calls thus get many
    repeats, which keeps their median stable on a loaded machine."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f'measure_time: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}')
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: List[float] = []
    while len(times) < repeats or (sum(times) < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), times)


def measure_interleaved(fns: Dict[str, Callable[[], object]], device: str = 'cpu', warmup: int = 1, repeats: int = 5,
                        min_time: float = 0.0, max_repeats: int = 100) -> Dict[str, Timing]:
    """:func:`measure_time` for several functions at once, in rounds: each round times one call of every
    function, in an order that rotates from round to round, so slow drifts of the machine (other jobs,
    frequency changes) hit all of them alike and their ratios stay meaningful. Rounds continue until
    every function has ``repeats`` runs and ``min_time`` seconds (or ``max_repeats`` runs)."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f'measure_interleaved: repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}')
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    synchronize(device)
    times: Dict[str, List[float]] = {name: [] for name in names}

    def more() -> bool:
        return any(len(t) < repeats or (sum(t) < min_time and len(t) < max_repeats) for t in times.values())

    shift = 0
    while more():
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            fns[name]()
            synchronize(device)
            times[name].append(time.perf_counter() - t0)
        shift = (shift + 1) % len(names)
    return {name: Timing(statistics.median(t), t) for name, t in times.items()}


_PAGE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def _rss() -> int:
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:  # not Linux: fall back to the peak RSS so far (monotonic, coarser)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):
        pass


def read_bandwidth(device: str = 'cpu', nbytes: int = 256 << 20, repeats: int = 5) -> float:
    """Memory read bandwidth in bytes/s: the median time of summing a float32 tensor of ``nbytes``
    (larger than the caches), warm-up excluded."""
    t = torch.ones(nbytes // 4, device=device)
    timing = measure_time(lambda: t.sum(), device, warmup=1, repeats=repeats)
    return t.numel() * 4 / timing.median


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse in this process: no ``mmap`` for large blocks and no
    trimming of the heap (what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<large>`` in the environment
    does at start-up). Returns ``False`` where the C library is not glibc (nothing changed)."""
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameter numbers (malloc.h)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2 ** 31 - 1))


def measure_peak_memory(fn: Callable[[], object], device: str = 'cpu') -> Optional[int]:
    """Peak extra memory (bytes) of one call of ``fn`` (see the module docstring)."""
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)
    import gc
    gc.collect()
    _trim()
    base = _rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    peak[0] = max(peak[0], _rss())
    return int(peak[0] - base)
