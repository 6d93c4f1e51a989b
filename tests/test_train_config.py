"""Run-config validation, --set overrides, built-in lookup, CLI help; the demo data generator."""
import io
import json
import re
import tarfile

import pytest

from xfast.config import ConfigError
from xfast.training import demo_data
from xfast.training.config import (
    TrainConfig,
    builtin_configs,
    describe_config,
    expand_variables,
    load_config,
    parse_override,
    resolve_config_path,
    save_config,
)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    demo_data.generate(root, train=24, test=12, sentences=40, seed=3)
    return root


@pytest.fixture
def base(tmp_path, demo_root):
    """A valid tiny CLIP config as a raw dict, and a writer returning its path."""
    raw = json.loads(resolve_config_path("demo_clip_tiny").read_text())
    raw["output_dir"] = str(tmp_path / "run")

    def write(cfg):
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps(cfg))
        return str(path)

    return raw, write


@pytest.fixture(autouse=True)
def demo_env(monkeypatch, demo_root):
    monkeypatch.setenv("XFAST_DEMO_DATA", str(demo_root))


def test_valid_config_loads_and_round_trips(base, tmp_path):
    raw, write = base
    cfg = load_config(write(raw))
    assert isinstance(cfg, TrainConfig)
    assert cfg.model.text.tokenizer.endswith("tokenizer") and "$" not in cfg.data.sources[0].urls
    save_config(cfg, tmp_path / "resolved.json")
    assert load_config(str(tmp_path / "resolved.json")) == cfg


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["train"].update(lrr=1e-3), "train.lrr: unknown key (did you mean 'lr'?)"),
    (lambda r: r.update(trian={}), "trian: unknown key (did you mean 'train'?)"),
    (lambda r: r["train"].update(steps="ten"), "train.steps: expected an integer, got 'ten'"),
    (lambda r: r["deepspeed"].update(zero_stage=4), "deepspeed.zero_stage: 4 is not allowed; choose one of 0, 1, 2, 3"),
    (lambda r: r["deepspeed"].update(precision="fp16"), "deepspeed.precision: 'fp16' is not allowed"),
    (lambda r: r["deepspeed"].update(precision="bf16", zero_stage=0), "deepspeed.precision: bf16 needs zero_stage >= 1"),
    (lambda r: r["train"].update(warmup_steps=5000), "train.warmup_steps: 5000 does not fit in train.steps=2000"),
    (lambda r: r["data"].update(modality="audio"), "data.modality: must match the model's media tower 'image'"),
    (lambda r: r["deepspeed"].update(extra={"optimizer": {"type": "AdamW"}}), "deepspeed.extra.optimizer: set by the trainer"),
    (lambda r: r["deepspeed"].update(extra={"zero_optimization": {"stage": 3}}), "deepspeed.extra.zero_optimization.stage"),
    (lambda r: r.update(objective={"simcse": {"mode": "unsup", "source": "sentences"}}),
     "sentence_data: required by objective.simcse.source"),
    (lambda r: r.update(sentence_data={"sources": [{"urls": "x.txt"}], "modality": "text"}),
     "sentence_data: only read with"),
    (lambda r: r["eval"]["tasks"]["demo_test"].update(task="retrievl"), "eval.tasks.demo_test.task: 'retrievl' is not a task"),
    (lambda r: r["data"].update(batch_size=1), "data.batch_size: a contrastive batch needs >= 2"),
    (lambda r: r["model"]["text"].update(tokenizer="$NO_SUCH_VARIABLE_X/tok"),
     "$NO_SUCH_VARIABLE_X  used by model.text.tokenizer"),
])
def test_config_errors_name_the_key(base, edit, message):
    raw, write = base
    edit(raw)
    with pytest.raises(ConfigError) as err:
        load_config(write(raw))
    assert message in str(err.value)


def test_data_is_checked_against_the_built_model(base):
    from xfast.training.config import check_data_fits_model
    raw, write = base
    cfg = load_config(write(raw))
    fits = {"max_text_length": 64, "image_size": 32, "num_channels": 3}
    check_data_fits_model(cfg, fits)
    with pytest.raises(ConfigError, match="data.text.max_length: 24 tokens exceed the text tower's 16"):
        check_data_fits_model(cfg, dict(fits, max_text_length=16))
    with pytest.raises(ConfigError, match="data.image.size: the image tower takes 64 pixels, got 32"):
        check_data_fits_model(cfg, dict(fits, image_size=64))
    clap = load_config("demo_clap_tiny")
    with pytest.raises(ConfigError, match="data.audio: 101 frames per clip .* exceed the audio tower's 64"):
        check_data_fits_model(clap, {"max_text_length": 64, "n_mels": 16, "max_frames": 64})


def test_set_overrides(base):
    raw, write = base
    cfg = load_config(write(raw), ["train.lr=1e-4", "deepspeed.zero_stage=3", "output_dir=elsewhere",
                                   "data.image.mean=[0.5,0.5,0.5]"])
    assert cfg.train.lr == 1e-4 and cfg.deepspeed.zero_stage == 3 and cfg.output_dir == "elsewhere"
    assert cfg.data.image.mean == [0.5, 0.5, 0.5]
    assert parse_override("a.b=true") == ("a.b", True) and parse_override("a=x y") == ("a", "x y")
    with pytest.raises(ConfigError, match="train.lr: expected a number"):
        load_config(write(raw), ["train.lr=fast"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_config(write(raw), ["train.lr"])


def test_builtin_configs_resolve_and_validate(demo_root, monkeypatch, tmp_path):
    names = builtin_configs()
    assert {"clip", "clap", "demo_clip_tiny", "demo_clap_tiny"} <= set(names)
    for name in ("demo_clip_tiny", "demo_clap_tiny.json"):
        assert load_config(name).train.steps > 0
    # A study arm (model + objective only) layered over a config that has data.
    layered = load_config(["demo_clap_tiny", "study/clap_none"])
    assert layered.model.text.pooling == "cls_mlp" and layered.data.modality == "audio"
    # Unsupervised SimCSE arms need a sentence stream: demo_sentences supplies the demo's.
    with pytest.raises(ConfigError, match="sentence_data: required"):
        load_config(["demo_clap_tiny", "study/cyclap_unsup"])
    for media, arm in (("clap", "clap_unsup"), ("clap", "cyclap_unsup"), ("clip", "clip_unsup"), ("clip", "cyclip_unsup")):
        unsup = load_config([f"demo_{media}_tiny", f"study/{arm}", "demo_sentences"])
        assert unsup.objective.simcse.mode == "unsup" and unsup.sentence_data.modality == "text"
    # The full-size configs take their paths from the environment; the text encoder of clap.json
    # is a local HF folder (only its config.json is read at validation).
    from transformers import RobertaConfig
    RobertaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(tmp_path / "roberta")
    monkeypatch.setenv("XFAST_TOKENIZER", str(demo_root / "tokenizer"))
    monkeypatch.setenv("XFAST_TEXT_ENCODER", str(tmp_path / "roberta"))
    monkeypatch.setenv("XFAST_TRAIN_SHARDS", str(demo_root / "images" / "train"))
    monkeypatch.setenv("XFAST_EVAL_SHARDS", str(demo_root / "images" / "test"))
    clip, clap = load_config("clip"), load_config("clap")
    assert clip.model.image.type == "clip_vision" and clip.deepspeed.precision == "bf16"
    assert clap.model.audio.type == "htsat" and clap.train.tower_lr == {"text": 2e-5}
    # Every unset variable in one message, each with the keys using it and what it is for.
    monkeypatch.delenv("XFAST_TRAIN_SHARDS")
    monkeypatch.delenv("XFAST_EVAL_SHARDS")
    with pytest.raises(ConfigError) as err:
        load_config("clip")
    message = str(err.value)
    assert message.startswith("2 environment variable(s) not set")
    assert re.search(r"\$XFAST_TRAIN_SHARDS  used by data.sources\[0\].urls\n +training shards: ", message)
    assert re.search(r"\$XFAST_EVAL_SHARDS  used by eval.tasks.val.data\n +held-out shards", message)
    with pytest.raises(ConfigError, match="neither a file nor a built-in config; built-ins: .*demo_clap_tiny"):
        resolve_config_path("no_such_config")


def test_layered_configs_merge_key_by_key(base, tmp_path):
    raw, write = base
    layer = tmp_path / "layer.json"
    layer.write_text(json.dumps({"train": {"lr": 1e-4}, "model": {"embed_dim": 8}}))
    cfg = load_config([write(raw), str(layer)])
    assert cfg.train.lr == 1e-4 and cfg.model.embed_dim == 8
    assert cfg.train.steps == raw["train"]["steps"] and cfg.model.image.type == "vit"
    layer.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="a config is a JSON object, got list"):
        load_config([write(raw), str(layer)])


def test_expand_variables(monkeypatch):
    monkeypatch.setenv("XFAST_TEST_ROOT", "/data")
    assert expand_variables({"a": ["$XFAST_TEST_ROOT/x", "${XFAST_TEST_ROOT}y", "cost $$5", 3]}) == \
        {"a": ["/data/x", "/datay", "cost $5", 3]}
    with pytest.raises(ConfigError, match=r"config.b: Invalid placeholder .* \(write \$\$ for a literal \$\)"):
        expand_variables({"b": "50$"})


def test_cli_reports_errors_and_documents_every_key(base, capsys):
    from xfast.train import main
    raw, write = base
    raw["checkpoint"]["keep_lats"] = 2
    assert main(["--cfg", write(raw)]) == 2
    assert "checkpoint.keep_lats: unknown key (did you mean 'keep_last'?)" in capsys.readouterr().err
    assert main(["--help-config"]) == 0
    listed = capsys.readouterr().out
    for key, _, _, _ in describe_config():
        assert f"\n{key}\n" in f"\n{listed}"
    for key in ("train.lr", "deepspeed.zero_stage", "checkpoint.keep_last", "data.batch_size", "model.embed_dim"):
        assert f"\n{key}\n" in f"\n{listed}"
    assert main(["--list-configs"]) == 0 and "demo_clap_tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--set KEY=VALUE" in capsys.readouterr().out


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_demo_data_layout_and_determinism(demo_root, tmp_path):
    manifest = json.loads((demo_root / "manifest.json").read_text())
    images = _members(demo_root / manifest["images"]["test"]["shards"][0])
    keys = sorted({n.rsplit(".", 1)[0] for n in images})
    assert len(keys) == 12 and all({f"{k}.jpg", f"{k}.txt", f"{k}.json"} <= set(images) for k in keys)
    captions = [images[f"{k}.txt"].decode() for k in keys]
    assert len(set(captions)) == 12  # test captions are distinct: retrieval has one right answer
    first = json.loads(images[f"{keys[0]}.json"])
    assert first["caption"] == captions[0] and f"{first['objects'][0][0]} {first['objects'][0][1]}" in captions[0]
    audio = _members(demo_root / manifest["audio"]["train"]["shards"][0])
    meta = json.loads(audio[sorted(n for n in audio if n.endswith(".json"))[0]])
    assert isinstance(meta["text"], list) and meta["text"][0].startswith("a ")
    import soundfile
    wave, rate = soundfile.read(io.BytesIO(audio[sorted(n for n in audio if n.endswith(".flac"))[0]]))
    assert rate == demo_data.SAMPLE_RATE and len(wave) == demo_data.SAMPLE_RATE
    again = demo_data.generate(tmp_path / "again", train=24, test=12, sentences=40, seed=3)
    assert again == manifest
    assert _members(tmp_path / "again" / manifest["images"]["test"]["shards"][0]) == images
    assert (demo_root / "tokenizer" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="at most 144"):
        demo_data.generate(tmp_path / "big", train=4, test=200, sentences=4)


def test_demo_data_learnable_signal():
    """The caption is a function of the drawn pixels: colours appear where the caption says."""
    import numpy as np
    rng = np.random.default_rng(0)
    combo = (("red", "circle"), ("blue", "square"), "to the left of")
    image, caption, _ = demo_data.make_image(rng, combo)
    pixels = np.asarray(image).astype(int)
    half = demo_data.IMAGE_SIZE // 2
    red = (pixels[..., 0] > 180) & (pixels[..., 1] < 90) & (pixels[..., 2] < 90)
    blue = (pixels[..., 2] > 180) & (pixels[..., 0] < 90)
    assert caption == "a red circle to the left of a blue square"
    assert red[:, :half].sum() > 50 and red[:, half:].sum() == 0
    assert blue[:, half:].sum() > 50 and blue[:, :half].sum() == 0
    loud, _, _ = demo_data.make_sound(rng, ("loud", "high", "beeping tone", "long", 3))
    quiet, caption, _ = demo_data.make_sound(rng, ("quiet", "high", "beeping tone", "long", 3))
    assert caption == "a quiet high beeping tone, long, repeated three times"
    assert np.abs(loud).max() > 4 * np.abs(quiet).max()
