"""Config sections "model" and "objective" (parsed with xfast.config.parse).

A model is a text tower plus exactly one media tower (image or audio). Each tower is an HF
transformers model built from a size preset ("tiny"/"base") or loaded from a local folder
("pretrained"), then pooled and projected to the shared embedding space of size embed_dim.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from xfast.config import ConfigError
from xfast.models.hf_configs import class_defaults, tower_config
from xfast.models.specs import PRESETS, SPECS, TOWER_TYPES

# Derived from the tower specs (xfast.models.specs): allowed poolings per type, the first the default.
POOLINGS: dict[str, tuple[str, ...]] = {name: spec.poolings for name, spec in SPECS.items()}
PROJECTIONS = ("linear", "mlp", "none")


@dataclass
class TowerConfig:
    """One encoder: which HF architecture, how it is initialised, pooled, projected and frozen."""
    type: str | None = field(default=None, metadata={
        "help": "architecture: text bert|roberta|clip_text|auto (auto: any AutoModel encoder, pretrained only); "
                "image vit|clip_vision; audio htsat|ast. Required unless model.init_from sets it"})
    preset: str | None = field(default=None, metadata={
        "help": "random initialisation at a size preset: 'tiny' (hidden 32, 2 layers; tests) or 'base'; "
                "exclusive with 'pretrained'"})
    pretrained: str | None = field(default=None, metadata={
        "help": "local folder with an HF save_pretrained checkpoint (e.g. a sentence-transformers model); "
                "exclusive with 'preset'. Never a hub name"})
    overrides: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "HF config attributes to set on top of the preset or checkpoint, e.g. "
                "{\"hidden_dropout_prob\": 0.1}"})
    pooling: str | None = field(default=None, metadata={
        "help": "text cls|cls_mlp|mean|eos; image cls|mean; htsat mean; ast cls_dist|cls|mean; "
                "null picks the architecture's usual one"})
    mlp_only_train: bool = field(default=False, metadata={
        "help": "cls_mlp only: in eval mode the sentence embedding is the bare CLS vector (unsupervised "
                "SimCSE); the cross-modal projection always sees the MLP output"})
    projection: str = field(default="linear", metadata={
        "help": "head into the shared space: 'linear' (CLIP, no bias), 'mlp' (LAION-CLAP: "
                "Linear-ReLU-Linear) or 'none' (needs hidden size == embed_dim)"})
    freeze: Literal["none", "all", "all_but_last_n"] = field(default="none", metadata={
        "help": "freeze the backbone: 'all' (kept in eval mode: no dropout, frozen norm statistics) or "
                "all but its last 'last_n' layers and final norm"})
    last_n: int = field(default=0, metadata={"help": "trainable last layers for freeze=all_but_last_n"})
    freeze_head: bool = field(default=False, metadata={"help": "also freeze the pooling MLP and projection"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "HF gradient checkpointing"})
    tokenizer: str | None = field(default=None, metadata={
        "help": "text only: local tokenizer folder (xfast.models.train_tokenizer output); defaults to the "
                "'pretrained' (or model.init_from) folder"})

    def __post_init__(self):
        # pathlib.Path is as good as str here; the saved config keeps str.
        for key in ("pretrained", "tokenizer"):
            if isinstance(getattr(self, key), os.PathLike):
                setattr(self, key, os.fspath(getattr(self, key)))


@dataclass
class ModelConfig:
    """Section "model": a text tower, exactly one of image/audio, and the shared space."""
    text: TowerConfig = field(metadata={"help": "text tower"})
    image: TowerConfig | None = field(default=None, metadata={"help": "image tower (CLIP)"})
    audio: TowerConfig | None = field(default=None, metadata={"help": "audio tower (CLAP)"})
    init_from: str | None = field(default=None, metadata={
        "help": "start from a whole pretrained model: a transformers CLIPModel or ClapModel folder, or an "
                "open_clip checkpoint file with its model config JSON beside it (see xfast.models.sources). "
                "It sets both towers (type, pooling, projection, weights), embed_dim, the logit scale and the "
                "default tokenizer; the tower sections keep the training settings (freeze, overrides, ...)"})
    embed_dim: int | None = field(default=None, metadata={
        "help": "size of the shared embedding space (default 512, or init_from's)"})
    logit_scale_init: float | None = field(default=None, metadata={
        "help": "initial logit scale (the multiplier, not its log; stored as log); default 1/0.07, or "
                "init_from's"})
    logit_scale_max: float = field(default=100.0, metadata={"help": "clamp of the scale inside forward"})
    learn_logit_scale: bool = field(default=True, metadata={"help": "train the logit scale"})

    @property
    def modality(self) -> str:
        return "image" if self.image is not None else "audio"

    @property
    def media(self) -> TowerConfig:
        return self.image if self.image is not None else self.audio

    def towers(self) -> dict[str, TowerConfig]:
        """{"text": ..., "image"|"audio": ...} in a fixed order."""
        return {"text": self.text, self.modality: self.media}

    def validate(self, path: str) -> None:
        if (self.image is None) == (self.audio is None):
            raise ConfigError(f"{path}: set exactly one media tower, 'image' or 'audio' (got "
                              f"{'both' if self.image is not None else 'neither'})")
        source = self.source(path)
        if source is not None:
            self._take_from_source(source, path)
        if self.embed_dim is None:
            self.embed_dim = 512
        if self.logit_scale_init is None:
            self.logit_scale_init = 1 / 0.07
        if self.embed_dim <= 0:
            raise ConfigError(f"{path}.embed_dim: must be positive, got {self.embed_dim}")
        if not (math.isfinite(self.logit_scale_init) and self.logit_scale_init > 0):
            raise ConfigError(f"{path}.logit_scale_init: must be positive and finite, got {self.logit_scale_init}")
        if not self.logit_scale_max >= self.logit_scale_init:
            raise ConfigError(f"{path}.logit_scale_max: must be >= logit_scale_init ({self.logit_scale_init}), "
                              f"got {self.logit_scale_max}")
        for modality, tower in self.towers().items():
            _validate_tower(tower, modality, f"{path}.{modality}", from_source=source is not None)
        # Dims are checked against the HF configs the towers will be built from, read as plain
        # dicts (no transformers import unless init_from, no weights).
        for modality, config in self.tower_configs(path, source).items():
            _validate_dims(self.towers()[modality], config, self.embed_dim, f"{path}.{modality}", f"{path}.embed_dim")

    def tower_configs(self, path: str = "model", source=None) -> dict[str, dict]:
        """{modality: the HF config attributes its tower is built with} (hf_configs.tower_config)."""
        if source is None and self.init_from is not None:
            source = self.source(path)
        return {modality: tower_config(tower, f"{path}.{modality}",
                                       base=source.towers()[modality].config.to_dict() if source is not None else None)
                for modality, tower in self.towers().items()}

    def source(self, path: str = "model"):
        """The init_from model's description (configs only, no weights), or None."""
        if self.init_from is None:
            return None
        from xfast.models.sources import read_source
        self.init_from = os.fspath(self.init_from)
        try:
            return read_source(self.init_from)
        except ConfigError as err:
            raise ConfigError(str(err).replace("model.init_from", f"{path}.init_from")) from None

    def _take_from_source(self, source, path: str) -> None:
        if source.modality != self.modality:
            raise ConfigError(f"{path}.{self.modality}: init_from {self.init_from!r} is a {source.kind} model with "
                              f"an {source.modality} tower; name that section '{source.modality}' (it may be {{}})")
        for modality, theirs in source.towers().items():
            tower, where = self.towers()[modality], f"{path}.{modality}"
            if tower.preset is not None or tower.pretrained is not None:
                raise ConfigError(f"{where}: init_from sets this tower's weights; remove 'preset'/'pretrained'")
            for key in ("type", "pooling"):
                if getattr(tower, key) not in (None, getattr(theirs, key)):
                    raise ConfigError(f"{where}.{key}: init_from {self.init_from!r} has a {theirs.type} tower with "
                                      f"{key} {getattr(theirs, key)!r}, got {getattr(tower, key)!r}")
            if tower.projection not in ("linear", theirs.projection):  # "linear" is also the default
                raise ConfigError(f"{where}.projection: init_from {self.init_from!r} has a {theirs.projection!r} "
                                  f"projection, got {tower.projection!r}")
            tower.type, tower.pooling, tower.projection = theirs.type, theirs.pooling, theirs.projection
        if self.text.tokenizer is None and source.tokenizer_dir is not None:
            self.text.tokenizer = source.tokenizer_dir
        if self.embed_dim not in (None, source.embed_dim):
            raise ConfigError(f"{path}.embed_dim: init_from {self.init_from!r} projects to {source.embed_dim}, "
                              f"got {self.embed_dim}")
        self.embed_dim = source.embed_dim
        if self.logit_scale_init is None:
            self.logit_scale_init = min(source.logit_scale, self.logit_scale_max)


def _validate_tower(tower: TowerConfig, modality: str, path: str, from_source: bool = False) -> None:
    allowed = TOWER_TYPES[modality]
    if tower.type is None:
        raise ConfigError(f"{path}.type: required key is missing (or set model.init_from)")
    if tower.type not in allowed:
        raise ConfigError(f"{path}.type: {tower.type!r} is not a {modality} tower; choose one of "
                          f"{', '.join(map(repr, allowed))}")
    if not from_source and (tower.preset is None) == (tower.pretrained is None):
        raise ConfigError(f"{path}: set exactly one of 'preset' ({', '.join(map(repr, PRESETS))}) or "
                          f"'pretrained' (a local folder)")
    if tower.preset is not None and tower.preset not in PRESETS:
        raise ConfigError(f"{path}.preset: {tower.preset!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, PRESETS))}")
    if SPECS[tower.type].config_class is None and tower.pretrained is None:
        raise ConfigError(f"{path}.type: 'auto' loads an architecture from a 'pretrained' folder and has no presets")
    if tower.pretrained is not None and not os.path.isfile(os.path.join(tower.pretrained, "config.json")):
        raise ConfigError(f"{path}.pretrained: {tower.pretrained!r} is not a folder with an HF config.json")
    poolings = POOLINGS[tower.type]
    if tower.pooling is not None and tower.pooling not in poolings:
        raise ConfigError(f"{path}.pooling: {tower.pooling!r} is not allowed for type {tower.type!r}; choose one "
                          f"of {', '.join(map(repr, poolings))}")
    if tower.mlp_only_train and tower.pooling != "cls_mlp":
        raise ConfigError(f"{path}.mlp_only_train: only applies to pooling 'cls_mlp', got pooling {tower.pooling!r}")
    if tower.projection not in PROJECTIONS:
        raise ConfigError(f"{path}.projection: {tower.projection!r} is not allowed; choose one of "
                          f"{', '.join(map(repr, PROJECTIONS))}")
    if tower.freeze == "all_but_last_n":
        if tower.last_n < 1:
            raise ConfigError(f"{path}.last_n: freeze 'all_but_last_n' needs last_n >= 1, got {tower.last_n}")
    elif tower.last_n:
        raise ConfigError(f"{path}.last_n: only applies to freeze 'all_but_last_n' (freeze is {tower.freeze!r})")
    if tower.tokenizer is not None:
        if modality != "text":
            raise ConfigError(f"{path}.tokenizer: only the text tower has a tokenizer")
        if not os.path.isdir(tower.tokenizer):
            raise ConfigError(f"{path}.tokenizer: {tower.tokenizer!r} is not a folder")


def _validate_dims(tower: TowerConfig, config: dict, embed_dim: int, path: str, embed_key: str) -> None:
    """Sizes in the tower's HF config (hf_configs.tower_config); a check whose keys the config does
    not state ('auto' towers of an unknown model_type) is left to the model build."""
    check = SPECS[tower.type].check_config
    if check is not None:
        check(config, path)
    hidden = config.get("hidden_size")
    if tower.projection == "none" and hidden is not None and hidden != embed_dim:
        raise ConfigError(f"{path}.projection: 'none' needs the tower's hidden size ({hidden}) to equal "
                          f"{embed_key} ({embed_dim}); use 'linear' or 'mlp'")
    if tower.gradient_checkpointing and tower.type != "auto":
        if not class_defaults()[tower.type]["supports_gradient_checkpointing"]:
            raise ConfigError(f"{path}.gradient_checkpointing: the HF {tower.type!r} model does not support it")


@dataclass
class SimCSEConfig:
    """Sentence-embedding training of the text tower (Gao et al. 2021)."""
    mode: Literal["none", "unsup", "sup"] = field(default="none", metadata={
        "help": "'unsup': two dropout views of the same sentences; 'sup': NLI (anchor, entailment, "
                "contradiction) triplets"})
    weight: float = field(default=1.0, metadata={"help": "lambda_se, the weight of the SimCSE loss in the total"})
    temperature: float = field(default=0.05, metadata={"help": "softmax temperature of SimCSE"})
    hard_negative_weight: float = field(default=0.0, metadata={
        "help": "sup only: log-weight added to each anchor's own hard-negative logit (SimCSE's code: 0)"})
    source: Literal["captions", "sentences", "both"] = field(default="captions", metadata={
        "help": "unsup only: the batch's own captions, an external sentence stream, or both (mean of the two)"})
    embedding: Literal["pooled", "projected"] = field(default="pooled", metadata={
        "help": "SimCSE on the text tower's pooled sentence embedding (as a sentence encoder is trained) or "
                "on its projection into the shared space"})
    schedule: Literal["joint", "sequential"] = field(default="joint", metadata={
        "help": "'joint': added to the cross-modal loss every step; 'sequential': SimCSE alone for "
                "stage1_steps, then cross-modal training alone from those weights"})
    stage1_steps: int = field(default=0, metadata={"help": "sequential only: optimizer steps of the SimCSE stage"})

    def validate(self, path: str) -> None:
        if self.mode == "none":
            return
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"{path}.weight: must be positive with mode {self.mode!r}, got {self.weight}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ConfigError(f"{path}.temperature: must be positive, got {self.temperature}")
        if self.hard_negative_weight and self.mode != "sup":
            raise ConfigError(f"{path}.hard_negative_weight: only applies to mode 'sup' (hard negatives)")
        if self.source != "captions" and self.mode != "unsup":
            raise ConfigError(f"{path}.source: only applies to mode 'unsup'; 'sup' trains on the NLI stream")
        if self.schedule == "sequential" and self.stage1_steps < 1:
            raise ConfigError(f"{path}.stage1_steps: schedule 'sequential' needs stage1_steps >= 1")
        if self.schedule == "joint" and self.stage1_steps:
            raise ConfigError(f"{path}.stage1_steps: only applies to schedule 'sequential'")


@dataclass
class ObjectiveConfig:
    """Section "objective": weighted sum of CLIP/CyCLIP/SimCSE terms, each reported separately."""
    contrastive_weight: float = field(default=1.0, metadata={"help": "weight of the cross-modal InfoNCE (CLIP)"})
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the cross-modal loss"})
    cyclip_lambda1: float = field(default=0.0, metadata={
        "help": "CyCLIP in-modal consistency weight (CyCLIP's runs: 0.25)"})
    cyclip_lambda2: float = field(default=0.0, metadata={
        "help": "CyCLIP cross-modal consistency weight (CyCLIP's runs: 0.25)"})
    simcse: SimCSEConfig = field(default_factory=SimCSEConfig, metadata={"help": "sentence-embedding training"})

    def validate(self, path: str) -> None:
        for key in ("contrastive_weight", "cyclip_lambda1", "cyclip_lambda2"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{path}.{key}: must be a finite number >= 0, got {value}")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"{path}.label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if not self.cross_modal:
            if self.simcse.mode == "none":
                raise ConfigError(f"{path}: nothing to train: contrastive_weight, cyclip_lambda1, cyclip_lambda2 "
                                  f"are 0 and simcse.mode is 'none'")
            if self.simcse.schedule == "sequential":
                raise ConfigError(f"{path}.contrastive_weight: schedule 'sequential' needs a cross-modal stage "
                                  f"after the SimCSE one; set contrastive_weight > 0")

    @property
    def cross_modal(self) -> bool:
        """Whether any cross-modal term has a weight; without one the objective is SimCSE alone and
        needs no paired media (a text-only sentence-embedding run)."""
        return bool(self.contrastive_weight or self.cyclip_lambda1 or self.cyclip_lambda2)
