"""Round orders and paired statistics shared by the benchmarks.

A paired benchmark runs every method once per round and compares methods within a round, so
what drifts between rounds on a shared machine (other load, clock) cancels. Two things are
needed for that to be fair, and both live here:
  balanced_orders   the order of the methods in each round (a Williams design);
  median_interval   the median of per-round differences with its distribution-free 95% interval.
"""
from __future__ import annotations

import math
import statistics


def balanced_orders(n: int) -> list[list[int]]:
    """Williams design: orders of n methods in which each runs in every position equally often
    and each directly follows every other one equally often, so neither a method's position in
    the round nor its predecessor's effect on the caches favours it. n orders for even n (and
    n = 1), 2n for odd n (the n orders of the Latin square and their reverses)."""
    first = [0] + [(i + 1) // 2 if i % 2 else n - i // 2 for i in range(1, n)]  # 0, 1, n-1, 2, n-2, ...
    orders = [[(f + shift) % n for f in first] for shift in range(n)]
    return orders if n % 2 == 0 or n == 1 else orders + [o[::-1] for o in orders]


def balanced_rounds(rounds: int, n_methods: int) -> int:
    """rounds rounded up to a whole number of balanced orders."""
    period = len(balanced_orders(n_methods))
    return -(-rounds // period) * period


def round_order(methods, round_index: int) -> list:
    """The methods in the order round `round_index` runs them (balanced_orders, cyclically)."""
    orders = balanced_orders(len(methods))
    return [methods[i] for i in orders[round_index % len(orders)]]


def median_rank_bounds(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based indices (lo, hi) into n sorted values such that [x_lo, x_hi] covers the median
    with probability >= confidence for any continuous distribution: the largest lo with
    P(Binomial(n, 1/2) <= lo) <= (1 - confidence) / 2 (exact binomial; hi = n - 1 - lo).
    The median lies below x_lo (0-based) exactly when at most lo values fall below it.
    None when too few values allow any such interval (n < 6 at 95%: even [min, max] covers less)."""
    alpha = (1 - confidence) / 2
    cdf, lo = 0.0, -1
    for k in range(n):
        cdf += math.comb(n, k) / 2 ** n
        if cdf > alpha:
            break
        lo = k
    return None if lo < 0 else (lo, n - 1 - lo)


def median_interval(diffs: list[float]) -> tuple[float, list[float]]:
    """The median of per-round differences and its distribution-free 95% interval (order
    statistics from median_rank_bounds); [nan, nan] (printed as nan) from fewer than 6 values,
    where no 95% interval exists."""
    diffs = sorted(diffs)
    bounds = median_rank_bounds(len(diffs))
    interval = [math.nan, math.nan] if bounds is None else [diffs[bounds[0]], diffs[bounds[1]]]
    return statistics.median(diffs), interval
