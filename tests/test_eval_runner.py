"""evaluate()/run_task() glue with a fake model: batches -> embeddings -> metrics, labels, errors."""
import json

import pytest
import torch
from torch import nn

from xfast.config import ConfigError
from xfast.eval import geometry_metrics, retrieval_metrics, sts_correlation, zeroshot_classify
from xfast.eval.encode import labels_from_csv, labels_to_indices, read_classnames, read_label_csv
from xfast.eval.runner import evaluate, parse_task, run_task
from xfast.models import train_tokenizer

WORDS = ("cat", "dog", "bird")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = ["a photo of a cat.", "a dog ran", "the bird flew", "two cats and a fish"] * 5
    return train_tokenizer(texts, 60, str(tmp_path_factory.mktemp("tok")))


class WordCountModel(nn.Module):
    """Text -> [#cat, #dog, #bird, 0.1] tokens; an image [3, H, W] -> its channel means + 0.1.
    sentence_embedding is the same counts with the class axes reversed, to tell the spaces apart."""

    modality = "image"

    def __init__(self, tokenizer):
        super().__init__()
        lookup = torch.zeros(len(tokenizer), 3)
        for i, word in enumerate(WORDS):
            lookup[tokenizer.convert_tokens_to_ids(word), i] = 1.0
        self.register_buffer("lookup", lookup)
        self.calls = []

    def _counts(self, input_ids, attention_mask):
        counts = (self.lookup[input_ids] * attention_mask[..., None]).sum(1)
        return torch.cat([counts, torch.full((counts.shape[0], 1), 0.1)], 1)

    def encode_text(self, input_ids, attention_mask):
        self.calls.append(("text", self.training))
        return nn.functional.normalize(self._counts(input_ids, attention_mask), dim=1)

    def sentence_embedding(self, input_ids, attention_mask):
        return self._counts(input_ids, attention_mask)[:, [2, 1, 0, 3]]

    def encode_image(self, pixel_values):
        self.calls.append(("image", self.training))
        means = pixel_values.mean((2, 3))
        return nn.functional.normalize(torch.cat([means, torch.full((means.shape[0], 1), 0.1)], 1), dim=1)


def image_of(channel_weights):
    return torch.tensor(channel_weights, dtype=torch.float32)[:, None, None].expand(3, 4, 4)


# Items: a cat picture, a dog picture, a picture mixing bird and cat, a dog picture labelled "bird".
PICTURES = [[1, 0, 0], [0, 1, 0], [0.5, 0, 1], [0, 1, 0]]
CAPTIONS = [["a cat", "cat cat"], ["a dog"], ["a bird", "a cat and a bird", "bird"], ["dog"]]
LABELS = ["cat", "Dog", "bird", "bird"]


def batches(batch_size):
    for start in range(0, len(PICTURES), batch_size):
        stop = start + batch_size
        yield {"pixel_values": torch.stack([image_of(p) for p in PICTURES[start:stop]]),
               "captions": CAPTIONS[start:stop], "label": LABELS[start:stop],
               "__key__": [f"item{i}" for i in range(start, min(stop, len(PICTURES)))]}


def loader(seen=None):
    def load(data, *, modality, tokenizer, batch_size, data_config):
        if seen is not None:
            seen.append((data, modality, batch_size, data_config))
        return batches(3)  # batches of 3 items: the captions span a batch boundary
    return load


def direct_embeddings(model, tokenizer):
    media = torch.cat([model.encode_image(image_of(p)[None]) for p in PICTURES])
    texts = [c for item in CAPTIONS for c in item]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    owner = [i for i, item in enumerate(CAPTIONS) for _ in item]
    return media, model.encode_text(enc["input_ids"], enc["attention_mask"]), owner


def test_retrieval_and_geometry_through_evaluate(tokenizer):
    model = WordCountModel(tokenizer)
    model.train()
    seen = []
    out = evaluate(model, tokenizer, {"coco": {"task": "retrieval", "data": "test-{0..1}.tar"},
                                      "geo": {"task": "geometry", "data": "test-{0..1}.tar"}},
                   batch_size=2, load_batches=loader(seen), data_config={"image": {"size": 4}})
    assert seen == [("test-{0..1}.tar", "image", 2, {"image": {"size": 4}})] * 2
    assert model.calls and all(not training for _, training in model.calls)  # encoded in eval mode
    assert model.training  # and the training mode is restored afterwards
    media, text, owner = direct_embeddings(model, tokenizer)
    expected = retrieval_metrics(media, text, owner, media_name="image")
    assert {k[len("coco/"):]: v for k, v in out.items() if k.startswith("coco/")} == pytest.approx(expected)
    # Hand check: each caption's own picture scores highest, except that the two dog pictures are
    # identical, so "a dog" and "dog" tie with the other dog picture and get rank 2: R@1 = 5/7.
    assert out["coco/text_to_image/R@1"] == pytest.approx(5 / 7)
    assert out["coco/image_to_text/R@1"] == pytest.approx(2 / 4)
    geo = geometry_metrics(media, text, owner, media_name="image")
    assert {k[len("geo/"):]: v for k, v in out.items() if k.startswith("geo/")} == pytest.approx(geo)


def test_zeroshot_labels_from_batches_and_csv(tokenizer, tmp_path):
    model = WordCountModel(tokenizer)
    out = run_task(model, tokenizer, {"task": "zeroshot", "data": "x", "classnames": ["cat", "dog", "bird"],
                                      "ks": [1, 2]}, load_batches=loader()).metrics
    # Predictions: cat, dog, bird (bird channel dominates), dog for the dog picture labelled bird.
    assert out["top1"] == pytest.approx(3 / 4)
    assert out["mean_per_class_top1"] == pytest.approx((1 + 1 + 1 / 2) / 3)
    assert out["classes"] == 3
    media = torch.cat([model.encode_image(image_of(p)[None]) for p in PICTURES])
    enc = tokenizer([f"a photo of a {c}." for c in ("cat", "dog", "bird")], padding=True, return_tensors="pt")
    assert out["top2"] == zeroshot_classify(media, model.encode_text(enc["input_ids"], enc["attention_mask"]),
                                            [0, 1, 2, 2], ks=(2,))["top2"]
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("filename,fold,target,category\nitem0.wav,1,0,cat\nitem1.wav,1,1,dog\n"
                        "item2.wav,1,2,bird\nitem3.wav,1,1,dog\n")
    out = run_task(model, tokenizer, {"task": "zeroshot", "data": "x", "labels_csv": str(csv_path),
                                      "templates": ["{}", "a {} here"]}, load_batches=loader()).metrics
    assert out["top1"] == 1.0 and out["classes"] == 3  # classes: the sorted distinct labels


def test_sts_and_text_geometry_use_the_chosen_space(tokenizer, tmp_path):
    model = WordCountModel(tokenizer)
    path = tmp_path / "sts.tsv"
    rows = [("a cat", "cat", 5.0), ("a dog", "a bird", 1.0), ("cat dog", "dog", 3.0), ("bird", "a cat bird", 4.2)]
    path.write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{s}\n" for a, b, s in rows))

    def emb(texts, fn):
        enc = tokenizer(list(texts), padding=True, return_tensors="pt")
        return fn(enc["input_ids"], enc["attention_mask"])

    s1, s2, gold = zip(*rows)
    for space, fn in (("sentence", model.sentence_embedding), ("joint", model.encode_text)):
        out = run_task(model, tokenizer, {"task": "sts", "data": str(path), "space": space}).metrics
        assert out == pytest.approx(sts_correlation(emb(s1, fn), emb(s2, fn), gold))
    out = run_task(model, tokenizer, {"task": "geometry", "data": str(path)}).metrics
    # Positives (score >= 4): ("a cat", "cat") identical counts -> 0; ("bird", "a cat bird"):
    # sentence space vectors [1,0,0,.1] and [1,0,1,.1] -> ||u/|u| - v/|v|||^2.
    u, v = torch.tensor([1.0, 0, 0, 0.1]), torch.tensor([1.0, 0, 1, 0.1])
    d = (u / u.norm() - v / v.norm()).pow(2).sum().item()
    assert out["text/alignment"] == pytest.approx(d / 2)
    assert set(out) == {"text/alignment", "text/uniformity"}


def test_max_items_truncates(tokenizer):
    model = WordCountModel(tokenizer)
    out = run_task(model, tokenizer, {"task": "retrieval", "data": "x"}, max_items=2, load_batches=loader()).metrics
    media, text, owner = direct_embeddings(model, tokenizer)
    assert out == pytest.approx(retrieval_metrics(media[:2], text[:3], owner[:3], media_name="image"))


def test_task_config_errors():
    with pytest.raises(ConfigError, match="eval.tasks.a.task: 'recall' is not a task"):
        parse_task({"task": "recall", "data": "x"}, "eval.tasks.a")
    with pytest.raises(ConfigError, match="eval.tasks.a.blocks: unknown key"):
        parse_task({"task": "retrieval", "data": "x", "blocks": 3}, "eval.tasks.a")
    with pytest.raises(ConfigError, match="eval.tasks.a.templates: .*needs a '\\{\\}'"):
        parse_task({"task": "zeroshot", "data": "x", "templates": ["a photo"]}, "eval.tasks.a")
    with pytest.raises(ValueError, match="tasks must be a non-empty dict"):
        evaluate(object(), None, {})


def test_batches_without_captions_or_labels_fail_clearly(tokenizer):
    model = WordCountModel(tokenizer)

    def no_captions(*args, **kwargs):
        return [{"pixel_values": torch.zeros(1, 3, 4, 4) + 1}]

    with pytest.raises(ValueError, match="retrieval needs batch\\['captions'\\]"):
        run_task(model, tokenizer, {"task": "retrieval", "data": "x"}, load_batches=no_captions)
    with pytest.raises(ValueError, match="zero-shot needs labels"):
        run_task(model, tokenizer, {"task": "zeroshot", "data": "x", "classnames": ["cat"]}, load_batches=no_captions)
    with pytest.raises(ValueError, match="yielded no batches"):
        run_task(model, tokenizer, {"task": "retrieval", "data": "x"}, load_batches=lambda *a, **k: [])


def test_labels_to_indices():
    names = ["dog_bark", "Rain", "cat"]
    assert labels_to_indices([2, "dog_bark", "dog bark", "rain", ["cat"]], names).tolist() == [2, 0, 0, 1, 2]
    with pytest.raises(ValueError, match="item 0 has class index 3"):
        labels_to_indices([3], names)
    with pytest.raises(ValueError, match="item 1 has label 'horse'"):
        labels_to_indices(["cat", "horse"], names)
    with pytest.raises(ValueError, match="item 0 has 2 labels"):
        labels_to_indices([["cat", "Rain"]], names)


def test_read_classnames_and_label_csv(tmp_path):
    (tmp_path / "c.txt").write_text("dog\n\ncat\n")
    (tmp_path / "c.json").write_text(json.dumps({"cat": 1, "dog": 0}))
    (tmp_path / "c.csv").write_text("index,mid,display_name\n1,/m/b,Cat\n0,/m/a,Dog\n")
    assert read_classnames(str(tmp_path / "c.txt")) == ["dog", "cat"]
    assert read_classnames(str(tmp_path / "c.json")) == ["dog", "cat"]
    assert read_classnames(str(tmp_path / "c.csv")) == ["Dog", "Cat"]
    assert read_classnames(["x", "y"]) == ["x", "y"]
    with pytest.raises(ValueError, match="does not exist"):
        read_classnames(str(tmp_path / "missing.txt"))
    (tmp_path / "l.csv").write_text("filename,target\n1-100-A-0.wav,0\n")
    table = read_label_csv(str(tmp_path / "l.csv"))
    assert labels_from_csv(["1-100-A-0"], table) == [0]
    with pytest.raises(ValueError, match="1 sample key\\(s\\) are not in the labels CSV"):
        labels_from_csv(["other"], table)
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="needs a key column"):
        read_label_csv(str(tmp_path / "bad.csv"))


def test_texts_are_truncated_like_training(tokenizer, tmp_path):
    model = WordCountModel(tokenizer)
    path = tmp_path / "sts.csv"
    path.write_text("sentence1,sentence2,score\nbird cat,cat,1\ncat dog,cat bird,2\ndog,dog cat,3\n")
    out = run_task(model, tokenizer, {"task": "sts", "data": str(path), "space": "joint"},
                   data_config={"text": {"max_length": 3}}).metrics  # [CLS] first-word [SEP]

    def emb(texts):
        enc = tokenizer(texts, padding=True, truncation=True, max_length=3, return_tensors="pt")
        return model.encode_text(enc["input_ids"], enc["attention_mask"])

    expected = sts_correlation(emb(["bird cat", "cat dog", "dog"]), emb(["cat", "cat bird", "dog cat"]), [1, 2, 3])
    assert out == pytest.approx(expected)
    # Truncated: cos [low, 1, 1] -> ranks [1, 2.5, 2.5] vs [1, 2, 3]: 1.5 / sqrt(1.5 * 2) = sqrt(3)/2.
    # Untruncated the cosines would be [.709, .502, .709] and Spearman 0.
    assert out["spearman"] == pytest.approx(3**0.5 / 2)
