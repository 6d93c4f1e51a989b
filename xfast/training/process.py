"""Process-wide settings of a training process: torch's thread count, how glibc's malloc
returns freed memory, and which objects Python's garbage collector examines. The Trainer sets
them once, before its loaders fork their workers (forked workers inherit the malloc settings;
workers started by spawn or forkserver would not)."""
from __future__ import annotations

import ctypes
import gc
import os
import sys

MALLOC_ENV = "XFAST_MALLOC"  # "default": leave glibc's malloc settings as they are
# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_GLIBC_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process for the next step; True if it was set.

    By default glibc serves each block above its mmap threshold (128 KiB, growing to at most 32 MiB)
    with a fresh mmap and unmaps it on free, and gives the top of the heap back to the OS once
    128 KiB of it are free. A training step frees its activations and gradients and allocates
    them again at the next step, so every step faults their pages in anew (minor page faults,
    kernel time; counted by benchmarks/bench_train.py). Here blocks up to 1 GiB come from the heap
    and freed memory is kept up to 2 GiB, so after the first steps a step reuses its pages. The cost:
    the process keeps its peak heap (up to 2 GiB more than it uses at a time, per malloc arena)
    instead of shrinking between steps, and so does each forked loader worker. Nothing is done off
    Linux/glibc, when XFAST_MALLOC=default, or when the user set one of glibc's own
    MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_, MALLOC_MMAP_THRESHOLD_ or a glibc.malloc tunable in
    GLIBC_TUNABLES (theirs win)."""
    if (os.environ.get(MALLOC_ENV, "").lower() == "default" or any(k in os.environ for k in _GLIBC_MALLOC_ENV)
            or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or not sys.platform.startswith("linux")):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError off glibc (musl, macOS)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt takes an int: 2**31 - 1 is its largest trim threshold (bytes)
    settings = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20))
    return all([mallopt(param, value) == 1 for param, value in settings])


def torch_threads(local_ranks: int, loader_workers: int) -> int:
    """Threads for torch in each of `local_ranks` ranks on this machine: the cores this process may
    run on, shared between the ranks, less one per loader worker of the rank (they decode and
    collate while the step runs), at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_ranks) - loader_workers)


def freeze_objects_before_fork() -> None:
    """Collect garbage once, then leave every object alive now out of the garbage collector's
    later passes (gc.freeze). Call it when the model, engine and loaders are built, right before
    the loaders fork their workers.

    A forked worker shares the training process's memory pages until one side writes to one,
    which then faults in a copy (a minor page fault). CPython's full collection (generation 2,
    every few dozen steps at the tiny sizes) writes into the header of every object it examines,
    so the first one after a fork copies every page holding Python objects: about 27,000 faults
    and 0.45 s in one step of tiny CLIP at ZeRO-2, which made a 30-step benchmark round show
    ~900 faults per step or ~20 depending on whether that collection fell into it. Frozen objects
    (imported modules, the model's and DeepSpeed's objects) are not examined again, so no page is
    copied and later full collections are cheap. The cost: a reference cycle among objects alive
    now is never freed if it becomes garbage later (gc.unfreeze() undoes it), so only a process
    that runs one training run calls it (xfast.train's entry point, the benchmarks), not the
    Trainer class."""
    gc.collect()
    gc.freeze()
