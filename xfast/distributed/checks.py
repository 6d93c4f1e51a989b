"""Collective agreement check run before any heavy exchange.

A rank whose input is wrong must not leave the others blocked in a collective they will
never complete. So every distributed op first validates its local inputs *without raising*,
then all ranks all-gather one small fixed-size record (error message, row counts, width,
dtype, whether backward will run, settings that must agree) with a timeout, and every rank
raises the same clear error if anything is off. Only then does the real exchange start.

The wait is bounded by XFAST_DIST_TIMEOUT_S seconds (default 1800, torch's default process
group timeout): a rank that never reaches the op (crashed, or took another code path) gives
a RuntimeError naming the op instead of a hang. Keep it above the longest time ranks can
legitimately drift apart (e.g. rank 0 evaluating while the others wait).
"""
from __future__ import annotations

import datetime
import math
import os
import struct
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from xfast.distributed.exchange import offsets

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
MESSAGE_BYTES = 384
ERROR_KINDS = (None, ValueError, RuntimeError)
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Layout:
    """Who holds what: rank r has rows[r] rows and a column block of cols[r] rows."""

    group: object
    rank: int
    world: int
    rows: tuple[int, ...]
    cols: tuple[int, ...]

    @property
    def total_rows(self) -> int:
        return sum(self.rows)

    @property
    def total_cols(self) -> int:
        return sum(self.cols)

    def col_start(self, rank: int) -> int:
        return offsets(self.cols)[rank]


@dataclass(frozen=True)
class LocalShape:
    rows: int
    cols: int
    dim: int
    dtype: torch.dtype
    needs_grad: bool


def check_group(group) -> None:
    """Raised locally: without an initialised group there is nobody to wait for."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group= was given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"group must be a torch.distributed.ProcessGroup (e.g. torch.distributed.group.WORLD), "
                         f"got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of the given process group")


def timeout() -> datetime.timedelta:
    raw = os.environ.get("XFAST_DIST_TIMEOUT_S", str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
    except ValueError:
        raise ValueError(f"XFAST_DIST_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if not seconds > 0:
        raise ValueError(f"XFAST_DIST_TIMEOUT_S must be positive, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def _float_bits(v) -> int:
    # A value that is not a number is reported by the op's own validation; it must not
    # raise here, before the exchange, or the other ranks would wait for this one.
    try:
        v = float(v)
    except (TypeError, ValueError):
        v = math.nan
    return struct.unpack("<q", struct.pack("<d", v))[0]


def agree(op: str, group, describe: Callable[[], LocalShape], same: dict[str, float] | None = None) -> Layout:
    """Runs `describe` (local validation returning the local shape) on every rank and
    returns the agreed Layout, or raises the same error on every rank.

    `same` holds settings that must be equal on all ranks (they steer the communication
    pattern, so a mismatch would hang or silently differ).
    """
    check_group(group)
    limit = timeout()
    same = same or {}
    try:
        local = describe()
        kind, message, local_error = 0, b"", None
    except Exception as err:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        local = LocalShape(0, 0, 0, torch.float32, False)
        kind, local_error = (2 if isinstance(err, RuntimeError) else 1), err
        text = str(err) if isinstance(err, (ValueError, RuntimeError)) else f"{type(err).__name__}: {err}"
        message = text.encode()
    message = message[:MESSAGE_BYTES]
    header = [kind, len(message), local.rows, local.cols, local.dim, DTYPES.index(local.dtype),
              int(local.needs_grad)] + [_float_bits(v) for v in same.values()]
    record = torch.zeros(len(header) + MESSAGE_BYTES, dtype=torch.int64)
    record[: len(header)] = torch.tensor(header, dtype=torch.int64)
    record[len(header): len(header) + len(message)] = torch.tensor(list(message), dtype=torch.int64)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    records = [torch.empty_like(record, device=device) for _ in range(world)]
    work = dist.all_gather(records, record.to(device), group=group, async_op=True)
    try:
        work.wait(limit)
        # A Work object that outlives its process group (kept by the traceback of an error
        # raised below, until a late garbage collection) aborts the process at exit.
        del work
    except RuntimeError as err:
        raise RuntimeError(f"{op}: rank {rank} waited {limit.total_seconds():g} s for the other ranks of the group "
                           f"to reach the same call; one of them never called {op} (it crashed, or took another "
                           f"code path). Set XFAST_DIST_TIMEOUT_S to change the wait. ({err})") from err
    table = torch.stack(records).cpu().tolist()

    for r, row in enumerate(table):
        if row[0]:
            text = bytes(row[len(header): len(header) + row[1]]).decode(errors="replace")
            where = "this rank" if r == rank else f"rank {r}"
            raise ERROR_KINDS[row[0]](f"{op}: invalid input on {where} (of {world}): {text}") from (
                local_error if r == rank else None)
    dims = [row[4] for row in table]
    if len(set(dims)) > 1:
        raise ValueError(f"{op}: the embedding dim differs across ranks: "
                         + ", ".join(f"rank {r} has {d}" for r, d in enumerate(dims)))
    dtypes = [DTYPES[row[5]] for row in table]
    if len(set(dtypes)) > 1:
        raise ValueError(f"{op}: the dtype differs across ranks: "
                         + ", ".join(f"rank {r} has {t}" for r, t in enumerate(dtypes)))
    grads = [bool(row[6]) for row in table]
    if len(set(grads)) > 1:
        raise ValueError(f"{op}: backward would run on some ranks only (inputs requiring grad with grad mode on: "
                         + ", ".join(f"rank {r} {g}" for r, g in enumerate(grads))
                         + "); every rank must take part in the backward exchange")
    for i, name in enumerate(same):
        values = [row[7 + i] for row in table]
        if len(set(values)) > 1:
            shown = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
            raise ValueError(f"{op}: {name} must be the same on every rank, got "
                             + ", ".join(f"rank {r}: {v:g}" for r, v in enumerate(shown)))
    return Layout(group, rank, world, tuple(row[2] for row in table), tuple(row[3] for row in table))
