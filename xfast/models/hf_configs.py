"""The HF configs of the towers as plain dicts, without importing transformers.

Every check that compares a config with the towers' sizes (embed_dim vs hidden size, heads,
max_length vs positions, image size, mel bins, frames) runs on these dicts, so `xfast train
--check` finds them all in well under a second. A tower's dict is its architecture's HF class
defaults (hf_defaults.json, written from transformers by `python -m xfast.models.hf_configs
--write`; a test compares it with the installed transformers), updated by the size preset or
the pretrained folder's config.json, then by `overrides`: the same values transformers builds
the tower from (xfast.models.towers.hf_config).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
from collections.abc import Mapping
from pathlib import Path

from xfast.config import ConfigError

DEFAULTS_FILE = Path(__file__).with_name("hf_defaults.json")
# Keys of a saved HF config that describe the file, not the model.
_BOOKKEEPING = ("transformers_version", "_name_or_path", "dtype", "architectures")

# Tower type -> the model_type a pretrained folder's config.json must declare.
MODEL_TYPES: dict[str, str] = {
    "bert": "bert",
    "roberta": "roberta",
    "clip_text": "clip_text_model",
    "vit": "vit",
    "clip_vision": "clip_vision_model",
    "htsat": "clap_audio_model",
    "ast": "audio-spectrogram-transformer",
}

_TINY_TRANSFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
# Tiny text towers share the special-token layout of xfast.models.train_tokenizer:
# [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4.
_TINY_TEXT = dict(_TINY_TRANSFORMER, vocab_size=1000, max_position_embeddings=64, pad_token_id=0)
PRESET_OVERRIDES: dict[str, dict[str, dict]] = {
    # "base" starts from the HF class defaults, which are the reference sizes: BERT-base, ViT-B/16,
    # CLIP ViT-B/32's towers, AST-base and LAION-CLAP's HTSAT; only RoBERTa needs its own numbers.
    "base": {
        "roberta": dict(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2),
    },
    "tiny": {
        "bert": _TINY_TEXT,
        "roberta": dict(_TINY_TEXT, max_position_embeddings=66),
        # CLIP's text transformer has no dropout but attention dropout; SimCSE needs some.
        "clip_text": dict(_TINY_TEXT, bos_token_id=2, eos_token_id=3, attention_dropout=0.1),
        "vit": dict(_TINY_TRANSFORMER, image_size=32, patch_size=8),
        "clip_vision": dict(_TINY_TRANSFORMER, image_size=32, patch_size=8),
        "htsat": dict(spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=4, patch_embeds_hidden_size=16,
                      depths=[1, 1], num_attention_heads=[2, 2], hidden_size=32, window_size=4,
                      enable_fusion=False),
        "ast": dict(_TINY_TRANSFORMER, patch_size=16, num_mel_bins=16, max_length=64, frequency_stride=16,
                    time_stride=16),
    },
}
# HF config attributes that hold a dropout probability, across the supported architectures.
DROPOUT_ATTRIBUTES = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout", "dropout")


@functools.cache
def class_defaults() -> dict[str, dict]:
    """{tower type: {"class": HF config class name, "supports_gradient_checkpointing": bool,
    "defaults": the class's default attributes}}."""
    return json.loads(DEFAULTS_FILE.read_text())


def defaults_for_model_type(model_type: str) -> dict | None:
    for tower_type, expected in MODEL_TYPES.items():
        if expected == model_type:
            return class_defaults()[tower_type]["defaults"]
    return None


def tower_config(tower, path: str, base: dict | None = None) -> dict:
    """The HF config attributes tower (a models.config.TowerConfig) is built with, as a dict;
    `base`: the config of model.init_from's tower (towers.hf_config's `base`, as a dict).

    For type 'auto' with a model_type xfast does not know, the dict holds what the folder's
    config.json states (keys left at the class default are then missing)."""
    if base is not None:
        defaults = defaults_for_model_type(base.get("model_type"))
        config = {**(defaults or {}), **base}
    elif tower.pretrained is not None:
        saved = read_pretrained_config(tower.pretrained, f"{path}.pretrained")
        model_type = saved.get("model_type")
        if tower.type != "auto" and model_type != MODEL_TYPES[tower.type]:
            raise ConfigError(f"{path}.pretrained: {tower.pretrained!r} holds a {model_type!r} model but type "
                              f"{tower.type!r} needs model_type {MODEL_TYPES[tower.type]!r} (or use type 'auto' "
                              f"for text)")
        defaults = defaults_for_model_type(model_type)
        config = {**(defaults or {}), **saved}
        if tower.type == "auto" and config.get("vocab_size") is None and (defaults is not None or "vocab_size" in saved):
            raise ConfigError(f"{path}.pretrained: {tower.pretrained!r} holds a {model_type!r} model, not a text "
                              f"encoder (its config has no vocab_size)")
    else:
        defaults = class_defaults()[tower.type]["defaults"]
        config = {**defaults, **PRESET_OVERRIDES[tower.preset].get(tower.type, {})}
    if defaults is not None:
        name = class_defaults()[_type_of(config["model_type"])]["class"]
        for key in tower.overrides:
            if key not in defaults:
                raise ConfigError(f"{path}.overrides.{key}: {name} has no attribute {key!r}")
    config.update(tower.overrides)
    return config


def _type_of(model_type: str) -> str:
    return next(t for t, m in MODEL_TYPES.items() if m == model_type)


def read_pretrained_config(folder: str, key: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as handle:
            config = json.load(handle)
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path}: {err.strerror}") from None
    except ValueError as err:
        raise ConfigError(f"{key}: {path} is not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{key}: {path} does not hold a JSON object")
    return config


def requirements(modality: str, tower_type: str, config: Mapping) -> dict:
    """What the data pipeline must produce for a tower with this HF config (see towers.py's
    docstring); a value is None when the config does not state it ('auto' towers)."""
    if modality == "text":
        positions = config.get("max_position_embeddings")
        # RoBERTa's positions start after the pad id.
        offset = 2 if config.get("model_type") in ("roberta", "xlm-roberta") else 0
        return {"max_text_length": None if positions is None else positions - offset}
    if modality == "image":
        return {"image_size": config["image_size"], "num_channels": config["num_channels"]}
    if tower_type == "htsat":
        spec, mels = config["spec_size"], config["num_mel_bins"]
        return {"n_mels": mels, "max_frames": spec * (spec // mels)}
    return {"n_mels": config["num_mel_bins"], "max_frames": config["max_length"]}


def dropout_probability(config: Mapping) -> float:
    """Largest dropout probability in a tower's HF config (0: two forward passes are identical)."""
    return max((float(config[k]) for k in DROPOUT_ATTRIBUTES
                if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)), default=0.0)


def _installed_defaults() -> dict[str, dict]:
    from xfast.models.towers import ARCHITECTURES

    out = {}
    for tower_type, (config_class, model_class) in ARCHITECTURES.items():
        defaults = {k: v for k, v in config_class().to_dict().items() if k not in _BOOKKEEPING}
        out[tower_type] = {"class": config_class.__name__,
                           "supports_gradient_checkpointing": bool(model_class.supports_gradient_checkpointing),
                           "defaults": defaults}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xfast.models.hf_configs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help=f"rewrite {DEFAULTS_FILE.name} from the installed transformers (else: compare)")
    args = parser.parse_args(argv)
    installed = _installed_defaults()
    if args.write:
        DEFAULTS_FILE.write_text(json.dumps(installed, indent=1, sort_keys=True) + "\n")
        print(f"wrote {DEFAULTS_FILE}")
        return 0
    differing = [t for t in installed if installed[t] != class_defaults().get(t)]
    print(f"{DEFAULTS_FILE.name} differs from the installed transformers for: {', '.join(differing)}"
          if differing else f"{DEFAULTS_FILE.name} matches the installed transformers")
    return 1 if differing else 0


if __name__ == "__main__":
    raise SystemExit(main())
