"""Crash safety of whole runs: one run is stopped by SIGTERM and killed (SIGKILL) at several
points, inside a checkpoint save and inside the fp32 export among them, and resumed each time
by the same command; its final weights and metrics must equal an uninterrupted run's bit for
bit (train.deterministic, CPU), with one metrics row per step and nothing temporary left.

The kills come from the XFAST_FAULT hook (xfast.training.faults), so they land at the same
point on every machine. Single-process runs are `python -m xfast.train` forked from the
`launcher` (tests/forkserver.py); the 2-rank run goes through the deepspeed launcher.
"""
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.test_train_run import TRAIN_PY, VENV_BIN, clean_env, final_weights, tiny_config, train_args
from xfast.distributed.rendezvous import free_port
from xfast.training import demo_data

VOLATILE = ("samples_per_s", "data_wait_share")  # wall-clock measurements


def fault_env(fault: str | None) -> dict:
    return dict(clean_env(), **({"XFAST_FAULT": fault} if fault else {}))


def run_with_fault(launcher, args, cwd: Path, fault: str | None, timeout: int = 400) -> subprocess.CompletedProcess:
    """`python -m xfast.train ARGS` (forked from the launcher) with XFAST_FAULT=fault."""
    return launcher.run("xfast.train", args, cwd=cwd, env=fault_env(fault), timeout=timeout)


def metric_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in rows]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    demo_data.generate(root / "demo", train=40, test=8, sentences=8, seed=11)
    return root


def crash_config(data: Path, num_workers: int) -> dict:
    cfg = tiny_config(data / "demo" / "images" / "train", data / "demo" / "tokenizer",
                      train={"steps": 8, "warmup_steps": 2}, checkpoint={"every_steps": 3, "keep_last": 2},
                      eval={"tasks": {"held_out": {"task": "retrieval", "data": str(data / "demo" / "images" / "test"),
                                                   "ks": [1]}}, "every_steps": 4})
    cfg["data"].update(num_workers=num_workers, persistent_workers=num_workers > 0)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_stopped_and_killed_run_resumes_to_the_uninterrupted_result(data, num_workers, launcher):
    cfg_path = data / f"crash_{num_workers}.json"
    cfg_path.write_text(json.dumps(crash_config(data, num_workers)))
    reference, resumed = data / f"reference_{num_workers}", data / f"resumed_{num_workers}"
    done = run_with_fault(launcher, train_args(cfg_path, f"output_dir={reference}"), data, None)
    assert done.returncode == 0, done.stderr[-4000:]

    args = train_args(cfg_path, f"output_dir={resumed}")
    checkpoints = resumed / "checkpoints"
    # (fault, what the interrupted run must have left): saves happen at steps 3, 6 and 8.
    interruptions = [
        ("train.step@2:TERM", "stopped"),        # clean stop: finish step 2, checkpoint it, exit 0
        ("save.written@3", "step_00000002"),     # killed inside a save: step 3 never appears
        ("save.renamed@6", "step_00000003"),     # killed after the rename, before `latest` moved
        ("train.step@8", "step_00000006"),       # killed mid-training; rows of step 7 were written
        ("export.written@8", "step_00000008"),   # killed inside the fp32 export
    ]
    for fault, left in interruptions:
        result = run_with_fault(launcher, args, data, fault)
        if left == "stopped":
            assert result.returncode == 0, result.stderr[-4000:]
            assert "rank 0: stop signal (SIGTERM): stopped after step 2, checkpoint step_00000002" in result.stderr
            left = "step_00000002"
        else:
            assert result.returncode == -signal.SIGKILL, (fault, result.returncode, result.stderr[-4000:])
        assert (checkpoints / "latest").read_text().strip() == left, fault
        assert not (resumed / "final").exists(), fault
    assert (checkpoints / "step_00000006").is_dir()  # renamed before the kill: the next start re-points to it

    final = run_with_fault(launcher, args, data, None)
    assert final.returncode == 0, final.stderr[-4000:]
    assert "re-pointed" not in final.stderr  # the earlier restarts repaired `latest`

    a, b = final_weights(reference), final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    rows_a, rows_b = metric_rows(reference), metric_rows(resumed)
    assert [r["step"] for r in rows_b] == [r["step"] for r in rows_a] == [1, 2, 3, 4, 4, 5, 6, 7, 8, 8]
    assert rows_b == rows_a  # the same losses, learning rates and evaluation results, bit for bit
    for run_dir in (reference, resumed):
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000006",
                                                                                  "step_00000008"]
        assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
@pytest.mark.multiprocess
def test_sigterm_on_one_rank_stops_every_rank_after_the_same_step(data):
    """Rank 1 alone gets SIGTERM during step 2: both ranks stop after step 2 (the stop flag is
    all-reduced at each step boundary), write one checkpoint, say so once each and exit 0."""
    cfg_path = data / "two_ranks.json"
    cfg = crash_config(data, 0)
    cfg["eval"] = {}
    cfg_path.write_text(json.dumps(cfg))
    output = data / "two_ranks"
    command = [str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN_PY),
               "--cfg", str(cfg_path), "--set", f"output_dir={output}"]
    result = subprocess.run(command, cwd=data, env=fault_env("train.step@2:TERM/1"), capture_output=True, text=True,
                            timeout=400)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    for rank in (0, 1):
        assert out.count(f"rank {rank}: stop signal") == 1, out[-4000:]
    assert "rank 1: stop signal (SIGTERM): stopped after step 2" in out
    assert "rank 0: stop signal (SIGTERM on another rank): stopped after step 2" in out
    assert (output / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert {p.name for p in (output / "checkpoints" / "step_00000002").glob("trainer_state_rank*.pt")} == {
        "trainer_state_rank0.pt", "trainer_state_rank1.pt"}
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_before_a_checkpoint_can_hold_it(data, launcher):
    # A learning rate of 1e30 (no warmup) on both towers takes their weights to ~1e30 in step 1 and
    # the loss to NaN in step 2, a repeated step whose features are not checked; logging comes only
    # at step 100, so the save due at step 2 is what must refuse, keeping step 1 as the latest
    # checkpoint. The logit scale keeps an ordinary rate: driven to 0 it would be refused by the
    # loss kernel first (a non-positive scale), not by the save.
    cfg = crash_config(data, 0)
    cfg["train"].update(lr=1e-3, tower_lr={"text": 1e30, "media": 1e30}, warmup_steps=0, steps=4)
    cfg["logging"]["every_steps"] = 100
    cfg["checkpoint"]["every_steps"] = 1
    cfg.pop("eval")
    cfg_path = data / "nan.json"
    cfg_path.write_text(json.dumps(cfg))
    run_dir = data / "nan"
    result = run_with_fault(launcher, train_args(cfg_path, f"output_dir={run_dir}"), data, None)
    assert result.returncode == 1, result.stderr[-4000:]
    assert ("the loss was NaN or inf at step 2" in result.stderr
            and "latest: step_00000001" in result.stderr), result.stderr[-4000:]
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step_00000001"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001"]
    assert not (run_dir / "final").exists()
