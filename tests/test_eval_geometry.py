"""Alignment, uniformity, CyCLIP consistency gaps: hand-computed values, streaming == pdist, errors."""
import math

import pytest
import torch

from xfast.eval import alignment, consistency_gaps, geometry_metrics, uniformity

E1, E2, E3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]


def test_alignment_by_hand():
    x = torch.tensor([E1, E2])
    y = torch.tensor([E1, E1])
    # ||0||^2 = 0 and ||e2 - e1||^2 = 2 -> mean 1; with alpha = 1: (0 + sqrt 2) / 2.
    assert alignment(x, y) == pytest.approx(1.0)
    assert alignment(x, y, alpha=1) == pytest.approx(math.sqrt(2) / 2)
    assert alignment(x * 7, y * 0.5) == pytest.approx(1.0)  # on the sphere


def test_uniformity_by_hand():
    # +-e1, +-e2: of the 6 pairs, 2 are antipodal (squared distance 4) and 4 orthogonal (2).
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    expected = math.log((2 * math.exp(-8) + 4 * math.exp(-4)) / 6)
    for block in (1, 3, 4, 1024):
        assert uniformity(x, block=block) == pytest.approx(expected)
    assert uniformity(x, t=1) == pytest.approx(math.log((2 * math.exp(-4) + 4 * math.exp(-2)) / 6))


def test_uniformity_streaming_matches_pdist():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(37, 5, generator=g, dtype=torch.float64), dim=1)
    expected = torch.pdist(x).pow(2).mul(-2).exp().mean().log().item()  # Wang & Isola's formula
    for block in (1, 5, 36, 37, 100):
        assert uniformity(x, block=block) == pytest.approx(expected, rel=1e-12)
    assert uniformity(x.float(), block=8) == pytest.approx(expected, rel=1e-5)


def test_consistency_gaps_by_hand():
    # x = (e1, e2), y = (e1, e1): <x_j,x_k> = I, <y_j,y_k> = all ones -> two off-diagonal
    # differences of 1 over 4 pairs; <x_j,y_k> = [[1,1],[0,0]] is not symmetric at (0,1)/(1,0).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert consistency_gaps(x, y) == pytest.approx({"in_modal_gap": 0.5, "cross_modal_gap": 0.5})
    # A rotation applied to one modality keeps in-modal similarities: in-modal gap 0.
    y = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    gaps = consistency_gaps(x, y)
    assert gaps["in_modal_gap"] == pytest.approx(0.0, abs=1e-12)
    assert gaps["cross_modal_gap"] == pytest.approx(((1 - -1) ** 2 * 2) / 4)


def test_consistency_gaps_match_plain_definition():
    g = torch.Generator().manual_seed(1)
    x = torch.nn.functional.normalize(torch.randn(11, 4, generator=g, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(11, 4, generator=g, dtype=torch.float64), dim=1)
    in_modal = ((x @ x.T - y @ y.T) ** 2).mean().item()
    cross = ((x @ y.T - (x @ y.T).T) ** 2).mean().item()
    assert consistency_gaps(x, y) == pytest.approx({"in_modal_gap": in_modal, "cross_modal_gap": cross})


def test_geometry_metrics_by_hand():
    media = torch.tensor([E1, E2])
    # Item 0 has captions e1 and e2, item 1 has caption e2.
    text = torch.tensor([E1, E2, E2])
    out = geometry_metrics(media, text, [0, 0, 1], media_name="image")
    assert set(out) == {
        "text/uniformity", "image/uniformity", "joint/uniformity", "text/alignment",
        "cross/alignment", "cross/in_modal_gap", "cross/cross_modal_gap",
    }
    # Text pairs: (e1,e2) d^2=2, (e1,e2) 2, (e2,e2) 0 -> log((2e^-4 + 1) / 3).
    assert out["text/uniformity"] == pytest.approx(math.log((2 * math.exp(-4) + 1) / 3))
    assert out["image/uniformity"] == pytest.approx(-4.0)
    # The only caption pair of one item: (e1, e2) -> 2.
    assert out["text/alignment"] == pytest.approx(2.0)
    # Captions vs their item: 0, 2, 0 -> 2/3.
    assert out["cross/alignment"] == pytest.approx(2 / 3)
    # Items paired with their first captions (e1, e2): identical -> no gaps.
    assert out["cross/in_modal_gap"] == pytest.approx(0.0)
    assert out["cross/cross_modal_gap"] == pytest.approx(0.0)
    # Joint set e1, e2, e1, e2, e2: 10 pairs, 4 identical (d^2 = 0), 6 orthogonal.
    assert out["joint/uniformity"] == pytest.approx(math.log((4 + 6 * math.exp(-4)) / 10))


def test_geometry_metrics_without_caption_pairs_has_no_text_alignment():
    out = geometry_metrics(torch.tensor([E1, E2]), torch.tensor([E2, E3]), [0, 1])
    assert "text/alignment" not in out and "media/uniformity" in out


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: alignment(torch.ones(2, 3), torch.ones(3, 3)), "y has 3 rows but x has 2"),
        (lambda: alignment(torch.ones(2, 3), torch.ones(2, 3), alpha=0), "alpha must be a positive number"),
        (lambda: uniformity(torch.ones(1, 3)), "x is empty or too small"),
        (lambda: uniformity(torch.ones(3, 3), t=-1), "t must be a positive number"),
        (lambda: uniformity(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), "x contains NaN"),
        (lambda: consistency_gaps(torch.ones(2, 3), torch.ones(2, 2)), "y has embedding dim 2"),
        (lambda: geometry_metrics(torch.ones(2, 3), torch.ones(2, 3), [0, 5]), "text_to_media values"),
        (lambda: geometry_metrics(torch.ones(0, 3), torch.ones(2, 3), [0, 0]), "media_emb is empty"),
    ],
)
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
