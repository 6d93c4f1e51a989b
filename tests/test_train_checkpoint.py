"""CheckpointManager on its own (a stand-in engine, one process): saves that complete or roll
back, `latest` re-pointed after a kill between rename and pointer write, no leftovers, clear
errors when the disk is full; the kill-safe folder replacement of the fp32 export."""
import errno
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from xfast.training.checkpoint import CheckpointError, CheckpointManager, clean_replace_leftovers, replace_dir, tag_for
from xfast.training.faults import _parse


class FakeEngine:
    """What CheckpointManager needs of a DeepSpeed engine: one tensor saved per tag."""

    def __init__(self, value: float = 0.0, fail_with: BaseException | None = None):
        self.weight = torch.tensor([value])
        self.fail_with = fail_with

    def save_checkpoint(self, save_dir, tag, save_latest):
        assert not save_latest
        folder = Path(save_dir) / tag
        folder.mkdir(parents=True)
        torch.save(self.weight, folder / "model.pt")
        if self.fail_with is not None:
            raise self.fail_with

    def load_checkpoint(self, load_dir, tag, **_):
        self.weight = torch.load(Path(load_dir) / tag / "model.pt")
        return str(Path(load_dir) / tag), {}


def entries(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_load_prune_and_rng(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (3, 6, 9):
        manager.save(FakeEngine(step), step, {"data": {"at": step}})
    assert entries(tmp_path) == ["latest", tag_for(6), tag_for(9)]  # nothing temporary left
    assert manager.latest_tag() == tag_for(9)

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    manager.save(FakeEngine(12), 12, {"data": {}})
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(2)
    random.seed(2)
    np.random.seed(2)
    engine = FakeEngine()
    state = manager.load(engine)
    assert state["step"] == 12 and engine.weight.item() == 12
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1] and np.random.rand() == expected[2]


def test_kill_between_rename_and_latest_is_repaired_on_start(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(FakeEngine(3), 3, {})
    manager.save(FakeEngine(6), 6, {})
    # The state a kill right after the rename of step 9 leaves (fault point save.renamed):
    # the folder is in place, `latest` still names step 6, a pointer write was under way.
    os.rename(tmp_path / tag_for(6), tmp_path / tag_for(9))
    manager.save(FakeEngine(6), 6, {})
    (tmp_path / ".latest.tmp4242").write_text("junk")
    (tmp_path / ".partial" / "x").mkdir(parents=True)
    (tmp_path / f".trash-{tag_for(3)}").mkdir()
    note = manager.recover()
    assert "re-pointed" in note and tag_for(9) in note
    assert manager.latest_tag() == tag_for(9)
    assert entries(tmp_path) == ["latest", tag_for(3), tag_for(6), tag_for(9)]
    assert manager.recover() is None  # nothing to repair the second time


def test_latest_naming_a_deleted_folder_is_repaired(tmp_path):
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(FakeEngine(3), 3, {})
    (tmp_path / "latest").write_text(tag_for(7) + "\n")
    assert manager.recover() is not None and manager.latest_tag() == tag_for(3)
    (tmp_path / tag_for(3)).rename(tmp_path / "elsewhere")
    manager.recover()
    assert manager.latest_tag() is None and not (tmp_path / "latest").exists()


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EROFS, "Read-only file system"), "read-only"),
    (RuntimeError("unexpected pickling failure"), "RuntimeError: unexpected pickling failure"),
])
def test_failed_save_rolls_back_and_says_why(tmp_path, error, reason):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(FakeEngine(3), 3, {})
    with pytest.raises(CheckpointError) as info:
        manager.save(FakeEngine(6, fail_with=error), 6, {})
    message = str(info.value)
    assert reason in message and tag_for(6) in message and f"{tag_for(3)} is still the latest" in message
    assert entries(tmp_path) == ["latest", tag_for(3)] and manager.latest_tag() == tag_for(3)


def test_torch_save_disk_full_error_without_errno_is_named(tmp_path, monkeypatch):
    """torch.save reports a full disk as RuntimeError('basic_ios::clear: iostream error'); the
    free space, less than one checkpoint, tells it apart."""
    import shutil
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(FakeEngine(3), 3, {})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 100))
    with pytest.raises(CheckpointError, match="no space left on the device \\(100 B free\\)"):
        manager.save(FakeEngine(6, fail_with=RuntimeError("basic_ios::clear: iostream error")), 6, {})


def test_replace_dir_never_leaves_a_half_written_target(tmp_path):
    target = tmp_path / "final"

    def write(text):
        def inner(folder):
            folder.mkdir()
            (folder / "w.txt").write_text(text)
        return inner

    replace_dir(target, write("one"))
    assert (target / "w.txt").read_text() == "one" and entries(tmp_path) == ["final"]

    def dies(folder):
        write("half")(folder)
        raise KeyboardInterrupt  # stands for a kill while writing
    with pytest.raises(KeyboardInterrupt):
        replace_dir(target, dies)
    assert (target / "w.txt").read_text() == "one"
    clean_replace_leftovers(target)
    assert entries(tmp_path) == ["final"]

    # A kill between moving the old copy aside and moving the new one in:
    os.rename(target, tmp_path / ".final.old")
    write("new")(tmp_path / ".final.partial")
    clean_replace_leftovers(target)
    assert entries(tmp_path) == ["final"] and (target / "w.txt").read_text() == "one"
    replace_dir(target, write("two"))
    assert (target / "w.txt").read_text() == "two" and entries(tmp_path) == ["final"]


def test_fault_spec_parsing(monkeypatch):
    monkeypatch.setenv("XFAST_FAULT", "save.written@6:term/1")
    assert _parse(os.environ["XFAST_FAULT"]) == ("save.written", 6, 15, 1)
    monkeypatch.setenv("XFAST_FAULT", "export.written@8")
    assert _parse(os.environ["XFAST_FAULT"]) == ("export.written", 8, 9, None)
    monkeypatch.setenv("XFAST_FAULT", "save.written")
    with pytest.raises(ValueError, match="POINT@STEP"):
        _parse(os.environ["XFAST_FAULT"])
