"""Towers: shapes per modality and pooling, pooling/projection formulas, freezing, gradients,
dropout views, logit scale, input errors."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.model_cases import make_model, media_inputs, objective, paired_batch, text_inputs
from xfast.config import ConfigError
from xfast.models.config import POOLINGS

EMBED = 16



@pytest.mark.parametrize("text_type", ["bert", "roberta", "clip_text"])
@pytest.mark.parametrize("pooling", ["cls", "cls_mlp", "mean", "eos"])
def test_text_shapes_and_normalisation(tok, text_type, pooling):
    model = make_model(tok, text={"type": text_type, "pooling": pooling}).eval()
    inputs = text_inputs(model)
    emb = model.encode_text(**inputs)
    assert emb.shape == (4, EMBED)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))
    assert model.sentence_embedding(**inputs).shape == (4, 32)
    raw = model.encode_text(**inputs, normalized=False)
    torch.testing.assert_close(F.normalize(raw, dim=-1), emb)


@pytest.mark.parametrize("media,media_type,pooling",
                         [(m, t, p) for m, types in {"image": ("vit", "clip_vision"), "audio": ("htsat", "ast")}.items()
                          for t in types for p in POOLINGS[t]])
@pytest.mark.parametrize("projection", ["linear", "mlp"])
def test_media_shapes(tok, media, media_type, pooling, projection):
    model = make_model(tok, media=media, media_type=media_type,
                       media_extra={"pooling": pooling, "projection": projection}).eval()
    assert model.modality == media
    emb = model.encode_media(media_inputs(model))
    assert emb.shape == (4, EMBED)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(4))


def test_htsat_accepts_shorter_clips(tok):
    model = make_model(tok, media="audio", media_type="htsat").eval()
    assert model.data_requirements() == {"max_text_length": 64, "n_mels": 16, "max_frames": 256}
    assert model.encode_audio(media_inputs(model, frames=100)["input_features"]).shape == (4, EMBED)


def test_text_pooling_matches_plain_computation(tok):
    for pooling in ("cls", "mean", "eos", "cls_mlp"):
        model = make_model(tok, text={"pooling": pooling}).eval()
        inputs = text_inputs(model)
        hidden = model.text.backbone(**inputs).last_hidden_state
        mask = inputs["attention_mask"]
        if pooling == "mean":
            expected = torch.stack([hidden[i, :int(mask[i].sum())].mean(0) for i in range(4)])
        elif pooling == "eos":
            expected = torch.stack([hidden[i, int(mask[i].sum()) - 1] for i in range(4)])
        else:
            expected = hidden[:, 0]
        if pooling == "cls_mlp":
            dense = model.text.cls_mlp.dense
            expected = torch.tanh(expected @ dense.weight.T + dense.bias)
        torch.testing.assert_close(model.sentence_embedding(**inputs), expected)
        # linear projection: CLIP's bias-free matrix
        projected = expected @ model.text.projection.weight.T
        torch.testing.assert_close(model.encode_text(**inputs, normalized=False), projected)


def test_mlp_projection_is_laion_clap_head(tok):
    model = make_model(tok, media="audio", media_type="htsat", media_extra={"projection": "mlp"}).eval()
    x = media_inputs(model)["input_features"]
    pooled = model.media.backbone(input_features=x).pooler_output
    first, _, second = model.media.projection
    expected = F.relu(pooled @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(model.encode_audio(x, normalized=False), expected)


def test_mlp_only_train_drops_mlp_from_eval_sentence_embedding_only(tok):
    model = make_model(tok, text={"pooling": "cls_mlp", "mlp_only_train": True}).eval()
    inputs = text_inputs(model)
    cls = model.text.backbone(**inputs).last_hidden_state[:, 0]
    torch.testing.assert_close(model.sentence_embedding(**inputs), cls)
    mlp = model.text.cls_mlp(cls)
    torch.testing.assert_close(model.encode_text(**inputs, normalized=False), model.text.projection(mlp))
    model.train()
    torch.manual_seed(1)
    sentence = model.sentence_embedding(**inputs)
    torch.manual_seed(1)
    hidden = model.text.backbone(**inputs).last_hidden_state[:, 0]
    torch.testing.assert_close(sentence, model.text.cls_mlp(hidden))


def test_simcse_views_differ_with_dropout_and_eval_is_deterministic(tok):
    model = make_model(tok, text={"pooling": "cls_mlp"})
    batch = text_inputs(model)
    obj = objective({"simcse": {"mode": "unsup"}})
    model.train()
    feats = model.features({**batch, **media_inputs(model)}, objective=obj)
    assert not torch.allclose(feats["text_pooled"], feats["text_view2"])
    # the two views are the same function up to dropout: their difference is dropout-sized
    assert F.cosine_similarity(feats["text_pooled"], feats["text_view2"]).min() > 0.5
    model.eval()
    torch.testing.assert_close(model.encode_text(**batch), model.encode_text(**batch), rtol=0, atol=0)
    feats = model.features({**batch, **media_inputs(model)}, objective=obj)
    torch.testing.assert_close(feats["text_pooled"], feats["text_view2"])


def test_simcse_needs_dropout_in_text_tower(tok):
    model = make_model(tok, text={"overrides": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}})
    with pytest.raises(ConfigError, match="model.text.overrides.*dropout"):
        model.features(paired_batch(model), objective=objective({"simcse": {"mode": "unsup"}}))
    frozen = make_model(tok, text={"freeze": "all"})
    with pytest.raises(ConfigError, match="model.text.freeze: unsupervised SimCSE"):
        frozen.features(paired_batch(frozen), objective=objective({"simcse": {"mode": "unsup"}}))


def _loss(model, obj, **streams):
    feats = model.features(paired_batch(model), objective=obj, **streams)
    total, _ = obj(feats, model.scale())
    return total


@pytest.mark.slow
@pytest.mark.parametrize("media,media_type", [("image", "clip_vision"), ("audio", "htsat"), ("audio", "ast")])
def test_gradients_reach_every_trainable_parameter(tok, media, media_type):
    model = make_model(tok, text={"pooling": "cls_mlp"}, media=media, media_type=media_type).train()
    obj = objective({"cyclip_lambda1": 0.25, "cyclip_lambda2": 0.25, "simcse": {"mode": "unsup"}})
    _loss(model, obj).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    assert model.logit_scale.grad.shape == (1,)


def test_frozen_tower_gets_no_gradient_and_stays_in_eval(tok):
    model = make_model(tok, media_extra={"freeze": "all"}).train()
    assert not model.media.backbone.training and model.text.backbone.training
    _loss(model, objective()).backward()
    assert all(p.grad is None for p in model.media.backbone.parameters())
    assert all(p.grad is not None for p in model.media.projection.parameters())
    assert all(p.grad is not None for p in model.text.parameters())


def test_freeze_head_freezes_projection(tok):
    model = make_model(tok, text={"freeze": "all", "freeze_head": True})
    assert not any(p.requires_grad for p in model.text.parameters())
    _loss(model, objective()).backward()
    assert all(p.grad is None for p in model.text.parameters())
    assert model.logit_scale.grad is not None


@pytest.mark.parametrize("text_type,media,media_type,text_tail,media_tail", [
    ("bert", "image", "vit", ("encoder.layer.1.",), ("layers.1.", "layernorm.")),
    ("clip_text", "image", "clip_vision", ("encoder.layers.1.", "final_layer_norm."),
     ("encoder.layers.1.", "post_layernorm.")),
    ("roberta", "audio", "htsat", ("encoder.layer.1.",), ("audio_encoder.layers.1.", "audio_encoder.norm.")),
])
def test_all_but_last_n_unfreezes_last_layer_and_final_norm(tok, text_type, media, media_type, text_tail,
                                                            media_tail):
    freeze = {"freeze": "all_but_last_n", "last_n": 1}
    model = make_model(tok, text={"type": text_type, **freeze}, media=media, media_type=media_type,
                       media_extra=freeze)
    for tower, tail in ((model.text, text_tail), (model.media, media_tail)):
        for name, p in tower.backbone.named_parameters():
            assert p.requires_grad == name.startswith(tail), name
    _loss(model, objective()).backward()
    for tower, tail in ((model.text, text_tail), (model.media, media_tail)):
        for name, p in tower.backbone.named_parameters():
            assert (p.grad is not None) == name.startswith(tail), name


def test_last_n_larger_than_depth_is_rejected(tok):
    with pytest.raises(ConfigError, match=r"model\.text\.last_n: 5 exceeds the 2 layers"):
        make_model(tok, text={"freeze": "all_but_last_n", "last_n": 5})


@pytest.mark.slow
def test_gradient_checkpointing_gives_the_same_gradients(tok):
    grads = []
    for checkpointing in (False, True):
        model = make_model(tok, seed=3, text={"gradient_checkpointing": checkpointing},
                           media_extra={"gradient_checkpointing": checkpointing}).eval()
        torch.manual_seed(4)
        _loss(model, objective()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], msg=name)


def test_logit_scale_shape_init_and_clamp(tok):
    model = make_model(tok)
    assert model.logit_scale.shape == (1,) and model.logit_scale.requires_grad
    torch.testing.assert_close(model.logit_scale.detach(), torch.tensor([math.log(1 / 0.07)]))
    torch.testing.assert_close(model.scale().detach(), torch.tensor([1 / 0.07]))
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale().item() == pytest.approx(100.0)
    model.scale().sum().backward()
    assert model.logit_scale.grad.item() == 0.0  # clamped: no gradient pushes it further


def test_bad_inputs_are_named(tok):
    image = make_model(tok)
    ids = text_inputs(image)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 32, 32\]"):
        image.encode_image(torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="pixel_values contains NaN"):
        image.encode_image(torch.full((4, 3, 32, 32), float("nan")))
    with pytest.raises(ValueError, match="pixel_values must be a floating-point"):
        image.encode_image(torch.zeros(4, 3, 32, 32, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        image.encode_text(ids["input_ids"].float(), ids["attention_mask"])
    with pytest.raises(ValueError, match="differ in shape"):
        image.encode_text(ids["input_ids"], ids["attention_mask"][:, :5])
    with pytest.raises(ValueError, match="at most 64 tokens"):
        image.encode_text(torch.ones(4, 65, dtype=torch.long), torch.ones(4, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="no tokens"):
        image.encode_text(ids["input_ids"], torch.zeros_like(ids["attention_mask"]))
    with pytest.raises(ValueError, match="media tower is 'image', not 'audio'"):
        image.encode_audio(torch.randn(4, 1, 64, 16))
    with pytest.raises(ValueError, match="needs batch\\['pixel_values'\\]"):
        image.encode_media({"input_ids": ids["input_ids"]})
    eos = make_model(tok, text={"pooling": "eos"})
    with pytest.raises(ValueError, match="right-padded"):
        eos.encode_text(ids["input_ids"], ids["attention_mask"].flip(1))
    htsat = make_model(tok, media="audio", media_type="htsat")
    with pytest.raises(ValueError, match=r"log-mel \[B, 1, frames, 16\]"):
        htsat.encode_audio(torch.randn(4, 1, 64, 32))
    with pytest.raises(ValueError, match="at most 256"):
        htsat.encode_audio(torch.randn(4, 1, 300, 16))
    with pytest.raises(ValueError, match="not waveforms"):
        htsat.encode_media({"waveform": torch.randn(4, 16000)})
    ast = make_model(tok, media="audio", media_type="ast")
    with pytest.raises(ValueError, match="exactly 64 frames"):
        ast.encode_audio(torch.randn(4, 1, 40, 16))
