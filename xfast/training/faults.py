"""A test hook that kills or signals the training process at a named point, so crash tests can
stop a run deterministically inside a checkpoint save or an export.

    XFAST_FAULT=POINT@STEP[:SIGNAL][/RANK]      e.g. save.written@6, export.written@8:KILL,
                                                train.step@2:TERM, train.step@3:TERM/1

When the running code reaches `fault_point(POINT, STEP)` (on RANK, default every rank) the
process sends itself SIGNAL (default KILL). Points: train.step (a step's update is done, before
it is logged), save.written (every file of the checkpoint is written under .partial/, before
the rename), save.renamed (the folder is in place, `latest` not yet rewritten), export.written
(the fp32 weights are written, not yet moved into place). Unset (the normal case) it costs one
dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal

ENV = "XFAST_FAULT"


def _parse(spec: str) -> tuple[str, int, signal.Signals, int | None]:
    spec, _, rank = spec.partition("/")
    where, _, name = spec.partition(":")
    point, _, step = where.partition("@")
    if not point or not step.isdigit():
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected POINT@STEP[:SIGNAL][/RANK]")
    return point, int(step), signal.Signals["SIG" + (name or "KILL").upper()], int(rank) if rank else None


def fault_point(point: str, step: int, rank: int = 0) -> None:
    """Send the signal named by $XFAST_FAULT if it names this point, step and rank."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    wanted, at_step, signum, on_rank = _parse(spec)
    if wanted == point and at_step == step and on_rank in (None, rank):
        os.kill(os.getpid(), signum)
