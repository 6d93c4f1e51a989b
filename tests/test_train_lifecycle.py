"""A training run's life cycle: run identity, resume checks, steps extension, warmup default,
cross-section checks before anything starts, environment variables, fast config errors (no
model stack imported), the demo's resume and reporting, --list-configs.

Speed is tested as a property (what `--check` imports), never as a wall-clock timing.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xfast.config import ConfigError
from xfast.training import demo, demo_data
from xfast.training.config import builtin_configs, load_config, save_config
from xfast.training.run_dir import (
    ABSENT,
    EXPORT_RECORD,
    archive_config,
    checkpoint_step,
    differences,
    lr_factor,
    plan_resume,
)

ARM = ["demo_clap_tiny", "study/clap_unsup", "demo_sentences"]
HEAVY = ("torch", "transformers", "deepspeed", "webdataset")


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("lifecycle") / "data"
    demo_data.generate(root, train=24, test=12, sentences=40, seed=3)
    return root


@pytest.fixture(autouse=True)
def demo_env(demo_root, monkeypatch):
    monkeypatch.setenv("XFAST_DEMO_DATA", str(demo_root))
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def fake_checkpoint(output_dir: Path, step: int) -> None:
    """What plan_resume reads of a run folder: checkpoints/latest naming an existing step folder."""
    folder = output_dir / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (output_dir / "checkpoints" / "latest").write_text(folder.name + "\n")


def start_run(cfg, step: int) -> None:
    """A run folder as the trainer leaves it: config.json and a checkpoint at `step`."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    save_config(cfg, Path(cfg.output_dir) / "config.json")
    fake_checkpoint(Path(cfg.output_dir), step)


def cli(*args, env=None, cwd):
    """`python -m xfast.train ARGS` in a child that reports which heavy modules it imported."""
    code = ("import sys, json; from xfast.train import main; rc = main(sys.argv[1:]); "
            f"print(json.dumps({{'rc': rc, 'heavy': [m for m in {HEAVY!r} if m in sys.modules]}}))")
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, **(env or {})), cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    *printed, report = result.stdout.strip().splitlines()
    report = json.loads(report)
    return report["rc"], report["heavy"], "\n".join(printed), result.stderr


# 1. Run identity -----------------------------------------------------------------------------

def test_output_folder_is_named_after_the_layers():
    assert load_config(ARM).output_dir == "runs/demo_clap_tiny+clap_unsup+demo_sentences"
    assert load_config(["demo_clap_tiny", "study/clap_none"]).output_dir == "runs/demo_clap_tiny+clap_none"
    assert load_config("demo_clip_tiny").output_dir == "runs/demo_clip_tiny"
    assert load_config(ARM, ["output_dir=elsewhere"]).output_dir == "elsewhere"
    for name in builtin_configs():  # no built-in pins a folder that other layerings would share
        assert "output_dir" not in json.loads(Path(load_config.__globals__["BUILTIN_DIR"], f"{name}.json").read_text())


def test_resume_refuses_another_config_in_the_same_folder(tmp_path):
    out = f"output_dir={tmp_path / 'run'}"
    first = load_config(ARM, [out])
    start_run(first, 40)
    other = load_config(["demo_clap_tiny", "study/clap_none"], [out])
    with pytest.raises(ConfigError) as err:
        plan_resume(other)
    message = str(err.value)
    assert "objective.simcse.mode: 'unsup' -> 'none'" in message and "sentence_data.batch_size" in message
    assert "--set output_dir=" in message and "--set checkpoint.resume=force" in message
    assert "model.text.pooling" not in message  # same in both arms
    # The same config resumes; keys that only change logging, saving and evaluation may differ.
    same = load_config(ARM, [out, "logging.every_steps=5", "checkpoint.keep_last=1", "eval.before_training=false"])
    plan = plan_resume(same)
    assert plan.step == 40 and not plan.complete and not plan.warnings and not plan.forced
    # A change that alters training (the learning rate) is refused too; force resumes anyway.
    with pytest.raises(ConfigError, match=r"train.lr: 0.002 -> 0.001"):
        plan_resume(load_config(ARM, [out, "train.lr=1e-3"]))
    forced = plan_resume(load_config(ARM, [out, "train.lr=1e-3", "checkpoint.resume=force"]))
    assert forced.forced == ["train.lr"] and "train.lr differ" in forced.warnings[0]
    with pytest.raises(ConfigError, match="checkpoint.resume is 'never'"):
        plan_resume(load_config(ARM, [out, "checkpoint.resume=never"]))


def test_differences_list_nested_added_and_removed_keys():
    saved = {"model": {"text": {"overrides": {}}}, "train": {"lr": 1.0}, "logging": {"every_steps": 1}}
    new = {"model": {"text": {"overrides": {"hidden_dropout_prob": 0.2}}}, "train": {"lr": 1.0},
           "logging": {"every_steps": 9}, "nli_data": None}
    # An added key counts (nli_data: absent -> null); logging is neutral.
    assert differences(saved, new) == [("model.text.overrides.hidden_dropout_prob", ABSENT, 0.2),
                                       ("nli_data", ABSENT, None)]
    assert repr(ABSENT) == "(absent)"


def test_second_arm_in_the_first_arms_folder_stops_before_any_work(tmp_path):
    out = tmp_path / "run"
    start_run(load_config(ARM, [f"output_dir={out}"]), 40)
    before = (out / "config.json").read_text()
    rc, heavy, _, stderr = cli("--cfg", "demo_clap_tiny", "--cfg", "study/clap_none", "--set", f"output_dir={out}",
                               cwd=tmp_path)
    assert rc == 2 and heavy == []
    assert "differs from this one in" in stderr and "objective.simcse.mode" in stderr
    assert (out / "config.json").read_text() == before  # the first arm's record is untouched


# 2. Extending train.steps ----------------------------------------------------------------------

def test_extension_relays_the_schedule_with_a_warning(tmp_path):
    out = f"output_dir={tmp_path / 'run'}"
    start_run(load_config("demo_clip_tiny", [out, "train.steps=20"]), 20)
    unexported = plan_resume(load_config("demo_clip_tiny", [out, "train.steps=20"]))
    assert not unexported.complete and unexported.step == 20  # killed before its fp32 export: export it
    (tmp_path / "run" / "final").mkdir()
    (tmp_path / "run" / "final" / EXPORT_RECORD).write_text('{"step": 20}')
    done = plan_resume(load_config("demo_clip_tiny", [out, "train.steps=20"]))
    assert done.complete and done.step == 20
    plan = plan_resume(load_config("demo_clip_tiny", [out, "train.steps=30"]))
    assert not plan.complete and plan.step == 20 and not plan.forced
    (warning,) = plan.warnings
    # warmup: 5% of 20 -> 1 step, of 30 -> 1 step; lr 2e-3 peak, cosine to 0.
    after = 2e-3 * lr_factor(20, 1, 30, 0.0)
    assert "train.steps 20 -> 30 (warmup 1 -> 1)" in warning and f"{after:.3g} at step 21" in warning
    assert after > 1e-4  # not the finished schedule's lr = 0
    with pytest.raises(ConfigError, match="cannot be shortened"):
        plan_resume(load_config("demo_clip_tiny", [out, "train.steps=10"]))
    saved = archive_config(tmp_path / "run", 20)
    assert saved.name == "config.step_00000020.json" and json.loads(saved.read_text())["train"]["steps"] == 20


def test_relay_schedule_restores_the_new_total_after_loading_the_old_one():
    torch = pytest.importorskip("torch")
    from xfast.training.engine import WarmupCosine, relay_schedule

    def scheduler(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, total, 0.0))

    opt, old = scheduler(20)
    for _ in range(20):
        opt.step()
        old.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # the finished schedule
    opt2, resumed = scheduler(30)
    resumed.load_state_dict(old.state_dict())  # what a checkpoint restores: the old total, lr 0
    assert resumed.lr_lambdas[0].total == 20
    relay_schedule(resumed, warmup=2, total=30, floor=0.0)
    expected = 0.1 * 0.5 * (1 + math.cos(math.pi * 18 / 28))
    assert opt2.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
    assert resumed.get_last_lr() == [pytest.approx(expected, rel=1e-12)]
    opt2.step()
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 19 / 28)), rel=1e-12)


# 3. Warmup that scales ------------------------------------------------------------------------

def test_warmup_defaults_to_a_fraction_of_steps():
    assert load_config("demo_clap_tiny").train.warmup == 50  # 5% of 1000
    assert load_config("demo_clap_tiny", ["train.steps=50"]).train.warmup == 2
    assert load_config("demo_clap_tiny", ["train.steps=50", "train.warmup_fraction=0.2"]).train.warmup == 10
    assert load_config("demo_clap_tiny", ["train.steps=50", "train.warmup_steps=7"]).train.warmup == 7
    assert load_config("demo_clap_tiny", ["train.steps=1"]).train.warmup == 0


def test_warmup_that_does_not_fit_is_one_check_error(tmp_path):
    rc, heavy, _, stderr = cli("--cfg", "demo_clap_tiny", "--set", "train.steps=50", "--set", "train.warmup_steps=60",
                               "--check", cwd=tmp_path)
    assert rc == 2 and heavy == []
    assert "train.warmup_steps: 60 does not fit in train.steps=50" in stderr and "warmup_fraction" in stderr
    assert stderr.count("config error") == 1


# 4. Cross-section checks from the configs alone -------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["data.text.max_length=100"], "data.text.max_length: 100 tokens exceed the text tower's 64 positions"),
    (["model.text.overrides={\"max_position_embeddings\": 16}"], "exceed the text tower's 16 positions"),
    (["data.audio.n_mels=32"], "data.audio.n_mels: the audio tower takes 16 mel bins, got 32"),
    (["data.audio.duration_s=4.0"], "data.audio: 401 frames per clip (duration_s x sample_rate / hop_length) exceed the audio tower's 256"),
])
def test_check_finds_data_vs_tower_sizes(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("demo_clap_tiny", overrides)


def test_check_finds_sizes_in_a_pretrained_towers_config_json(tmp_path):
    """Only the folder's config.json is read (no weights in it): positions of a saved RoBERTa
    (stored as a diff against the class defaults) and a dropout-free text tower for SimCSE."""
    folder = tmp_path / "roberta"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 22,
                                                    "hidden_size": 32, "num_attention_heads": 2}))
    text = {"type": "roberta", "pretrained": str(folder), "tokenizer": "$XFAST_DEMO_DATA/tokenizer"}
    with pytest.raises(ConfigError, match="data.text.max_length: 24 tokens exceed the text tower's 20 positions"):
        load_config("demo_clap_tiny", [f"model.text={json.dumps(text)}"])
    load_config("demo_clap_tiny", [f"model.text={json.dumps(text)}", "data.text.max_length=20"])
    # Unsupervised SimCSE needs dropout: the defaults (0.1) have it, overrides that remove it fail.
    no_dropout = dict(text, overrides={"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    with pytest.raises(ConfigError, match="unsupervised SimCSE needs dropout"):
        load_config(ARM, [f"model.text={json.dumps(no_dropout)}", "data.text.max_length=20",
                              "sentence_data.text.max_length=20", "model.text.pooling=cls_mlp"])


def test_unsup_simcse_with_a_frozen_text_tower_is_a_config_error():
    with pytest.raises(ConfigError, match="model.text.freeze: unsupervised SimCSE"):
        load_config(ARM, ["model.text.freeze=all"])


def write_sized_shards(folder: Path, counts: list[int], source: Path) -> None:
    """Shards holding the first samples of `source` (a demo shard), with a sizes.json."""
    import tarfile
    folder.mkdir()
    with tarfile.open(source) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    keys = sorted({m.name.split(".")[0] for m, _ in members})
    start = 0
    for i, count in enumerate(counts):
        wanted = set(keys[start:start + count])
        start += count
        with tarfile.open(folder / f"part-{i}.tar", "w") as out:
            for member, payload in members:
                if member.name.split(".")[0] in wanted:
                    import io
                    out.addfile(member, io.BytesIO(payload))
    (folder / "sizes.json").write_text(json.dumps({f"part-{i}.tar": c for i, c in enumerate(counts)}))


def test_shard_smaller_than_the_batch_is_named_from_sizes_json(tmp_path, demo_root, monkeypatch):
    source = sorted((demo_root / "images" / "train").glob("*.tar"))[0]
    write_sized_shards(tmp_path / "small", [5, 4], source)
    data = [f"data.sources=[{{\"urls\": \"{tmp_path / 'small'}\"}}]", "data.num_workers=1"]
    with pytest.raises(ConfigError) as err:
        load_config("demo_clip_tiny", data)  # batch 16 from 9 samples
    assert str(err.value).startswith("data.batch_size: 16 samples per batch, but the 9 samples of its 2 shard(s)")
    assert "at most 9 per epoch" in str(err.value)
    load_config("demo_clip_tiny", [*data, "data.batch_size=8"])
    # Two ranks split the 2 shards: one reader holds at most 5.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="dealt to 2 rank\\(s\\) x 1 worker\\(s\\) give each reader at most 5"):
        load_config("demo_clip_tiny", [*data, "data.batch_size=8"])


def test_loader_says_what_is_short_when_workers_cannot_fill_a_batch(tmp_path, demo_root):
    pytest.importorskip("torch")
    from xfast.config import parse
    from xfast.data import DataConfig, DataError, build_loader
    from xfast.models import load_tokenizer

    source = sorted((demo_root / "images" / "train").glob("*.tar"))[0]
    write_sized_shards(tmp_path / "small", [5, 4], source)
    cfg = parse(DataConfig, {"sources": [{"urls": str(tmp_path / "small")}], "modality": "image", "batch_size": 8,
                             "num_workers": 0, "image": {"size": 32}, "text": {"max_length": 24}}, "data")
    loader = build_loader(cfg, load_tokenizer(str(demo_root / "tokenizer")), rank=1, world_size=2)
    with pytest.raises(DataError, match=r"gave rank 1 no batch of 8: its 1 data worker\(s\) read 4 samples, "
                                        r"fewer than a batch each"):
        list(loader)


def test_check_does_not_import_the_model_stack_and_reports_the_plan(tmp_path):
    rc, heavy, stdout, stderr = cli(*sum((["--cfg", c] for c in ARM), []), "--check", cwd=tmp_path)
    assert rc == 0 and heavy == []
    assert json.loads(stdout)["output_dir"] == "runs/demo_clap_tiny+clap_unsup+demo_sentences"
    assert "config OK; a fresh run in runs/demo_clap_tiny+clap_unsup+demo_sentences" in stderr


# 5. Environment variables ---------------------------------------------------------------------

def test_unset_variables_are_reported_together_once_per_launch(tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("XFAST_") or k == "XFAST_DEMO_DATA"}
    code = "import sys; from xfast.train import main; sys.exit(main(sys.argv[1:]))"
    for rank, expect_message in (("0", True), ("1", False)):
        result = subprocess.run([sys.executable, "-c", code, "--cfg", "clap", "--check"], capture_output=True,
                                text=True, timeout=120, env=dict(base, RANK=rank))
        assert result.returncode == 2
        if expect_message:  # rank 0 speaks for all ranks, without a traceback
            assert "3 environment variable(s) not set" in result.stderr and "Traceback" not in result.stderr
            for name in ("XFAST_TEXT_ENCODER", "XFAST_TRAIN_SHARDS", "XFAST_EVAL_SHARDS"):
                assert f"${name}  used by" in result.stderr
            assert "(HF save_pretrained: config.json, weights" in result.stderr
        else:
            assert result.stderr == ""


def test_torchrun_failure_summary_gets_the_config_error(tmp_path):
    """torchrun prints the worker's error file as the root cause: ours holds the message."""
    error_file = tmp_path / "error.json"
    rc, heavy, _, _ = cli("--cfg", "demo_clap_tiny", "--set", "train.lr=-1", cwd=tmp_path,
                          env={"TORCHELASTIC_ERROR_FILE": str(error_file)})
    assert rc == 2 and heavy == []
    message = json.loads(error_file.read_text())["message"]
    assert message["message"] == "ConfigError: train.lr: must be > 0, got -1.0"
    assert message["extraInfo"]["py_callstack"] == "config error: train.lr: must be > 0, got -1.0"
    int(message["extraInfo"]["timestamp"])


# 6. Config errors without the model stack -----------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (["model.embed_dim=0"], "model.embed_dim: must be positive"),
    (["model.text.overrides={\"hidden_size\": 31}"], "model.text.overrides.hidden_size: 31 is not divisible"),
    (["model.text.overrides={\"hiden_size\": 30}"], "model.text.overrides.hiden_size: BertConfig has no attribute"),
    (["model.audio.projection=none", "model.embed_dim=16"],
     "model.audio.projection: 'none' needs the tower's hidden size (32) to equal model.embed_dim (16)"),
    (["eval.tasks={\"x\": {\"task\": \"zeroshot\", \"data\": \"d\", \"templates\": [\"no slot\"]}}"],
     "eval.tasks.x.templates: every template needs"),
    (["data.batch_size=1"], "data.batch_size: a contrastive batch needs >= 2"),
])
def test_config_errors_are_found_without_torch_or_transformers(overrides, message, tmp_path):
    rc, heavy, _, stderr = cli("--cfg", "demo_clap_tiny", *sum((["--set", o] for o in overrides), []), cwd=tmp_path)
    assert rc == 2 and heavy == [], stderr
    assert message in stderr


def test_light_tower_configs_match_transformers(tmp_path):
    """hf_configs (JSON, no transformers) gives the sizes transformers builds every tower with."""
    pytest.importorskip("transformers")
    from xfast.models.config import TowerConfig
    from xfast.models.hf_configs import (
        DROPOUT_ATTRIBUTES,
        MODEL_TYPES,
        PRESET_OVERRIDES,
        class_defaults,
        requirements,
        tower_config,
    )
    from xfast.models.towers import ARCHITECTURES, hf_config

    modality = {"bert": "text", "roberta": "text", "clip_text": "text", "vit": "image", "clip_vision": "image",
                "htsat": "audio", "ast": "audio"}
    facts = ("model_type", "hidden_size", "num_attention_heads", "max_position_embeddings", "image_size",
             "num_channels", "num_mel_bins", "spec_size", "depths", "patch_embeds_hidden_size", "enable_fusion",
             "max_length", *DROPOUT_ATTRIBUTES)
    for tower_type, (config_class, model_class) in ARCHITECTURES.items():
        reference = config_class()
        stored = class_defaults()[tower_type]
        assert stored["class"] == config_class.__name__ and reference.model_type == MODEL_TYPES[tower_type]
        assert stored["supports_gradient_checkpointing"] == model_class.supports_gradient_checkpointing
        assert all(hasattr(reference, key) for key in stored["defaults"])
        for preset in PRESET_OVERRIDES:
            tower = TowerConfig(type=tower_type, preset=preset, overrides={"hidden_dropout_prob": 0.3}
                                if hasattr(reference, "hidden_dropout_prob") else {})
            light, heavy = tower_config(tower, "t"), hf_config(tower, "t").to_dict()
            for key in facts:
                assert light.get(key) == heavy.get(key), (tower_type, preset, key)
            assert requirements(modality[tower_type], tower_type, light) == \
                requirements(modality[tower_type], tower_type, heavy)
    # A pretrained folder as save_pretrained writes it (only the values that differ from the defaults).
    from transformers import RobertaConfig
    RobertaConfig(hidden_size=48, num_attention_heads=3, max_position_embeddings=40).save_pretrained(tmp_path / "r")
    tower = TowerConfig(type="roberta", pretrained=str(tmp_path / "r"))
    light, heavy = tower_config(tower, "t"), hf_config(tower, "t").to_dict()
    assert all(light.get(k) == heavy.get(k) for k in facts)
    assert requirements("text", "roberta", light) == {"max_text_length": 38}


# 7. The demo resumes and reports each run --------------------------------------------------------

def fake_run(run_dir: Path, steps: int) -> None:
    """What summarize() reads, as a finished run writes it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    evals = {f"eval/demo_test/{d}/R@{k}": 1.0 for d in ("text_to_image", "image_to_text") for k in (1, 5)}
    rows = [dict(evals, step=0), {"step": steps, "loss": 1.0, "samples_per_s": 100.0, "data_wait_share": 0.1},
            dict(evals, step=steps)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_demo_keeps_runs_resumes_and_reports_each_run_as_it_ends(tmp_path, demo_root, monkeypatch, capsys):
    out = tmp_path / "runs"
    launched = []

    def launch(config, run_dir, ranks, overrides):
        launched.append((config, run_dir))
        print(f"[trained {config}]")
        cfg = load_config(config, [*overrides, f"output_dir={run_dir}"])
        start_run(cfg, cfg.train.steps)
        (run_dir / "final").mkdir()
        (run_dir / "final" / EXPORT_RECORD).write_text(json.dumps({"step": cfg.train.steps}))
        fake_run(run_dir, cfg.train.steps)
        return 0, 12.0

    monkeypatch.setattr(demo, "launch", launch)
    # An interrupted earlier demo left a checkpoint of the CLIP run: it is kept and resumed.
    partial = load_config("demo_clip_tiny", ["train.steps=40", f"output_dir={out / 'demo_clip_tiny'}"])
    start_run(partial, 20)
    marker = out / "demo_clip_tiny" / "checkpoints" / "step_00000020" / "kept"
    marker.write_text("")
    assert demo.main(["--out", str(out), "--data", str(demo_root), "--set", "train.steps=40"]) == 0
    printed = capsys.readouterr().out
    assert marker.exists() and [c for c, _ in launched] == ["demo_clap_tiny", "demo_clip_tiny"]
    first_line = printed.splitlines()[0]
    # clap: 40 steps from scratch; clip: 20 steps left.
    clap_s, clip_s = demo.estimate_seconds("demo_clap_tiny", 40, 2), demo.estimate_seconds("demo_clip_tiny", 20, 2)
    assert first_line.startswith("demo: about ") and f"demo_clap_tiny ~{clap_s:.0f} s" in first_line
    assert f"demo_clip_tiny ~{clip_s:.0f} s" in first_line and clip_s < demo.estimate_seconds("demo_clip_tiny", 40, 2)
    # Each result right after its run, before the next one starts.
    assert printed.index("| demo_clap_tiny |") < printed.index("[trained demo_clip_tiny]")
    # A second demo trains nothing: both runs are complete and only reported.
    launched.clear()
    assert demo.main(["--out", str(out), "--data", str(demo_root), "--set", "train.steps=40"]) == 0
    printed = capsys.readouterr().out
    assert launched == [] and "demo_clap_tiny complete, demo_clip_tiny complete" in printed
    assert "| demo_clip_tiny |" in printed and "12 s" in printed
    # --fresh starts over.
    assert demo.main(["--out", str(out), "--data", str(demo_root), "--set", "train.steps=40", "--fresh"]) == 0
    assert len(launched) == 2 and not marker.exists()


# 8. --list-configs --------------------------------------------------------------------------------

def test_list_configs_describes_every_builtin_without_the_model_stack(tmp_path):
    rc, heavy, stdout, _ = cli("--list-configs", cwd=tmp_path)
    assert rc == 0 and heavy == []
    lines = stdout.splitlines()
    names = builtin_configs()
    assert len(lines) == len(names) and {"clap", "clip", "demo_clap_tiny", "study/clap_unsup"} <= set(names)
    for name, line in zip(names, lines, strict=True):
        assert line.startswith(name + " ") and len(line[len(name):].strip()) > 20, line


def test_checkpoint_step_reads_the_latest_pointer(tmp_path):
    assert checkpoint_step(tmp_path) is None
    fake_checkpoint(tmp_path, 7)
    assert checkpoint_step(tmp_path) == 7
    # A kill between a save's rename and its pointer write: the newest complete folder counts.
    (tmp_path / "checkpoints" / "step_00000009").mkdir()
    assert checkpoint_step(tmp_path) == 9


# 1 + 2 end to end: a real run, extended, then another config refused in its folder -----------------

@pytest.mark.slow
def test_real_run_extended_trains_on_and_another_config_is_refused(tmp_path, demo_root, launcher):
    pytest.importorskip("deepspeed")
    cfg = {
        "model": {"text": {"type": "bert", "preset": "tiny", "tokenizer": str(demo_root / "tokenizer")},
                  "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16},
        "data": {"sources": [{"urls": str(demo_root / "images" / "train")}], "modality": "image", "batch_size": 8,
                 "num_workers": 0, "shuffle_buffer": 8, "image": {"size": 32}, "text": {"max_length": 24}},
        "train": {"steps": 4, "lr": 2e-3},
        "deepspeed": {"zero_stage": 2},
        "logging": {"every_steps": 1, "progress_bar": False, "tensorboard": False},
        "checkpoint": {"every_steps": 0, "export_fp32": False},
    }
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")

    def train(*overrides):  # `python -m xfast.train`, forked from the launcher (tests/forkserver.py)
        return launcher.run("xfast.train", ["--cfg", str(path), *(a for o in overrides for a in ("--set", o))],
                            cwd=tmp_path, env=env, timeout=600)

    first = train()
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"  # named after the config file
    assert checkpoint_step(run_dir) == 4
    again = train()  # complete: nothing to train, exits at once
    assert again.returncode == 0 and "is complete" in again.stderr
    extended = train("train.steps=6")
    assert extended.returncode == 0, extended.stderr[-3000:]
    assert "train.steps 4 -> 6" in extended.stderr
    rows = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "lr" in r}
    assert rows[4]["lr"] == pytest.approx(0.0, abs=1e-12)  # the 4-step schedule's end
    # After the resume the schedule runs over 6 steps (warmup 5% of 6 = 0): the lr logged after
    # step k is the one step k + 1 uses.
    for step in (5, 6):
        assert rows[step]["lr"] == pytest.approx(2e-3 * lr_factor(step, 0, 6, 0.0), rel=1e-6)
    assert rows[5]["lr"] > 1e-5
    assert (run_dir / "config.step_00000004.json").is_file()
    other = train("train.steps=6", "objective.contrastive_weight=0.5")
    assert other.returncode == 2 and "objective.contrastive_weight: 1.0 -> 0.5" in other.stderr
    assert checkpoint_step(run_dir) == 6
