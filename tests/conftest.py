import os

# Triton kernels run on CPU tensors in the interpreter; this must be set before any module
# defining @triton.jit functions is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
