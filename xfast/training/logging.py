"""Training progress: a tqdm bar on rank 0 and TensorBoard scalars.

Throughput is measured between consecutive log points; the data-wait share is the fraction of
that wall time spent waiting for the loader, so a value near 1 means the input pipeline, not
the model, limits speed.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm.auto import tqdm


class TrainLogger:
    """Rank 0 writes; other ranks keep the same interface and do nothing."""

    def __init__(self, output_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool, progress_bar: bool):
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, disable=not (enabled and progress_bar))
        # A run resumed from the checkpoint of step S logged every row up to S before saving it;
        # rows after S (written before a crash) are dropped here and written again.
        kept_through = start_step if start_step > 0 else -1
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=kept_through + 1)
        self.history_path = Path(output_dir) / "metrics.jsonl" if enabled else None
        if enabled:
            _truncate_history(self.history_path, kept_through)
        self._mark = time.perf_counter()
        self._samples = 0
        self._data_wait = 0.0

    def start_window(self) -> None:
        """Measure throughput from now on (e.g. after an evaluation or a resume)."""
        self._mark, self._samples, self._data_wait = time.perf_counter(), 0, 0.0

    def count(self, samples: int, data_wait: float) -> None:
        """Record one step's samples (all ranks) and seconds spent waiting for data."""
        self._samples += samples
        self._data_wait += data_wait
        self.bar.update(1)

    def log(self, step: int, scalars: dict[str, float], skipped: dict[str, int] | None = None) -> dict:
        """Report scalars at `step` plus throughput since the previous call; returns the row."""
        now = time.perf_counter()
        elapsed = max(now - self._mark, 1e-9)
        row = {"step": step, **scalars,
               "samples_per_s": self._samples / elapsed,
               "data_wait_share": min(1.0, self._data_wait / elapsed)}
        for kind, count in (skipped or {}).items():
            row[f"skipped/{kind}"] = count
        self._mark, self._samples, self._data_wait = now, 0, 0.0
        if not self.enabled:
            return row
        shown = {"loss": row.get("loss"), "scale": row.get("logit_scale"),
                 "smp/s": row["samples_per_s"], "wait": row["data_wait_share"]}
        shown.update({k.removeprefix("loss/"): v for k, v in row.items() if k.startswith("loss/")})
        if skipped:
            shown["skip"] = sum(skipped.values())
        self.bar.set_postfix({k: f"{v:.3g}" for k, v in shown.items() if v is not None}, refresh=False)
        self._record(step, row)
        return row

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        """Scalars that are not training progress (e.g. evaluation) at `step`."""
        if self.enabled:
            self._record(step, {"step": step, **metrics})

    def _record(self, step: int, row: dict) -> None:
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(key, value, step)
            self.writer.flush()
        with open(self.history_path, "a") as handle:
            handle.write(json.dumps(row) + "\n")

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()


def _truncate_history(path: Path, last_step: int) -> None:
    """Keep the rows of steps <= last_step (replacing the file atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = []
    for line in lines:
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a row cut short by a kill
        if step <= last_step:
            kept.append(line)
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
