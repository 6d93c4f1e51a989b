#!/usr/bin/env bash
# The GPU benchmark of xfast's Triton losses: correctness on the device, then fwd+bwd time and
# memory next to Inf-CL, open_clip and the cuBLAS 4-GEMM floor (see bench_gpu.py's docstring).
#
#   benchmarks/gpu/run.sh RESULTS_DIR             # on the GPU machine (< 8 min on an H100/H200)
#   benchmarks/gpu/run.sh RESULTS_DIR --dry-run   # here: CPU, Triton interpreter, toy sizes
#   benchmarks/gpu/run.sh --fetch-peers           # here (needs PyPI): wheels into .gpu_carry/
#
# It runs the machine's own python3 (override with PYTHON=...), with the repository on
# PYTHONPATH: no install, no C++ extension, no network. Peers travel in .gpu_carry/ (ignored
# by git; pass it with the device tool's carry): Inf-CL's wheel is unpacked there, and
# open_clip's loss.py is taken out of the open-clip-torch wheel. A missing peer is skipped
# with its reason in the table.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
CARRY=.gpu_carry

if [ "${1:-}" = "--fetch-peers" ]; then
    mkdir -p "$CARRY"
    "$PY" -m pip download --no-deps --dest "$CARRY" inf-cl open-clip-torch
    exit 0
fi
if [ $# -lt 1 ]; then
    echo "usage: $0 RESULTS_DIR [--dry-run] [bench_gpu.py options] | $0 --fetch-peers" >&2
    exit 2
fi

# Unpack the carried peers once (pure-Python wheels are zip files).
"$PY" - "$CARRY" <<'PYEOF'
import glob, os, sys, zipfile
carry = sys.argv[1]
for wheel in sorted(glob.glob(os.path.join(carry, "inf_cl-*.whl")))[-1:]:
    if not os.path.isdir(os.path.join(carry, "site", "inf_cl")):
        zipfile.ZipFile(wheel).extractall(os.path.join(carry, "site"))
for wheel in sorted(glob.glob(os.path.join(carry, "open_clip_torch-*.whl")))[-1:]:
    target = os.path.join(carry, "open_clip_loss.py")
    if not os.path.isfile(target):
        with zipfile.ZipFile(wheel) as z, open(target, "wb") as f:
            f.write(z.read("open_clip/loss.py"))
PYEOF

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu/bench_gpu.py "$@"
