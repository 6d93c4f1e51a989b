"""Training progress on rank 0: a tqdm bar on a terminal, TensorBoard scalars, metrics.jsonl.

Logs are read in files as often as on terminals. On a terminal the bar updates in place; when
stderr is a file or pipe, a plain progress line is written at most every PLAIN_PROGRESS_EVERY_S
seconds instead (tqdm's carriage-return updates would add a line per step). progress_bar=false
turns off both, and the bars of transformers, huggingface_hub and DeepSpeed's checkpoint
conversion with them (quiet_progress_bars). Warnings print once per process
(quiet_repeated_warnings), not once per step.

Throughput is measured between consecutive log points; the data-wait share is the fraction of
that wall time spent waiting for the loader, so a value near 1 means the input pipeline, not
the model, limits speed.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import warnings
from pathlib import Path

from tqdm.auto import tqdm

PLAIN_PROGRESS_EVERY_S = 60.0


def quiet_repeated_warnings() -> None:
    """Show each distinct warning (category and text) once per process.

    Python's default shows a warning once per code location, but every warnings.catch_warnings()
    or filter change (libraries do this per batch) resets that memory, in the "once" action too,
    so e.g. torch's all_gather_into_tensor FutureWarning printed on every step. This dedupes at
    display time instead; filters (-W, PYTHONWARNINGS, "error") still act first.
    """
    if getattr(warnings.showwarning, "xfast_once", False):
        return
    shown: set[tuple[type, str]] = set()
    original = warnings.showwarning

    def show_once(message, category, filename, lineno, file=None, line=None):
        key = (category, str(message))
        if key not in shown:
            shown.add(key)
            original(message, category, filename, lineno, file, line)

    show_once.xfast_once = True
    warnings.showwarning = show_once


def quiet_progress_bars() -> None:
    """Turn off the progress bars of the libraries the trainer runs (and of tqdm in child processes)."""
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm when a (child) process imports it
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass
    try:  # DeepSpeed's ZeRO -> fp32 conversion (used by the final export) calls tqdm directly
        from deepspeed.utils import zero_to_fp32
        zero_to_fp32.tqdm = functools.partial(tqdm, disable=True)
    except ImportError:
        pass


def setup_output(progress_bar: bool, stream=None) -> bool:
    """Call first thing in a training process: warnings once; the libraries' bars off unless
    progress_bar is on and `stream` (default stderr) is a terminal. Returns whether bars are drawn."""
    quiet_repeated_warnings()
    drawn = progress_bar and is_terminal(stream if stream is not None else sys.stderr)
    if not drawn:
        quiet_progress_bars()
    return drawn


def is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # closed stream
        return False


class TrainLogger:
    """Rank 0 writes; other ranks keep the same interface and do nothing."""

    def __init__(self, output_dir: str | Path, *, total_steps: int, start_step: int, enabled: bool,
                 tensorboard: bool, progress_bar: bool, stream=None):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stderr
        setup_output(progress_bar and enabled, self.stream)
        terminal = is_terminal(self.stream)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", file=self.stream,
                        dynamic_ncols=True, disable=not (enabled and progress_bar and terminal))
        # Plain lines into files: step, rate, ETA and the last logged values, at a steady low rate.
        self._plain = enabled and progress_bar and not terminal
        self._total, self._step, self._start_step = total_steps, start_step, start_step
        self._started = self._last_plain = time.perf_counter()
        self._shown: dict[str, str] = {}
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
        self._closed = False

    def start_window(self) -> None:
        """Measure throughput from now on (e.g. after an evaluation or a resume)."""
        self._mark, self._samples, self._data_wait = time.perf_counter(), 0, 0.0

    def count(self, samples: int, data_wait: float) -> None:
        """Record one step's samples (all ranks) and seconds spent waiting for data."""
        self._samples += samples
        self._data_wait += data_wait
        self.bar.update(1)
        self._step += 1
        if self._plain:
            now = time.perf_counter()
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY_S or self._step == self._total:
                self._last_plain = now
                self.write(self._plain_line(now))

    def _plain_line(self, now: float) -> str:
        done = self._step - self._start_step
        rate = done / max(now - self._started, 1e-9)
        eta = (self._total - self._step) / rate if rate > 0 else float("nan")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta == eta else "?"
        values = " ".join(f"{k}={v}" for k, v in self._shown.items())
        return (f"train: step {self._step}/{self._total} ({100 * self._step / max(self._total, 1):.0f}%), "
                f"{rate:.3g} step/s, eta {eta_text}" + (f", {values}" if values else ""))

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
        self._shown = {k: f"{v:.3g}" for k, v in shown.items() if v is not None}
        self.bar.set_postfix(self._shown, refresh=False)
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

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Evaluation results at `step`: printed as a table, recorded under eval/."""
        if not metrics:
            return
        from xfast.eval.cli import format_table
        self.write(f"eval @ step {step}\n{format_table({f'step {step}': metrics})}")
        self.log_metrics(step, {f"eval/{k}": v for k, v in metrics.items()})

    def write(self, message: str) -> None:
        if self.enabled:
            self.bar.write(message, file=self.stream)

    def plot(self) -> Path | None:
        """OUTPUT/training_curves.png from metrics.jsonl (loss, logit scale, eval R@K against step)."""
        if not self.enabled or self.history_path is None or not self.history_path.is_file():
            return None
        from xfast.eval.plots import plot_training_curves
        try:
            return plot_training_curves(self.history_path, self.history_path.parent / "training_curves.png")
        except ValueError as err:  # nothing to plot yet
            self.write(f"no training curves: {err}")
            return None

    def close(self, *, plot: bool = True) -> None:
        """End of training: close the bar and TensorBoard; write training_curves.png (plot=True).
        A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if plot:
            self.plot()
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
