"""Whole pretrained contrastive models as a starting point (`model.init_from`) and as an export format.

Three source kinds, detected from the path:
- "clip": a transformers CLIPModel folder (config.json with model_type "clip"): towers clip_text
  (eos pooling) + clip_vision (cls pooling), bias-free linear projections, one logit scale.
- "clap": a transformers ClapModel folder (model_type "clap", feature fusion off): the text
  tower is RoBERTa with ClapTextModel's pooler (tanh(W cls)) as xfast's cls_mlp pooling, the
  audio tower is HTSAT; both projections are Linear-ReLU-Linear; logit_scale_a is the scale.
- "open_clip": an open_clip checkpoint file (.pt/.bin/.safetensors, a state dict in open_clip's
  CLIP layout, optionally under "state_dict") with its model config JSON next to it
  (same stem + ".json", or open_clip_config.json / config.json in its folder; the config may
  also be wrapped as {"model_cfg": {...}}). Only the standard ViT + text-transformer CLIP
  layout (no timm / HF text towers, no attentional pooler) maps onto xfast's towers.

read_source() reads configs only (cheap: used when a config is validated); source_state_dict()
loads the weights renamed to ContrastiveModel's parameter names. The same renames run backwards
in to_hf_state_dict() for the export.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import (
    ClapAudioConfig,
    ClapConfig,
    CLIPConfig,
    CLIPTextConfig,
    CLIPVisionConfig,
    PretrainedConfig,
    RobertaConfig,
)

from xfast.config import ConfigError

OPEN_CLIP_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")
# ClapTextConfig attributes that are RoBERTa's (ClapTextModel is RoBERTa with a pooler).
_ROBERTA_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                 "hidden_act", "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings",
                 "type_vocab_size", "layer_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id")


@dataclass
class SourceTower:
    type: str
    pooling: str
    projection: str
    config: PretrainedConfig


@dataclass
class Source:
    """What a pretrained contrastive model fixes: towers, shared space, scale, tokenizer, preprocessing."""
    kind: str
    path: str
    modality: str
    text: SourceTower
    media: SourceTower
    embed_dim: int
    logit_scale: float  # the multiplier exp(log scale)
    tokenizer_dir: str | None = None
    preprocessing: dict = field(default_factory=dict)

    def towers(self) -> dict[str, SourceTower]:
        return {"text": self.text, self.modality: self.media}


def detect(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if os.path.isdir(path):
        config = os.path.join(path, "config.json")
        if not os.path.isfile(config):
            raise ConfigError(f"model.init_from: {path!r} is a folder without config.json (expected a transformers "
                              f"CLIPModel/ClapModel folder, or an open_clip checkpoint file)")
        model_type = _read_json(config).get("model_type")
        if model_type in ("clip", "clap"):
            return model_type
        raise ConfigError(f"model.init_from: {path!r} holds a {model_type!r} model; init_from takes a CLIPModel "
                          f"('clip') or ClapModel ('clap') folder (single encoders go in model.text/image/audio."
                          f"pretrained)")
    if os.path.isfile(path):
        if path.endswith(OPEN_CLIP_SUFFIXES):
            return "open_clip"
        raise ConfigError(f"model.init_from: {path!r} is a file but not an open_clip checkpoint "
                          f"({', '.join(OPEN_CLIP_SUFFIXES)})")
    raise ConfigError(f"model.init_from: {path!r} does not exist")


def read_source(path: str | os.PathLike) -> Source:
    path = os.fspath(path)
    kind = detect(path)
    return {"clip": _read_clip, "clap": _read_clap, "open_clip": _read_open_clip}[kind](path)


def source_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """The source's weights under ContrastiveModel's names (logit_scale as log, shape (1,))."""
    if source.kind == "open_clip":
        return _open_clip_to_xfast(_load_state_dict(source.path), source)
    weights = _load_hf_weights(source.path)
    renames = RENAMES[source.kind]
    out = {}
    for key, value in weights.items():
        if key in SCALE_KEYS[source.kind]:
            if key == SCALE_KEYS[source.kind][0]:
                out["logit_scale"] = value.reshape(1).float()
            continue
        new = _rename(key, renames)
        if new is not None:
            out[new] = value
    return out


def to_hf_state_dict(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """ContrastiveModel's state dict under CLIPModel / ClapModel names (inverse of the renames)."""
    backwards = [(dst, src) for src, dst in RENAMES[kind]]
    out = {}
    for key, value in state.items():
        if key == "logit_scale":
            for scale_key in SCALE_KEYS[kind]:
                out[scale_key] = value.detach().reshape(()).clone()
            continue
        new = _rename(key, backwards)
        if new is None:
            raise ValueError(f"{key}: no {kind} counterpart")
        out[new] = value
    return out


# (source prefix, xfast prefix); the first match wins, so specific prefixes come first.
RENAMES: dict[str, list[tuple[str, str]]] = {
    "clip": [("text_model.", "text.backbone."), ("vision_model.", "media.backbone."),
             ("text_projection.", "text.projection."), ("visual_projection.", "media.projection.")],
    "clap": [("text_model.pooler.dense.", "text.cls_mlp.dense."), ("text_model.", "text.backbone."),
             ("text_projection.linear1.", "text.projection.0."), ("text_projection.linear2.", "text.projection.2."),
             ("audio_model.", "media.backbone."),
             ("audio_projection.linear1.", "media.projection.0."), ("audio_projection.linear2.", "media.projection.2.")],
}
# The first key is read; all are written. CLAP's forward scales logits_per_audio (what the
# zero-shot pipeline reads) by logit_scale_a and logits_per_text by logit_scale_t.
SCALE_KEYS = {"clip": ("logit_scale",), "clap": ("logit_scale_a", "logit_scale_t")}
# Buffers the HF models save that xfast's towers rebuild themselves.
IGNORED_BUFFERS = ("text.backbone.embeddings.position_ids", "text.backbone.embeddings.token_type_ids",
                   "media.backbone.embeddings.position_ids")


def _rename(key: str, renames) -> str | None:
    for src, dst in renames:
        if key.startswith(src):
            return dst + key[len(src):]
    return None


def fit_to_model(state: dict[str, torch.Tensor], model: torch.nn.Module, source: str) -> dict[str, torch.Tensor]:
    """`state` checked against model's own keys and shapes; every error names the tensors."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not (k in IGNORED_BUFFERS and k not in own)}
    missing = sorted(set(own) - set(state) - set(IGNORED_BUFFERS))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{source} does not match the model built from it: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''}")
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{source}: tensor shapes differ from the model built from it: {'; '.join(bad[:8])}")
    return state


# -- transformers folders


def _read_clip(path: str) -> Source:
    config = CLIPConfig.from_pretrained(path)
    text = SourceTower("clip_text", "eos", "linear", config.text_config)
    image = SourceTower("clip_vision", "cls", "linear", config.vision_config)
    preprocessing = {}
    processor = _read_optional_json(path, "preprocessor_config.json")
    if processor:
        preprocessing["image"] = _image_preprocessing(processor, config.vision_config.image_size)
    return Source("clip", path, "image", text, image, config.projection_dim, math.exp(config.logit_scale_init_value),
                  _tokenizer_dir(path), preprocessing)


def _read_clap(path: str) -> Source:
    config = ClapConfig.from_pretrained(path)
    text_cfg, audio_cfg = config.text_config, config.audio_config
    if audio_cfg.enable_fusion:
        raise ConfigError(f"model.init_from: {path!r} is a fused CLAP (audio_config.enable_fusion=true); xfast's "
                          f"HTSAT tower takes one log-mel channel (use an unfused checkpoint, e.g. clap-htsat-unfused)")
    for name, cfg in (("text", text_cfg), ("audio", audio_cfg)):
        if cfg.projection_hidden_act != "relu":
            raise ConfigError(f"model.init_from: {path!r} has {name}_config.projection_hidden_act="
                              f"{cfg.projection_hidden_act!r}; xfast's 'mlp' projection is Linear-ReLU-Linear")
    roberta = RobertaConfig(**{k: getattr(text_cfg, k) for k in _ROBERTA_KEYS})
    audio = ClapAudioConfig(**{k: v for k, v in audio_cfg.to_dict().items()
                               if k not in ("model_type", "transformers_version", "architectures")})
    text = SourceTower("roberta", "cls_mlp", "mlp", roberta)
    media = SourceTower("htsat", "mean", "mlp", audio)
    preprocessing = {}
    processor = _read_optional_json(path, "preprocessor_config.json")
    if processor:
        preprocessing["audio"] = _audio_preprocessing(processor)
    # ClapConfig keeps the multiplier (CLIPConfig its log); the trained value comes with the weights.
    return Source("clap", path, "audio", text, media, config.projection_dim, config.logit_scale_init_value,
                  _tokenizer_dir(path), preprocessing)


def _tokenizer_dir(path: str) -> str | None:
    names = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer_config.json")
    return path if any(os.path.isfile(os.path.join(path, n)) for n in names) else None


def _image_preprocessing(processor: dict, image_size: int) -> dict:
    processor = processor.get("image_processor", processor)
    crop = processor.get("crop_size") or {}
    size = crop.get("height") if isinstance(crop, dict) else crop
    out = {"size": int(size or image_size)}
    if processor.get("image_mean") is not None:
        out["mean"] = [float(v) for v in processor["image_mean"]]
        out["std"] = [float(v) for v in processor["image_std"]]
    out["interpolation"] = {2: "bilinear", 3: "bicubic"}.get(processor.get("resample", 3), "bicubic")
    return out


def _audio_preprocessing(processor: dict) -> dict:
    processor = processor.get("feature_extractor", processor)
    return {"sample_rate": processor["sampling_rate"], "duration_s": float(processor["max_length_s"]),
            "n_fft": processor["fft_window_size"], "hop_length": processor["hop_length"],
            "n_mels": processor["feature_size"], "fmin": float(processor["frequency_min"]),
            "fmax": float(processor["frequency_max"]), "mel_scale": "slaney", "mel_norm": "slaney",
            "padding": "repeatpad" if processor.get("padding", "repeatpad") == "repeatpad" else "pad"}


def _load_hf_weights(path: str) -> dict[str, torch.Tensor]:
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        from safetensors.torch import load_file
        return load_file(single)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        from safetensors.torch import load_file
        out = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            out.update(load_file(os.path.join(path, shard)))
        return out
    legacy = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(legacy):
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise ConfigError(f"model.init_from: {path!r} has no model.safetensors(.index.json) or pytorch_model.bin")


# -- open_clip


def open_clip_config_path(checkpoint: str) -> str:
    p = Path(checkpoint)
    for candidate in (p.with_suffix(".json"), p.parent / "open_clip_config.json", p.parent / "config.json"):
        if candidate.is_file():
            return str(candidate)
    raise ConfigError(f"model.init_from: no model config for the open_clip checkpoint {checkpoint!r}; put its "
                      f"JSON (open_clip's model_configs/<name>.json) next to it as {p.with_suffix('.json').name} "
                      f"or open_clip_config.json")


def _read_open_clip(path: str) -> Source:
    config_path = open_clip_config_path(path)
    raw = _read_json(config_path)
    raw = raw.get("model_cfg", raw)
    try:
        vision, text, embed_dim = raw["vision_cfg"], raw["text_cfg"], raw["embed_dim"]
    except KeyError as err:
        raise ConfigError(f"model.init_from: {config_path} lacks {err.args[0]!r} (expected open_clip's model config: "
                          f"embed_dim, vision_cfg, text_cfg)") from None
    unsupported = [f"vision_cfg.{k}" for k in ("timm_model_name", "attentional_pool", "no_ln_pre", "final_ln_after_pool")
                   if vision.get(k)] + [f"text_cfg.{k}" for k in ("hf_model_name", "no_causal_mask", "embed_cls")
                                        if text.get(k)]
    if isinstance(vision.get("layers"), (list, tuple)):
        unsupported.append("vision_cfg.layers (ResNet)")
    if vision.get("pool_type", "tok") != "tok" or text.get("pool_type", "argmax") not in ("argmax", "last"):
        unsupported.append("pool_type")
    if vision.get("ls_init_value") or text.get("ls_init_value"):
        unsupported.append("ls_init_value (layer scale)")
    if unsupported:
        raise ConfigError(f"model.init_from: {config_path} uses {', '.join(unsupported)}, which xfast's CLIP towers "
                          f"do not have; only the standard ViT + text transformer CLIP layout maps")
    act = "quick_gelu" if raw.get("quick_gelu", False) else "gelu"
    t_width, v_width = text.get("width", 512), vision.get("width", 768)
    t_heads = text.get("heads", 8)
    v_heads = vision.get("heads", v_width // vision.get("head_width", 64))
    vocab = text.get("vocab_size", 49408)
    text_cfg = CLIPTextConfig(
        vocab_size=vocab, hidden_size=t_width, intermediate_size=int(t_width * text.get("mlp_ratio", 4.0)),
        projection_dim=embed_dim, num_hidden_layers=text.get("layers", 12), num_attention_heads=t_heads,
        max_position_embeddings=text.get("context_length", 77), hidden_act=act, layer_norm_eps=1e-5,
        attention_dropout=0.0, pad_token_id=0, bos_token_id=vocab - 2, eos_token_id=vocab - 1)
    vision_cfg = CLIPVisionConfig(
        hidden_size=v_width, intermediate_size=int(v_width * vision.get("mlp_ratio", 4.0)), projection_dim=embed_dim,
        num_hidden_layers=vision["layers"], num_attention_heads=v_heads, image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16), hidden_act=act, layer_norm_eps=1e-5)
    image_size = vision.get("image_size", 224)
    preprocessing = {"image": {"size": image_size if isinstance(image_size, int) else image_size[0]}}
    pre = raw.get("preprocess_cfg") or {}
    if pre.get("mean") is not None:
        preprocessing["image"].update(mean=list(pre["mean"]), std=list(pre["std"]))
    source = Source("open_clip", path, "image", SourceTower("clip_text", "eos", "linear", text_cfg),
                    SourceTower("clip_vision", "cls", "linear", vision_cfg), embed_dim, 1 / 0.07,
                    None, preprocessing)
    return source


def _load_state_dict(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    # DDP-saved checkpoints prefix every key with "module."
    return {k.removeprefix("module."): v for k, v in state.items()}


def _open_clip_to_xfast(state: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    try:
        return _open_clip_renamed(state, source)
    except KeyError as err:
        raise ValueError(f"{source.path}: not an open_clip CLIP state dict with the layout of its config "
                         f"(no tensor {err.args[0]!r})") from None


def _open_clip_renamed(state: dict[str, torch.Tensor], source: Source) -> dict[str, torch.Tensor]:
    out = {"logit_scale": state["logit_scale"].reshape(1).float(),
           "text.projection.weight": state["text_projection"].T.contiguous(),
           "media.projection.weight": state["visual.proj"].T.contiguous()}
    text, vision = "text.backbone.", "media.backbone."
    out[text + "embeddings.token_embedding.weight"] = state["token_embedding.weight"]
    out[text + "embeddings.position_embedding.weight"] = state["positional_embedding"]
    out[text + "final_layer_norm.weight"] = state["ln_final.weight"]
    out[text + "final_layer_norm.bias"] = state["ln_final.bias"]
    out[vision + "embeddings.class_embedding"] = state["visual.class_embedding"]
    out[vision + "embeddings.patch_embedding.weight"] = state["visual.conv1.weight"]
    out[vision + "embeddings.position_embedding.weight"] = state["visual.positional_embedding"]
    for ours, theirs in (("pre_layrnorm", "visual.ln_pre"), ("post_layernorm", "visual.ln_post")):
        for p in ("weight", "bias"):
            out[f"{vision}{ours}.{p}"] = state[f"{theirs}.{p}"]
    for prefix, theirs, layers in ((text, "transformer.", source.text.config.num_hidden_layers),
                                   (vision, "visual.transformer.", source.media.config.num_hidden_layers)):
        for i in range(layers):
            src, dst = f"{theirs}resblocks.{i}.", f"{prefix}encoder.layers.{i}."
            for name in ("weight", "bias"):
                q, k, v = state[f"{src}attn.in_proj_{name}"].chunk(3)
                out[f"{dst}self_attn.q_proj.{name}"] = q
                out[f"{dst}self_attn.k_proj.{name}"] = k
                out[f"{dst}self_attn.v_proj.{name}"] = v
                out[f"{dst}self_attn.out_proj.{name}"] = state[f"{src}attn.out_proj.{name}"]
                out[f"{dst}layer_norm1.{name}"] = state[f"{src}ln_1.{name}"]
                out[f"{dst}layer_norm2.{name}"] = state[f"{src}ln_2.{name}"]
                out[f"{dst}mlp.fc1.{name}"] = state[f"{src}mlp.c_fc.{name}"]
                out[f"{dst}mlp.fc2.{name}"] = state[f"{src}mlp.c_proj.{name}"]
    return out


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _read_optional_json(folder: str, name: str) -> dict | None:
    path = os.path.join(folder, name)
    return _read_json(path) if os.path.isfile(path) else None
