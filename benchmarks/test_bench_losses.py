"""pytest-benchmark view of the loss benchmark (N = 2048, d = 512).

    .venv/bin/python -m pytest benchmarks/test_bench_losses.py --benchmark-columns=mean,stddev,rounds

Compare the groups side by side: fused xfast vs the materialising reference vs the tiled
compute floor (the kernel's four GEMMs per tile into one reused cache-resident tile).
bench_losses.py has the full table with GFLOP/s and memory.
"""
import pytest
import torch

import xfast
from xfast.kernels.cpu_similarity_lse import tile_gemm_floor

N, D = 2048, 512


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).requires_grad_()
    y = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).requires_grad_()
    hn = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=-1).requires_grad_()
    return x, y, hn, torch.tensor(1 / 0.07, requires_grad=True)


def tiled_floor(x, cols):
    tile_gemm_floor(x.detach(), cols.detach(), 4)


@pytest.mark.benchmark(group="clip_loss fwd+bwd N=2048 d=512")
@pytest.mark.parametrize("method", ["xfast", "reference", "floor"])
def test_clip_loss(benchmark, inputs, method):
    x, y, _, s = inputs
    if method == "floor":
        benchmark(tiled_floor, x, y)
        return
    backend = "cpu" if method == "xfast" else "reference"
    benchmark(lambda: xfast.clip_loss(x, y, s, backend=backend).backward())


@pytest.mark.benchmark(group="simcse_loss (hard negatives) fwd+bwd N=2048 d=512")
@pytest.mark.parametrize("method", ["xfast", "reference", "floor"])
def test_simcse_loss(benchmark, inputs, method):
    x, y, hn, _ = inputs
    if method == "floor":
        cols = torch.cat([y, hn]).detach()
        benchmark(tiled_floor, x, cols)
        return
    backend = "cpu" if method == "xfast" else "reference"
    benchmark(lambda: xfast.simcse_loss(x, y, hn, hard_negative_weight=1.0, backend=backend).backward())
