// Element-wise work on one tile of Z = scale * X Y^T + B for the similarity-logsumexp kernel.
//
// The GEMMs live in similarity_lse.cpp (ATen/MKL); this file's code only sees a rows x cols
// tile in cache. It is compiled once per instruction set (x86: AVX-512, AVX2+FMA and the
// baseline) and the best variant the CPU supports is chosen when the extension loads, by
// CPU feature (not vendor), so AMD and Intel machines get the same code path.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

namespace xfast {

template <typename T>
struct TileKernels {
  // z: a rows x cols tile of Z without its bias (scale * X Y^T, as the GEMM wrote it), given
  // diag_bias at (r, diag_col0 + r) in place and folded into the running row (row_m, row_l)
  // and column (col_m, col_l) logsumexp accumulators: (m, l) stands for m + log(l), l == 0
  // for an empty sum. col_m == nullptr skips the columns. scratch: 2 * cols + rows values.
  void (*forward)(T* z, int64_t rows, int64_t cols, T diag_bias, int64_t diag_col0, T* row_m, T* row_l, T* col_m,
                  T* col_l, T* scratch);
  // z: the same tile of Z without its bias, bitwise as the forward saw it (the same GEMM call),
  // overwritten in place with D = dL/dZ = g_row * exp(Z - row_lse) + g_col * exp(Z - col_lse);
  // either term may be absent (nullptr). Returns sum(D * (Z - B)), which is scale times the
  // tile's share of dL/dscale. scratch: cols values.
  T (*backward)(T* z, int64_t rows, int64_t cols, T diag_bias, int64_t diag_col0, const T* row_lse, const T* col_lse,
                const T* g_row, const T* g_col, T* scratch);
  // v[i] = exp(v[i]) for n values <= 0: the exp the tile loops use (its error bound is tested).
  void (*exp)(T* v, int64_t n);
};

// Folds (m_new, l_new) into the running logsumexp accumulator (m, l) = m + log(l).
template <typename T>
inline void merge_lse(T& m, T& l, T m_new, T l_new) {
  if (l_new == T(0)) return;
  if (l == T(0)) { m = m_new; l = l_new; return; }
  if (m_new > m) { l = l * std::exp(m - m_new) + l_new; m = m_new; }
  else { l = l + l_new * std::exp(m_new - m); }
}

// The variant in use: "avx512", "avx2_fma" or "baseline" (float32; float64 is always baseline).
const char* tile_isa();
// Variants this CPU can run, best first.
std::vector<std::string> supported_tile_isas();
// Switches the variant (tests run every supported one); throws std::invalid_argument otherwise.
void select_tile_isa(const std::string& isa);

template <typename T>
const TileKernels<T>& tile_kernels();

}  // namespace xfast
