"""Collective agreement check run before any heavy exchange.

A rank whose input is wrong must not leave the others blocked in a collective they will
never complete. So every distributed op first validates its local inputs *without raising*,
then all ranks all-gather one small fixed-size record (error message, row counts, width,
dtype, whether backward will run, settings that must agree) with a timeout, and every rank
raises the same clear error if anything is off. Only then does the real exchange start.

A training loop repeats the same calls step after step: under RepeatedSteps.step(kind) the
first step of each kind agrees collectively and later ones reuse its answers without a
collective (see RepeatedSteps).

The wait is bounded by XFAST_DIST_TIMEOUT_S seconds (default 1800, torch's default process
group timeout) and by the group's own timeout: a rank that never reaches the op (crashed, or
took another code path) gives a RuntimeError naming the op, how long this rank really waited
and which ranks did not arrive, instead of a hang. Keep it above the longest time ranks can
legitimately drift apart (e.g. rank 0 evaluating while the others wait).
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime
import os
import struct
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from xfast._checks import trusted_values
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


# Record layout: every rank all-gathers one fixed-size int64 record, whatever op it is in, so
# ranks that reached different ops still exchange and can say so instead of hanging.
HEADER = ("kind", "message_bytes", "rows", "cols", "dim", "dtype", "needs_grad")
OP_SLOTS = 4  # op name, 32 bytes
MAX_SETTINGS, SETTING_SLOTS = 8, 3  # (type tag, 16 bytes of value)
_NUMBER, _BOOL, _TEXT, _BAD = 1, 2, 3, 4


def _pack(data: bytes, slots: int) -> list[int]:
    return list(struct.unpack(f"<{slots}q", data[: 8 * slots].ljust(8 * slots, b"\0")))


def _unpack(ints, length: int | None = None) -> bytes:
    data = struct.pack(f"<{len(ints)}q", *ints)
    return data[:length] if length is not None else data.rstrip(b"\0")


def _encode_setting(value) -> list[int]:
    """A setting as (tag, two int64s). A value that is not a number, bool or string is
    reported by the op's own validation; it must not raise here, before the exchange."""
    if isinstance(value, bool):
        return [_BOOL, int(value), 0]
    if isinstance(value, str):
        return [_TEXT, *_pack(value.encode(), 2)]
    try:
        number = float(value.detach() if hasattr(value, "detach") else value)  # a number or a 1-element tensor
    except Exception:  # noqa: BLE001 - see the docstring
        return [_BAD, 0, 0]
    return [_NUMBER, struct.unpack("<q", struct.pack("<d", number))[0], 0]


def _decode_setting(tag: int, a: int, b: int) -> str:
    if tag == _BOOL:
        return repr(bool(a))
    if tag == _TEXT:
        return repr(_unpack([a, b]).decode(errors="replace"))
    if tag == _NUMBER:
        return repr(struct.unpack("<d", struct.pack("<q", a))[0])
    return "(invalid)"


class _Arrivals:
    """Which ranks reached an agreement call, kept in the process group's store.

    Each rank writes the number of agreement calls it has entered on the group (one small
    store write per call); after a timeout the ranks whose count is behind this rank's are
    the ones that never arrived."""

    def __init__(self):
        self.calls: dict[str, int] = {}

    @staticmethod
    def _store():
        try:
            return dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - private API: without it the message names no rank
            return None

    @staticmethod
    def _key(group, rank: int) -> str:
        return f"xfast/agree/{group.group_name}/{rank}"

    def enter(self, group, rank: int, op: str) -> int:
        count = self.calls.get(group.group_name, 0) + 1
        self.calls[group.group_name] = count
        store = self._store()
        if store is not None:
            store.set(self._key(group, rank), f"{count} {op}")
        return count

    def missing(self, group, rank: int, world: int, count: int) -> str:
        store = self._store()
        if store is None:
            return "one of them"
        late = []
        for r in range(world):
            key = self._key(group, r)
            seen = store.get(key).decode().split(" ", 1) if store.check([key]) else ["0", "nothing yet"]
            if int(seen[0]) < count:
                late.append(f"rank {r} (its last call was {seen[1]})" if seen[0] != "0" else f"rank {r} (no call yet)")
        return ", ".join(late) if late else "one of them"


_arrivals = _Arrivals()


@dataclass(frozen=True)
class _Call:
    """One agreement call of a recorded step, and its answer."""
    op: str
    group_name: str
    local: LocalShape
    settings: tuple  # (name, value) of the settings that are not tensors
    layout: Layout


def _plain_settings(same: dict) -> tuple:
    return tuple((name, value) for name, value in same.items() if not isinstance(value, torch.Tensor))


class _StepCalls:
    """The agreement calls of the step in progress: recorded, or replayed from a record."""

    def __init__(self, kind, calls: list[_Call], replay: bool):
        self.kind, self.calls, self.replay, self.index = kind, calls, replay, 0

    def answer(self, op: str, group, describe: Callable[[], LocalShape], same: dict) -> Layout:
        """The recorded Layout, once this rank's call is checked to be the recorded one; any
        difference raises here, on this rank only (no collective: the other ranks skip it)."""
        check_group(group)
        where = f"{op}: in a repeated step of kind {self.kind!r}, call {self.index + 1}"
        if self.index >= len(self.calls):
            raise ValueError(f"{where} was not made by the first step of that kind ({len(self.calls)} calls)")
        call = self.calls[self.index]
        self.index += 1
        local, settings = describe(), _plain_settings(same)
        if (op, group.group_name) != (call.op, call.group_name):
            raise ValueError(f"{where} is {op} on group {group.group_name!r}; the first step of that kind made "
                             f"{call.op} on group {call.group_name!r}")
        for what, now, then in (("local shape", local, call.local), ("settings", settings, call.settings)):
            if now != then:
                raise ValueError(f"{where}: this rank's {what} changed from {then} (first step of that kind) to "
                                 f"{now}. Repeated steps skip the agreement across ranks, so their shapes and "
                                 f"settings must not change (e.g. no ragged last batch: data.drop_last)")
        return call.layout

    def record(self, op: str, group, local: LocalShape, same: dict, layout: Layout) -> None:
        self.calls.append(_Call(op, group.group_name, local, _plain_settings(same), layout))


_step_calls: contextvars.ContextVar[_StepCalls | None] = contextvars.ContextVar("xfast_step_calls", default=None)


class RepeatedSteps:
    """Agreement for a loop of repeated steps: collective on the first step of each kind, then local.

    Under step(kind), the first step of a kind runs every agree() call (and every value check)
    as usual and records the calls in order. A later step of the same kind answers each call
    from that record with no collective and no store write, after checking that this rank's
    call is the recorded one (op, group, local shape, settings that are not tensors), and skips
    the losses' checks that read tensor values (xfast._checks.trusted_values: device-to-host
    waits on an accelerator).

    The caller guarantees what is no longer checked: `kind` is the same on every rank at every
    step (e.g. the objective's plan of the step), the row counts of a kind never change (no
    ragged batches), and tensor settings (a learnable logit scale) are equal on every rank
    (replicated parameters). A rank whose call differs from the record anyway raises there:
    falling back to a collective that the other ranks skip would leave them waiting.
    """

    def __init__(self):
        self._recorded: dict[object, list[_Call]] = {}

    @contextlib.contextmanager
    def step(self, kind):
        calls = self._recorded.get(kind)
        current = _StepCalls(kind, [] if calls is None else calls, replay=calls is not None)
        token = _step_calls.set(current)
        try:
            with trusted_values() if current.replay else contextlib.nullcontext():
                yield
        finally:
            _step_calls.reset(token)
        # Reached only when the step completed.
        if not current.replay:
            self._recorded[kind] = current.calls
        elif current.index != len(calls):
            raise ValueError(f"a repeated step of kind {kind!r} made {current.index} agreement calls, the first "
                             f"step of that kind {len(calls)}")


def agree(op: str, group, describe: Callable[[], LocalShape], same: dict | None = None) -> Layout:
    """Runs `describe` (local validation returning the local shape) on every rank and
    returns the agreed Layout, or raises the same error on every rank.

    `same` holds settings that must be equal on all ranks (numbers, bools or strings): those
    that steer the communication pattern, where a mismatch would hang, and the loss's scalars
    (logit_scale, temperature, ...), where it would silently mix two losses.
    Inside a repeated step of RepeatedSteps.step the recorded answer is returned instead.
    """
    same = same or {}
    step_calls = _step_calls.get()
    if step_calls is not None and step_calls.replay:
        return step_calls.answer(op, group, describe, same)
    check_group(group)
    limit = timeout()
    if len(same) > MAX_SETTINGS:
        raise ValueError(f"{op}: at most {MAX_SETTINGS} settings can be agreed on, got {len(same)}")
    try:
        local = describe()
        kind, message, local_error = 0, b"", None
    except Exception as err:  # noqa: BLE001 - whatever it is, the other ranks must hear of it
        local = LocalShape(0, 0, 0, torch.float32, False)
        kind, local_error = (2 if isinstance(err, RuntimeError) else 1), err
        text = str(err) if isinstance(err, (ValueError, RuntimeError)) else f"{type(err).__name__}: {err}"
        message = text.encode()
    message = message[:MESSAGE_BYTES]
    settings = [slot for value in same.values() for slot in _encode_setting(value)]
    record = torch.tensor(
        [kind, len(message), local.rows, local.cols, local.dim, DTYPES.index(local.dtype), int(local.needs_grad)]
        + _pack(op.encode(), OP_SLOTS) + settings + [0] * (SETTING_SLOTS * MAX_SETTINGS - len(settings))
        + _pack(message, MESSAGE_BYTES // 8), dtype=torch.int64)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    records = [torch.empty_like(record, device=device) for _ in range(world)]
    count = _arrivals.enter(group, rank, op)
    start = time.monotonic()
    work = dist.all_gather(records, record.to(device), group=group, async_op=True)
    try:
        work.wait(limit)
        # A Work object that outlives its process group (kept by the traceback of an error
        # raised below, until a late garbage collection) aborts the process at exit.
        del work
    except RuntimeError as err:
        waited = time.monotonic() - start
        raise RuntimeError(
            f"{op}: rank {rank} waited {waited:.1f} s for the other ranks of the group (of {world}) to reach the "
            f"same call; {_arrivals.missing(group, rank, world, count)} did not arrive (crashed, or took another "
            f"code path). The wait is bounded by XFAST_DIST_TIMEOUT_S={limit.total_seconds():g} s and by the "
            f"process group's own timeout, whichever ends first. ({err})") from err
    layout = _layout(op, group, rank, world, same, torch.stack(records).cpu().tolist(), local_error)
    if step_calls is not None:
        step_calls.record(op, group, local, same, layout)
    return layout


def _layout(op, group, rank, world, same, table, local_error) -> Layout:
    """The Layout from every rank's record, or the same error on every rank."""
    h, o, m = len(HEADER), len(HEADER) + OP_SLOTS, len(HEADER) + OP_SLOTS + SETTING_SLOTS * MAX_SETTINGS
    ops = [_unpack(row[h:o]).decode(errors="replace") for row in table]
    if len(set(ops)) > 1:
        raise ValueError(f"{op}: the ranks reached different calls: "
                         + ", ".join(f"rank {r} is in {name}" for r, name in enumerate(ops)))
    for r, row in enumerate(table):
        if row[0]:
            text = _unpack(row[m:], row[1]).decode(errors="replace")
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
        values = [tuple(row[o + SETTING_SLOTS * i: o + SETTING_SLOTS * (i + 1)]) for row in table]
        if len(set(values)) > 1:
            raise ValueError(f"{op}: {name} must be the same on every rank, got "
                             + ", ".join(f"rank {r}: {_decode_setting(*v)}" for r, v in enumerate(values)))
    return Layout(group, rank, world, tuple(row[2] for row in table), tuple(row[3] for row in table))
