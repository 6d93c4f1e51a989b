"""How a loader worker's batches reach the training process.

torch sends a tensor through a multiprocessing queue in shared memory, and the receiving process
then fetches each tensor's file descriptor from the sending worker over a socket connection with an
authentication handshake, which the worker answers only when one of its threads gets the GIL: about
1 ms per tensor on 2 busy cores even when the batch is long ready, 2.4-3.7 ms per image-text batch,
a 10% data wait next to a 25 ms step. Small batches are cheaper to copy: their tensors travel as
numpy arrays through the loader's result pipe, which torch shares among all the loader's workers
and which is enlarged to PIPE_BYTES, room for one batch: while the step runs, a worker writes a
whole batch into it and the training process then reads it in one go (the other workers' next
batches wait in their feeder threads). Batches too large for the pipe are built in shared memory,
as before.
"""
from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.context
import weakref

import torch
from torch.utils.data import get_worker_info

try:
    import fcntl
except ImportError:  # not a POSIX system: pipes keep their size
    fcntl = None

# Linux's default limit for an unprivileged pipe (/proc/sys/fs/pipe-max-size).
PIPE_BYTES = 1 << 20
# The most tensor bytes a batch sends through the pipe: the rest of PIPE_BYTES is room for the
# pickle's framing (a few hundred bytes per array) and the batch's keys, captions and counters.
TENSOR_BUDGET = PIPE_BYTES - (64 << 10)
# Key of the names for_pipe turned into arrays; from_pipe removes it.
PIPED = "__piped__"
# Tensor dtypes numpy represents (bfloat16 and the float8s it does not).
_NUMPY_DTYPES = frozenset({torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                           torch.float16, torch.float32, torch.float64, torch.complex64, torch.complex128})

log = logging.getLogger(__name__)
_refusal_logged = False


def _in_memory_order(value: torch.Tensor) -> torch.Tensor:
    """The tensor with its dimensions permuted into memory order (largest stride first)."""
    return value.permute(sorted(range(value.dim()), key=lambda d: -value.stride(d)))


def _dense(value: torch.Tensor) -> bool:
    """Whether the tensor's elements fill a block of memory without gaps or overlaps (contiguous,
    or a permutation of contiguous such as the log-mel's transposed view)."""
    return _in_memory_order(value).is_contiguous()


def _pipeable(value) -> bool:
    """Whether `value` is a tensor that goes through the pipe as a numpy array with its exact dtype,
    shape and strides: a dense CPU tensor of a numpy dtype, not in shared memory."""
    return (isinstance(value, torch.Tensor) and value.dtype in _NUMPY_DTYPES and value.device.type == "cpu"
            and value.layout == torch.strided and not value.requires_grad and not value.is_conj()
            and not value.is_neg() and not value.is_shared() and _dense(value))


def _pipe_bytes(batch: dict) -> int:
    return sum(v.nbytes for v in batch.values() if _pipeable(v))


def build_shared(batch: dict, nbytes: int) -> bool:
    """Whether a tensor of `nbytes` that a collate function is about to add to `batch` is built in
    shared memory: in a loader worker, when with the batch's other pipeable tensors it would exceed
    TENSOR_BUDGET (the rule for_pipe applies to the finished batch)."""
    return get_worker_info() is not None and _pipe_bytes(batch) + nbytes > TENSOR_BUDGET


def _memory(value: torch.Tensor):
    """The tensor's block of memory as a flat numpy array, in memory order (no copy)."""
    return _in_memory_order(value).reshape(-1).numpy()


def for_pipe(batch: dict) -> dict:
    """In a worker: the batch's pipeable tensors as flat numpy arrays of their memory (pickled into
    the pipe) when together they fit TENSOR_BUDGET, their shapes and strides under PIPED; otherwise
    the batch as it is (torch then moves its tensors to shared memory). Other tensors (bfloat16,
    already shared, ...) always take torch's route."""
    names = [k for k, v in batch.items() if _pipeable(v)]
    if not names or sum(batch[k].nbytes for k in names) > TENSOR_BUDGET:
        return batch
    layouts = {k: (tuple(batch[k].shape), batch[k].stride()) for k in names}
    return {**batch, **{k: _memory(batch[k]) for k in names}, PIPED: layouts}


def from_pipe(batch: dict) -> dict:
    """In the training process: the arrays for_pipe made back to the tensors it was given (no copy)."""
    if PIPED not in batch:
        return batch
    layouts = batch[PIPED]
    return {k: torch.from_numpy(v).as_strided(*layouts[k]) if k in layouts else v
            for k, v in batch.items() if k != PIPED}


def as_sent(batch: dict) -> dict:
    """The DataLoader's collate_fn: the batch as the worker made it. The processors' collate
    already returns tensors, so torch's default_convert would have nothing to convert; it would
    only turn for_pipe's arrays back into tensors in the worker."""
    return batch


def _enlarge(queue) -> None:
    global _refusal_logged
    try:
        fcntl.fcntl(queue._writer.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as error:  # above pipe-max-size (EPERM), or this user's pipe quota is spent
        if not _refusal_logged:
            _refusal_logged = True
            log.warning("the kernel refused to enlarge the data loader's result pipe to %d bytes (%s; see "
                        "/proc/sys/fs/pipe-max-size and pipe-user-pages-soft): batches pass through it in "
                        "parts, more slowly", PIPE_BYTES, error)


def large_pipe_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context `method` (default: the default one) for a DataLoader, whose
    result queue's pipe holds PIPE_BYTES where the OS allows (Linux; elsewhere, or above the
    system's pipe-max-size, it keeps its size: batches then pass through it in parts, more slowly).
    The workers' index queues keep the default size: Linux charges every pipe's full size to the
    user's pipe quota, and a user over it gets small pipes everywhere."""
    base = multiprocessing.get_context(method)
    if fcntl is None or not hasattr(fcntl, "F_SETPIPE_SZ"):
        return base
    return _with_result_pipe(type(base))()


class _ResultPipeQueues:
    """torch's _MultiProcessingDataLoaderIter creates its one result queue and right after it the
    workers' done Event; each index queue is followed by its worker's Process. So the queue made
    just before an Event is the result queue, enlarged there."""

    _last_queue = None

    def Queue(self, maxsize: int = 0):
        queue = super().Queue(maxsize)
        self._last_queue = weakref.ref(queue)
        return queue

    def Event(self):
        queue = self._last_queue() if self._last_queue is not None else None
        self._last_queue = None
        if queue is not None:
            _enlarge(queue)
        return super().Event()


@functools.cache
def _with_result_pipe(context_type: type) -> type:
    return type(f"ResultPipe{context_type.__name__}", (_ResultPipeQueues, context_type), {})
