"""Retrieval metrics: hand-computed ranks, multi-caption protocol, blockwise == one-shot, errors."""
import pytest
import torch

from xfast.eval import retrieval_metrics, retrieval_ranks

# Media are the axes of R^3; every caption has norm 5 so cosines are exact (components / 5).
MEDIA = torch.eye(3, dtype=torch.float64)
TEXT = torch.tensor([[5, 0, 0], [0, 4, 3], [3, 4, 0], [4, 3, 0], [4, 0, 3]], dtype=torch.float64)
OWNER = [0, 0, 1, 1, 2]


def test_hand_computed_multi_caption_case():
    # text->media (scores = row / 5): t0 [1,0,0] owner 0 -> rank 1; t1 [0,.8,.6] owner 0 -> 3
    # (all three items score >= 0); t2 [.6,.8,0] -> 1; t3 [.8,.6,0] -> 2; t4 [.8,0,.6] -> 2.
    # media->text, columns: m0 [1,0,.6,.8,.8] relevant t0,t1 -> relevant at ranks 1 and 5;
    # m1 [0,.8,.8,.6,0] relevant t2,t3: t1 ties t2 at .8 and is ranked first -> ranks 2, 3;
    # m2 [0,.6,0,0,.6] relevant t4 ties t1 -> rank 2.
    r = retrieval_ranks(MEDIA, TEXT, OWNER)
    assert r.text_to_media.tolist() == [1, 3, 1, 2, 2]
    assert r.media_to_text.tolist() == [1, 2, 2]
    m = retrieval_metrics(MEDIA, TEXT, OWNER, ks=(1, 2, 5), media_name="audio")
    assert m["text_to_audio/R@1"] == pytest.approx(2 / 5)
    assert m["text_to_audio/R@2"] == pytest.approx(4 / 5)
    assert m["text_to_audio/R@5"] == 1.0
    assert m["text_to_audio/median_rank"] == 2.0
    assert m["text_to_audio/mean_rank"] == pytest.approx(9 / 5)
    assert m["text_to_audio/mAP@10"] == pytest.approx((1 + 1 / 3 + 1 + 1 / 2 + 1 / 2) / 5)
    # The two directions differ: best caption per item gives R@1 = 1/3, not 2/5.
    assert m["audio_to_text/R@1"] == pytest.approx(1 / 3)
    assert m["audio_to_text/R@2"] == 1.0
    assert m["audio_to_text/median_rank"] == 2.0
    assert m["audio_to_text/mean_rank"] == pytest.approx(5 / 3)
    ap = [(1 / 1 + 2 / 5) / 2, (1 / 2 + 2 / 3) / 2, 1 / 2]
    assert m["audio_to_text/mAP@10"] == pytest.approx(sum(ap) / 3)


def test_map_cutoff_and_normalisation():
    # One item, 12 captions, the relevant two at ranks 3 and 11: AP@10 = (1/3) / min(2, 10).
    media = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    angles = torch.linspace(0.0, 1.5, 12, dtype=torch.float64)  # strictly decreasing cosines
    text = torch.stack([angles.cos(), angles.sin()], 1)
    owner = [0] * 12
    r = retrieval_ranks(media.repeat(2, 1), text, [1 if i in (2, 10) else 0 for i in range(12)], map_k=10)
    assert r.media_to_text[1].item() == 3
    assert r.media_to_text_ap[1].item() == pytest.approx((1 / 3) / 2)
    # The other item owns 10 captions at ranks 1,2,4,...,10,12: AP normalised by min(10, 10).
    expected = (1 + 1 + 3 / 4 + 4 / 5 + 5 / 6 + 6 / 7 + 7 / 8 + 8 / 9 + 9 / 10) / 10
    assert r.media_to_text_ap[0].item() == pytest.approx(expected)
    assert retrieval_ranks(media, text, owner).media_to_text_ap.item() == pytest.approx(1.0)


def test_collapsed_embeddings_get_the_worst_rank():
    media = torch.ones(4, 3)
    text = torch.ones(8, 3)
    r = retrieval_ranks(media, text, [0, 0, 1, 1, 2, 2, 3, 3])
    assert r.text_to_media.tolist() == [4] * 8
    # Two relevant captions tie with six others: the best relevant one is ranked 7th.
    assert r.media_to_text.tolist() == [7] * 4


def reference_ranks(media, text, owner):
    """Plain python: sort every query's keys by (-score, relevant last) and read positions."""
    media = torch.nn.functional.normalize(media.double(), dim=1)
    text = torch.nn.functional.normalize(text.double(), dim=1)
    scores = (text @ media.T).tolist()
    t2m, m2t, m2t_ap = [], [], []
    for t, row in enumerate(scores):
        order = sorted(range(len(row)), key=lambda j: (-row[j], j == owner[t]))
        t2m.append(order.index(owner[t]) + 1)
    for i in range(media.shape[0]):
        col = [scores[t][i] for t in range(len(scores))]
        relevant = {t for t in range(len(col)) if owner[t] == i}
        order = sorted(range(len(col)), key=lambda t: (-col[t], t in relevant))
        positions = [p + 1 for p, t in enumerate(order) if t in relevant]
        m2t.append(positions[0])
        m2t_ap.append(sum((h + 1) / p for h, p in enumerate(positions) if p <= 10) / min(len(relevant), 10))
    return t2m, m2t, m2t_ap


@pytest.mark.parametrize("kind", ["random", "ties"])
def test_blockwise_equals_one_shot_and_reference(kind):
    g = torch.Generator().manual_seed(0)
    n, t, d = 23, 57, 4
    if kind == "random":
        media = torch.randn(n, d, generator=g, dtype=torch.float64)
        text = torch.randn(t, d, generator=g, dtype=torch.float64)
    else:  # +-1 entries: every norm is 2, every score a multiple of 1/4, exact -> many exact ties
        media = torch.randint(0, 2, (n, d), generator=g).double() * 2 - 1
        text = torch.randint(0, 2, (t, d), generator=g).double() * 2 - 1
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (t - n,), generator=g)])
    owner = owner[torch.randperm(t, generator=g)]
    ref_t2m, ref_m2t, ref_ap = reference_ranks(media, text, owner.tolist())
    one_shot = retrieval_metrics(media, text, owner, block=10_000)
    for block in (1, 2, 7, 23, 64):
        r = retrieval_ranks(media, text, owner, block=block)
        assert r.text_to_media.tolist() == ref_t2m
        assert r.media_to_text.tolist() == ref_m2t
        assert r.media_to_text_ap.tolist() == pytest.approx(ref_ap)
        assert retrieval_metrics(media, text, owner, block=block) == one_shot


def test_float32_and_unnormalised_inputs_rank_by_cosine():
    g = torch.Generator().manual_seed(1)
    media = torch.randn(9, 5, generator=g)
    text = torch.randn(20, 5, generator=g)
    owner = torch.arange(20) % 9
    scaled = retrieval_ranks(media * torch.rand(9, 1, generator=g) * 10, text * 3, owner)
    plain = retrieval_ranks(media.double(), text.double(), owner)
    assert scaled.text_to_media.tolist() == plain.text_to_media.tolist()
    assert scaled.media_to_text.tolist() == plain.media_to_text.tolist()


@pytest.mark.parametrize(
    "media, text, owner, match",
    [
        (torch.empty(0, 3), torch.ones(2, 3), [0, 0], "media_emb is empty"),
        (torch.ones(2, 3), torch.empty(0, 3), [], "text_emb is empty"),
        (torch.ones(2, 3), torch.ones(2, 4), [0, 1], "text_emb has embedding dim 4"),
        (torch.ones(2, 3), torch.ones(3, 3), [0, 1], "text_to_media has 2 entries"),
        (torch.ones(2, 3), torch.ones(2, 3), [0, 2], r"text_to_media values must lie in \[0, 2\)"),
        (torch.ones(2, 3), torch.ones(2, 3), [0, 0], "no caption to 1 media item"),
        (torch.ones(2, 3), torch.ones(2, 3), [0.0, 1.0], "text_to_media must hold integers"),
        (torch.tensor([[1.0, float("nan")], [1.0, 0.0]]), torch.ones(2, 2), [0, 1], "media_emb contains NaN"),
        (torch.ones(2, 3), torch.zeros(2, 3), [0, 1], "text_emb row 0 is all zeros"),
        (torch.ones(2, 3, 1), torch.ones(2, 3), [0, 1], "media_emb must be 2-D"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(media, text, owner, match):
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(media, text, owner)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="block must be a positive integer"):
        retrieval_metrics(MEDIA, TEXT, OWNER, block=0)
    with pytest.raises(ValueError, match="ks must be"):
        retrieval_metrics(MEDIA, TEXT, OWNER, ks=())
    with pytest.raises(ValueError, match="map_k must be a positive integer"):
        retrieval_metrics(MEDIA, TEXT, OWNER, map_k=0)
