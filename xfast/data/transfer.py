"""How a loader worker's batches reach the training process.

torch sends a tensor through a multiprocessing queue in shared memory, and the receiving process
then fetches each tensor's file descriptor from the sending worker over a socket connection with an
authentication handshake, which the worker answers only when one of its threads gets the GIL: about
1 ms per tensor on 2 busy cores even when the batch is long ready, 2.4-3.7 ms per image-text batch,
a 10% data wait next to a 25 ms step. Small batches are cheaper to copy: their tensors travel as
numpy arrays through the worker's result pipe, enlarged to PIPE_BYTES, so the worker writes a whole
batch while the step runs and the training process reads it in one go. Tensors too large for the
pipe are built in shared memory, as before.
"""
from __future__ import annotations

import fcntl
import multiprocessing

import numpy as np
import torch
from torch.utils.data import get_worker_info

# Linux's default limit for an unprivileged pipe (/proc/sys/fs/pipe-max-size).
PIPE_BYTES = 1 << 20


def build_shared(nbytes: int) -> bool:
    """Whether a batch tensor of `nbytes` is built in shared memory: in a loader worker, when it is
    too large for the pipe."""
    return get_worker_info() is not None and nbytes > PIPE_BYTES


def for_pipe(batch: dict) -> dict:
    """In a worker: the batch's tensors that are not in shared memory as numpy arrays (pickled into
    the pipe) when together they fit in it; otherwise the batch as it is (torch then moves them to
    shared memory)."""
    small = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor) and not v.is_shared()}
    if sum(v.nbytes for v in small.values()) > PIPE_BYTES:
        return batch
    return {**batch, **{k: v.numpy() for k, v in small.items()}}


def from_pipe(batch: dict) -> dict:
    """In the training process: the arrays back to tensors (no copy)."""
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def as_sent(batch: dict) -> dict:
    """The DataLoader's collate_fn: the batch as the worker made it (torch's default would turn the
    arrays back into tensors in the worker)."""
    return batch


def large_pipe_context() -> multiprocessing.context.BaseContext:
    """The default multiprocessing context, its queues' pipes holding PIPE_BYTES where the OS allows
    (Linux; elsewhere, or above the system's pipe-max-size, pipes keep their size: batches then
    pass through them in parts, more slowly)."""
    base = multiprocessing.get_context()

    class LargePipes(type(base)):
        def Queue(self, maxsize: int = 0):
            queue = super().Queue(maxsize)
            try:
                fcntl.fcntl(queue._writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except (AttributeError, OSError):
                pass
            return queue

    return LargePipes()
