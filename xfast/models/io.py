"""Save / load a ContrastiveModel as HF folders plus xfast's heads and config.

Layout of save_pretrained(out_dir):
  xfast_config.json   {"format": "xfast.ContrastiveModel", "format_version": 1, "modality", "model": {...}}
  heads.safetensors   projections, SimCSE's CLS MLP, logit_scale
  text/               HF model (+ tokenizer when the model has one) + sentence-transformers modules
  image/ or audio/    HF model

The text folder is a sentence encoder on its own:
  transformers: AutoModel.from_pretrained("out/text") and AutoTokenizer.from_pretrained("out/text"),
    then pool last_hidden_state as 1_Pooling/config.json says (cls: [:, 0]; mean: attention-masked
    mean; lasttoken: the last non-pad token) and, if 2_Dense exists, apply tanh(W x + b) with its
    weights (SimCSE's MLP); that equals ContrastiveModel.sentence_embedding in eval mode.
  sentence-transformers: SentenceTransformer("out/text") (written when a tokenizer is present).
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

import xfast
from xfast.config import parse, to_dict

FORMAT = "xfast.ContrastiveModel"
FORMAT_VERSION = 1
CONFIG_NAME = "xfast_config.json"
HEADS_NAME = "heads.safetensors"
TOWER_PREFIXES = ("text.backbone.", "media.backbone.")
ST_POOLING_KEYS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                   "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_lasttoken")
ST_POOLING = {"cls": "pooling_mode_cls_token", "cls_mlp": "pooling_mode_cls_token",
              "mean": "pooling_mode_mean_tokens", "eos": "pooling_mode_lasttoken"}


def save_pretrained(model, out_dir: str) -> None:
    from xfast.models.model import ContrastiveModel
    if not isinstance(model, ContrastiveModel):
        raise TypeError(f"save_pretrained takes a ContrastiveModel, got {type(model).__name__}")
    os.makedirs(out_dir, exist_ok=True)
    modality = model.modality
    text_dir, media_dir = os.path.join(out_dir, "text"), os.path.join(out_dir, modality)
    model.text.backbone.save_pretrained(text_dir)
    model.media.backbone.save_pretrained(media_dir)
    has_tokenizer = model.tokenizer is not None
    if has_tokenizer:
        model.tokenizer.save_pretrained(text_dir)
        _write_sentence_transformers(model, text_dir)
    heads = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()
             if not k.startswith(TOWER_PREFIXES)}
    save_file(heads, os.path.join(out_dir, HEADS_NAME))
    raw = to_dict(model.config)
    for name, folder in (("text", "text"), (modality, modality)):
        raw[name].update(pretrained=folder, preset=None, overrides={},
                         tokenizer="text" if name == "text" and has_tokenizer else None)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "xfast_version": xfast.__version__,
           "modality": modality, "model": raw}
    with open(os.path.join(out_dir, CONFIG_NAME), "w") as f:
        json.dump(doc, f, indent=2)


def load_pretrained(model_dir: str, *, map_location: str | torch.device = "cpu"):
    """Rebuild a ContrastiveModel written by save_pretrained (for evaluation or fine-tuning)."""
    from xfast.models.config import ModelConfig
    from xfast.models.model import build_model
    path = os.path.join(model_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        raise ValueError(f"{model_dir!r} is not an xfast model folder (no {CONFIG_NAME})")
    with open(path) as f:
        doc = json.load(f)
    if doc.get("format") != FORMAT or doc.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: expected format {FORMAT!r} version {FORMAT_VERSION}, got "
                         f"{doc.get('format')!r} version {doc.get('format_version')!r}")
    raw = doc["model"]
    for name in ("text", doc["modality"]):
        raw[name]["pretrained"] = os.path.join(model_dir, raw[name]["pretrained"])
        if raw[name].get("tokenizer"):
            raw[name]["tokenizer"] = os.path.join(model_dir, raw[name]["tokenizer"])
    cfg = parse(ModelConfig, raw, "model")
    model = build_model(cfg)
    heads = load_file(os.path.join(model_dir, HEADS_NAME), device=str(map_location))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [k for k in missing if not k.startswith(TOWER_PREFIXES)]
    if missing or unexpected:
        raise ValueError(f"{model_dir}/{HEADS_NAME} does not match the model: missing {missing}, "
                         f"unexpected {unexpected}")
    return model.to(map_location)


def _write_sentence_transformers(model, text_dir: str) -> None:
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
    _write_json(os.path.join(text_dir, "sentence_bert_config.json"),
                {"max_seq_length": tower.requirements()["max_text_length"], "do_lower_case": False})


def _write_json(path: str, obj) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
