"""Encoder towers: an HF backbone (from a preset or a local folder), pooling, projection, freezing.

What each tower type is (HF classes, poolings, presets, the inputs it takes and its size checks)
lives in its spec, xfast.models.specs.SPECS; this module builds and runs towers from the specs.
"""
from __future__ import annotations

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, PretrainedConfig, PreTrainedModel

from xfast._checks import DeferredChecks, nonfinite_flags
from xfast.config import ConfigError
from xfast.models import hf_configs
from xfast.models.config import TowerConfig
from xfast.models.heads import ClsMlp, projection_head
from xfast.models.patchify import patchify_convs
from xfast.models.specs import SPECS
from xfast.models.time_stretch import use_gemm_time_stretch

# type -> (HF config class, HF model class), from the specs ('auto' has none).
ARCHITECTURES: dict[str, tuple[type[PretrainedConfig], type[PreTrainedModel]]] = {
    t: (spec.hf_config_class(), spec.hf_model_class()) for t, spec in SPECS.items() if spec.config_class is not None}


def hf_config(tower: TowerConfig, path: str, *, base: PretrainedConfig | None = None) -> PretrainedConfig:
    """The HF config a tower is built from: preset (or checkpoint, or `base`: model.init_from's) plus
    overrides; no weights."""
    spec = SPECS[tower.type]
    if base is not None:
        config = copy.deepcopy(base)
    elif tower.pretrained is not None:
        config = AutoConfig.from_pretrained(tower.pretrained)
        if spec.model_type is not None:
            if config.model_type != spec.model_type:
                raise ConfigError(f"{path}.pretrained: {tower.pretrained!r} holds a {config.model_type!r} model but "
                                  f"type {tower.type!r} needs model_type {spec.model_type!r} (or use type 'auto' "
                                  f"for text)")
        elif getattr(config, "vocab_size", None) is None:
            raise ConfigError(f"{path}.pretrained: {tower.pretrained!r} holds a {config.model_type!r} model, not a "
                              f"text encoder (its config has no vocab_size)")
    else:
        config = spec.hf_config_class()(**spec.presets.get(tower.preset, {}))
    reference = type(config)()
    for key, value in tower.overrides.items():
        if not hasattr(reference, key):
            raise ConfigError(f"{path}.overrides.{key}: {type(config).__name__} has no attribute {key!r}")
        setattr(config, key, value)
    return config


def model_class(tower: TowerConfig, config: PretrainedConfig) -> type[PreTrainedModel]:
    """The spec's HF model class, or (type 'auto') the AutoModel class of `config`."""
    spec = SPECS[tower.type]
    if spec.model_class is not None:
        return spec.hf_model_class()
    if type(config) not in MODEL_MAPPING:
        raise ConfigError(f"model.text.pretrained: transformers has no AutoModel for {type(config).__name__}")
    return MODEL_MAPPING[type(config)]


def build_backbone(tower: TowerConfig, path: str, *, vocab: dict | None = None,
                   base: PretrainedConfig | None = None) -> PreTrainedModel:
    """The HF model of a tower. vocab: tokenizer facts for random text towers (size, special ids).
    base: the config of model.init_from's tower (its weights are loaded by build_model)."""
    config = hf_config(tower, path, base=base)
    if vocab is not None and tower.pretrained is None and base is None:
        _fit_vocab(config, tower, vocab, path)
    cls = model_class(tower, config)
    # A pooler layer nobody uses would get no gradient (DeepSpeed/DDP complain about that).
    extra = {"add_pooling_layer": False} if "add_pooling_layer" in _init_parameters(cls) else {}
    if tower.pretrained is not None and base is None:
        model = cls.from_pretrained(tower.pretrained, config=config, **extra)
    else:
        model = cls(config, **extra)
    # Same parameters and function, cheaper ops (see the modules): patch embeddings and HTSAT's
    # time stretch as GEMMs.
    patchify_convs(model)
    use_gemm_time_stretch(model)
    if tower.gradient_checkpointing:
        if not cls.supports_gradient_checkpointing:  # 'auto' towers; the others are checked with the config
            raise ConfigError(f"{path}.gradient_checkpointing: the HF {cls.__name__} does not support it")
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    return model


def _init_parameters(cls) -> tuple[str, ...]:
    return tuple(inspect.signature(cls.__init__).parameters)


def _fit_vocab(config, tower: TowerConfig, vocab: dict, path: str) -> None:
    size = vocab["size"]
    if "vocab_size" in tower.overrides:
        if config.vocab_size < size:
            raise ConfigError(f"{path}.overrides.vocab_size: {config.vocab_size} is smaller than the tokenizer's "
                              f"{size} tokens")
    else:
        config.vocab_size = size
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        if vocab.get(key) is not None and key not in tower.overrides and hasattr(config, key):
            setattr(config, key, vocab[key])


class EncoderTower(nn.Module):
    """backbone -> pooling -> (sentence embedding, projection input) -> projection.

    For every pooling but 'cls_mlp' the sentence embedding and the projection input are the same
    vector. With 'cls_mlp' the projection always sees MLP(CLS); the sentence embedding is MLP(CLS)
    too, except in eval mode with mlp_only_train (bare CLS, as unsupervised SimCSE evaluates).
    """

    def __init__(self, modality: str, tower: TowerConfig, backbone: PreTrainedModel, embed_dim: int,
                 path: str = "model"):
        super().__init__()
        self.modality = modality
        self.type = tower.type
        self.spec = SPECS[tower.type]
        self.pooling = tower.pooling or self.spec.poolings[0]
        self.mlp_only_train = tower.mlp_only_train
        self.freeze = tower.freeze
        self.backbone = backbone
        self._requirements = None
        hidden = self.hidden_size
        self.cls_mlp = ClsMlp(hidden) if self.pooling == "cls_mlp" else None
        self.projection = projection_head(tower.projection, hidden, embed_dim)
        self._apply_freeze(tower, f"{path}.{modality}")

    @property
    def hidden_size(self) -> int:
        return self.backbone.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        # A fully frozen backbone is a fixed function: no dropout, no BatchNorm statistics updates.
        if self.freeze == "all":
            self.backbone.eval()
        return self

    def forward(self, **inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(sentence embedding, projected embedding), both unnormalised."""
        pooled = self._pool(**inputs)
        if self.cls_mlp is None:
            return pooled, self.projection(pooled)
        mlp_out = self.cls_mlp(pooled)
        sentence = pooled if (self.mlp_only_train and not self.training) else mlp_out
        return sentence, self.projection(mlp_out)

    def _pool(self, **inputs) -> torch.Tensor:
        return self.spec.pool(self.backbone, inputs, self.pooling)

    # -- input checks: every error names the tensor, the expected layout and the tower's settings.

    def check_inputs(self, checks: DeferredChecks | None = None, **inputs) -> dict[str, torch.Tensor]:
        """The inputs on the tower's device, after every check. Shapes, dtypes and sizes raise here;
        the checks of values (empty or wrongly padded text rows, NaN/inf media) go to `checks`, to be
        read with the rest of the step's in one device-to-host copy (ContrastiveModel.features);
        without `checks` they are read before returning."""
        own = checks is None
        checks = DeferredChecks() if own else checks
        out = self._check(checks, inputs)
        if own:
            checks.read()
        return out

    def _check(self, checks: DeferredChecks, inputs: dict) -> dict[str, torch.Tensor]:
        device, dtype = self._param_device_dtype()
        if self.modality == "text":
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            for name, t in (("input_ids", ids), ("attention_mask", mask)):
                _check_tensor(name, t, 2, integer=True)
            if ids.shape != mask.shape:
                raise ValueError(f"input_ids {tuple(ids.shape)} and attention_mask {tuple(mask.shape)} differ in shape")
            if ids.shape[0] == 0 or ids.shape[1] == 0:
                raise ValueError(f"input_ids is empty (shape {tuple(ids.shape)})")
            limit = self.requirements()["max_text_length"]
            if ids.shape[1] > limit:
                raise ValueError(f"input_ids has length {ids.shape[1]} but the text tower takes at most {limit} tokens")
            lengths = mask.sum(1)
            checks.add((lengths == 0).any(), "attention_mask has a row with no tokens")
            if self.pooling == "eos":
                positions = torch.arange(mask.shape[1], device=mask.device)
                checks.add((mask.bool() != (positions < lengths[:, None])).any(),
                           "eos pooling needs right-padded input (attention_mask rows of 1s then 0s)")
            return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if self.modality == "image":
            x = inputs["pixel_values"]
            _check_tensor("pixel_values", x, 4, integer=False)
            req = self.requirements()
            size, channels = req["image_size"], req["num_channels"]
            if tuple(x.shape[1:]) != (channels, size, size):
                raise ValueError(f"pixel_values must be [B, {channels}, {size}, {size}] for this {self.type} tower, "
                                 f"got {tuple(x.shape)}")
            return {"pixel_values": _finite(checks, "pixel_values", x).to(device, dtype)}
        x = inputs["input_features"]
        _check_tensor("input_features", x, 4, integer=False)
        req = self.requirements()
        n_mels, frames = req["n_mels"], req["max_frames"]
        if x.shape[1] != 1 or x.shape[3] != n_mels:
            raise ValueError(f"input_features must be log-mel [B, 1, frames, {n_mels}] for this {self.type} tower, "
                             f"got {tuple(x.shape)}")
        if self.spec.exact_frames and x.shape[2] != frames:
            raise ValueError(f"input_features must have exactly {frames} frames ({self.type} max_length), "
                             f"got {x.shape[2]}")
        if x.shape[2] > frames:
            raise ValueError(f"input_features has {x.shape[2]} frames; this htsat tower takes at most {frames}")
        return {"input_features": _finite(checks, "input_features", x).to(device, dtype)}

    def requirements(self) -> dict:
        """What the data pipeline must produce for this tower (see the module docstring)."""
        if self._requirements is None:  # the config is fixed once built; check_inputs asks every step
            self._requirements = self.spec.requirements(self.backbone.config.to_dict())
        return self._requirements

    def dropout_probability(self) -> float:
        """Largest dropout probability in the backbone's config (0: two forward passes are identical)."""
        return hf_configs.dropout_probability(self.backbone.config.to_dict())

    def _param_device_dtype(self):
        p = next(self.backbone.parameters())
        return p.device, p.dtype

    def _apply_freeze(self, tower: TowerConfig, path: str) -> None:
        if tower.freeze_head:
            for module in (self.cls_mlp, self.projection):
                if module is not None:
                    module.requires_grad_(False)
        if tower.freeze == "none":
            return
        self.backbone.requires_grad_(False)
        if tower.freeze == "all":
            return
        layers_name, layers = _encoder_layers(self.backbone)
        if tower.last_n > len(layers):
            raise ConfigError(f"{path}.last_n: {tower.last_n} exceeds the {len(layers)} layers of the {tower.type} tower")
        for layer in layers[len(layers) - tower.last_n:]:
            layer.requires_grad_(True)
        # The final norm sits next to the layer stack (HTSAT) or next to its encoder (CLIP, ViT, AST).
        parent = _parent(layers_name)
        owners = {parent, _parent(parent)}
        for name, module in self.backbone.named_modules():
            if name.rsplit(".", 1)[-1] in FINAL_NORMS and _parent(name) in owners:
                module.requires_grad_(True)


FINAL_NORMS = ("final_layer_norm", "post_layernorm", "layernorm", "norm")


def _parent(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _encoder_layers(backbone: nn.Module) -> tuple[str, nn.ModuleList]:
    """The backbone's stack of encoder layers (HTSAT: its stages): the longest ModuleList named layer(s)."""
    candidates = [(name, m) for name, m in backbone.named_modules()
                  if isinstance(m, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    if not candidates:
        raise ConfigError(f"freeze 'all_but_last_n': cannot find the encoder layers of {type(backbone).__name__}")
    return max(candidates, key=lambda c: len(c[1]))


def _check_tensor(name: str, t, dims: int, *, integer: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if integer and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if not integer and not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(t.shape)})")


def _finite(checks: DeferredChecks, name: str, t: torch.Tensor) -> torch.Tensor:
    if t.numel():
        checks.add(nonfinite_flags(t), f"{name} contains NaN or inf")
    return t


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
