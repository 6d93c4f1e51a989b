"""Model config validation (errors name the key and the allowed values) and the study grid configs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import xfast
from tests.model_cases import media_inputs, nli_inputs, text_inputs
from xfast.config import ConfigError, parse
from xfast.models import ModelConfig, Objective, ObjectiveConfig, build_model

STUDY = Path(xfast.__file__).parent / "configs" / "study"



def raw_model(**changes):
    raw = {"text": {"type": "bert", "preset": "tiny"}, "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            raw[section][leaf] = value
        else:
            raw[section] = value
    return raw


@pytest.mark.parametrize("changes,message", [
    ({"text__type": "gpt2"}, r"model\.text\.type: 'gpt2' is not a text tower; choose one of 'bert', 'roberta', "
                             r"'clip_text', 'auto'"),
    ({"image__type": "htsat"}, r"model\.image\.type: 'htsat' is not a image tower; choose one of 'vit', "
                               r"'clip_vision'"),
    ({"text__pooling": "max"}, r"model\.text\.pooling: 'max' is not allowed for type 'bert'; choose one of 'cls', "
                               r"'cls_mlp', 'mean', 'eos'"),
    ({"image__pooling": "eos"}, r"model\.image\.pooling: 'eos' is not allowed for type 'vit'; choose one of 'cls', "
                                r"'mean'"),
    ({"text__projection": "none"}, r"model\.text\.projection: 'none' needs the tower's hidden size \(32\) to equal "
                                   r"model\.embed_dim \(16\)"),
    ({"text__projection": "conv"}, r"model\.text\.projection: 'conv' is not allowed; choose one of 'linear', 'mlp'"),
    ({"text__overrides": {"num_attention_heads": 3}}, r"model\.text\.overrides\.hidden_size: 32 is not divisible "
                                                      r"by num_attention_heads \(3\)"),
    ({"text__overrides": {"hiden_size": 64}}, r"model\.text\.overrides\.hiden_size: BertConfig has no attribute"),
    ({"text__preset": "huge"}, r"model\.text\.preset: 'huge' is not allowed; choose one of 'tiny', 'base'"),
    ({"text__preset": None}, r"model\.text: set exactly one of 'preset'"),
    ({"text__pretrained": "/nonexistent"}, r"model\.text: set exactly one of 'preset'"),
    ({"text__mlp_only_train": True}, r"model\.text\.mlp_only_train: only applies to pooling 'cls_mlp'"),
    ({"text__freeze": "all_but_last_n"}, r"model\.text\.last_n: freeze 'all_but_last_n' needs last_n >= 1"),
    ({"text__freeze": "some"}, r"model\.text\.freeze: 'some' is not allowed; choose one of 'none', 'all'"),
    ({"text__type": "auto"}, r"model\.text\.type: 'auto' loads an architecture from a 'pretrained' folder"),
    ({"text__poolng": "cls"}, r"model\.text\.poolng: unknown key \(did you mean 'pooling'\?\)"),
    ({"image__tokenizer": "/tmp"}, r"model\.image\.tokenizer: only the text tower has a tokenizer"),
    ({"audio": {"type": "htsat", "preset": "tiny"}}, r"model: set exactly one media tower, 'image' or 'audio' "
                                                     r"\(got both\)"),
    ({"image": None}, r"model: set exactly one media tower, 'image' or 'audio' \(got neither\)"),
    ({"embed_dim": 0}, r"model\.embed_dim: must be positive"),
    ({"logit_scale_max": 10.0}, r"model\.logit_scale_max: must be >= logit_scale_init"),
])
def test_model_config_errors_name_the_key_and_allowed_values(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse(ModelConfig, raw_model(**changes), "model")


@pytest.mark.parametrize("overrides,message", [
    ({"hidden_size": 48}, r"model\.audio\.overrides\.hidden_size: htsat needs hidden_size == "
                          r"patch_embeds_hidden_size \* 2\*\*\(len\(depths\)-1\) = 32, got 48"),
    ({"num_attention_heads": [2]}, r"model\.audio\.overrides\.num_attention_heads: one head count per stage"),
    ({"num_attention_heads": [2, 3]}, r"stage 1 width 32 is not divisible by 3 heads"),
    ({"enable_fusion": True}, r"model\.audio\.overrides\.enable_fusion: not supported"),
    ({"num_mel_bins": 24}, r"model\.audio\.overrides\.num_mel_bins: htsat needs spec_size \(64\) to be a multiple"),
])
def test_htsat_dimension_checks(overrides, message):
    raw = raw_model(image=None, audio={"type": "htsat", "preset": "tiny", "overrides": overrides})
    with pytest.raises(ConfigError, match=message):
        parse(ModelConfig, raw, "model")


def test_pretrained_folder_must_match_type(tmp_path):
    from transformers import ViTConfig
    ViTConfig().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"model\.text\.pretrained: .* holds a 'vit' model but type 'bert' needs "
                                          r"model_type 'bert'"):
        parse(ModelConfig, raw_model(text={"type": "bert", "pretrained": str(tmp_path)}), "model")
    with pytest.raises(ConfigError, match=r"model\.text\.pretrained: .* holds a 'vit' model, not a text encoder"):
        parse(ModelConfig, raw_model(text={"type": "auto", "pretrained": str(tmp_path)}), "model")
    with pytest.raises(ConfigError, match=r"model\.text\.pretrained: .* is not a folder with an HF config\.json"):
        parse(ModelConfig, raw_model(text={"type": "bert", "pretrained": str(tmp_path / "missing")}), "model")


def test_htsat_does_not_support_gradient_checkpointing():
    raw = raw_model(image=None, audio={"type": "htsat", "preset": "tiny", "gradient_checkpointing": True})
    with pytest.raises(ConfigError, match=r"model\.audio\.gradient_checkpointing: the HF 'htsat' model does not"):
        parse(ModelConfig, raw, "model")


def test_tokenizer_larger_than_vocab_override_is_rejected(tok):
    raw = raw_model(text={"type": "bert", "preset": "tiny", "tokenizer": tok, "overrides": {"vocab_size": 50}})
    with pytest.raises(ConfigError, match=r"model\.text\.overrides\.vocab_size: 50 is smaller than the tokenizer's "
                                          r"120 tokens"):
        build_model(parse(ModelConfig, raw, "model"))


def test_random_text_tower_takes_vocab_and_special_ids_from_tokenizer(tok):
    for text_type in ("bert", "roberta", "clip_text"):
        model = build_model(parse(ModelConfig, raw_model(text={"type": text_type, "preset": "tiny",
                                                               "tokenizer": tok}), "model"))
        config = model.text.backbone.config
        assert config.vocab_size == 120 and config.pad_token_id == model.tokenizer.pad_token_id == 0


def test_base_presets_have_reference_sizes():
    from xfast.models.towers import hf_config
    sizes = {}
    for modality, tower_type in (("text", "bert"), ("text", "roberta"), ("text", "clip_text"), ("image", "vit"),
                                 ("image", "clip_vision"), ("audio", "htsat"), ("audio", "ast")):
        raw = raw_model(image=None if modality == "audio" else {"type": "vit", "preset": "tiny"})
        raw[modality] = {"type": tower_type, "preset": "base"}
        cfg = parse(ModelConfig, raw, "model")
        sizes[tower_type] = hf_config(getattr(cfg, modality), "model").hidden_size
    assert sizes == {"bert": 768, "roberta": 768, "clip_text": 512, "vit": 768, "clip_vision": 768, "htsat": 768,
                     "ast": 768}


def test_study_grid_is_complete():
    names = sorted(p.stem for p in STUDY.glob("*.json"))
    assert names == sorted(f"{m}_{s}" for m in ("clip", "cyclip", "clap", "cyclap") for s in ("none", "unsup", "sup"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in STUDY.glob("*.json")))
def test_study_config_trains_one_step(tok, name):
    doc = json.loads((STUDY / f"{name}.json").read_text())
    doc["model"]["text"]["tokenizer"] = tok
    cfg = parse(ModelConfig, doc["model"], "model")
    obj = Objective(parse(ObjectiveConfig, doc["objective"], "objective"))
    family, arm = name.split("_")
    assert cfg.modality == ("image" if family in ("clip", "cyclip") else "audio")
    cyclic = family.startswith("cy")
    assert (obj.cfg.cyclip_lambda1, obj.cfg.cyclip_lambda2) == ((0.25, 0.25) if cyclic else (0.0, 0.0))
    assert obj.cfg.simcse.mode == arm
    torch.manual_seed(0)
    model = build_model(cfg).train()
    feats = model.features({**text_inputs(model), **media_inputs(model)}, objective=obj,
                           sentences=text_inputs(model) if obj.needs_sentences else None,
                           nli=nli_inputs(model) if obj.needs_nli else None)
    total, parts = obj(feats, model.scale())
    expected = {"clip", "total"} | ({"cyclip_in", "cyclip_cross"} if cyclic else set())
    expected |= {"none": set(), "unsup": {"simcse", "simcse_sentences"}, "sup": {"simcse"}}[arm]
    assert set(parts) == expected
    total.backward()
    assert model.logit_scale.grad is not None and torch.isfinite(total)
