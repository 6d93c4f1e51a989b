"""Start-up checks (data paths, output folder), metrics rows after a
resume, and data draws that leave the global torch RNG alone."""
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from xfast.config import ConfigError, parse
from xfast.data import DataConfig
from xfast.training import demo_data
from xfast.training.logging import TrainLogger
from xfast.training.preflight import (
    StartupError,
    check_data_paths,
    check_free_space,
    check_shards,
    check_writable,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    demo_data.generate(root / "demo", train=16, test=4, sentences=8, seed=3)
    return root / "demo"


def test_shards_must_exist_and_hold_samples(demo, tmp_path):
    train = demo / "images" / "train"
    check_shards(str(train), "data.sources[0].urls")
    with pytest.raises(ConfigError, match=r"data.sources\[0\].urls: 1 of 1 shard\(s\) do not exist, e.g. '.*nope.tar'"):
        check_shards(str(tmp_path / "nope.tar"), "data.sources[0].urls")
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty files"):
        check_shards(str(tmp_path / "empty.tar"), "x")
    (tmp_path / "junk.tar").write_bytes(b"\0" * 2048)  # two zero blocks: a valid, empty tar
    with pytest.raises(ConfigError, match="the first shard .*junk.tar' holds no samples"):
        check_shards(str(tmp_path / "junk.tar"), "x")


def test_eval_paths_are_checked_before_any_model(demo, tmp_path):
    from xfast.training.config import load_config
    cfg_path = tmp_path / "cfg.json"
    raw = {"model": {"text": {"type": "bert", "preset": "tiny", "tokenizer": str(demo / "tokenizer")},
                     "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16},
           "data": {"sources": [{"urls": str(demo / "images" / "train")}], "modality": "image", "batch_size": 4,
                    "text": {"max_length": 24}, "image": {"size": 32}},  # sizes of the tiny towers
           "eval": {"tasks": {"held_out": {"task": "retrieval", "data": str(demo / "images" / "test")},
                              "sts": {"task": "sts", "data": str(tmp_path / "missing-sts.tsv")}}}}
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="eval.tasks.sts.data: '.*missing-sts.tsv' does not exist"):
        check_data_paths(load_config([str(cfg_path)], []))
    del raw["eval"]["tasks"]["sts"]
    raw["eval"]["tasks"]["held_out"]["data"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="eval.tasks.held_out.data"):
        check_data_paths(load_config([str(cfg_path)], []))


def test_output_must_be_writable(tmp_path):
    check_writable(tmp_path / "run" / "checkpoints")
    assert os.listdir(tmp_path / "run" / "checkpoints") == []
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(StartupError, match="output_dir .*file/run is not writable: Not a directory"):
        check_writable(tmp_path / "file" / "run")


def test_free_space_for_checkpoints(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10_000_000))
    root = tmp_path / "checkpoints"
    # 100k parameters x 16 B = 1.6 MB per checkpoint, 3 + 1 of them and a 0.4 MB export: 6.8 MB fits
    check_free_space(root, parameters=100_000, keep_last=3, export=True)
    with pytest.raises(StartupError, match=r"no space for checkpoints in .*: 9.5 MB free, the run needs about "
                                           r"12.6 MB \(1.5 MB per checkpoint, checkpoint.keep_last=7"):
        check_free_space(root, parameters=100_000, keep_last=7, export=True)
    # An existing checkpoint is measured, and counts as one of those kept.
    (root / "step_00000010").mkdir(parents=True)
    (root / "step_00000010" / "blob").write_bytes(b"\0" * 3_000_000)
    with pytest.raises(StartupError, match=r"2.9 MB per checkpoint"):
        check_free_space(root, parameters=100_000, keep_last=4, export=False)  # 4 more x 3 MB
    check_free_space(root, parameters=100_000, keep_last=3, export=False)  # 3 more x 3 MB


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_metrics_rows_after_the_resumed_step_are_dropped(tmp_path):
    logger = TrainLogger(tmp_path, total_steps=9, start_step=0, enabled=True, tensorboard=False, progress_bar=False)
    logger.log_metrics(0, {"eval/r1": 0.1})
    for step in range(1, 8):
        logger.log(step, {"loss": float(step)})
    logger.close()
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 8, "lo')  # a row cut short by the kill
    # resumed from the checkpoint of step 5: its rows (logged before it was saved) stay
    logger = TrainLogger(tmp_path, total_steps=9, start_step=5, enabled=True, tensorboard=False, progress_bar=False)
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3, 4, 5]
    for step in range(6, 10):
        logger.log(step, {"loss": float(step)})
    logger.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == list(range(10))
    # no checkpoint to resume from: the run starts over, and so does its history
    TrainLogger(tmp_path, total_steps=9, start_step=0, enabled=True, tensorboard=False, progress_bar=False).close()
    assert _rows(tmp_path / "metrics.jsonl") == []


@pytest.mark.slow
def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logger = TrainLogger(tmp_path, total_steps=8, start_step=0, enabled=True, tensorboard=True, progress_bar=False)
    for step in range(1, 7):
        logger.log(step, {"loss": float(step)})
    logger.close()
    time.sleep(1.1)  # event files are named by the second they were opened
    logger = TrainLogger(tmp_path, total_steps=8, start_step=4, enabled=True, tensorboard=True, progress_bar=False)
    for step in range(5, 9):
        logger.log(step, {"loss": 100.0 + step})
    logger.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    seen = [(e.step, e.value) for e in events.Scalars("loss")]
    assert seen == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_drawing_batches_leaves_the_global_rng_alone(demo, num_workers):
    """A DataLoader draws its workers' base seed from the global torch RNG whenever its iterator
    starts; a resume restarts the workers, so the draw would shift every later dropout mask."""
    from transformers import AutoTokenizer

    from xfast.training.streams import EndlessStream
    cfg = parse(DataConfig, {"sources": [{"urls": str(demo / "images" / "train")}], "modality": "image",
                             "batch_size": 4, "num_workers": num_workers, "image": {"size": 32},
                             "shuffle_buffer": 4}, "data")
    stream = EndlessStream("pairs", cfg, AutoTokenizer.from_pretrained(str(demo / "tokenizer")), rank=0, world_size=1)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    for _ in range(6):  # more than one epoch of 16 samples
        stream.next()
    assert torch.equal(torch.get_rng_state(), before)


def test_missing_training_data_fails_at_config_time(demo, tmp_path, capsys):
    from xfast.train import main
    raw = {"model": {"text": {"type": "bert", "preset": "tiny", "tokenizer": str(demo / "tokenizer")},
                     "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16},
           "data": {"sources": [{"urls": str(tmp_path / "shards-{0..3}.tar")}], "modality": "image", "batch_size": 4,
                    "image": {"size": 32}, "text": {"max_length": 24}},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.json").write_text(json.dumps(raw))
    assert main(["--cfg", str(tmp_path / "cfg.json"), "--check"]) == 2
    assert ("config error: data.sources[0].urls: 4 of 4 shard(s) do not exist, e.g. "
            f"'{tmp_path / 'shards-0.tar'}'") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
