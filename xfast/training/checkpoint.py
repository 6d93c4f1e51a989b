"""Checkpoints: a save that completes or rolls back, keep the last K, resume, fp32 export.

Layout under the run's checkpoint folder:

    step_00000040/      a complete DeepSpeed checkpoint (model, ZeRO optimizer partitions,
                        lr scheduler) + trainer_state_rank{r}.pt (data position, RNG, step)
    latest              text file naming the newest complete step folder
    .partial/           where a save is written before it is renamed into place

A save is written under .partial/ by every rank, then rank 0 renames the finished folder into
place and rewrites `latest` through a temporary file and os.replace (the folder rename and the
pointer replace are both atomic on POSIX filesystems; the checkpoint folder must be one
filesystem shared by all ranks). So a step folder exists only once it is complete, and a kill
at any moment leaves the previous checkpoint intact. `recover()`, called on start, removes what
an interrupted save or prune left behind and re-points `latest` at the newest step folder
(a kill between the rename and the pointer write leaves it one save behind). Old checkpoints
are renamed out of the way before they are deleted, so a half-deleted one never looks complete.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from xfast.training.preflight import checkpoint_bytes, human_bytes

_TAG = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    """Every RNG the training loop draws from, to restore on resume."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the previous one is intact."""


def _errno_of(err: BaseException) -> int | None:
    while err is not None:
        if isinstance(err, OSError) and err.errno:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def _any_rank(flag: bool) -> bool:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    from xfast.training.engine import comm_device
    value = torch.tensor([int(flag)], device=comm_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _fsync_tree(folder: Path) -> None:
    """Flush a finished folder's files to disk before it is renamed into place (a power cut
    must not leave a complete-looking checkpoint with empty files)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(target: Path, write) -> None:
    """Write a folder through `write(tmp)` and move it to `target` (replacing an older one), so
    a kill leaves either the old folder or the new one, never a half-written `target`. Call
    `clean_replace_leftovers(target)` on start to remove what an interrupted call left."""
    tmp, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    _fsync_tree(tmp)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def clean_replace_leftovers(target: Path) -> None:
    """Remove the temporary folders of a `replace_dir(target, ...)` that was killed; a kill
    between its two renames leaves only the old copy, which is moved back."""
    tmp, old = target.with_name(f".{target.name}.partial"), target.with_name(f".{target.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not target.exists():
        os.rename(old, target)
    shutil.rmtree(old, ignore_errors=True)


class CheckpointManager:
    """Saves and restores training state under `root`, keeping the newest `keep_last`, every
    `every_steps` optimizer steps (0: only the final save)."""

    def __init__(self, root: str | os.PathLike, keep_last: int, rank: int = 0, world_size: int = 1, *,
                 every_steps: int = 0):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.every_steps = every_steps
        self.partial = self.root / ".partial"

    def due(self, step: int, last_step: int) -> bool:
        """Whether a periodic checkpoint is written after optimizer step `step` (the final one,
        at `last_step`, is the trainer's)."""
        return bool(self.every_steps) and step % self.every_steps == 0 and step < last_step

    def tags(self) -> list[str]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _TAG.match(p.name))

    def latest_tag(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        tag = pointer.read_text().strip()
        if not (self.root / tag).is_dir():
            raise FileNotFoundError(f"{pointer} names {tag!r}, which is not in {self.root}")
        return tag

    def recover(self) -> str | None:
        """Clean up after a killed run and make `latest` name the newest complete checkpoint.
        Every rank calls this on start, before loading; returns a note when `latest` moved."""
        note = None
        if self.rank == 0 and self.root.is_dir():
            shutil.rmtree(self.partial, ignore_errors=True)
            for leftover in self.root.iterdir():
                if leftover.name.startswith((".latest.tmp", ".trash-")):
                    shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            tags = self.tags()
            pointer = self.root / "latest"
            named = pointer.read_text().strip() if pointer.is_file() else None
            newest = tags[-1] if tags else None
            if newest != named:
                if newest is None:
                    pointer.unlink()
                else:
                    _write_atomically(pointer, newest + "\n")
                note = f"{pointer} named {named}, the newest complete checkpoint is {newest}: re-pointed it"
        _barrier()
        return note

    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Write a checkpoint of `engine` (all ranks call this) and return its tag. Raises
        CheckpointError on every rank if any rank failed to write; the previous checkpoint
        stays the latest."""
        from xfast.training.faults import fault_point

        tag = tag_for(step)
        if (self.root / tag).is_dir():
            return tag  # already saved at this step (e.g. final save right after a periodic one)
        if self.rank == 0:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
        _barrier()
        error = None
        try:
            engine.save_checkpoint(str(self.partial), tag=tag, save_latest=False)
            state = dict(trainer_state, step=step, world_size=self.world_size, rng=rng_state())
            target = self.partial / tag / f"trainer_state_rank{self.rank}.pt"
            torch.save(state, target.with_suffix(".tmp"))
            os.replace(target.with_suffix(".tmp"), target)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as RuntimeError
            error = err
        if _any_rank(error is not None):
            if self.rank == 0:
                shutil.rmtree(self.partial, ignore_errors=True)
            _barrier()
            raise CheckpointError(self._save_failure(tag, error)) from error
        fault_point("save.written", step, self.rank)
        if self.rank == 0:
            _fsync_tree(self.partial / tag)
            os.rename(self.partial / tag, self.root / tag)
            fault_point("save.renamed", step)
            _write_atomically(self.root / "latest", tag + "\n")
            shutil.rmtree(self.partial, ignore_errors=True)
            self._prune(keep=tag)
        _barrier()
        return tag

    def _save_failure(self, tag: str, error: BaseException | None) -> str:
        previous = self.latest_tag()
        kept = f"{previous} is still the latest checkpoint" if previous else "there is no earlier checkpoint"
        if error is None:
            return f"checkpoint {tag} was not saved: another rank failed to write its part; {kept}"
        code = _errno_of(error)
        free = shutil.disk_usage(self.root).free
        # torch.save reports a full disk as "basic_ios::clear: iostream error", without an errno
        needed = checkpoint_bytes(self.root / previous) if previous else 1 << 20
        if code == errno.ENOSPC or (code is None and free < needed):
            reason = f"no space left on the device ({human_bytes(free)} free)"
        elif code == errno.EROFS:
            reason = "the filesystem is read-only"
        elif code in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        elif code == errno.EDQUOT:
            reason = "disk quota exceeded"
        else:
            reason = f"{type(error).__name__}: {error}"
        return f"checkpoint {tag} could not be written to {self.root}: {reason}; {kept}"

    def _prune(self, keep: str) -> None:
        old = [t for t in self.tags() if t != keep]
        for tag in old[:max(0, len(old) - (self.keep_last - 1))]:
            trash = self.root / f".trash-{tag}"
            os.rename(self.root / tag, trash)  # gone from tags() at once; the delete may be cut short
            shutil.rmtree(trash)

    def load(self, engine, tag: str | None = None) -> dict | None:
        """Restore engine (weights, optimizer, scheduler) and this rank's RNG from `tag`
        (default: latest). Returns this rank's trainer state, or None without a checkpoint."""
        tag = tag or self.latest_tag()
        if tag is None:
            return None
        state_file = self.root / tag / f"trainer_state_rank{self.rank}.pt"
        if not state_file.is_file():
            raise FileNotFoundError(f"{state_file} is missing: checkpoint {tag} was not written by a "
                                    f"run with this rank ({self.rank} of {self.world_size})")
        state = torch.load(state_file, weights_only=False)
        if state["world_size"] != self.world_size:
            raise ValueError(f"checkpoint {self.root / tag} was written by {state['world_size']} ranks, "
                             f"this run has {self.world_size}: resume with the same number of ranks")
        path, _ = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        set_rng_state(state["rng"])
        return state

    def fp32_state_dict(self, tag: str | None = None) -> dict[str, torch.Tensor]:
        """Consolidated fp32 weights of the wrapped module from a saved checkpoint (any ZeRO
        stage; ZeRO 1-3 via DeepSpeed's zero_to_fp32, which merges the fp32 master partitions)."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        tag = tag or self.latest_tag()
        if tag is None:
            raise FileNotFoundError(f"no checkpoint in {self.root}")
        folder = self.root / tag
        if any(folder.glob("*zero_pp_rank_*optim_states.pt")):  # ZeRO 1-3, fp32 or bf16
            state = get_fp32_state_dict_from_zero_checkpoint(str(self.root), tag=tag)
        else:  # ZeRO stage 0 (fp32 only, see DeepSpeedSection): the module's state dict is stored whole
            state = torch.load(folder / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
