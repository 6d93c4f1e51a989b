"""benchmarks/rounds.py: the balanced round orders and the median's distribution-free interval."""
from __future__ import annotations

import importlib.util
import math
import random
from collections import Counter
from fractions import Fraction
from math import comb
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("rounds", BENCHMARKS / "rounds.py")
rounds = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rounds)


def coverage(n: int, lo: int) -> Fraction:
    """Exact probability that [x_(lo), x_(n-1-lo)] (0-based order statistics of n draws from a
    continuous distribution) holds its median: 1 - 2 P(Binomial(n, 1/2) <= lo)."""
    return 1 - 2 * sum(Fraction(comb(n, k), 2 ** n) for k in range(lo + 1))


@pytest.mark.parametrize("n", range(6, 121))
def test_interval_is_the_narrowest_with_95_percent_coverage(n):
    lo, hi = rounds.median_rank_bounds(n)
    assert hi == n - 1 - lo
    assert coverage(n, lo) >= Fraction(95, 100)
    assert coverage(n, lo + 1) < Fraction(95, 100)  # one order statistic further in is too narrow


def test_known_ranks():
    # n = 60: the old 1-based-as-0-based formula gave [22, 37]
    assert rounds.median_rank_bounds(60) == (21, 38)
    assert rounds.median_rank_bounds(30) == (9, 20)
    assert rounds.median_rank_bounds(20) == (5, 14)
    # Too few for 95%: even [min, max] of 5 covers 1 - 2/32 = 93.75% only.
    assert coverage(5, 0) < Fraction(95, 100) and rounds.median_rank_bounds(5) is None
    median, interval = rounds.median_interval([3.0, 1.0, 2.0])
    assert median == 2.0 and all(math.isnan(v) for v in interval)


def test_median_interval_reads_the_sorted_values():
    values = [float(v) for v in range(60)]
    random.Random(0).shuffle(values)
    median, (low, high) = rounds.median_interval(values)
    assert median == 29.5 and (low, high) == (21.0, 38.0)


def test_simulated_coverage_matches():
    # 4000 samples of n = 40 from a skewed distribution: the interval holds the true median
    # (ln 2 for Exp(1)) in at least ~95% of them (exact coverage 96.2%; 3 sigma of the binomial = 0.9%).
    rng = random.Random(1)
    n, trials, hits = 40, 4000, 0
    for _ in range(trials):
        _, (low, high) = rounds.median_interval([rng.expovariate(1.0) for _ in range(n)])
        hits += low <= 0.6931471805599453 <= high
    assert abs(hits / trials - float(coverage(n, rounds.median_rank_bounds(n)[0]))) < 0.01


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_round_order_is_balanced_over_one_period(n):
    # Over balanced_rounds(1, n) rounds, as round_order gives them: every method in every position
    # equally often, and right after every other method equally often; then the orders repeat.
    methods = [f"m{i}" for i in range(n)]
    period = rounds.balanced_rounds(1, n)
    seen = [rounds.round_order(methods, r) for r in range(period)]
    assert all(sorted(order) == methods for order in seen)
    positions = Counter((m, i) for order in seen for i, m in enumerate(order))
    assert set(positions.values()) == {period // n} and len(positions) == n * n
    pairs = Counter(pair for order in seen for pair in zip(order, order[1:]))
    assert n == 1 or (len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1)
    assert [rounds.round_order(methods, period + r) for r in range(period)] == seen

