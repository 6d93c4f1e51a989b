"""benchmarks/bench_losses.py's paired ratios and its reading of older results files."""
from __future__ import annotations

import csv
import importlib.util
import json
import statistics
from collections import Counter
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"
spec = importlib.util.spec_from_file_location("bench_losses", SCRIPT)
bench_losses = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_losses)


def timings(walls, cpus):
    return {"round_seconds": walls, "round_cpu_seconds": cpus, "seconds": min(walls), "cpu_seconds": min(cpus)}


def test_ratio_is_the_median_of_per_round_ratios_not_best_over_best():
    # The last of the three rounds is slow for both (the machine's state): paired, it cancels;
    # best/best pairs the kernel's best round with the floor's best round, which ran in
    # different states.
    floor = timings([2.0, 1.0, 4.0], [2.0, 1.0, 4.0])
    kernel = timings([2.2, 1.3, 4.4], [2.4, 1.2, 4.0])
    r = bench_losses.paired_ratios(kernel, floor)
    assert r["round_ratios"] == pytest.approx([1.1, 1.3, 1.1])
    assert r["x_tiled_floor"] == pytest.approx(1.1)
    assert (r["x_tiled_floor_low"], r["x_tiled_floor_high"]) == pytest.approx((1.1, 1.3))
    assert r["x_tiled_floor_best"] == pytest.approx(1.3)
    assert r["cpu_x_tiled_floor"] == pytest.approx(1.2)
    assert (r["cpu_x_tiled_floor_low"], r["cpu_x_tiled_floor_high"]) == pytest.approx((1.0, 1.2))
    assert r["cpu_x_tiled_floor_best"] == pytest.approx(1.2)


@pytest.mark.parametrize("n", range(1, 8))
def test_balanced_orders_give_every_position_and_predecessor_equally_often(n):
    orders = bench_losses.balanced_orders(n)
    assert len(orders) == (n if n % 2 == 0 or n == 1 else 2 * n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    per_position = len(orders) // n
    for pos in range(n):
        assert Counter(o[pos] for o in orders) == {m: per_position for m in range(n)}
    # Each ordered pair (a right before b, a != b) equally often: every method's predecessor
    # is every other method as often (and so each method is first as often).
    follows = Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert follows == Counter({(a, b): per_position for a in range(n) for b in range(n) if a != b})


@pytest.mark.parametrize(("rounds", "methods", "expected"), [(3, 2, 4), (4, 2, 4), (11, 2, 12), (1, 3, 6), (7, 4, 8), (1, 1, 1)])
def test_rounds_are_rounded_up_to_whole_balanced_orders(rounds, methods, expected):
    assert bench_losses.balanced_rounds(rounds, methods) == expected


def test_rounds_run_the_methods_in_the_balanced_orders(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_losses, "make_step", lambda loss, m, n, d: lambda: calls.append(m))
    out = bench_losses.time_worker("clip", ["a", "b"], 8, 4, 3)  # 3 rounds -> 4: each first twice
    assert calls[2:] == ["a", "b", "b", "a", "a", "b", "b", "a"]  # after one warm-up each
    assert all(len(out[m]["round_seconds"]) == 4 for m in "ab")


@pytest.mark.parametrize("rounds", ["0", "-3"])
def test_rounds_must_be_positive(rounds, capsys):
    with pytest.raises(SystemExit):
        bench_losses.main(["--rounds", rounds])
    assert "must be a positive integer" in capsys.readouterr().err


def test_older_results_keep_their_best_over_best_ratio_under_its_name(tmp_path):
    old = {"meta": {"command": "x"}, "peak": {"gflops": 1.0, "shape": "s"},
           "rows": [{"loss": "clip", "N": 8, "d": 4, "method": "xfast", "seconds": 1.0, "cpu_seconds": 1.5, "gflops": 9.0, "x_tiled_floor": 1.2,
                     "cpu_x_tiled_floor": 1.1}]}
    path = tmp_path / "losses.json"
    path.write_text(json.dumps(old))
    runs, rows = bench_losses.previous_results(path)
    assert len(runs) == 1 and rows[0]["run"] == 0
    assert rows[0]["x_tiled_floor_best"] == 1.2 and rows[0]["cpu_x_tiled_floor_best"] == 1.1
    assert "x_tiled_floor" not in rows[0]  # no median was measured
    assert "| - | - | 1.20 | - |" in bench_losses.table(rows, runs)


def test_older_rows_without_a_cpu_ratio_are_read(tmp_path):
    old = {"runs": [{"meta": {"command": "x"}, "peak": {"gflops": 1.0, "shape": "s"}}],
           "rows": [{"loss": "clip", "N": 8, "d": 4, "method": "xfast", "seconds": 1.0, "gflops": 9.0, "run": 0,
                     "x_tiled_floor": 1.2},
                    {"loss": "clip", "N": 8, "d": 4, "method": "reference", "error": "skipped", "run": 0}]}
    path = tmp_path / "losses.json"
    path.write_text(json.dumps(old))
    runs, rows = bench_losses.previous_results(path)
    assert rows[0]["x_tiled_floor_best"] == 1.2 and "cpu_x_tiled_floor_best" not in rows[0]
    assert rows[1] == old["rows"][1]


def test_committed_results_keys_mean_what_the_code_computes():
    # x_tiled_floor is the median of the per-round paired ratios, recomputed from the stored
    # round times; best/best and the CPU figures likewise; the CSV holds the same numbers.
    path = SCRIPT.parent / "results" / "losses.json"
    runs, rows = bench_losses.previous_results(path)
    floors = {(r["loss"], r["N"], r["d"]): r for r in rows if r["method"] == "tiled_floor" and "seconds" in r}
    checked = 0
    for r in rows:
        floor = floors.get((r["loss"], r["N"], r["d"]))
        if floor is None or "round_seconds" not in r:
            continue
        assert r["round_seconds"] and len(r["round_seconds"]) == len(floor["round_seconds"])
        expected = bench_losses.paired_ratios(r, floor)
        for key in ("x_tiled_floor", "x_tiled_floor_low", "x_tiled_floor_high", "x_tiled_floor_best",
                    "cpu_x_tiled_floor", "cpu_x_tiled_floor_low", "cpu_x_tiled_floor_high", "cpu_x_tiled_floor_best"):
            assert r[key] == pytest.approx(expected[key], rel=1e-12), (r["loss"], r["N"], r["d"], r["method"], key)
        assert r["x_tiled_floor"] == pytest.approx(statistics.median(
            a / b for a, b in zip(r["round_seconds"], floor["round_seconds"])), rel=1e-12)
        checked += 1
    assert checked >= 8  # the committed table: 2 losses x 2 N x 2 d, xfast and the floor
    with path.with_suffix(".csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(rows)
    for c, r in zip(csv_rows, rows):
        assert float(c["x_tiled_floor"]) == pytest.approx(r["x_tiled_floor"], rel=1e-12)
        assert float(c["x_tiled_floor_best"]) == pytest.approx(r["x_tiled_floor_best"], rel=1e-12)
