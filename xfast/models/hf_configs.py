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
from xfast.models.specs import PRESETS, SPECS

DEFAULTS_FILE = Path(__file__).with_name("hf_defaults.json")
# Keys of a saved HF config that describe the file, not the model.
_BOOKKEEPING = ("transformers_version", "_name_or_path", "dtype", "architectures")

# Tower type -> the model_type a pretrained folder's config.json must declare (from the specs).
MODEL_TYPES: dict[str, str] = {t: spec.model_type for t, spec in SPECS.items() if spec.model_type is not None}
# Preset -> tower type -> HF config overrides of the class defaults (from the specs).
PRESET_OVERRIDES: dict[str, dict[str, dict]] = {
    preset: {t: spec.presets[preset] for t, spec in SPECS.items() if preset in spec.presets} for preset in PRESETS}
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
    """What the data pipeline must produce for a tower with this HF config (xfast.models.specs);
    a value is None when the config does not state it ('auto' towers)."""
    return SPECS[tower_type].requirements(config)


def dropout_probability(config: Mapping) -> float:
    """Largest dropout probability in a tower's HF config (0: two forward passes are identical)."""
    return max((float(config[k]) for k in DROPOUT_ATTRIBUTES
                if isinstance(config.get(k), (int, float)) and not isinstance(config.get(k), bool)), default=0.0)


def _installed_defaults() -> dict[str, dict]:
    out = {}
    for tower_type, spec in SPECS.items():
        if spec.config_class is None:
            continue
        config_class, model_class = spec.hf_config_class(), spec.hf_model_class()
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
