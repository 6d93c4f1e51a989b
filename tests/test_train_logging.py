"""Training logs read in files: no per-step carriage returns, warnings once, eval as a table, curves PNG."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import pytest

from xfast.eval.plots import plot_training_curves, read_metrics
from xfast.training import logging as train_logging
from xfast.training.logging import TrainLogger


@pytest.fixture(autouse=True)
def restore_progress_bars(monkeypatch):
    """TrainLogger turns library bars off process-wide when not on a terminal; undo that after each test."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    try:
        from deepspeed.utils import zero_to_fp32
        monkeypatch.setattr(zero_to_fp32, "tqdm", zero_to_fp32.tqdm)
    except ImportError:
        pass
    yield
    from huggingface_hub.utils import enable_progress_bars
    from transformers.utils import logging as hf_logging
    hf_logging.enable_progress_bar()
    enable_progress_bars()


class FileLike(io.StringIO):
    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _run(stream, steps=50, progress_bar=True, tmp_path=None):
    logger = TrainLogger(tmp_path, total_steps=steps, start_step=0, enabled=True, tensorboard=False,
                         progress_bar=progress_bar, stream=stream)
    for step in range(1, steps + 1):
        logger.count(8, 0.0)
        if step % 10 == 0:
            logger.log(step, {"loss": 1.0 / step, "logit_scale": 14.0 + step})
    logger.close(plot=False)
    return stream.getvalue()


def test_a_file_gets_plain_lines_at_a_low_rate(tmp_path, monkeypatch):
    out = _run(FileLike(), tmp_path=tmp_path)
    assert "\r" not in out
    # the interval is not reached in this short run: only the final line
    lines = [line for line in out.splitlines() if line.startswith("train: step")]
    assert lines == [lines[-1]] and lines[-1].startswith("train: step 50/50 (100%)") and "loss=0.02" in lines[-1]
    monkeypatch.setattr(train_logging, "PLAIN_PROGRESS_EVERY_S", 0.0)
    many = _run(FileLike(), tmp_path=tmp_path)
    assert many.count("train: step") == 50 and "\r" not in many


def test_a_terminal_gets_the_bar_and_the_switch_silences_everything(tmp_path):
    from deepspeed.utils import zero_to_fp32
    from transformers.utils import logging as hf_logging
    assert "\r" in _run(Terminal(), tmp_path=tmp_path)
    assert hf_logging.is_progress_bar_enabled() and "TQDM_DISABLE" not in os.environ
    assert _run(Terminal(), progress_bar=False, tmp_path=tmp_path) == ""
    assert not hf_logging.is_progress_bar_enabled() and os.environ["TQDM_DISABLE"] == "1"
    assert zero_to_fp32.tqdm(range(3), file=io.StringIO()).disable
    assert _run(FileLike(), progress_bar=False, tmp_path=tmp_path) == ""


def test_off_a_terminal_the_libraries_bars_are_off_too(tmp_path):
    from transformers.utils import logging as hf_logging
    _run(FileLike(), tmp_path=tmp_path)
    assert not hf_logging.is_progress_bar_enabled()


SCRIPT = textwrap.dedent("""
    import sys, warnings
    if sys.argv[1] == "quiet":
        from xfast.training.logging import quiet_repeated_warnings
        quiet_repeated_warnings()
    for step in range(5):
        warnings.warn("all_gather_into_tensor is deprecated", FutureWarning)
        with warnings.catch_warnings():  # what libraries do per batch; it resets the 'default' memory
            warnings.simplefilter("ignore")
""")


@pytest.mark.parametrize("mode,count", [("plain", 5), ("quiet", 1)])
def test_a_warning_repeated_every_step_prints_once(mode, count):
    err = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True).stderr
    assert err.count("all_gather_into_tensor is deprecated") == count


def test_eval_is_a_table_and_curves_are_plotted(tmp_path):
    stream = FileLike()
    logger = TrainLogger(tmp_path, total_steps=20, start_step=0, enabled=True, tensorboard=False,
                         progress_bar=False, stream=stream)
    logger.log_eval(0, {"demo/text_to_image/R@1": 0.1, "demo/text_to_image/R@5": 0.4})
    for step in range(1, 21):
        logger.count(4, 0.0)
        if step % 5 == 0:
            logger.log(step, {"loss": 2.0 / step, "logit_scale": 14.3, "loss/clip": 2.0 / step})
    logger.log_eval(20, {"demo/text_to_image/R@1": 0.5, "demo/text_to_image/R@5": 0.9})
    logger.close()
    png = tmp_path / "training_curves.png"  # written by close()
    text = stream.getvalue()
    assert "eval @ step 20\nmetric" in text
    row = next(line for line in text.splitlines() if line.startswith("demo/text_to_image/R@5") and "0.9000" in line)
    assert row.split() == ["demo/text_to_image/R@5", "0.9000"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_read_metrics_keeps_the_last_row_of_a_repeated_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "loss": 1.5},
            {"step": 20, "eval/x/R@1": 0.3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 30, "lo')
    got = read_metrics(path)
    assert got == [rows[0], rows[2], rows[3]]
    assert plot_training_curves(path, tmp_path / "c.png").is_file()
    path.write_text('{"step": 1}\n')
    with pytest.raises(ValueError, match="no training or evaluation rows"):
        plot_training_curves(path, tmp_path / "d.png")
