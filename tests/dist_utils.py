"""Starting a small gloo process group on CPU for the distributed tests.

Ranks are real processes started through multiprocessing's fork server: one server process,
started at the first use, imports torch, DeepSpeed, transformers and the test helpers once
(PRELOAD) and forks every rank from there, so a rank starts in a fraction of a second instead of
paying those imports (several seconds on 2 cores) as a spawned interpreter does. The server
never runs a torch op, so no thread pool is copied into a rank. Its environment is the one of
the first use and its output goes where the output of the first use went: each rank gets the
caller's current environment and stdout/stderr instead (`_Caller`).
"""
from __future__ import annotations

import datetime
import gc
import os
from multiprocessing import reduction

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xfast.distributed.rendezvous import free_port

# Spawned ranks share the machine's cores with each other and with CI.
THREADS_PER_RANK = 1
# What the ranks of the distributed tests import; anything else is imported by each rank.
PRELOAD = ["torch", "torch.distributed", "tests.dist_utils", "tests.loss_cases", "tests.model_cases",
           "xfast.distributed", "xfast.models", "xfast.training.engine", "xfast.training.accumulation"]
START_METHOD = "forkserver"
mp.get_context(START_METHOD).set_forkserver_preload(PRELOAD)


class _Caller:
    """The caller's environment and stdout/stderr, handed to a rank (the descriptors are passed
    through the server's connection when the rank is started, as multiprocessing passes its own)."""

    def __init__(self):
        self.env = dict(os.environ)

    def __reduce__(self):
        return _Caller._restore, (self.env, reduction.DupFd(1), reduction.DupFd(2))

    @staticmethod
    def _restore(env: dict[str, str], stdout, stderr) -> dict[str, str]:
        for target, passed in ((1, stdout), (2, stderr)):
            fd = passed.detach()
            os.dup2(fd, target)
            os.close(fd)
        os.environ.clear()
        os.environ.update(env)
        return env


def _as_caller(rank: int, caller, fn, args) -> None:
    fn(rank, *args)


def start_ranks(fn, args: tuple, nprocs: int, *, join: bool = True):
    """torch.multiprocessing.spawn(fn, args, nprocs, join) with the ranks forked from the preloaded
    server; each runs fn(rank, *args) with the caller's environment, stdout and stderr."""
    return mp.start_processes(_as_caller, args=(_Caller(), fn, args), nprocs=nprocs, join=join,
                              start_method=START_METHOD)


def _entry(rank: int, world: int, port: int, fn, args, timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(THREADS_PER_RANK)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    fn(rank, world, *args)
    # Free everything that still refers to gloo work (e.g. tracebacks of expected errors)
    # while the interpreter is alive: gloo aborts the process if that happens at exit.
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0) -> None:
    """Runs fn(rank, world, *args) in `world` processes of one gloo group (see start_ranks).

    fn must be a module-level function. An exception in any rank fails the call with that
    rank's traceback; a hang fails it after timeout_s (the survivors are terminated).
    """
    context = start_ranks(_entry, (world, free_port(), fn, args, timeout_s), world, join=False)
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while not context.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{world} spawned ranks did not finish within {timeout_s:g} s")
