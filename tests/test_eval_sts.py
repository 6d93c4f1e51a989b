"""STS correlation: hand-computed and scipy-checked Spearman/Pearson, file reading, errors."""
import math

import pytest
import scipy.stats
import torch

from xfast.eval import read_sts_file, sts_correlation
from xfast.eval.sts import average_ranks

E1, E2 = [1.0, 0.0], [0.0, 1.0]


def test_hand_computed_with_ties():
    # Cosines [1, 0, 0, -1]; gold [3, 1, 2, 0]. Average ranks: cos [4, 2.5, 2.5, 1], gold
    # [4, 2, 3, 1]; centred: a = [1.5, 0, 0, -1.5], b = [1.5, -.5, .5, -1.5]:
    # spearman = 4.5 / sqrt(4.5 * 5). Pearson: cos centred [1,0,0,-1], gold centred
    # [1.5,-.5,.5,-1.5] -> 3 / sqrt(2 * 5).
    emb1 = torch.tensor([E1, E1, E2, E1])
    emb2 = torch.tensor([E1, E2, E1, [-1.0, 0.0]])
    out = sts_correlation(emb1, emb2, [3, 1, 2, 0])
    assert out["spearman"] == pytest.approx(4.5 / math.sqrt(22.5))
    assert out["pearson"] == pytest.approx(3 / math.sqrt(10))
    assert out["pairs"] == 4


def test_matches_scipy_on_random_data_with_ties():
    g = torch.Generator().manual_seed(0)
    emb1, emb2 = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g)
    emb2[:20] = emb1[:20] * 3  # equal cosines (1.0) -> ties in the predictions
    gold = torch.randint(0, 6, (200,), generator=g).double()  # STS-B-like integer scores: many ties
    cos = torch.nn.functional.cosine_similarity(emb1.double(), emb2.double()).numpy()
    out = sts_correlation(emb1, emb2, gold)
    assert out["spearman"] == pytest.approx(scipy.stats.spearmanr(cos, gold.numpy()).statistic, abs=1e-12)
    assert out["pearson"] == pytest.approx(scipy.stats.pearsonr(cos, gold.numpy()).statistic, abs=1e-12)


def test_average_ranks_match_scipy():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 1.0, 7.0])
    assert average_ranks(x).tolist() == scipy.stats.rankdata(x.numpy(), method="average").tolist()


def test_collapsed_encoder_gives_nan():
    out = sts_correlation(torch.ones(3, 2), torch.ones(3, 2), [1, 2, 3])
    assert math.isnan(out["spearman"]) and math.isnan(out["pearson"])


@pytest.mark.parametrize(
    "emb1, emb2, gold, match",
    [
        (torch.ones(1, 2), torch.ones(1, 2), [1], "emb1 is empty or too small"),
        (torch.ones(3, 2), torch.ones(2, 2), [1, 2, 3], "emb2 has 2 rows but emb1 has 3"),
        (torch.ones(3, 2), torch.ones(3, 3), [1, 2, 3], "emb2 has embedding dim 3"),
        (torch.ones(3, 2), torch.ones(3, 2), [1, 2], "gold must hold one score per pair"),
        (torch.ones(3, 2), torch.ones(3, 2), [1, float("nan"), 2], "gold contains NaN"),
        (torch.ones(3, 2), torch.ones(3, 2), [2, 2, 2], "gold scores are all equal"),
        (torch.ones(3, 2), torch.full((3, 2), float("inf")), [1, 2, 3], "emb2 contains NaN or inf"),
    ],
)
def test_bad_inputs(emb1, emb2, gold, match):
    with pytest.raises(ValueError, match=match):
        sts_correlation(emb1, emb2, gold)


def test_reads_glue_stsb_tsv_with_bare_quotes(tmp_path):
    path = tmp_path / "dev.tsv"
    path.write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        '0\tmain-captions\tMSRvid\t2012test\t0000\tnone\tnone\tA man with a "hard hat" is dancing.\tA man is dancing.\t5.000\n'
        "\n"
        "1\tmain-captions\tMSRvid\t2012test\t0002\tnone\tnone\tA young child rides a horse.\tA child is riding a horse.\t4.750\n"
    )
    s1, s2, scores = read_sts_file(path)
    assert s1 == ['A man with a "hard hat" is dancing.', "A young child rides a horse."]
    assert s2 == ["A man is dancing.", "A child is riding a horse."]
    assert scores == [5.0, 4.75]


def test_reads_sick_and_headerless_csv(tmp_path):
    sick = tmp_path / "SICK.txt"
    sick.write_text("pair_ID\tsentence_A\tsentence_B\trelatedness_score\tentailment_judgment\n1\tA b.\tC d.\t4.5\tNEUTRAL\n")
    assert read_sts_file(sick) == (["A b."], ["C d."], [4.5])
    plain = tmp_path / "pairs.csv"
    plain.write_text('"One, two.",Three.,1.5\nFour.,Five.,2\n')
    assert read_sts_file(plain) == (["One, two.", "Four."], ["Three.", "Five."], [1.5, 2.0])


@pytest.mark.parametrize(
    "content, match",
    [
        ("", "is empty"),
        ("a,b,c,d\n1,2,3,4\n", "cannot find the columns"),
        ("sentence1,sentence2,score\n", "has a header but no pairs"),
        ("sentence1,sentence2,score\nx,y,\n", "line 2: score '' is not a number"),
        ("sentence1\tsentence2\tscore\nx\ty\t1\nshort\t2\n", "line 3: expected at least 3 columns"),
        ("x,y,nan\n", "line 1: score 'nan' is not finite"),
    ],
)
def test_bad_files(tmp_path, content, match):
    path = tmp_path / "sts.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=match):
        read_sts_file(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        read_sts_file(tmp_path / "nope.tsv")
