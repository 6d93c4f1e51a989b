"""`xfast study`: arm selection and validation, the report's aggregation, and a real study of
2 tiny arms x 2 seeds: killed mid-run and resumed, finished runs skipped, and the report's
numbers equal to `xfast eval` run by hand on the same checkpoints."""
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from xfast.config import ConfigError
from xfast.study.arms import GRID, parse_arms
from xfast.study.report import aggregate, markdown_table
from xfast.study.runner import CALL_HOOK, Run, StudyPlan, _command_caller, plan_runs
from xfast.training import demo_data

TINY = ["train.steps=20", "train.warmup_steps=2", "checkpoint.every_steps=2", "checkpoint.keep_last=1",
        "logging.every_steps=2", "logging.progress_bar=false", "logging.tensorboard=false",
        "eval.before_training=false", "data.num_workers=0", "data.batch_size=8", "deepspeed.zero_stage=0",
        "train.deterministic=true", "model.embed_dim=16"]


def test_grid_is_the_papers_twelve_arms():
    assert len(GRID) == 12 and {a.split("_")[0] for a in GRID} == {"clip", "cyclip", "clap", "cyclap"}
    image_arms = [a.name for a in parse_arms(None, {"image"})]
    assert image_arms == ["clip_none", "clip_unsup", "clip_sup", "cyclip_none", "cyclip_unsup", "cyclip_sup"]
    assert [a.modality for a in parse_arms(None, {"audio", "image"})].count("audio") == 6


@pytest.mark.parametrize("text, modalities, message", [
    ("clip_none,clip_bogus", {"image"}, "'clip_bogus' is not an arm"),
    ("clap_none", {"image"}, "clap_none trains on audio, but no --base"),
    ("clip_none,clip_none", {"image"}, "listed twice"),
    (" , ", {"image"}, "no arm given"),
])
def test_bad_arms_are_named(text, modalities, message):
    with pytest.raises(ConfigError, match=message):
        parse_arms(text, modalities)


def test_arm_needing_a_stream_without_one_fails_before_training(tmp_path):
    plan = StudyPlan(bases={"image": "demo_clip_tiny"}, arms=parse_arms("clip_none,clip_unsup", {"image"}),
                     seeds=[0], out=tmp_path)
    with pytest.raises(ConfigError, match="clip_unsup .*--sentences"):
        plan_runs(plan)
    plan.arms = parse_arms("clip_sup", {"image"})
    with pytest.raises(ConfigError, match="clip_sup .*--nli"):
        plan_runs(plan)


def test_run_layers_keep_the_base_towers_and_take_the_arms_objective(tmp_path):
    plan = StudyPlan(bases={"image": "demo_clip_tiny"}, arms=parse_arms("cyclip_sup", {"image"}), seeds=[3],
                     out=tmp_path, nli="demo_nli", overrides=["train.steps=20", "train.warmup_steps=2"])
    (run,) = plan_runs(plan)
    from xfast.training.config import load_config
    cfg = load_config(run.layers, plan.overrides)
    assert cfg.model.image.type == "vit"  # demo_clip_tiny's tower, not the arm file's clip_vision
    assert (cfg.objective.cyclip_lambda1, cfg.objective.simcse.mode) == (0.25, "sup")
    assert cfg.train.seed == 3 and cfg.nli_data is not None and cfg.sentence_data is None
    assert Path(cfg.output_dir) == tmp_path.resolve() / "runs" / "cyclip_sup" / "seed3"


@pytest.mark.parametrize("spec, message", [("xfast.no_such_module:call", "No module named"),
                                           ("subprocess:no_such_function", "no_such_function"),
                                           ("subprocess", "no module:function form")])
def test_a_bad_call_hook_is_named(monkeypatch, spec, message):
    monkeypatch.setenv(CALL_HOOK, spec)
    with pytest.raises(ConfigError, match=f"XFAST_STUDY_CALL={spec!r}: expected an importable module:function .*{message}"):
        _command_caller()
    monkeypatch.delenv(CALL_HOOK)
    assert _command_caller() is subprocess.call


def test_aggregate_is_mean_and_sample_std_over_seeds():
    arms = parse_arms("clip_none,clip_sup", {"image"})
    runs = [Run(arm, seed, Path("."), []) for seed in (0, 1, 2) for arm in arms]
    values = {"clip_none": [0.1, 0.2, 0.6], "clip_sup": [0.5, 0.5, 0.5]}
    results = {r.label: {"metrics": {"retrieval": {"text_to_image/R@1": values[r.arm.name][r.seed]},
                                     "geometry": {"cross/alignment": float(r.seed)}}} for r in runs}
    table = aggregate(results, runs)
    cell = table["clip_none"]["text→image R@1"]
    assert cell["mean"] == pytest.approx(0.3) and cell["n"] == 3
    assert cell["std"] == pytest.approx(((0.2 ** 2 + 0.1 ** 2 + 0.3 ** 2) / 2) ** 0.5)
    assert table["clip_sup"]["text→image R@1"]["std"] == 0.0
    assert table["clip_sup"]["cross-modal alignment"]["mean"] == pytest.approx(1.0)
    text = markdown_table(table)
    assert "| clip_none | 30.0 ± 26.5 |" in text and "1.000 ± 1.000" in text


# ---- a real study: 2 arms x 2 seeds through the CLI --------------------------------------------


def _env(data: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    return dict(env, XFAST_DEMO_DATA=str(data), DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")


def _study_args(out: Path, data: Path) -> list[str]:
    args = ["study", "--base", "demo_clip_tiny", "--arms", "clip_none,clip_unsup", "--sentences",
            str(data / "sentences.json"), "--seeds", "0,1", "--out", str(out), "--sts", str(data / "sts.tsv")]
    return args + [a for o in TINY for a in ("--set", o)]


@pytest.fixture(scope="module")
def study(tmp_path_factory, launcher):
    """A study killed inside its first run, then run to the end, then run once more.

    Each `python -m xfast.cli study` is forked from the `launcher` (tests/forkserver.py), and the
    study forks its trainer runs in turn through its XFAST_STUDY_CALL hook (tests.forkserver.call):
    real processes in the study's process group, without a fresh interpreter's imports each."""
    root = tmp_path_factory.mktemp("study")
    data = root / "demo"
    demo_data.generate(data, train=48, test=12, sentences=24, nli=8, seed=3)
    (data / "sts.tsv").write_text("a red circle\ta red square\t3.5\na blue circle\ta green triangle\t1.0\n"
                                  "a loud beep\ta quiet beep\t3.0\na red circle\ta red circle above\t4.5\n")
    sentences = {"sources": [{"urls": str(data / "sentences" / "train.txt")}], "modality": "text", "batch_size": 8,
                 "num_workers": 0, "text": {"max_length": 24}}
    (data / "sentences.json").write_text(json.dumps({"sentence_data": sentences}))
    out = root / "out"
    first_run = out / "runs" / "clip_none" / "seed0"
    env = dict(_env(data), XFAST_STUDY_CALL="tests.forkserver:call")
    killed = launcher.start("xfast.cli", _study_args(out, data), cwd=root, env=env, new_session=True)
    deadline = time.monotonic() + 600
    while not (first_run / "checkpoints" / "latest").is_file():
        assert killed.poll() is None, killed.result()
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.01)
    os.killpg(killed.pid, signal.SIGKILL)  # the study and the trainer it forked
    assert killed.result().returncode == -signal.SIGKILL
    resumed = launcher.run("xfast.cli", _study_args(out, data), cwd=root, env=env, timeout=1200)
    again = launcher.run("xfast.cli", _study_args(out, data), cwd=root, env=env, timeout=600)
    return {"root": root, "data": data, "out": out, "first_run": first_run, "resumed": resumed, "again": again}


@pytest.mark.slow
@pytest.mark.multiprocess
def test_killed_study_resumes_the_interrupted_run_and_finishes(study):
    resumed = study["resumed"]
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "[1/4] clip_none/seed0: resuming" in resumed.stdout
    log = (study["first_run"] / "train.log").read_text()
    assert log.count("$ ") == 2 and "resumed from" in log  # one killed and one resumed trainer
    for arm in ("clip_none", "clip_unsup"):
        for seed in (0, 1):
            assert (study["out"] / "runs" / arm / f"seed{seed}" / "study_done.json").is_file()
    report = (study["out"] / "report.md").read_text()
    assert "| clip_none |" in report and "| clip_unsup |" in report and "STS Spearman" in report
    assert (study["out"] / "alignment_uniformity.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.multiprocess
def test_rerun_skips_finished_runs(study):
    again = study["again"]
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("finished earlier, skipped") == 4
    assert "training" not in again.stdout and "evaluating" not in again.stdout  # evaluations are cached too


@pytest.mark.slow
@pytest.mark.multiprocess
def test_report_numbers_equal_xfast_eval_by_hand(study, launcher):
    record = json.loads((study["out"] / "report.json").read_text())
    run = record["runs"]["clip_unsup/seed1"]
    heldout = record["evaluation"]["heldout"]["image"]
    checks = {"retrieval": ["--task", "retrieval", "--data", heldout, "--ks", "1", "5"],
              "geometry": ["--task", "geometry", "--data", heldout],
              "sts": ["--task", "sts", "--data", str(study["data"] / "sts.tsv"), "--space", "sentence"]}
    # The three evaluations are independent processes (forked from the launcher): they run side by side.
    outs = {task: study["root"] / f"by_hand_{task}" for task in checks}
    evals = {task: launcher.start("xfast.cli", ["eval", "--ckpt", run["folder"], *options, "--out", str(outs[task]),
                                                "--no-progress"], cwd=study["root"], env=_env(study["data"]))
             for task, options in checks.items()}
    for task, process in evals.items():
        out, options = outs[task], checks[task]
        done = process.result(timeout=300)
        assert done.returncode == 0, done.stderr
        by_hand = json.loads((out / f"{options[1]}.json").read_text())["checkpoints"]
        (metrics,) = [c["metrics"] for c in by_hand.values()]
        assert metrics == run["metrics"][task], task
        assert run["commands"][task].startswith(f"xfast eval --ckpt {run['folder']} --task {options[1]}")
    per_seed = [record["runs"][f"clip_unsup/seed{s}"]["metrics"]["retrieval"]["text_to_image/R@1"] for s in (0, 1)]
    assert record["table"]["clip_unsup"]["text→image R@1"]["values"] == per_seed
