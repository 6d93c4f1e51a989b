"""Input validation shared by the losses: every error names the argument at fault."""
from __future__ import annotations

import contextlib
import contextvars
import math

import torch

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

_values_trusted = contextvars.ContextVar("xfast_values_trusted", default=False)


@contextlib.contextmanager
def trusted_values():
    """Inside: the losses skip the checks that read tensor values (finite embeddings, the value
    of a tensor scale or temperature), each a device-to-host wait on an accelerator; structure
    (shapes, dtypes, devices) is still checked. For the repeated steps of a training loop whose
    first step of the same kind ran every check (xfast.distributed.checks.RepeatedSteps)."""
    token = _values_trusted.set(True)
    try:
        yield
    finally:
        _values_trusted.reset(token)


def check_float_matrix(name: str, t, *, rows: str = "batch") -> None:
    """A 2-D tensor of a floating dtype; `rows` names the first axis in the message."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [{rows}, dim], got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float64, bfloat16 or float16, got {t.dtype}")


def nonfinite_flags(t: torch.Tensor) -> torch.Tensor:
    """[2] bool on t's device, some True iff t holds a NaN or an inf (t non-empty). NaN propagates
    through min/max and inf is an extreme: one pass, no mask tensor the size of t."""
    return ~torch.isfinite(torch.stack(torch.aminmax(t.detach())))


def check_finite(name: str, t: torch.Tensor) -> None:
    """No NaN or inf (one device-to-host read)."""
    if t.numel() and bool(nonfinite_flags(t).any()):
        raise ValueError(f"{name} contains NaN or inf")


class DeferredChecks:
    """Checks of data values whose verdicts stay on the device until read() fetches all of them
    in one device-to-host copy (on an accelerator every bool(tensor) is a wait for the device).

    add(flags, message): the problem `message` is present iff some element of the bool tensor
    `flags` is True. read() raises ValueError(message) for the first problem added that is
    present. Wrap the work that consumes the checked data in `with checks.consuming():` and
    call read() once that work is done.
    """

    def __init__(self):
        self._flags: list[torch.Tensor] = []
        self._messages: list[str] = []

    def add(self, flags: torch.Tensor, message: str) -> None:
        self._flags.append(flags.reshape(-1))
        self._messages.append(message)

    def problem(self) -> str | None:
        """The first present problem's message (reads the flags; they are then cleared)."""
        flags, messages, self._flags, self._messages = self._flags, self._messages, [], []
        if not flags:
            return None
        values: list[list[bool]] = [[] for _ in flags]
        by_device: dict[torch.device, list[int]] = {}
        for i, f in enumerate(flags):
            by_device.setdefault(f.device, []).append(i)
        for idx in by_device.values():  # one read per device (one device in practice)
            fetched = torch.cat([flags[i] for i in idx]).tolist()
            start = 0
            for i in idx:
                values[i] = fetched[start:start + flags[i].numel()]
                start += flags[i].numel()
        return next((m for m, v in zip(messages, values) if any(v)), None)

    def read(self) -> None:
        message = self.problem()
        if message is not None:
            raise ValueError(message)

    @contextlib.contextmanager
    def consuming(self):
        """Around work that consumes the checked data (a tower's forward): if it raises, and the
        data was bad (which may have broken it), the named problem is raised instead, chained to
        that error. Only there: an error of the caller's own (a missing key) stays what it is."""
        try:
            yield self
        except Exception as err:
            message = self.problem()
            if message is not None:
                raise ValueError(message) from err
            raise


def check_alike(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, same_rows: bool = True) -> None:
    """The tensors share the first one's device, dtype and width (and row count, with same_rows)."""
    first_name, first = names[0], tensors[0]
    for name, t in zip(names[1:], tensors[1:]):
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
        if t.dtype != first.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but {first_name} has {first.dtype}")
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{name} has embedding dim {t.shape[1]} but {first_name} has {first.shape[1]}")
        if same_rows and t.shape[0] != first.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]} but {first_name} has {first.shape[0]}")


def check_embeddings(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], *, same_rows: bool = True) -> None:
    """2-D floating tensors on one device, one dtype, one width, finite (unless under
    trusted_values), non-empty."""
    for name, t in zip(names, tensors):
        check_float_matrix(name, t)
        if t.shape[0] == 0 or t.shape[1] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): a contrastive loss needs at least one pair")
    check_alike(names, tensors, same_rows=same_rows)
    if not _values_trusted.get():
        for name, t in zip(names, tensors):
            check_finite(name, t)


def check_positive_scalar(name: str, value, device: torch.device) -> torch.Tensor:
    """A positive finite scalar (python number or 1-element tensor) as a tensor on `device`
    (a tensor's value is not read under trusted_values)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must hold a single value, got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the embeddings are on {device}")
        if _values_trusted.get():
            return value
        v = float(value.detach())
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        v = float(value)
        value = torch.tensor(v, dtype=torch.float64, device=device)  # cast to the compute dtype later
    else:
        raise ValueError(f"{name} must be a number or a tensor, got {type(value).__name__}")
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be positive and finite, got {v}")
    return value


def check_float(name: str, value, *, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name} must be finite and in [{low}, {high}], got {value}")
    return float(value)
