"""Build hook for the native CPU kernels in csrc/ (metadata lives in setup.cfg)."""
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

setup(
    ext_modules=[
        CppExtension(
            "xfast._C",
            ["csrc/similarity_lse.cpp", "csrc/similarity_lse_tiles.cpp"],
            depends=["csrc/similarity_lse_tiles.h"],
            # -fno-trapping-math (as PyTorch's own build): without it gcc leaves the exp loops
            # of the AVX2 and baseline tile kernels scalar; see csrc/similarity_lse_tiles.cpp.
            extra_compile_args=["-O3", "-fopenmp", "-fno-trapping-math"],
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
