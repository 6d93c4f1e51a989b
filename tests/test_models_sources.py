"""model.init_from: a transformers CLIPModel / ClapModel folder or an open_clip checkpoint as the
starting towers + projections + logit scale; embeddings must equal the source model's own."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.hf_sources import (
    OPEN_CLIP_CFG,
    clap_model,
    clip_model,
    open_clip_encode_image,
    open_clip_encode_text,
    open_clip_state,
    write_open_clip,
)
from xfast.config import ConfigError, parse
from xfast.models import ModelConfig, build_model


def build(raw: dict):
    return build_model(parse(ModelConfig, raw, "model")).eval()


def _text_batch(vocab: int, eos: int, pad: int, lengths=(9, 5, 12, 3), low: int = 4):
    """Right-padded rows ending in eos; the other ids avoid the special ones."""
    g = torch.Generator().manual_seed(1)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(low, vocab - 1, (n,), generator=g)
        ids[row, n - 1] = eos
        mask[row, :n] = 1
    return ids, mask


# Both sides run in float64: the same transformers layers, some reached through other module
# paths (RobertaModel for ClapTextModel), agree to ~1e-15; a renaming slip changes them at O(1).
TOL = dict(rtol=0, atol=1e-12)


def test_clip_folder_gives_the_source_embeddings_and_scale(tmp_path):
    source = clip_model()
    source.save_pretrained(tmp_path)
    model = build({"init_from": str(tmp_path), "text": {}, "image": {}}).double()
    source.double()
    assert (model.config.text.type, model.config.image.type, model.config.embed_dim) == ("clip_text", "clip_vision", 16)
    ids, mask = _text_batch(120, eos=3, pad=0)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        # CLIPModel returns the projections unnormalised (ClapModel normalises them)
        want_text = F.normalize(source.get_text_features(input_ids=ids, attention_mask=mask).pooler_output, dim=-1)
        want_image = F.normalize(source.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        torch.testing.assert_close(model.encode_text(ids, mask), want_text, **TOL)
        torch.testing.assert_close(model.encode_image(pixels), want_image, **TOL)
    assert model.logit_scale.item() == source.logit_scale.item()


def test_clap_folder_gives_the_source_embeddings_and_scale(tmp_path):
    source = clap_model()
    source.save_pretrained(tmp_path)
    model = build({"init_from": tmp_path, "text": {}, "audio": {"freeze": "all"}}).double()
    source.double()
    assert model.config.text.pooling == "cls_mlp" and model.config.audio.projection == "mlp"
    assert not any(p.requires_grad for p in model.media.backbone.parameters())
    ids, mask = _text_batch(120, eos=2, pad=1)
    ids[:, 0] = 0  # <s>
    features = torch.randn(3, 1, 101, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        want_text = source.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        want_audio = source.get_audio_features(input_features=features).pooler_output
        torch.testing.assert_close(model.encode_audio(features), want_audio, **TOL)
        got_text = model.encode_text(ids, mask)
        # ClapTextModel's attention takes its softmax in float32 even in a float64 run, so its text
        # embedding carries float32 rounding: it may differ from xfast's float64 one by a few times
        # what running xfast itself in float32 changes (flash-attention's rule), no more.
        float32_error = (model.float().encode_text(ids, mask).double() - got_text).abs().max()
    assert (want_text - got_text).abs().max() <= 4 * float32_error
    assert model.logit_scale.item() == source.logit_scale_a.item()


def test_open_clip_checkpoint_matches_an_independent_float64_forward(tmp_path):
    path = write_open_clip(tmp_path)
    model = build({"init_from": path, "text": {}, "image": {}}).double()
    state = open_clip_state()
    vocab = OPEN_CLIP_CFG["text_cfg"]["vocab_size"]
    ids, mask = _text_batch(vocab, eos=vocab - 1, pad=0, lengths=(7, 20, 4, 11))  # open_clip pools at argmax (EOT)
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        got_text, got_image = model.encode_text(ids, mask), model.encode_image(pixels)
    torch.testing.assert_close(got_text, open_clip_encode_text(state, ids), **TOL)
    torch.testing.assert_close(got_image, open_clip_encode_image(state, pixels), **TOL)
    assert model.logit_scale.item() == pytest.approx(state["logit_scale"].item(), abs=1e-6)
    # sanity of the oracle: a different checkpoint gives different embeddings
    other = open_clip_state(seed=1)
    assert (open_clip_encode_image(other, pixels) - got_image).abs().max() > 1e-2


def test_tower_settings_apply_on_top_of_the_source(tmp_path):
    clip_model().save_pretrained(tmp_path)
    model = build({"init_from": str(tmp_path), "text": {"freeze": "all_but_last_n", "last_n": 1,
                                                        "overrides": {"attention_dropout": 0.1}},
                   "image": {"freeze": "all"}})
    assert model.text.backbone.config.attention_dropout == 0.1
    trainable = [n for n, p in model.text.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("layers.1." in n or "final_layer_norm" in n for n in trainable)


@pytest.mark.parametrize("raw,message", [
    ({"text": {}, "audio": {}}, "name that section 'image'"),
    ({"text": {"type": "bert"}, "image": {}}, "text.type"),
    ({"text": {}, "image": {"preset": "tiny"}}, "remove 'preset'"),
    ({"text": {"pooling": "mean"}, "image": {}}, "text.pooling"),
    ({"text": {}, "image": {"projection": "mlp"}}, "image.projection"),
    ({"text": {}, "image": {}, "embed_dim": 32}, "embed_dim"),
])
def test_settings_that_contradict_the_source_are_named(tmp_path, raw, message):
    clip_model().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=message):
        parse(ModelConfig, {"init_from": str(tmp_path), **raw}, "model")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        parse(ModelConfig, {"init_from": str(tmp_path / "nope"), "text": {}, "image": {}}, "model")
    with pytest.raises(ConfigError, match="no model config for the open_clip"):
        ckpt = tmp_path / "lonely.pt"
        torch.save({"logit_scale": torch.tensor(1.0)}, ckpt)
        parse(ModelConfig, {"init_from": str(ckpt), "text": {}, "image": {}}, "model")
    fused = clap_model()
    fused.config.audio_config.enable_fusion = True
    fused.save_pretrained(tmp_path / "fused")
    with pytest.raises(ConfigError, match="fused CLAP"):
        parse(ModelConfig, {"init_from": str(tmp_path / "fused"), "text": {}, "audio": {}}, "model")
    # an open_clip checkpoint whose tensors do not fit its config
    path = write_open_clip(tmp_path)
    cfg = json.loads(Path(path).with_suffix(".json").read_text())
    cfg["text_cfg"]["layers"] = 3
    Path(path).with_suffix(".json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="transformer.resblocks.2"):
        build({"init_from": path, "text": {}, "image": {}})


def test_pathlib_paths_are_accepted(tmp_path):
    from transformers import BertConfig, BertModel
    BertModel(BertConfig(**{"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                            "intermediate_size": 64, "vocab_size": 50})).save_pretrained(tmp_path / "bert")
    cfg = parse(ModelConfig, {"text": {"type": "bert", "pretrained": tmp_path / "bert"},
                              "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}, "model")
    assert cfg.text.pretrained == str(tmp_path / "bert")
    assert build_model(cfg).text.hidden_size == 32
