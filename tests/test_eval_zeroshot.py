"""Zero-shot classification: hand-computed accuracies, prompt averaging, errors."""
import pytest
import torch

from xfast.eval import average_prompts, build_class_embeddings, zeroshot_classify

CLASSES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
MEDIA = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0], [0.0, -1.0]])
LABELS = [0, 0, 1, 1, 2]


def test_hand_computed_accuracy():
    # Scores against (c0, c1, c2): m0 [1,0,-1] true c0 -> rank 1; m1 [0,1,0] true c0 ties c2 and
    # loses to c1 -> rank 3; m2 [.6,.8,-.6] true c1 -> 1; m3 [-1,0,1] true c1 -> 2;
    # m4 [0,-1,0] true c2 ties c0 -> 2 (ties count against the true class).
    out = zeroshot_classify(MEDIA, CLASSES, LABELS, ks=(1, 2, 5))
    assert out["top1"] == pytest.approx(2 / 5)
    assert out["top2"] == pytest.approx(4 / 5)
    assert out["top5"] == 1.0
    assert out["mean_per_class_top1"] == pytest.approx((1 / 2 + 1 / 2 + 0) / 3)


def test_blocks_and_label_containers_agree():
    g = torch.Generator().manual_seed(0)
    media, classes = torch.randn(40, 6, generator=g), torch.randn(7, 6, generator=g)
    labels = torch.randint(0, 7, (40,), generator=g)
    ref_scores = torch.nn.functional.normalize(media, dim=1) @ torch.nn.functional.normalize(classes, dim=1).T
    expected_top1 = float((ref_scores.argmax(1) == labels).double().mean())
    expected_top5 = float((ref_scores.topk(5, dim=1).indices == labels[:, None]).any(1).double().mean())
    for block in (1, 3, 40, 100):
        out = zeroshot_classify(media, classes, labels.tolist(), block=block)
        assert out["top1"] == pytest.approx(expected_top1)
        assert out["top5"] == pytest.approx(expected_top5)


def test_prompt_embeddings_are_normalised_averaged_and_renormalised():
    prompts = torch.tensor([[[2.0, 0.0], [0.0, 5.0]], [[0.0, -1.0], [0.0, -3.0]]])
    s = 2**-0.5
    expected = torch.tensor([[s, s], [0.0, -1.0]])
    torch.testing.assert_close(average_prompts(prompts), expected)
    # [C, P, D] input is averaged the same way inside zeroshot_classify.
    media = torch.tensor([[1.0, 1.0], [0.0, -1.0], [1.0, 0.9]])
    assert zeroshot_classify(media, prompts, [0, 1, 1])["top1"] == pytest.approx(2 / 3)


def test_build_class_embeddings_fills_templates_and_chunks():
    seen = []
    vectors = {
        "a photo of a {cat}.": [1.0, 0.0, 0.0], "art of {cat}": [0.0, 2.0, 0.0],
        "a photo of a dog.": [0.0, 0.0, 1.0], "art of dog": [0.0, 0.0, 4.0],
        "a photo of a bird.": [1.0, 0.0, 0.0], "art of bird": [-1.0, 0.0, 0.0] ,
    }

    def encode(texts):
        seen.append(list(texts))
        return torch.tensor([vectors[t] for t in texts])

    with pytest.raises(ValueError, match="prompt average"):  # bird's prompts cancel out
        build_class_embeddings(encode, ["{cat}", "dog", "bird"], ["a photo of a {}.", "art of {}"], batch_size=4)
    assert seen == [["a photo of a {cat}.", "art of {cat}", "a photo of a dog.", "art of dog"], ["a photo of a bird.", "art of bird"]]
    emb = build_class_embeddings(encode, ["{cat}", "dog"], ["a photo of a {}.", "art of {}"], batch_size=3)
    s = 2**-0.5
    torch.testing.assert_close(emb, torch.tensor([[s, s, 0.0], [0.0, 0.0, 1.0]]))


def test_build_class_embeddings_checks_the_encoder_output():
    with pytest.raises(ValueError, match="encode_text_fn must return a \\[2, dim\\] tensor"):
        build_class_embeddings(lambda texts: torch.ones(1, 3), ["a", "b"], ["{}"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(classnames=[], templates=["{}"]), "classnames must be a non-empty list"),
        (dict(classnames=["a", "a"], templates=["{}"]), "classnames lists 'a' twice"),
        (dict(classnames=["a"], templates=["a photo"]), "needs a '\\{\\}'"),
        (dict(classnames=["a"], templates="a {}"), "templates must be a non-empty list"),
    ],
)
def test_bad_class_prompts(kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_class_embeddings(lambda texts: torch.ones(len(texts), 2), **kwargs)


@pytest.mark.parametrize(
    "media, classes, labels, match",
    [
        (torch.empty(0, 2), CLASSES, [], "media_emb is empty"),
        (MEDIA, torch.ones(3, 5), LABELS, "class_text_emb has embedding dim 5 but media_emb has 2"),
        (MEDIA, CLASSES, [0, 1], "labels has 2 entries"),
        (MEDIA, CLASSES, [0, 0, 1, 1, 3], r"labels values must lie in \[0, 3\)"),
        (MEDIA, CLASSES * float("nan"), LABELS, "class_text_emb contains NaN"),
        (MEDIA, torch.ones(3, 0, 2), LABELS, "class_text_emb is empty"),
    ],
)
def test_bad_inputs(media, classes, labels, match):
    with pytest.raises(ValueError, match=match):
        zeroshot_classify(media, classes, labels)
