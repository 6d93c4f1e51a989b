"""xfast.training.process: the malloc settings of a training process and its thread count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xfast.training import process

# Runs in a fresh interpreter (mallopt settings are process-wide and cannot be undone): mallinfo2
# tells where a 64 MiB block came from (hblkhd: bytes in mmapped blocks; fordblks: free bytes kept
# in the heap), with and without keep_freed_memory, in the process and in a child it forks.
PROBE = textwrap.dedent("""
    import ctypes, json, os, sys
    from xfast.training.process import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                     "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    BLOCK = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)

    def where():
        before = libc.mallinfo2()
        block = libc.malloc(BLOCK)
        ctypes.memset(block, 1, BLOCK)
        held = libc.mallinfo2()
        libc.free(block)
        after = libc.mallinfo2()
        return {"mmapped": held.hblkhd - before.hblkhd, "kept_after_free": after.fordblks}

    result = {"set": keep_freed_memory() if sys.argv[1] == "tune" else None, "parent": where()}
    pid = os.fork()
    if pid == 0:
        print(json.dumps(where()), file=open(sys.argv[2], "w"))
        os._exit(0)
    os.waitpid(pid, 0)
    result["child"] = json.load(open(sys.argv[2]))
    print(json.dumps(result))
""")

BLOCK = 64 << 20


def _probe(tmp_path, mode: str, **env) -> dict:
    import json
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "XFAST_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode, str(tmp_path / "child.json")], capture_output=True,
                         text=True, env={**environ, **env}, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def _glibc_version() -> tuple[int, ...]:
    name = os.confstr("CS_GNU_LIBC_VERSION") if sys.platform.startswith("linux") else None  # "glibc 2.36"
    return tuple(int(part) for part in name.split()[1].split(".")[:2]) if name else ()


glibc_only = pytest.mark.skipif(_glibc_version() < (2, 33), reason="mallopt is glibc's; mallinfo2 needs glibc >= 2.33")


@glibc_only
def test_glibc_defaults_map_and_unmap_a_large_block(tmp_path):
    # the control: without the settings a 64 MiB block is mmapped and given back on free
    result = _probe(tmp_path, "plain")
    for side in ("parent", "child"):
        assert result[side]["mmapped"] >= BLOCK
        assert result[side]["kept_after_free"] < BLOCK


@glibc_only
def test_keep_freed_memory_serves_large_blocks_from_the_heap_and_keeps_them(tmp_path):
    result = _probe(tmp_path, "tune")
    assert result["set"] is True
    for side in ("parent", "child"):  # a forked loader worker inherits the settings
        assert result[side]["mmapped"] == 0
        assert result[side]["kept_after_free"] >= BLOCK


@glibc_only
@pytest.mark.parametrize("env", [{"XFAST_MALLOC": "default"}, {"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_the_user_opts_out_or_sets_glibc_s_own_variables(tmp_path, env):
    result = _probe(tmp_path, "tune", **env)
    assert result["set"] is False
    assert result["parent"]["mmapped"] >= BLOCK


@glibc_only
def test_a_tunable_of_another_glibc_part_leaves_the_settings_on(tmp_path):
    result = _probe(tmp_path, "tune", GLIBC_TUNABLES="glibc.pthread.rseq=0")
    assert result["set"] is True
    assert result["parent"]["mmapped"] == 0


@pytest.mark.parametrize("cores, ranks, workers, threads", [
    (2, 1, 1, 1),  # the demo: 1 rank and its loader worker on 2 cores
    (2, 1, 0, 2),
    (2, 2, 1, 1),  # never below 1
    (16, 2, 3, 5),
    (16, 1, 0, 16),
])
def test_torch_threads_share_the_cores_with_ranks_and_loader_workers(monkeypatch, cores, ranks, workers, threads):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert process.torch_threads(ranks, workers) == threads


# Runs in a fresh interpreter (gc.freeze is process-wide): many small tracked objects, a forked
# child that keeps sharing their pages, then a full collection in the parent; its minor page
# faults are the pages the collection wrote to (each write to a shared page copies it).
FORK_PROBE = textwrap.dedent("""
    import gc, json, os, resource, sys
    from xfast.training.process import freeze_objects_before_fork

    def resident():
        return int(open("/proc/self/statm").read().split()[1])

    start = resident()
    objects = [[] for _ in range(300_000)]  # lists, each tracked by the collector; ~90% of the pages
    pages = resident() - start  # the pages they take
    if sys.argv[1] == "freeze":
        freeze_objects_before_fork()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker: holds the shared pages until the parent is done
        os.read(reader, 1)
        os._exit(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    os.write(writer, b"x")
    os.waitpid(pid, 0)
    print(json.dumps({"pages": pages, "faults": faults, "frozen": gc.get_freeze_count()}))
""")


def _fork_probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", FORK_PROBE, mode], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_frozen_objects_keep_their_pages_shared_with_a_forked_worker():
    plain, frozen = _fork_probe("plain"), _fork_probe("freeze")
    # The collection writes to every tracked object's header, so every page holding them is
    # copied (an empty list takes 80 bytes, its pointer in the outer list 8: ~90% of the pages);
    # frozen, it examines none of them and copies a few pages of its own.
    assert plain["faults"] > plain["pages"] / 2, plain
    assert frozen["faults"] < frozen["pages"] / 20, frozen
    assert frozen["frozen"] >= 300_000 and plain["frozen"] == 0


# Runs in a process of its own (a Trainer sets process-wide state: the process group, threads),
# forked from the `launcher` (it froze nothing): a reference cycle alive while a Trainer is built,
# dropped afterwards, must still be collected.
TRAINER_PROBE = textwrap.dedent("""
    import gc, json, sys, weakref
    from xfast.config import parse
    from xfast.training import demo_data
    from xfast.training.config import TrainConfig
    from xfast.training.trainer import Trainer
    from tests.test_train_run import tiny_config

    class Node:
        pass

    root = sys.argv[1]
    frozen_before = gc.get_freeze_count()  # 0: the launcher that forked this process froze nothing
    demo_data.generate(f"{root}/demo", train=16, test=4, sentences=4, seed=1)
    raw = tiny_config(f"{root}/demo/images/train", f"{root}/demo/tokenizer")
    raw["output_dir"] = f"{root}/run"
    cycle = Node()
    cycle.self = cycle
    alive = weakref.ref(cycle)
    trainer = Trainer(parse(TrainConfig, raw, "config"))
    frozen = gc.get_freeze_count()
    del cycle
    gc.collect()
    print(json.dumps({"frozen_before": frozen_before, "frozen": frozen, "cycle_freed": alive() is None}))
""")


@pytest.mark.multiprocess
def test_a_trainer_leaves_the_garbage_collector_alone(tmp_path, launcher):
    """gc.freeze would keep every cycle alive at that moment forever (modules, engines, anything
    the caller holds): the Trainer class leaves it to the one-run entry point, so a process that
    builds several Trainers (a notebook, a sweep, a test session) still frees its garbage."""
    from tests.test_train_run import clean_env
    out = launcher.run_code(TRAINER_PROBE, [tmp_path], cwd=tmp_path, timeout=300,
                            env=dict(clean_env(), PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"frozen_before": 0, "frozen": 0, "cycle_freed": True}, result


def test_the_train_entry_point_freezes_once_the_trainer_is_built(monkeypatch):
    """The fork fix stays in `xfast train`: objects are frozen after the Trainer is built and
    before train() (where the loaders fork their workers)."""
    import gc

    import xfast.train
    import xfast.training.trainer
    seen = {}

    class Probe:
        def __init__(self, cfg):
            seen["frozen_at_build"] = gc.get_freeze_count()

        def train(self):
            seen["frozen_at_train"] = gc.get_freeze_count()
            return 0

    monkeypatch.setattr(xfast.training.trainer, "Trainer", Probe)
    gc.unfreeze()
    try:
        assert xfast.train.train(object()) == 0
    finally:
        gc.unfreeze()
    assert seen["frozen_at_build"] == 0 and seen["frozen_at_train"] > 0, seen
