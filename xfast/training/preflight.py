"""Start-up checks that fail in one line before the work they protect: every data path exists
and holds samples (before the model is built), output_dir is writable and has room for the
checkpoints (before the first step). Imports no torch: `xfast train`
checks data paths with the config, before the model stack is loaded."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from xfast.config import ConfigError
from xfast.data.skips import empty_counts
from xfast.data.sources import expand_urls, read_shard, shard_format

# Bytes per parameter of one checkpoint when none exists yet to measure: the module's weights
# (4, fp32) and the optimizer's fp32 master copy and two AdamW moments (12).
CHECKPOINT_BYTES_PER_PARAM = 16
EXPORT_BYTES_PER_PARAM = 4


def checkpoint_bytes(folder: Path) -> int:
    """Bytes of the files under `folder` (0 when it does not exist)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


class StartupError(RuntimeError):
    """The environment (disk, filesystem, lock files) stops the run from starting."""


# Data --------------------------------------------------------------------------------------

def check_shards(urls, path: str) -> None:
    """Every local shard of `urls` is a non-empty file, and the first one yields a sample."""
    shards = expand_urls(urls, path)
    local = [u for u in shards if not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u)]
    if missing:
        raise ConfigError(f"{path}: {len(missing)} of {len(shards)} shard(s) do not exist, e.g. {missing[0]!r}")
    empty = [u for u in local if os.path.getsize(u) == 0]
    if empty:
        raise ConfigError(f"{path}: {len(empty)} shard(s) are empty files, e.g. {empty[0]!r}")
    if not local:
        return  # pipe: commands are run by the loader, not here
    skips = empty_counts()
    first = next(read_shard(local[0], lambda kind, detail: skips.__setitem__(kind, skips[kind] + 1)), None)
    if first is None:
        problems = ", ".join(f"{k}={v}" for k, v in skips.items() if v) or "no sample in it"
        raise ConfigError(f"{path}: the first shard {local[0]!r} holds no samples ({problems})")


def _check_file(path_value: str, path: str) -> None:
    if not os.path.isfile(path_value):
        raise ConfigError(f"{path}: {path_value!r} does not exist or is not a file")
    if os.path.getsize(path_value) == 0:
        raise ConfigError(f"{path}: {path_value!r} is empty")


def check_data_paths(cfg) -> None:
    """The training streams and every evaluation task's files (TrainConfig `cfg`)."""
    for name in ("data", "sentence_data", "nli_data"):
        section = getattr(cfg, name)
        for i, source in enumerate(section.sources if section is not None else []):
            check_shards(source.urls, f"{name}.sources[{i}].urls")
    for task_name, task in cfg.eval.tasks.items():
        key = f"eval.tasks.{task_name}"
        data = task["data"]
        if task["task"] == "sts" or (task["task"] == "geometry" and shard_format(data) != "tar"):
            _check_file(data, f"{key}.data")
        else:
            check_shards(data, f"{key}.data")
        for option in ("classnames", "labels_csv"):
            if isinstance(task.get(option), str):
                _check_file(task[option], f"{key}.{option}")


# Output folder -----------------------------------------------------------------------------

def check_writable(folder: Path, rank: int = 0) -> None:
    """Create `folder` and write, flush and delete a probe file in it."""
    probe = folder / f".write-probe-{rank}-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError as err:
        raise StartupError(f"output_dir {folder} is not writable: {err.strerror or err}") from None


def check_free_space(checkpoints: Path, *, parameters: int, keep_last: int, export: bool) -> None:
    """Room for the checkpoints still to come: keep_last of them plus the one being written
    (less those already there), and the fp32 export. Sizes are measured from an existing
    checkpoint when there is one, else estimated per parameter."""
    existing = sorted(p for p in checkpoints.glob("step_*") if p.is_dir()) if checkpoints.is_dir() else []
    each = checkpoint_bytes(existing[-1]) if existing else parameters * CHECKPOINT_BYTES_PER_PARAM
    export_bytes = EXPORT_BYTES_PER_PARAM * parameters if export else 0
    final = checkpoints.parent / "final"
    needed = each * max(1, keep_last + 1 - len(existing)) + max(0, export_bytes - checkpoint_bytes(final))
    free = shutil.disk_usage(checkpoints if checkpoints.is_dir() else checkpoints.parent).free
    if free < needed:
        raise StartupError(
            f"no space for checkpoints in {checkpoints}: {human_bytes(free)} free, the run needs about "
            f"{human_bytes(needed)} ({human_bytes(each)} per checkpoint, checkpoint.keep_last={keep_last} "
            f"plus one being written" + (f", fp32 export {human_bytes(export_bytes)}" if export else "")
            + "): free space, lower checkpoint.keep_last or choose another output_dir")
