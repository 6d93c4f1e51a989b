"""Train every (arm, seed) of a study in its own folder, then evaluate and report.

Each run is the trainer's own command (`python -m xfast.train`, or `deepspeed` / `torchrun` with
the same flags as training) on the layers: base config, [sentence or NLI stream], and a small
per-run layer (objective of the arm, seed, output folder) written next to the run. Rerunning
the same study skips finished runs (marker `study_done.json`) and lets the trainer resume an
interrupted one from its checkpoints.

Hook: each run's command is started with `subprocess.call(command, stdout=LOG, stderr=STDOUT,
env=ENV)`. The environment variable XFAST_STUDY_CALL="package.module:function" names a function
with that signature to call instead (it must run the command as a real child process and return
its exit status); the test suite uses it to fork runs from a process that imported the training
stack once (tests/forkserver.py). Users leave it unset.
"""
from __future__ import annotations

import importlib
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import xfast
from xfast.config import ConfigError
from xfast.distributed.rendezvous import free_port
from xfast.study.arms import Arm
from xfast.training.config import TrainConfig, load_config

TRAIN_PY = Path(xfast.__file__).resolve().parent / "train.py"
LAUNCHERS = ("python", "deepspeed", "torchrun")
CALL_HOOK = "XFAST_STUDY_CALL"
DONE_MARKER = "study_done.json"
RUN_LAYER = "study_run.json"


@dataclass
class EvalSpec:
    """What every run is evaluated on (the same for all arms)."""
    heldout: dict[str, str] = field(default_factory=dict)  # modality -> held-out shards (retrieval, geometry)
    sts: str | None = None  # scored pairs: STS Spearman and sentence-space geometry
    zeroshot: dict | None = None  # an xfast.eval zeroshot task (data, classnames, templates, label_key)
    batch_size: int = 64
    block: int = 256


@dataclass
class StudyPlan:
    bases: dict[str, str]  # modality -> base config (name or path)
    arms: list[Arm]
    seeds: list[int]
    out: Path
    overrides: list[str] = field(default_factory=list)
    sentences: str | None = None  # config layer with `sentence_data`, for unsupervised arms
    nli: str | None = None  # config layer with `nli_data`, for supervised arms
    launcher: str = "python"
    ranks: int = 1
    evaluation: EvalSpec = field(default_factory=EvalSpec)


@dataclass
class Run:
    arm: Arm
    seed: int
    folder: Path
    layers: list[str]

    @property
    def label(self) -> str:
        return f"{self.arm.name}/seed{self.seed}"

    def done(self) -> bool:
        return (self.folder / DONE_MARKER).is_file() and (self.folder / "final").is_dir()


def plan_runs(plan: StudyPlan) -> list[Run]:
    """Every (arm, seed), seed-major (a partial study has whole seeds), each config validated
    now, so a bad arm fails before any training."""
    runs = []
    for seed in plan.seeds:
        for arm in plan.arms:
            folder = (plan.out / "runs" / arm.name / f"seed{seed}").resolve()
            layers = [plan.bases[arm.modality]]
            objective = arm.objective()
            simcse = objective.get("simcse", {})
            if simcse.get("mode") == "unsup" and simcse.get("source", "captions") != "captions":
                if plan.sentences is None:
                    raise ConfigError(f"arm {arm.name} trains unsupervised SimCSE on a sentence stream: give "
                                      f"--sentences CONFIG (a layer with a sentence_data section, e.g. demo_sentences)")
                layers.append(plan.sentences)
            if simcse.get("mode") == "sup":
                if plan.nli is None:
                    raise ConfigError(f"arm {arm.name} trains supervised SimCSE on NLI triplets: give --nli CONFIG "
                                      f"(a layer with an nli_data section, e.g. demo_nli)")
                layers.append(plan.nli)
            run = Run(arm, seed, folder, layers + [str(folder / RUN_LAYER)])
            layer = {"output_dir": str(folder), "objective": objective, "train": {"seed": seed}}
            try:
                _validate(run, layer, plan.overrides)
            except ConfigError as err:
                raise ConfigError(f"arm {arm.name}, seed {seed}: {err}") from None
            runs.append(run)
    return runs


def _validate(run: Run, layer: dict, overrides: list[str]) -> TrainConfig:
    run.folder.mkdir(parents=True, exist_ok=True)
    path = run.folder / RUN_LAYER
    text = json.dumps(layer, indent=2) + "\n"
    if not path.is_file() or path.read_text() != text:
        partial = path.with_name(f".{path.name}.{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)
    cfg = load_config(run.layers, overrides)
    if not cfg.checkpoint.export_fp32:
        raise ConfigError("checkpoint.export_fp32: the study evaluates each run's final/ export; set it to true")
    return cfg


def train_command(run: Run, plan: StudyPlan) -> list[str]:
    args = [a for layer in run.layers for a in ("--cfg", layer)]
    args += [a for override in plan.overrides for a in ("--set", override)]
    if plan.launcher == "python":
        return [sys.executable, "-m", "xfast.train", *args]
    if plan.launcher == "deepspeed":
        launcher = Path(sys.executable).with_name("deepspeed")
        return [str(launcher) if launcher.exists() else "deepspeed", "--num_gpus", str(plan.ranks),
                "--master_port", str(free_port()), str(TRAIN_PY), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(plan.ranks),
            str(TRAIN_PY), *args]


def _has_checkpoint(run: Run) -> bool:
    return (run.folder / "checkpoints").is_dir() and any((run.folder / "checkpoints").glob("step_*"))


def _children_cpu_seconds() -> float:
    """User + system CPU time of the finished child processes (and theirs): a run's cost that
    other load on the machine does not inflate the way it inflates wall time."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _command_caller():
    """subprocess.call, or the function that XFAST_STUDY_CALL names (module:function)."""
    spec = os.environ.get(CALL_HOOK)
    if not spec:
        return subprocess.call
    module, colon, name = spec.partition(":")
    try:
        if not (module and colon and name):
            raise ValueError("no module:function form")
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{CALL_HOOK}={spec!r}: expected an importable module:function ({err})") from None


def train_runs(runs: list[Run], plan: StudyPlan, say=print) -> list[str]:
    """Train what is not finished; returns the labels trained now. The trainer's output goes to
    RUN/train.log; a failure stops the study with the log's tail (the finished runs are kept)."""
    call = _command_caller()
    trained = []
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.label}"
        if run.done():
            say(f"{prefix}: finished earlier, skipped")
            continue
        command = train_command(run, plan)
        say(f"{prefix}: {'resuming' if _has_checkpoint(run) else 'training'} (log: {run.folder / 'train.log'})")
        start, cpu_start = time.perf_counter(), _children_cpu_seconds()
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        with (run.folder / "train.log").open("a") as log:
            log.write("$ " + " ".join(command) + "\n")
            log.flush()
            code = call(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        seconds, cpu_seconds = time.perf_counter() - start, _children_cpu_seconds() - cpu_start
        if code != 0:
            tail = (run.folder / "train.log").read_text().splitlines()[-15:]
            raise RuntimeError(f"{run.label}: training exited with code {code}; last lines of "
                               f"{run.folder / 'train.log'}:\n  " + "\n  ".join(tail))
        if not (run.folder / "final").is_dir():  # the trainer stopped cleanly on SIGTERM/SIGINT
            raise RuntimeError(f"{run.label}: training stopped before its last step (it was signalled and "
                               f"saved a checkpoint); the same study command resumes it")
        (run.folder / DONE_MARKER).write_text(json.dumps(
            {"command": command, "seconds": round(seconds, 1), "cpu_seconds": round(cpu_seconds, 1),
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1) + "\n")
        say(f"{prefix}: done in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)")
        trained.append(run.label)
    return trained


def run_study(plan: StudyPlan, *, train: bool = True, say=print) -> dict:
    """Train (unless train=False), evaluate and report; returns the report's JSON record."""
    from xfast.study.report import evaluate_runs, write_report

    runs = plan_runs(plan)
    plan.out.mkdir(parents=True, exist_ok=True)
    if train:
        train_runs(runs, plan, say=say)
    missing = [r.label for r in runs if not r.done()]
    if missing:
        raise RuntimeError(f"not trained yet: {', '.join(missing)} (run the study without --report-only)")
    results = evaluate_runs(runs, plan.evaluation, say=say)
    return write_report(results, runs, plan, say=say)
