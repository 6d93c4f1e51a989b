"""Checkpoints: atomic save, keep the last K, resume, consolidated fp32 export.

Layout under the run's checkpoint folder:

    step_00000040/      a complete DeepSpeed checkpoint (model, ZeRO optimizer partitions,
                        lr scheduler) + trainer_state_rank{r}.pt (data position, RNG, step)
    latest              text file naming the newest complete step folder
    .partial/           where a save is written before it is renamed into place

A save is written under .partial/ by every rank, then rank 0 renames the finished folder into
place and rewrites `latest` through a temporary file and os.replace, so a crash at any moment
leaves `latest` naming a complete checkpoint (the folder rename and the pointer replace are
both atomic on POSIX filesystems; the checkpoint folder must be one filesystem shared by all
ranks). Leftovers of an interrupted save are removed by the next one.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

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


class CheckpointManager:
    """Saves and restores training state under `root`, keeping the newest `keep_last`."""

    def __init__(self, root: str | os.PathLike, keep_last: int, rank: int = 0, world_size: int = 1):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last, self.rank, self.world_size = keep_last, rank, world_size
        self.partial = self.root / ".partial"

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

    def save(self, engine, step: int, trainer_state: dict) -> str:
        """Write a checkpoint of `engine` (all ranks call this) and return its tag."""
        tag = tag_for(step)
        if (self.root / tag).is_dir():
            return tag  # already saved at this step (e.g. final save right after a periodic one)
        if self.rank == 0:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
        _barrier()
        engine.save_checkpoint(str(self.partial), tag=tag, save_latest=False)
        state = dict(trainer_state, step=step, world_size=self.world_size, rng=rng_state())
        target = self.partial / tag / f"trainer_state_rank{self.rank}.pt"
        torch.save(state, target.with_suffix(".tmp"))
        os.replace(target.with_suffix(".tmp"), target)
        _barrier()
        if self.rank == 0:
            os.rename(self.partial / tag, self.root / tag)
            _write_atomically(self.root / "latest", tag + "\n")
            shutil.rmtree(self.partial, ignore_errors=True)
            self._prune(keep=tag)
        _barrier()
        return tag

    def _prune(self, keep: str) -> None:
        old = [t for t in self.tags() if t != keep]
        for tag in old[:max(0, len(old) - (self.keep_last - 1))]:
            shutil.rmtree(self.root / tag)

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
