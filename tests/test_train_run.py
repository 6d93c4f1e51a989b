"""End-to-end training runs of a tiny CLIP: kill -9 + resume, corrupt shards, 2-rank ZeRO-3.

Each run is a separate process on a few dozen procedural samples: the reference run is the
documented `python -m xfast.train` in a fresh interpreter, the 2-rank run goes through
`deepspeed --num_gpus 2 xfast/train.py`, and the other single-process runs are `python -m
xfast.train` forked from the `launcher` (tests/forkserver.py), which imported the training stack once.
"""
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import xfast
from xfast.distributed.rendezvous import free_port
from xfast.training import demo_data

TRAIN_PY = Path(xfast.__file__).resolve().parent / "train.py"
VENV_BIN = Path(sys.executable).parent


def tiny_config(data_dir: Path, tokenizer: Path, **sections) -> dict:
    raw = {
        "model": {"text": {"type": "bert", "preset": "tiny", "tokenizer": str(tokenizer)},
                  "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16},
        "data": {"sources": [{"urls": str(data_dir)}], "modality": "image", "batch_size": 8, "num_workers": 0,
                 "shuffle_buffer": 16, "image": {"size": 32}, "text": {"max_length": 24}},
        "train": {"steps": 10, "lr": 2e-3, "warmup_steps": 2, "weight_decay": 0.05, "deterministic": True},
        "deepspeed": {"zero_stage": 2},
        "logging": {"every_steps": 1, "progress_bar": False},
        "checkpoint": {"every_steps": 3, "keep_last": 2},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


def clean_env() -> dict:
    """This process's environment without the process-group variables that an in-process
    DeepSpeed test may have set (a child would try to join that group)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")


def run(args, *, cwd, timeout=300, **kwargs):
    return subprocess.run(args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout, **kwargs)


def train_args(cfg_path, *overrides) -> list[str]:
    return ["--cfg", str(cfg_path), *(a for o in overrides for a in ("--set", o))]


def train_command(cfg_path, *overrides):
    return [sys.executable, "-m", "xfast.train", *train_args(cfg_path, *overrides)]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted((run_dir / "final").rglob("*.safetensors")):
        for key, value in load_file(path).items():
            tensors[f"{path.relative_to(run_dir / 'final')}:{key}"] = value
    assert tensors, f"no exported weights under {run_dir / 'final'}"
    return tensors


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _corrupt_copy(good: Path, out_dir: Path) -> None:
    """Two damaged shards from a good one: undecodable images and bad JSON in one, a cut-off
    tar in the other."""
    with tarfile.open(good) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    damaged = io.BytesIO()
    with tarfile.open(fileobj=damaged, mode="w") as tar:
        for index, (name, payload) in enumerate(members[:36]):
            if name.endswith(".jpg") and index % 9 == 0:
                payload = b"\xff\xd8 not a jpeg at all"
            elif name.endswith(".json") and index % 9 == 5:  # other samples than the images
                payload = b"{broken"
            info = tarfile.TarInfo("bad_" + name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (out_dir / "shard-bad.tar").write_bytes(damaged.getvalue())
    raw = good.read_bytes()
    (out_dir / "shard-cut.tar").write_bytes(raw[: len(raw) // 3 + 100])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_run")
    demo_data.generate(root / "demo", train=48, test=12, sentences=20, seed=5)
    good = next((root / "demo" / "images" / "train").glob("*.tar"))
    corrupt = root / "corrupt"
    corrupt.mkdir()
    shutil.copy(good, corrupt / "shard-good.tar")
    _corrupt_copy(good, corrupt)
    return root


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    """The reference run on shards with corrupt samples, evaluated at the end."""
    cfg = tiny_config(workdir / "corrupt", workdir / "demo" / "tokenizer",
                      eval={"tasks": {"held_out": {"task": "retrieval", "data": str(workdir / "demo" / "images" / "test"),
                                                   "ks": [1, 5]}}, "before_training": True})
    cfg_path = workdir / "resume.json"
    cfg_path.write_text(json.dumps(cfg))
    result = run(train_command(cfg_path, f"output_dir={workdir / 'run_a'}"), cwd=workdir)
    assert result.returncode == 0, result.stderr[-4000:]
    return cfg_path, workdir / "run_a", result


@pytest.mark.slow
@pytest.mark.multiprocess
def test_corrupt_samples_are_skipped_and_reported(uninterrupted):
    _, run_dir, result = uninterrupted
    assert (run_dir / "final" / "xfast_config.json").is_file()
    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    assert last["step"] == 10  # 80 samples: more than one epoch of the ~70 usable ones
    assert last["skipped/corrupt_image"] >= 1 and last["skipped/corrupt_metadata"] >= 1
    assert last["skipped/truncated_shard"] >= 1
    assert "skipped data: " in result.stderr + result.stdout and "corrupt_image=" in result.stderr + result.stdout
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if "eval/" in line]
    assert evals and 0 <= evals[-1]["eval/held_out/text_to_image/R@5"] <= 1
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["train"]["steps"] == 10 and saved["output_dir"] == str(run_dir)
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert tags == ["step_00000009", "step_00000010"]  # keep_last 2 of saves at 3, 6, 9, 10
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_demo_report_reads_a_run(uninterrupted):
    from xfast.training.demo import summarize, table
    _, run_dir, _ = uninterrupted
    summary = summarize(run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/held_out/text_to_image/R@1" in r]
    assert [r["step"] for r in evals] == [0, 10]
    assert summary["text_to_image/R@1/before"] == evals[0]["eval/held_out/text_to_image/R@1"]
    assert summary["image_to_text/R@5/after"] == evals[1]["eval/held_out/image_to_text/R@5"]
    assert summary["loss_first"] == losses(run_dir)[1] and summary["steps"] == 10
    report = table({"tiny": dict(summary, seconds=12.0)}, test_items=12)
    assert "chance R@1 = 8.3%" in report and "| tiny | text -> image |" in report


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_then_same_command_resumes_to_the_same_weights(uninterrupted, workdir, launcher):
    cfg_path, run_a, _ = uninterrupted
    run_b = workdir / "run_b"
    args = train_args(cfg_path, f"output_dir={run_b}")
    process = launcher.start("xfast.train", args, cwd=workdir, env=clean_env())
    latest = run_b / "checkpoints" / "latest"
    deadline = time.time() + 240
    while not latest.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.result(timeout=60).returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest.read_text().strip() in ("step_00000003", "step_00000006", "step_00000009")
    assert not (run_b / "final").exists()

    resumed = launcher.run("xfast.train", args, cwd=workdir, env=clean_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    a, b = final_weights(run_a), final_weights(run_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=1e-5, msg=key)
    loss_a, loss_b = losses(run_a), losses(run_b)
    for step in range(int(latest.read_text().strip()[5:]) + 1, 11):
        assert loss_b[step] == pytest.approx(loss_a[step], rel=1e-5, abs=1e-6)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_zero3_matches_one_rank(workdir, launcher):
    """One shard read by 2 ranks splits sample-wise (even/odd), so the 2 x 8 global batch holds the
    same 16 samples as the 1-rank batch; without dropout or augmentation the runs must agree."""
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    base = tiny_config(workdir / "demo" / "images" / "train", workdir / "demo" / "tokenizer",
                       train={"steps": 3, "warmup_steps": 1}, checkpoint={"every_steps": 0})
    base["model"]["text"]["overrides"] = no_dropout
    base["model"]["image"]["overrides"] = no_dropout
    base["data"].update(shuffle_buffer=0, shard_shuffle=False)
    base["data"]["image"].update(train_crop_scale=[1.0, 1.0], train_crop_ratio=[1.0, 1.0])
    cfg_path = workdir / "zero3.json"
    cfg_path.write_text(json.dumps(base))

    one = launcher.run("xfast.train", train_args(cfg_path, f"output_dir={workdir / 'one'}", "data.batch_size=16",
                                                 "deepspeed.zero_stage=0"), cwd=workdir, env=clean_env(), timeout=300)
    assert one.returncode == 0, one.stderr[-4000:]
    two = run([str(VENV_BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), str(TRAIN_PY),
               "--cfg", str(cfg_path), "--set", f"output_dir={workdir / 'two'}", "--set", "deepspeed.zero_stage=3"],
              cwd=workdir, timeout=400)
    assert two.returncode == 0, two.stdout[-4000:] + two.stderr[-4000:]

    info = json.loads((workdir / "two" / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["zero_stage"] == 3
    held = info["parameters_held_per_rank"]
    # Each rank holds about half of every parameter (a few elements of padding per tensor).
    assert all(0 < n <= info["parameters"] / 2 + 200 for n in held), info
    assert sum(held) >= info["parameters"]

    loss_one, loss_two = losses(workdir / "one"), losses(workdir / "two")
    assert sorted(loss_one) == sorted(loss_two) == [1, 2, 3]
    for step in loss_one:
        assert loss_two[step] == pytest.approx(loss_one[step], rel=1e-4), step
    # Adam scales every update to about lr (2e-3), so rounding-level differences in gradients that
    # are truly ~0 (attention key biases) can move a weight by a small fraction of one step.
    a, b = final_weights(workdir / "one"), final_weights(workdir / "two")
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=5e-5, rtol=1e-4, msg=key)
