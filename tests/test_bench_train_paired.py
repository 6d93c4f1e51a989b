"""benchmarks/bench_train.py's paired result (DeepSpeed's cost and each step's ratio to the loop
in the same rounds) and its tables, also for results saved before the loop joined the rounds."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
spec = importlib.util.spec_from_file_location("bench_train", BENCH / "bench_train.py")
bench_train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_train)


def _times(rounds: int = 8) -> dict[str, list[float]]:
    # The machine's speed drifts over the rounds (x3 by the end); within a round the loop takes
    # 1.3x xfast_torch, ZeRO-0 +1 ms and ZeRO-2 +4 ms over xfast_torch.
    drift = [1 + 2 * i / (rounds - 1) for i in range(rounds)]
    torch_step = [0.020 * d for d in drift]
    return {"xfast_torch": torch_step, "xfast_zero0": [t + 0.001 for t in torch_step],
            "xfast": [t + 0.004 for t in torch_step], "transformers": [1.3 * t for t in torch_step]}


def test_paired_ratios_to_the_loop_are_per_round_and_cancel_the_drift():
    result = bench_train.paired_result(_times(), world=1, compiled=True)
    assert result["xfast_torch"]["vs_loop"] == pytest.approx(1.3)
    assert result["xfast_torch"]["round_vs_loop"] == pytest.approx([1.3] * 8)
    assert result["xfast_zero0"]["deepspeed_ms_per_step"] == pytest.approx(1.0)
    assert result["xfast"]["deepspeed_ms_per_step"] == pytest.approx(4.0)
    # ZeRO-2's ratio in round i is 1.3 t_i / (t_i + 4 ms): it grows as the machine slows
    expected = statistics.median(1.3 * t / (t + 0.004) for t in _times()["xfast_torch"])
    assert result["xfast"]["vs_loop"] == pytest.approx(expected)
    low, high = result["xfast"]["vs_loop_ci95"]
    assert low <= result["xfast"]["vs_loop"] <= high
    assert result["ms_per_step"]["transformers"] == pytest.approx(1e3 * statistics.median(_times()["transformers"]))


def test_without_the_loop_the_result_is_the_deepspeed_cost_only():
    times = _times()
    del times["transformers"]
    result = bench_train.paired_result(times, world=2, compiled=False)
    assert "xfast_torch" not in result
    assert "vs_loop" not in result["xfast"] and "transformers" not in result["ms_per_step"]


def _row(paired: dict) -> dict:
    method = {"samples_per_s": 1000.0, "ms_per_step": 32.0, "data_wait_share": 0.04, "compiled": True}
    return {"size": "tiny_clip", "batch": 32, "xfast": dict(method), "xfast_torch": dict(method),
            "transformers": dict(method), "deepspeed_cost": {"1": paired}}


def test_tables_show_the_paired_ratios_and_read_older_results():
    now = bench_train.table([_row(bench_train.paired_result(_times(), world=1, compiled=True))], "h")
    line = next(l for l in now.splitlines() if l.startswith("| tiny_clip (batch 32) | 1, compiled towers"))
    # torch exactly 1.3 in every round; ZeRO-0 1.3 t / (t + 1 ms), median 1.268 between rounds 4 and 5
    assert "| 52.0 | 1.30x [1.30, 1.30] / 1.27x" in line
    # the throughput table's xfast_torch row has no DeepSpeed cost even though the paired result
    # now holds its ratio to the loop
    torch_row = next(l for l in now.splitlines() if "| xfast_torch (compiled towers) |" in l)
    assert torch_row.split("|")[7].strip() == ""
    times = _times()
    del times["transformers"]
    before = bench_train.table([_row(bench_train.paired_result(times, world=1, compiled=True))], "h")
    line = next(l for l in before.splitlines() if l.startswith("| tiny_clip (batch 32) | 1, compiled towers"))
    assert line.endswith("|  |  |")


def test_the_committed_results_still_render():
    rows = json.loads((BENCH / "results" / "train.json").read_text())["rows"]
    text = bench_train.table(rows, bench_train.HEADER)
    assert "| tiny_clip (batch 32) | 1, compiled towers |" in text
