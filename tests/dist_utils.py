"""Spawning a small gloo process group on CPU for the distributed tests."""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from xfast.distributed.rendezvous import free_port

# Spawned ranks share the machine's cores with each other and with CI.
THREADS_PER_RANK = 1


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
    """Runs fn(rank, world, *args) in `world` spawned processes of one gloo group.

    fn must be a module-level function. An exception in any rank fails the call with that
    rank's traceback; a hang fails it after timeout_s (the survivors are terminated).
    """
    context = mp.start_processes(_entry, args=(world, free_port(), fn, args, timeout_s), nprocs=world,
                                 join=False, start_method="spawn")
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    while not context.join(timeout=1.0):
        if datetime.datetime.now() > deadline:
            for p in context.processes:
                if p.is_alive():
                    p.terminate()
            raise TimeoutError(f"{world} spawned ranks did not finish within {timeout_s:g} s")
