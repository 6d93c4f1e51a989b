"""benchmarks/bench_losses.py's paired ratios and its reading of older results files."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_losses.py"
spec = importlib.util.spec_from_file_location("bench_losses", SCRIPT)
bench_losses = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_losses)


def timings(walls, cpus):
    return {"round_seconds": walls, "round_cpu_seconds": cpus, "seconds": min(walls), "cpu_seconds": min(cpus)}


def test_ratio_is_the_median_of_per_round_ratios_not_best_over_best():
    # Round 2 is slow for both (the machine's state): paired, it cancels; best/best pairs the
    # kernel's best round with the floor's best round, which ran in different states.
    floor = timings([2.0, 1.0, 4.0], [2.0, 1.0, 4.0])
    kernel = timings([2.2, 1.3, 4.4], [2.4, 1.2, 4.0])
    r = bench_losses.paired_ratios(kernel, floor)
    assert r["round_ratios"] == pytest.approx([1.1, 1.3, 1.1])
    assert r["x_tiled_floor"] == pytest.approx(1.1)
    assert (r["x_tiled_floor_low"], r["x_tiled_floor_high"]) == pytest.approx((1.1, 1.3))
    assert r["x_tiled_floor_best"] == pytest.approx(1.3)
    assert r["cpu_x_tiled_floor"] == pytest.approx(1.2)
    assert r["cpu_x_tiled_floor_best"] == pytest.approx(1.2)


def test_rounds_rotate_the_order_of_the_methods(monkeypatch):
    calls = []
    monkeypatch.setattr(bench_losses, "make_step", lambda loss, m, n, d: lambda: calls.append(m))
    out = bench_losses.time_worker("clip", ["a", "b", "c"], 8, 4, 3)
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # after one warm-up each
    assert all(len(out[m]["round_seconds"]) == 3 for m in "abc")


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
