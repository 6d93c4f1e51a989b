"""Compile xfast's Triton kernels for real GPUs without one, and report what ptxas made of them.

Run without TRITON_INTERPRET (tests/test_triton_similarity_lse.py does, in a subprocess):

    python tests/triton_compile_report.py [--arch 80 90] [--dtype bf16 fp32 ...] [--d 128 512 1024]
    python tests/triton_compile_report.py --arch 90 --case bf16:512 fp64:128   # chosen pairs only

Every kernel variant the wrappers launch for full tiles (sizes divisible by the blocks, as in
training) is compiled with the specialisation Triton's JIT applies to such arguments: 16-byte
aligned pointers, integer sizes and row strides divisible by 16, unit d-strides as constants.
Triton's own ptxas run (-v) reports registers, spill and stack bytes.
Prints one JSON object per kernel: arch, dtype, d, kernel, registers, spill bytes, shared
memory, and the tensor-core instructions found in the PTX (mma.sync / wgmma).
"""
import argparse
import contextlib
import io
import json
import os
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from xfast.kernels import triton_similarity_lse as K  # noqa: E402

assert not K._INTERPRETED, "unset TRITON_INTERPRET: this compiles for real GPUs"
PTR = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32, "fp32": torch.float32,
          "fp64": torch.float64}
# Integer arguments that are multiples of 16 when every size is (the JIT marks them so).
DIVISIBLE = {"N", "M", "D", "stride_xn", "stride_yn", "stride_dxn", "stride_dyg", "stride_dyn"}
UNIT = {"stride_xd", "stride_yd"}


def build(fn, pointers, constants, num_warps, num_stages, arch):
    """(compiled kernel, ptxas -v log): the log is the one of Triton's own ptxas run, flags included."""
    sig = {name: "i32" for name in fn.arg_names}
    sig.update(pointers)
    constants = dict(constants, **{name: 1 for name in UNIT})
    sig.update({name: "constexpr" for name in constants})
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in sig.items()
             if ty.startswith("*") or name in DIVISIBLE}
    log = io.StringIO()
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, sig, constants, attrs), target=GPUTarget("cuda", arch, 32),
                                      options=dict(num_warps=num_warps, num_stages=num_stages))
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    return compiled, log.getvalue()


def ptxas_usage(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    stack = re.search(r"(\d+) bytes stack frame", log)
    assert regs, f"no ptxas -v report in: {log[-2000:]}"
    return {"registers": int(regs.group(1)), "spill_bytes": sum(spills), "stack_bytes": int(stack.group(1)) if stack else 0}


def dot_lowering(ttgir: str) -> dict:
    """How many tt.dot ops became tensor-core MMAs (wgmma, or mma.sync's #mma layout) and how
    many were left on the FMA units (a #blocked result layout)."""
    mma = fma = 0
    for line in ttgir.splitlines():
        if "ttng.warp_group_dot " in line:
            mma += 1
        elif re.search(r"\btt\.dot ", line):
            result = line.rsplit("->", 1)[-1]
            mma += "#mma" in result
            fma += "#blocked" in result
    return {"mma_dots": mma, "fma_dots": fma}


def variants(dtype: torch.dtype, d: int, tf32: bool, arch: int = 90):
    torch.backends.cuda.matmul.allow_tf32 = tf32  # _dot_precision reads torch's float32 precision
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    b = K.blocks_for(dtype, d, (arch // 10, arch % 10))
    common = dict(HAS_BIAS=True, ACC=K._tl_dtype(acc), PRECISION=K._dot_precision(dtype), BF16_AS_FP32=False,
                  EVEN_N=True, EVEN_M=True, EVEN_K=True, INT64=False, MARGIN=K._MARGIN[acc], BLOCK_N=b.n,
                  BLOCK_M=b.m, BLOCK_K=b.k)
    fwd_ptrs = dict(x_ptr=PTR[dtype], y_ptr=PTR[dtype], scale_ptr=PTR[acc], bias_ptr=PTR[acc],
                    row_part_ptr=PTR[acc], col_part_ptr=PTR[acc])
    yield "forward", K._forward_kernel, fwd_ptrs, dict(common, WITH_COLS=True), b
    bwd_ptrs = dict(x_ptr=PTR[dtype], y_ptr=PTR[dtype], scale_ptr=PTR[acc], bias_ptr=PTR[acc], row_lse_ptr=PTR[acc],
                    col_lse_ptr=PTR[acc], g_row_ptr=PTR[acc], g_col_ptr=PTR[acc], dx_ptr=PTR[acc], dy_ptr=PTR[dtype],
                    dscale_part_ptr=PTR[acc], turn_ptr="*i32")
    yield "backward", K._backward_kernel, bwd_ptrs, dict(common, HAS_ROW=True, HAS_COL=True, EVEN_DV=True,
                                                         BLOCK_DV=b.dv, BLOCK_DX=b.dx), b


def case(text: str) -> tuple[str, int]:
    name, _, d = text.partition(":")
    if name not in DTYPES or not d.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: expected DTYPE:D with DTYPE one of {', '.join(DTYPES)}")
    return name, int(d)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    parser.add_argument("--dtype", nargs="+", default=list(DTYPES), choices=list(DTYPES),
                        help="input dtypes; tf32 is float32 with TF32 dots allowed (default: all)")
    parser.add_argument("--d", type=int, nargs="+", default=[128, 512, 1024], help="embedding sizes")
    parser.add_argument("--case", nargs="+", type=case, metavar="DTYPE:D",
                        help="(dtype, d) pairs to compile instead of every --dtype x --d combination")
    args = parser.parse_args(argv)
    cases = args.case or [(name, d) for name in args.dtype for d in args.d]
    for arch in args.arch:
        for name, d in cases:
            for kernel_name, fn, ptrs, consts, b in variants(DTYPES[name], d, tf32=name == "tf32", arch=arch):
                compiled, log = build(fn, ptrs, consts, b.num_warps, b.num_stages, arch)
                ptx = compiled.asm["ptx"]
                report = dict(arch=arch, dtype=name, d=d, kernel=kernel_name, blocks=vars(b),
                              shared=compiled.metadata.shared, mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                              wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), **dot_lowering(compiled.asm["ttgir"]),
                              **ptxas_usage(log))
                print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
