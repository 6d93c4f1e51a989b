"""TrainConfig: the one JSON config of a training run, its built-in configs and `--set` overrides.

Sections: model, objective (xfast.models), data (xfast.data), eval (xfast.eval), and the
trainer's own train, deepspeed, logging, checkpoint. Everything is validated by
`load_config` before any work starts; each error names the dotted key and what is allowed.
"""
from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xfast.config import ConfigError, describe, parse, set_dotted, to_dict
from xfast.data.config import DataConfig
from xfast.models.config import ModelConfig, ObjectiveConfig

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "configs"

# DeepSpeed keys the trainer derives from other sections; setting them in deepspeed.extra
# would silently disagree with the rest of the config.
_MANAGED_DS_KEYS = {
    "train_batch_size": "data.batch_size x deepspeed.accumulation_steps x ranks",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "deepspeed.accumulation_steps",
    "gradient_clipping": "deepspeed.gradient_clipping",
    "bf16": "deepspeed.precision",
    "fp16": "deepspeed.precision (fp16 needs loss scaling, which the trainer does not do)",
    "optimizer": "train.lr/weight_decay/betas/eps (torch AdamW)",
    "scheduler": "train.warmup_steps/min_lr_ratio (warmup + cosine)",
}


@dataclass
class OptimConfig:
    """Section "train": optimisation and run length."""
    steps: int = field(default=1000, metadata={"help": "optimizer steps of the whole run"})
    lr: float = field(default=5e-4, metadata={"help": "peak learning rate (AdamW)"})
    tower_lr: dict[str, float] = field(default_factory=dict, metadata={
        "help": "peak learning rate per submodule, by parameter-name prefix, e.g. {\"text\": 1e-5}; "
                "other parameters use lr"})
    weight_decay: float = field(default=0.2, metadata={
        "help": "AdamW weight decay (never applied to biases, norms, the logit scale or other 1-D tensors)"})
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98], metadata={"help": "AdamW [beta1, beta2]"})
    eps: float = field(default=1e-6, metadata={"help": "AdamW epsilon"})
    warmup_steps: int = field(default=100, metadata={"help": "linear warmup steps, then cosine decay"})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "lr at the end of the cosine, as a fraction of the peak"})
    seed: int = field(default=0, metadata={"help": "seed of model initialisation and dropout"})
    deterministic: bool = field(default=False, metadata={
        "help": "torch.use_deterministic_algorithms: bit-reproducible runs (resume matches an uninterrupted "
                "run), possibly slower"})

    def validate(self, path: str) -> None:
        if self.steps < 1:
            raise ConfigError(f"{path}.steps: must be >= 1, got {self.steps}")
        for key, value in [("lr", self.lr), *((f"tower_lr.{k}", v) for k, v in self.tower_lr.items())]:
            if not value > 0:
                raise ConfigError(f"{path}.{key}: must be > 0, got {value}")
        if self.weight_decay < 0:
            raise ConfigError(f"{path}.weight_decay: must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"{path}.betas: expected [beta1, beta2] in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"{path}.eps: must be > 0, got {self.eps}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ConfigError(f"{path}.warmup_steps: must be in [0, train.steps={self.steps}), "
                              f"got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"{path}.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")


@dataclass
class DeepSpeedSection:
    """Section "deepspeed": sharding, precision, clipping, accumulation."""
    zero_stage: Literal[0, 1, 2, 3] = field(default=2, metadata={
        "help": "ZeRO stage: 0 plain data parallel, 1 optimizer state, 2 + gradients, 3 + parameters sharded"})
    precision: Literal["fp32", "bf16"] = field(default="fp32", metadata={
        "help": "training precision (bf16 keeps fp32 master weights)"})
    gradient_clipping: float = field(default=1.0, metadata={"help": "max global gradient norm (0: off)"})
    accumulation_steps: int = field(default=1, metadata={
        "help": "micro-batches per optimizer step; their features form ONE contrastive batch (GradCache)"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "further DeepSpeed config keys, merged as given (e.g. {\"zero_optimization\": "
                "{\"overlap_comm\": true}}); batch, precision, optimizer and scheduler keys are derived"})

    def validate(self, path: str) -> None:
        if self.accumulation_steps < 1:
            raise ConfigError(f"{path}.accumulation_steps: must be >= 1, got {self.accumulation_steps}")
        if self.gradient_clipping < 0:
            raise ConfigError(f"{path}.gradient_clipping: must be >= 0, got {self.gradient_clipping}")
        for key, source in _MANAGED_DS_KEYS.items():
            if key in self.extra:
                raise ConfigError(f"{path}.extra.{key}: set by the trainer from {source}; remove it here")
        if self.precision == "bf16" and self.zero_stage == 0:
            raise ConfigError(f"{path}.precision: bf16 needs zero_stage >= 1, whose partitions keep the fp32 master "
                              f"weights that checkpoints and the fp32 export read")
        if "stage" in self.extra.get("zero_optimization", {}):
            raise ConfigError(f"{path}.extra.zero_optimization.stage: use {path}.zero_stage")


@dataclass
class LoggingSection:
    every_steps: int = field(default=10, metadata={"help": "steps between progress/TensorBoard reports"})
    tensorboard: bool = field(default=True, metadata={"help": "write TensorBoard event files to OUTPUT/tensorboard"})
    progress_bar: bool = field(default=True, metadata={"help": "show a tqdm progress bar on rank 0"})

    def validate(self, path: str) -> None:
        if self.every_steps < 1:
            raise ConfigError(f"{path}.every_steps: must be >= 1, got {self.every_steps}")


@dataclass
class CheckpointSection:
    every_steps: int = field(default=1000, metadata={
        "help": "steps between checkpoints (0: only at the end); one is always written at the end"})
    keep_last: int = field(default=3, metadata={"help": "complete checkpoints kept (older ones are deleted)"})
    resume: Literal["auto", "never"] = field(default="auto", metadata={
        "help": "'auto': continue from OUTPUT/checkpoints/latest if present; 'never': start fresh (refuses "
                "to overwrite an existing run)"})
    export_fp32: bool = field(default=True, metadata={
        "help": "at the end, write consolidated fp32 weights to OUTPUT/final (save_pretrained format)"})

    def validate(self, path: str) -> None:
        if self.every_steps < 0:
            raise ConfigError(f"{path}.every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ConfigError(f"{path}.keep_last: must be >= 1, got {self.keep_last}")


@dataclass
class EvalSection:
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict, metadata={
        "help": "named xfast.eval tasks, e.g. {\"test\": {\"task\": \"retrieval\", \"data\": \"test-{0..3}.tar\"}} "
                "(see `xfast eval --help`); empty: no evaluation"})
    every_steps: int = field(default=0, metadata={"help": "steps between evaluations (0: only at the end)"})
    before_training: bool = field(default=False, metadata={"help": "also evaluate the initial model"})
    batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})
    max_items: int | None = field(default=None, metadata={"help": "evaluate on at most this many media items"})

    def validate(self, path: str) -> None:
        from xfast.eval.runner import parse_task
        for name, task in self.tasks.items():
            parse_task(task, f"{path}.tasks.{name}")
        if self.every_steps < 0:
            raise ConfigError(f"{path}.every_steps: must be >= 0, got {self.every_steps}")
        if self.batch_size < 1:
            raise ConfigError(f"{path}.batch_size: must be >= 1, got {self.batch_size}")
        if self.max_items is not None and self.max_items < 1:
            raise ConfigError(f"{path}.max_items: must be >= 1, got {self.max_items}")


@dataclass
class TrainConfig:
    """A whole training run (see `python -m xfast.train --help-config`)."""
    model: ModelConfig = field(metadata={"help": "towers and shared space (xfast.models)"})
    data: DataConfig = field(metadata={"help": "the image- or audio-caption training stream (xfast.data)"})
    sentence_data: DataConfig | None = field(default=None, metadata={
        "help": "sentence stream (modality 'text') for objective.simcse.source 'sentences'/'both'"})
    nli_data: DataConfig | None = field(default=None, metadata={
        "help": "NLI triplet stream (modality 'nli') for objective.simcse.mode 'sup'"})
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    output_dir: str = field(default="runs/xfast", metadata={
        "help": "run folder: config.json, checkpoints/, tensorboard/, metrics.jsonl, final/"})
    train: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def validate(self, path: str) -> None:
        if self.data.modality != self.model.modality:
            extra = " (sentences and NLI triplets go in sentence_data / nli_data)" \
                if self.data.modality in ("text", "nli") else ""
            raise ConfigError(f"data.modality: must match the model's media tower {self.model.modality!r}, "
                              f"got {self.data.modality!r}{extra}")
        se = self.objective.simcse
        needs_sentences = se.mode == "unsup" and se.source in ("sentences", "both")
        for key, stream, needed, modality, why in (
                ("sentence_data", self.sentence_data, needs_sentences, "text",
                 "objective.simcse.source 'sentences' or 'both' with mode 'unsup'"),
                ("nli_data", self.nli_data, se.mode == "sup", "nli", "objective.simcse.mode 'sup'")):
            if needed and stream is None:
                raise ConfigError(f"{key}: required by {why}")
            if not needed and stream is not None:
                raise ConfigError(f"{key}: only read with {why}; remove it or change the objective")
            if stream is not None and stream.modality != modality:
                raise ConfigError(f"{key}.modality: must be {modality!r}, got {stream.modality!r}")
        if self.data.batch_size * self.deepspeed.accumulation_steps < 2:
            raise ConfigError("data.batch_size: a contrastive batch needs >= 2 samples per rank "
                              "(data.batch_size x deepspeed.accumulation_steps)")


def check_data_fits_model(cfg: TrainConfig, requirements: dict) -> None:
    """Data sections against what the built model takes (model.data_requirements()): a mismatch
    is a ConfigError naming the data key, raised before any data is read."""
    streams = {"data": cfg.data, "sentence_data": cfg.sentence_data, "nli_data": cfg.nli_data}
    for key, stream in streams.items():
        if stream is not None and stream.text.max_length > requirements["max_text_length"]:
            raise ConfigError(f"{key}.text.max_length: {stream.text.max_length} tokens exceed the text tower's "
                              f"{requirements['max_text_length']} positions")
    if cfg.data.modality == "image" and cfg.data.image.size != requirements["image_size"]:
        raise ConfigError(f"data.image.size: the image tower takes {requirements['image_size']} pixels, "
                          f"got {cfg.data.image.size}")
    if cfg.data.modality == "audio" and cfg.data.audio.output == "logmel":
        audio = cfg.data.audio
        if audio.n_mels != requirements["n_mels"]:
            raise ConfigError(f"data.audio.n_mels: the audio tower takes {requirements['n_mels']} mel bins, "
                              f"got {audio.n_mels}")
        if audio.num_frames > requirements["max_frames"]:
            raise ConfigError(f"data.audio: {audio.num_frames} frames per clip (duration_s x sample_rate / "
                              f"hop_length) exceed the audio tower's {requirements['max_frames']}")


def builtin_configs() -> list[str]:
    """Names accepted by --cfg besides paths: every JSON under xfast/configs (e.g. 'clap', 'study/...')."""
    return sorted(str(p.relative_to(BUILTIN_DIR).with_suffix("")) for p in BUILTIN_DIR.rglob("*.json"))


def resolve_config_path(name_or_path: str) -> Path:
    """A config file path, or a built-in name with or without '.json'."""
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path
    name = name_or_path.removesuffix(".json")
    builtin = BUILTIN_DIR / f"{name}.json"
    if builtin.is_file():
        return builtin
    raise ConfigError(f"--cfg: {name_or_path!r} is neither a file nor a built-in config; built-ins: "
                      f"{', '.join(builtin_configs()) or '(none)'}")


def parse_override(text: str) -> tuple[str, Any]:
    """'train.lr=1e-4' -> ('train.lr', 0.0001): the value is JSON when it parses, else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def expand_variables(value, path: str = "config"):
    """$VAR / ${VAR} and a leading ~ in every string of a raw config, like a shell would.

    $XFAST_DEMO_DATA defaults to the demo dataset's folder, so the built-in demo configs run as
    they are. An unset variable is an error naming the key, not a silently wrong path.
    """
    if isinstance(value, dict):
        return {k: expand_variables(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_variables(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or ("$" not in value and not value.startswith("~")):
        return value
    from xfast.training.demo_data import default_root

    env = {"XFAST_DEMO_DATA": str(default_root()), **os.environ}
    template = string.Template(value)
    unset = [name for name in template.get_identifiers() if name not in env]
    if unset:
        raise ConfigError(f"{path}: environment variable ${unset[0]} is not set (in {value!r})")
    try:
        return os.path.expanduser(template.substitute(env))
    except ValueError as err:  # a lone '$' not followed by a name
        raise ConfigError(f"{path}: {err} in {value!r} (write $$ for a literal $)") from None


def merge(base: dict, update: dict) -> dict:
    """`update` laid over `base`: objects merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(names_or_paths: str | list[str], overrides: list[str] = ()) -> TrainConfig:
    """Read (several files merge left to right), override, expand and validate a run config;
    raises ConfigError naming the bad key."""
    raw: dict = {}
    for name in [names_or_paths] if isinstance(names_or_paths, str) else names_or_paths:
        path = resolve_config_path(name)
        try:
            layer = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(layer, dict):
            raise ConfigError(f"{path}: a config is a JSON object, got {type(layer).__name__}")
        raw = merge(raw, layer)
    try:
        for text in overrides:
            set_dotted(raw, *parse_override(text))
        return parse(TrainConfig, expand_variables(raw), "config")
    except ConfigError as err:  # report "train.lr", not "config.train.lr"
        raise ConfigError(str(err).removeprefix("config.")) from None


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def describe_config() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows for every key of TrainConfig."""
    return describe(TrainConfig)
