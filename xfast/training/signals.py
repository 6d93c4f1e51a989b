"""SIGTERM / SIGINT during training: the first one asks for a clean stop (finish the step, write
a checkpoint, exit 0), a second one exits at once.

Ranks may get the signal at different moments (or only some of them: a launcher forwarding it,
a preempted node), so the loop asks `stop_requested()` at every step boundary, which agrees
across ranks by an all-reduce: every rank stops after the same step.
"""
from __future__ import annotations

import os
import signal

import torch
import torch.distributed as dist

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Installs the handlers on enter and restores the previous ones on exit."""

    def __init__(self):
        self.received: str | None = None
        self._pid = os.getpid()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> GracefulStop:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self._pid:
            return  # a forked data worker inherited the handler: the main process decides
        name = signal.Signals(signum).name
        if self.received is not None:
            os.write(2, f"xfast train: second signal ({name}): exiting now, without a checkpoint\n".encode())
            os._exit(128 + signum)
        self.received = name

    def stop_requested(self) -> str | None:
        """The stop signal's name if any rank got one, else None (a collective: every rank calls
        it after the same step)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        from xfast.training.engine import comm_device
        signum = torch.tensor([signal.Signals[self.received] if self.received else 0], device=comm_device())
        dist.all_reduce(signum, op=dist.ReduceOp.MAX)
        return signal.Signals(int(signum.item())).name if signum.item() else None

    def describe(self, name: str) -> str:
        return name if self.received else f"{name} on another rank"
