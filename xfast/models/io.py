"""Save / load a ContrastiveModel: the ecosystem's formats where the towers fit them, xfast's otherwise.

save_pretrained(model, out_dir, preprocessing=...) writes
  xfast_config.json   {"format": "xfast.ContrastiveModel", "format_version": 2, "modality", "model": {...},
                       "weights": "clip" | "clap" | "xfast", "preprocessing": {"text", "image" | "audio"}}
  text/               the text tower alone: HF model + tokenizer + sentence-transformers modules
and the whole model in one of two ways:
  "clip" (clip_text eos + clip_vision cls, linear projections) and "clap" (roberta cls_mlp + htsat,
  mlp projections, the towers model.init_from gives for those sources):
    config.json + model.safetensors   a transformers CLIPModel / ClapModel
    tokenizer files, preprocessor_config.json (CLIPImageProcessor / ClapFeatureExtractor with
    xfast's preprocessing), so pipeline("zero-shot-image-classification" / "zero-shot-audio-
    classification", model=out_dir) runs on it; xfast reads the weights back through init_from.
  "xfast" (every other pair, e.g. BERT + ViT, which CLIPModel/ClapModel cannot hold):
    heads.safetensors   projections, SimCSE's CLS MLP, logit_scale
    image/ or audio/    the media tower as an HF model

The text folder is a sentence encoder on its own:
  transformers: AutoModel.from_pretrained("out/text") and AutoTokenizer.from_pretrained("out/text"),
    then pool last_hidden_state as 1_Pooling/config.json says (cls: [:, 0]; mean: attention-masked
    mean; lasttoken: the last non-pad token) and, if 2_Dense exists, apply tanh(W x + b) with its
    weights (SimCSE's MLP); that equals ContrastiveModel.sentence_embedding in eval mode.
  sentence-transformers: SentenceTransformer("out/text") (written when a tokenizer is present);
    max_seq_length is the text source's own (its sentence_bert_config.json), else the length
    the model was trained with, else the tower's position limit.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import xfast
from xfast.config import parse, to_dict
from xfast.models.config import ModelConfig

FORMAT = "xfast.ContrastiveModel"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
CONFIG_NAME = "xfast_config.json"
HEADS_NAME = "heads.safetensors"
TOWER_PREFIXES = ("text.backbone.", "media.backbone.")
ST_POOLING_KEYS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                   "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_lasttoken")
ST_POOLING = {"cls": "pooling_mode_cls_token", "cls_mlp": "pooling_mode_cls_token",
              "mean": "pooling_mode_mean_tokens", "eos": "pooling_mode_lasttoken"}
# Tower layouts CLIPModel / ClapModel hold: (text type, pooling, projection), (media type, pooling, projection).
HF_LAYOUTS = {"clip": (("clip_text", "eos", "linear"), ("clip_vision", "cls", "linear")),
              "clap": (("roberta", "cls_mlp", "mlp"), ("htsat", "mean", "mlp"))}


def hf_format(model) -> str | None:
    """'clip' or 'clap' when the model's towers are exactly what CLIPModel / ClapModel hold, else None."""
    for kind, (text, media) in HF_LAYOUTS.items():
        got = tuple((t.type, t.pooling, _projection_kind(t.projection)) for t in (model.text, model.media))
        if got == (text, media) and not (kind == "clap" and model.media.backbone.config.enable_fusion):
            return kind
    return None


def _projection_kind(module) -> str:
    if isinstance(module, torch.nn.Linear):
        return "linear" if module.bias is None else "linear_bias"
    if isinstance(module, torch.nn.Sequential):
        return "mlp"
    return "none"


def save_pretrained(model, out_dir: str | os.PathLike, *, preprocessing: dict | None = None) -> str:
    """Write `model` (see the module docstring); returns the weights format: 'clip', 'clap' or 'xfast'.

    preprocessing: {"text": {"max_length"}, "image": ImageConfig fields | "audio": AudioConfig fields},
    e.g. the training run's data section; default: what the model carries (model.preprocessing).
    """
    if not all(hasattr(model, key) for key in ("config", "modality", "text", "media", "tokenizer")):
        raise TypeError(f"save_pretrained takes a ContrastiveModel, got {type(model).__name__}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    modality = model.modality
    preprocessing = resolve_preprocessing(model, preprocessing)
    text_dir = os.path.join(out_dir, "text")
    model.text.backbone.save_pretrained(text_dir)
    has_tokenizer = model.tokenizer is not None
    if has_tokenizer:
        model.tokenizer.save_pretrained(text_dir)
        _write_sentence_transformers(model, text_dir, preprocessing)
    kind = hf_format(model)
    raw = to_dict(model.config)
    if kind is not None:
        from xfast.models.hf_export import write_hf_model
        notes = write_hf_model(model, out_dir, kind, preprocessing)
        raw.update(init_from=".", embed_dim=None, logit_scale_init=None)
        for name in ("text", modality):
            raw[name].update(type=None, pooling=None, projection="linear", pretrained=None, preset=None,
                             overrides={}, tokenizer=None)
    else:
        notes = {"hf_model": "not written: CLIPModel holds clip_text (eos) + clip_vision (cls) towers with linear "
                             "projections, ClapModel roberta (cls_mlp) + htsat with mlp projections; this model has "
                             f"{model.text.type} ({model.text.pooling}) + {model.media.type} ({model.media.pooling})"}
        model.media.backbone.save_pretrained(os.path.join(out_dir, modality))
        heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
                 if not k.startswith(TOWER_PREFIXES)}
        save_file(heads, os.path.join(out_dir, HEADS_NAME))
        for name, folder in (("text", "text"), (modality, modality)):
            raw[name].update(pretrained=folder, preset=None, overrides={},
                             tokenizer="text" if name == "text" and has_tokenizer else None)
    raw["init_from"] = raw.get("init_from") if kind is not None else None
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "xfast_version": xfast.__version__,
           "modality": modality, "weights": kind or "xfast", "model": raw, "preprocessing": preprocessing,
           "notes": notes}
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2)
    return kind or "xfast"


def preprocessing_from_data(data) -> dict:
    """The preprocessing a run trained with, from its parsed "data" section (xfast.data.DataConfig)."""
    out = {"text": {"max_length": data.text.max_length}}
    if data.modality in ("image", "audio"):
        out[data.modality] = to_dict(getattr(data, data.modality))
    return out


def resolve_preprocessing(model, preprocessing: dict | None) -> dict:
    """Text max_length and the media front end, validated; falls back on model.preprocessing."""
    from xfast.data.config import AudioConfig, ImageConfig
    given = dict(preprocessing if preprocessing is not None else (getattr(model, "preprocessing", None) or {}))
    out = {}
    limit = model.text.requirements()["max_text_length"]
    text = given.get("text") or {}
    out["text"] = {"max_length": min(int(text.get("max_length", limit)), limit)}
    media = given.get(model.modality)
    if media is None and model.modality == "image":
        media = {"size": model.media.requirements()["image_size"]}  # CLIP's mean/std and filter
    if media is not None:
        section = ImageConfig if model.modality == "image" else AudioConfig
        fields = {k: v for k, v in media.items() if k in section.__dataclass_fields__}
        out[model.modality] = to_dict(parse(section, fields, f"preprocessing.{model.modality}"))
    return out


def read_pretrained(model_dir: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(the ModelConfig to build, the xfast_config.json document) of a folder written by
    save_pretrained, with its paths made absolute; xfast.models.load_pretrained builds the model
    and calls load_weights."""
    model_dir = os.fspath(model_dir)
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} is not an xfast model folder (no {CONFIG_NAME})")
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT or doc.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                         f"{doc.get('format')!r} version {doc.get('format_version')!r}")
    raw = doc["model"]
    if raw.get("init_from") is not None:
        raw["init_from"] = os.path.normpath(os.path.join(model_dir, raw["init_from"]))
    for name in ("text", doc["modality"]):
        for key in ("pretrained", "tokenizer"):
            if raw[name].get(key):
                raw[name][key] = os.path.join(model_dir, raw[name][key])
    if doc.get("weights", "xfast") != "xfast" and raw["text"].get("tokenizer") is None \
            and os.path.isfile(os.path.join(model_dir, "text", "tokenizer_config.json")):
        raw["text"]["tokenizer"] = os.path.join(model_dir, "text")
    return parse(ModelConfig, raw, "model"), doc


def load_weights(model, model_dir: str | os.PathLike, doc: dict, *, map_location: str | torch.device = "cpu") -> None:
    """The heads (projections, CLS MLP, logit scale) of an 'xfast'-weights folder into a model
    built from read_pretrained (the towers' weights came with their folders), and its
    preprocessing."""
    model_dir = os.fspath(model_dir)
    if doc.get("weights", "xfast") == "xfast":
        heads = load_file(os.path.join(model_dir, HEADS_NAME), device=str(map_location))
        missing, unexpected = model.load_state_dict(heads, strict=False)
        missing = [k for k in missing if not k.startswith(TOWER_PREFIXES)]
        if missing or unexpected:
            raise ValueError(f"{model_dir}/{HEADS_NAME} does not match the model: missing {missing}, "
                             f"unexpected {unexpected}")
    model.preprocessing = doc.get("preprocessing") or {}


def _write_sentence_transformers(model, text_dir: str, preprocessing: dict) -> None:
    """modules.json + pooling (+ SimCSE's MLP as a Dense module when it is kept at eval)."""
    tower = model.text
    hidden = tower.hidden_size
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    pooling = {"word_embedding_dimension": hidden, **{k: False for k in ST_POOLING_KEYS},
               ST_POOLING[tower.pooling]: True}
    _write_json(os.path.join(text_dir, "1_Pooling", "config.json"), pooling)
    if tower.cls_mlp is not None and not tower.mlp_only_train:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        dense_dir = os.path.join(text_dir, "2_Dense")
        _write_json(os.path.join(dense_dir, "config.json"),
                    {"in_features": hidden, "out_features": hidden, "bias": True,
                     "activation_function": "torch.nn.modules.activation.Tanh"})
        dense = tower.cls_mlp.dense
        save_file({"linear.weight": dense.weight.detach().contiguous().cpu(),
                   "linear.bias": dense.bias.detach().contiguous().cpu()},
                  os.path.join(dense_dir, "model.safetensors"))
    _write_json(os.path.join(text_dir, "modules.json"), modules)
    _write_json(os.path.join(text_dir, "sentence_bert_config.json"), _sentence_bert_config(model, preprocessing))


def _sentence_bert_config(model, preprocessing: dict) -> dict:
    """The text source's own settings when it was a sentence-transformers model, else the trained length."""
    limit = model.text.requirements()["max_text_length"]
    source = model.config.text.pretrained
    if source is not None and os.path.isfile(os.path.join(source, "sentence_bert_config.json")):
        with open(os.path.join(source, "sentence_bert_config.json")) as f:
            theirs = json.load(f)
        return {"max_seq_length": min(int(theirs.get("max_seq_length", limit)), limit),
                "do_lower_case": bool(theirs.get("do_lower_case", False))}
    return {"max_seq_length": preprocessing["text"]["max_length"], "do_lower_case": False}


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
